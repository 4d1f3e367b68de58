"""`rasterize`: one entry point for every Gaussian-splatting backend."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from . import _cpu, _reference

BACKENDS = ("auto", "cpu", "torch", "gsplat")


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    backgrounds: Tensor | None = None,
    packed: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render 3D Gaussians with the conventions of ``gsplat.rasterization`` 1.5.3.

    Classic (non-antialiased) 3DGS with a pinhole camera and post-activation
    colors (no spherical harmonics).

    Args:
        means: [..., N, 3] world-space centers.
        quats: [..., N, 4] rotations (w, x, y, z); normalised internally.
        scales: [..., N, 3] activated scales.
        opacities: [..., N] activated opacities.
        colors: [..., N, D] or [..., C, N, D] per-Gaussian features, any D.
        viewmats: [..., C, 4, 4] world-to-camera matrices.
        Ks: [..., C, 3, 3] intrinsics.
        width, height: image size in pixels.
        near_plane, far_plane: depth range; Gaussians outside are culled.
        eps2d: blur added to the diagonal of every 2D covariance.
        backgrounds: [..., C, D] colors behind the Gaussians, or None (black).
        packed: gsplat's memory layout switch; only forwarded to gsplat, the
            CPU backends compute the same images either way.
        backend: "gsplat" (CUDA tensors only), "cpu" (compiled AVX2/OpenMP
            kernel), "torch" (pure-PyTorch reference, slow) or "auto" (gsplat
            for CUDA tensors, else cpu).

    Returns:
        render_colors [..., C, H, W, D], render_alphas [..., C, H, W, 1], and a
        meta dict with radii [..., C, N, 2] (int32, 0 = culled), means2d
        [..., C, N, 2], depths [..., C, N], conics [..., C, N, 3], opacities
        [..., C, N], width, height, tile_size and backend. On the CPU backends
        the meta tensors carry no gradient.

    Gradients flow to means, quats, scales, opacities, colors, viewmats and
    backgrounds; Ks gets none (as in gsplat).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    batch_dims, N, C, D = _check_inputs(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds
    )
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "cpu"
    if backend == "gsplat":
        return _rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
            backgrounds=backgrounds, packed=packed,
        )
    if means.device.type != "cpu":
        raise ValueError(f"backend {backend!r} needs CPU tensors, got {means.device}")

    B = math.prod(batch_dims)
    per_camera_colors = colors.dim() == len(batch_dims) + 3
    flat = (
        means.reshape(B, N, 3),
        quats.reshape(B, N, 4),
        scales.reshape(B, N, 3),
        opacities.reshape(B, N),
        colors.reshape(B, C if per_camera_colors else 1, N, D),
        viewmats.reshape(B, C, 4, 4),
        Ks.reshape(B, C, 3, 3),
        None if backgrounds is None else backgrounds.reshape(B, C, D),
    )
    impl = _cpu.rasterize if backend == "cpu" else _reference.rasterize
    width, height = int(width), int(height)
    color, alpha, radii, means2d, depths, conics = impl(
        *flat, width, height, float(near_plane), float(far_plane), float(eps2d)
    )

    lead = batch_dims + (C,)
    meta = {
        "radii": radii.reshape(*lead, N, 2),
        "means2d": means2d.reshape(*lead, N, 2),
        "depths": depths.reshape(*lead, N),
        "conics": conics.reshape(*lead, N, 3),
        "opacities": torch.broadcast_to(opacities.detach()[..., None, :], (*lead, N)),
        "width": width,
        "height": height,
        "tile_size": _reference.TILE_SIZE,
        "backend": backend,
    }
    return color.reshape(*lead, height, width, D), alpha.reshape(*lead, height, width, 1), meta


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *,
                      near_plane, far_plane, eps2d, backgrounds, packed):
    if not means.is_cuda:
        raise ValueError(
            "backend 'gsplat' needs CUDA tensors; use backend='cpu' (or 'auto') for CPU tensors"
        )
    import gsplat

    color, alpha, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, backgrounds=backgrounds,
        packed=packed, sh_degree=None, rasterize_mode="classic", render_mode="RGB",
    )
    meta["backend"] = "gsplat"
    return color, alpha, meta


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                  backgrounds) -> tuple[tuple[int, ...], int, int, int]:
    named = {"means": means, "quats": quats, "scales": scales, "opacities": opacities,
             "colors": colors, "viewmats": viewmats, "Ks": Ks}
    if backgrounds is not None:
        named["backgrounds"] = backgrounds
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        if t.dtype != means.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but means has {means.dtype}")
        if t.device != means.device:
            raise ValueError(f"{name} is on {t.device} but means is on {means.device}")
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")

    if means.dim() < 2 or means.shape[-1] != 3:
        raise ValueError(f"means must have shape [..., N, 3], got {tuple(means.shape)}")
    batch = tuple(means.shape[:-2])
    N = means.shape[-2]

    def expect(name: str, t: Tensor, shape: tuple[int, ...], text: str) -> None:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {text} = {shape}, got {tuple(t.shape)}")

    expect("quats", quats, batch + (N, 4), "[..., N, 4]")
    expect("scales", scales, batch + (N, 3), "[..., N, 3]")
    expect("opacities", opacities, batch + (N,), "[..., N]")
    if viewmats.dim() != len(batch) + 3 or viewmats.shape[-2:] != (4, 4) or viewmats.shape[:-3] != batch:
        raise ValueError(
            f"viewmats must have shape [..., C, 4, 4] with batch dims {batch}, got {tuple(viewmats.shape)}"
        )
    C = viewmats.shape[-3]
    if C == 0:
        raise ValueError("viewmats holds no camera")
    expect("Ks", Ks, batch + (C, 3, 3), "[..., C, 3, 3]")
    if colors.dim() == len(batch) + 2 and colors.shape[:-1] == batch + (N,):
        D = colors.shape[-1]
    elif colors.dim() == len(batch) + 3 and colors.shape[:-1] == batch + (C, N):
        D = colors.shape[-1]
    else:
        raise ValueError(
            f"colors must have shape [..., N, D] or [..., C, N, D] with batch dims {batch}, "
            f"N={N}, C={C}; got {tuple(colors.shape)}"
        )
    if D == 0:
        raise ValueError("colors has no channel")
    if backgrounds is not None:
        expect("backgrounds", backgrounds, batch + (C, D), "[..., C, D]")
    return batch, N, C, D
