"""Builds and loads the project's compiled CPU kernels (single C++ sources under */csrc/).

An extension is compiled on first use with torch.utils.cpp_extension into
``${PERSE_RAY_CACHE:-~/.cache/perse_ray}/torch_extensions/<hash>``, where the
hash covers the source, the compiler flags and the torch/Python versions, so a
build happens once per machine and configuration. A file lock serialises
concurrent builds (pytest-xdist, Ray workers).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def cache_root() -> Path:
    return Path(os.environ.get("PERSE_RAY_CACHE", "~/.cache/perse_ray")).expanduser()


def cpu_supports_avx2() -> bool:
    """True when the CPU has AVX2 and FMA, which the kernels are compiled for."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_key(source: Path) -> str:
    source = Path(source)
    h = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):  # what the source may include from its folder
        h.update(header.name.encode() + header.read_bytes())
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2], platform.machine())).encode())
    return h.hexdigest()[:16]


def _ensure_ninja_on_path() -> None:
    # torch's JIT build shells out to `ninja`; the pip wheel installs it next to
    # the interpreter, which is not on PATH when the venv is not activated.
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for d in candidates:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return


@functools.lru_cache(maxsize=None)
def load_extension(name: str, source: Path):
    """Return the module compiled from ``source`` (imported as ``<name>_<hash>``), building it if needed.

    Raises RuntimeError carrying the compiler output when the build fails. Callers check
    ``cpu_supports_avx2()`` first: the flags assume AVX2/FMA.
    """
    # importing cpp_extension on a CUDA build without a GPU logs a CUDA_HOME
    # warning that does not concern CPU builds
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load as torch_load
    finally:
        cpp_logger.setLevel(level)

    source = Path(source)
    key = build_key(source)
    build_dir = cache_root() / "torch_extensions" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    _ensure_ninja_on_path()
    with open(build_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return torch_load(
                name=f"{name}_{key}",
                sources=[str(source)],
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                build_directory=str(build_dir),
                verbose=False,
            )
        except Exception as e:  # the message carries the compiler output
            raise RuntimeError(f"perse_ray: building {source.name} failed:\n{e}") from e
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class OptionalKernel:
    """A kernel its caller runs where it builds and replaces with torch's ops elsewhere:
    ``available()`` builds it once per process (a failed build, ~10 s of compiler, is not tried again,
    and is logged once with the compiler's output) and ``module()`` returns it or raises the reason."""

    def __init__(self, name: str, source: Path):
        self.name, self.source = name, Path(source)

    @functools.cached_property
    def _loaded(self):
        if not cpu_supports_avx2():
            return None, RuntimeError(f"perse_ray: {self.source.name} needs a CPU with AVX2 and FMA")
        try:
            return load_extension(self.name, self.source), None
        except RuntimeError as e:  # carries the compiler output
            logging.getLogger(__name__).warning("%s; torch's ops run instead (slower, the same sums)", e)
            return None, e

    def available(self) -> bool:
        return self._loaded[1] is None

    def module(self):
        module, error = self._loaded
        if error is not None:
            raise RuntimeError(str(error))
        return module
