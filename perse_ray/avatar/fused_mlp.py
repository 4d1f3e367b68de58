"""Fused CPU kernel for the core of the decoder's per-branch MLP (csrc/branch_mlp_cpu.cpp).

``silu_mlp(g, zp, w, b)`` equals ``silu(g[None] + zp[:, None]) @ w + b``
(g [n, H], zp [U, H], w [H, C], b [C] -> [U, n, C]) without the [U, n, H]
intermediates torch keeps for its backward: the kernel recomputes them, and its
forward and backward each make one pass over the Gaussians. float32 runs on
AVX2/FMA; float64 (for gradcheck) takes the kernel's scalar path. Call
``available()`` first: the kernel needs an AVX2 CPU and a C++ compiler.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import cpp_ext

SOURCE = Path(__file__).with_name("csrc") / "branch_mlp_cpu.cpp"
KERNEL = cpp_ext.OptionalKernel("perse_ray_branch_mlp", SOURCE)
_ext = KERNEL.module
available = KERNEL.available  # an AVX2 CPU and the extension built (builds it once)


class _SiluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, zp, w, b):
        g, zp, w, b = (t.contiguous() for t in (g, zp, w, b))
        ctx.save_for_backward(g, zp, w)
        return _ext().silu_mlp_forward(g, zp, w, b, torch.get_num_threads())

    @staticmethod
    @once_differentiable  # the backward is compiled: no double backward
    def backward(ctx, grad_out):
        g, zp, w = ctx.saved_tensors
        need_g, need_zp, need_w, need_b = ctx.needs_input_grad
        # grad_out is often an expanded (stride-0) tensor, e.g. from .sum()
        return tuple(_ext().silu_mlp_backward(g, zp, w, grad_out.contiguous(), need_g, need_zp,
                                              need_w, need_b, torch.get_num_threads()))


def silu_mlp(g: Tensor, zp: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """silu(g[None] + zp[:, None]) @ w + b: g [n, H], zp [U, H], w [H, C], b [C] -> [U, n, C].

    CPU tensors of one dtype, float32 or float64. Every (u, i) row is computed the same way
    whatever the other rows are, and results are deterministic (also across thread counts).
    """
    if not all(t.dtype == g.dtype for t in (zp, w, b)) or g.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"silu_mlp: expected float32 or float64 tensors of one dtype, got "
                        f"{g.dtype}, {zp.dtype}, {w.dtype}, {b.dtype}")
    return _SiluMLP.apply(g, zp, w, b)
