"""Differentiable Gaussian-splatting renderer with gsplat 1.5.3 semantics.

`rasterize` dispatches to gsplat on CUDA, to an exact compiled CPU kernel
(AVX2 + OpenMP) or to a pure-PyTorch reference; all three produce the same
images up to float rounding.
"""

from ._api import BACKENDS, rasterize

__all__ = ["BACKENDS", "rasterize"]
