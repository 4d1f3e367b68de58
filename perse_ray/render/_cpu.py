"""backend="cpu": autograd wrapper around the compiled kernel (see _ext.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext


class _RasterizeCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, colors, viewmats, Ks, backgrounds,
                width, height, near_plane, far_plane, eps2d):
        ext = _ext.load()
        bg = backgrounds if backgrounds is not None else means.new_empty(0)
        (color, alpha, radii, means2d, depths, conics, aux, trans, last, tile_offsets,
         flatten_ids) = ext.rasterize_forward(
            means, quats, scales, opacities, colors, viewmats, Ks, bg,
            width, height, near_plane, far_plane, eps2d, torch.get_num_threads(),
        )
        ctx.save_for_backward(means, quats, scales, opacities, colors, viewmats, Ks, bg, radii,
                              means2d, conics, aux, trans, last, tile_offsets, flatten_ids)
        ctx.config = (width, height, near_plane, far_plane, eps2d)
        ctx.mark_non_differentiable(radii, means2d, depths, conics)
        return color, alpha, radii, means2d, depths, conics

    @staticmethod
    def backward(ctx, v_color, v_alpha, *_):
        (means, quats, scales, opacities, colors, viewmats, Ks, bg, radii, means2d, conics, aux,
         trans, last, tile_offsets, flatten_ids) = ctx.saved_tensors
        B, C = viewmats.shape[:2]
        H, W = trans.shape[-2:]
        if v_color is None:
            v_color = means.new_zeros(B, C, H, W, colors.shape[-1])
        if v_alpha is None:
            v_alpha = means.new_zeros(B, C, H, W, 1)
        v_color, v_alpha = v_color.contiguous(), v_alpha.contiguous()
        v_means, v_quats, v_scales, v_opac, v_colors, v_viewmats = _ext.load().rasterize_backward(
            means, quats, scales, opacities, colors, viewmats, Ks, bg, *ctx.config,
            radii, means2d, conics, aux, trans, last, tile_offsets, flatten_ids,
            v_color, v_alpha, torch.get_num_threads(),
        )
        need = ctx.needs_input_grad
        v_bg = (v_color * trans[..., None]).sum(dim=(-3, -2)) if need[7] else None
        grads = (v_means, v_quats, v_scales, v_opac, v_colors, v_viewmats)
        return (*(g if n else None for g, n in zip(grads, need)), None, v_bg,
                None, None, None, None, None)


def rasterize(
    means: Tensor,  # [B, N, 3]
    quats: Tensor,  # [B, N, 4]
    scales: Tensor,  # [B, N, 3]
    opacities: Tensor,  # [B, N]
    colors: Tensor,  # [B, 1 or C, N, D]
    viewmats: Tensor,  # [B, C, 4, 4]
    Ks: Tensor,  # [B, C, 3, 3]
    backgrounds: Tensor | None,  # [B, C, D]
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
    eps2d: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns colors [B,C,H,W,D], alphas [B,C,H,W,1], radii, means2d, depths, conics.

    Differentiable w.r.t. means, quats, scales, opacities, colors, viewmats and
    backgrounds (not Ks, as in gsplat).
    """
    tensors = [t.contiguous() for t in (means, quats, scales, opacities, colors, viewmats, Ks)]
    bg = backgrounds.contiguous() if backgrounds is not None else None
    return _RasterizeCPU.apply(*tensors, bg, int(width), int(height),
                               float(near_plane), float(far_plane), float(eps2d))
