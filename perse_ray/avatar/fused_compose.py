"""Fused CPU kernel for the union/owned composition of the decoder's parts (csrc/compose_cpu.cpp).

``compose_parts`` computes what ``AvatarModel.gaussians`` does with the expression part and the
attribute parts under ``attribute_composition`` "union" or "owned" at ``color_dominance`` 0 (the
union opacity, the owned shares, the parts' geometry deltas added and the colour), forward and
backward, in one pass over the Gaussians each: torch's ops take ~300 small ones and a zero-filled
[B, N, 14] copy per channel slice in the backward. Every (b, n) goes through the same operations in
torch's order of sums, so an attribute whose parts are exactly zero changes no bit of the result.
float32 is the decoder's; float64 is for gradcheck. Call ``available()`` first: the kernel needs a C++
compiler (and, built with the project's flags, an AVX2 CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import cpp_ext

SOURCE = Path(__file__).with_name("csrc") / "compose_cpu.cpp"
KERNEL = cpp_ext.OptionalKernel("perse_ray_compose", SOURCE)
_ext = KERNEL.module
available = KERNEL.available  # an AVX2 CPU and the extension built (builds it once)


class _ComposeParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, opacity_logits, color_logits, expression, attributes, owned, opacity_unit, color_unit):
        inputs = tuple(t.contiguous() for t in (opacity_logits, color_logits, expression, attributes))
        outputs = _ext().compose_forward(*inputs, owned, opacity_unit, color_unit, torch.get_num_threads())
        ctx.save_for_backward(*inputs, outputs[4])  # the colour: its sigmoid's derivative
        ctx.settings = (owned, opacity_unit, color_unit)
        return tuple(outputs)

    @staticmethod
    @once_differentiable  # the backward is compiled: no double backward
    def backward(ctx, *grads):
        *inputs, colour = ctx.saved_tensors
        # grads are often expanded (stride-0) tensors, e.g. from .sum()
        grads = [g.contiguous() for g in grads]
        return (*_ext().compose_backward(*inputs, colour, *ctx.settings, *grads, *ctx.needs_input_grad[:4],
                                         torch.get_num_threads()), None, None, None)


def compose_parts(opacity_logits: Tensor, color_logits: Tensor, expression: Tensor, attributes: Tensor,
                  owned: bool, opacity_unit: float, color_unit: float) -> tuple[Tensor, ...]:
    """The union ("owned": also the owned shares) composition at colour dominance 0.

    opacity_logits [N] and color_logits [N, 3] (canonical), expression [B, N, 14] and attributes
    [A, B, N, 14] (the decoder's parts, A may be 0) → (d_mean [B, N, 3], d_quat [B, N, 4],
    d_scale [B, N, 3], opacity [B, N], colour [B, N, 3]): the geometry deltas are in the decoder's
    units (before ``DELTA_UNITS``), opacity and colour activated. CPU tensors of one dtype, float32
    or float64; results are deterministic (also across thread counts).
    """
    tensors = (opacity_logits, color_logits, expression, attributes)
    if not all(t.dtype == expression.dtype for t in tensors) or expression.dtype not in (torch.float32,
                                                                                          torch.float64):
        raise TypeError("compose_parts: expected float32 or float64 tensors of one dtype, got "
                        + ", ".join(str(t.dtype) for t in tensors))
    return _ComposeParts.apply(opacity_logits, color_logits, expression, attributes, bool(owned),
                               float(opacity_unit), float(color_unit))
