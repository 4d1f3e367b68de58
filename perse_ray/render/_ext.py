"""Builds and loads the compiled CPU rasterizer (csrc/rasterize_cpu.cpp).

The build itself (cache under ``${PERSE_RAY_CACHE:-~/.cache/perse_ray}``, keyed by
source, flags and versions; a file lock against concurrent builds) is shared with
the other kernels: see perse_ray/cpp_ext.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .. import cpp_ext
from ..cpp_ext import CFLAGS, LDFLAGS, cache_root, cpu_supports_avx2  # noqa: F401  (public names)

SOURCE = Path(__file__).with_name("csrc") / "rasterize_cpu.cpp"


@functools.lru_cache(maxsize=None)
def load():
    """Return the compiled module, building it if needed."""
    if not cpu_supports_avx2():
        raise RuntimeError(
            "perse_ray.render: the 'cpu' backend needs a CPU with AVX2 and FMA; "
            "use backend='torch' on this machine"
        )
    return cpp_ext.load_extension("perse_ray_render", SOURCE)  # RuntimeError with the compiler output
