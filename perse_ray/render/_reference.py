"""Pure-PyTorch reference rasterizer (backend="torch").

Readable and exact rather than fast: gradients come from autograd. It follows
the same rules as gsplat 1.5.3 (see `project` and `composite_image`) and the
compiled CPU kernel, and is used to cross-check both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TILE_SIZE = 16
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
TRANSMITTANCE_MIN = 1e-4
EXTEND_MAX = 3.33


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """[..., 4] quaternions (w, x, y, z), normalised here -> [..., 3, 3]."""
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).unflatten(-1, (3, 3))


def project(
    means: Tensor,  # [B, N, 3]
    quats: Tensor,  # [B, N, 4]
    scales: Tensor,  # [B, N, 3]
    opacities: Tensor,  # [B, N]
    viewmats: Tensor,  # [B, C, 4, 4]
    Ks: Tensor,  # [B, C, 3, 3]
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
    eps2d: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EWA projection of gsplat 1.5.3 (ProjectionEWA3DGSFused.cu, persp_proj).

    Returns radii [B, C, N, 2] int32 (0 = culled), means2d [B, C, N, 2],
    depths [B, C, N], conics [B, C, N, 3]; culled entries are zero.
    """
    R = quat_to_rotmat(quats)
    M = R * scales[..., None, :]
    covars = M @ M.transpose(-1, -2)  # [B, N, 3, 3]

    W = viewmats[..., :3, :3]  # [B, C, 3, 3]
    t = viewmats[..., :3, 3]
    means_c = torch.einsum("bcij,bnj->bcni", W, means) + t[:, :, None, :]
    covars_c = W[:, :, None] @ covars[:, None] @ W[:, :, None].transpose(-1, -2)

    x, y, z = means_c.unbind(-1)
    in_depth = (z >= near_plane) & (z <= far_plane)
    z = torch.where(in_depth, z, torch.ones_like(z))  # keeps culled entries finite

    fx, fy = Ks[..., 0, 0, None], Ks[..., 1, 1, None]
    cx, cy = Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    # Jacobian at x/z, y/z clamped to 30% beyond the image borders.
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    tx = z * torch.clamp(x / z, min=-(cx / fx + 0.3 * tan_fovx), max=(width - cx) / fx + 0.3 * tan_fovx)
    ty = z * torch.clamp(y / z, min=-(cy / fy + 0.3 * tan_fovy), max=(height - cy) / fy + 0.3 * tan_fovy)
    zeros = torch.zeros_like(z)
    J = torch.stack(
        [fx / z, zeros, -fx * tx / z**2, zeros, fy / z, -fy * ty / z**2], dim=-1
    ).unflatten(-1, (2, 3))
    cov2d = J @ covars_c @ J.transpose(-1, -2)
    a = cov2d[..., 0, 0] + eps2d
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + eps2d
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)

    det = a * c - b * b
    positive = det > 0
    det = torch.where(positive, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)

    # Opacity-aware box: beyond extend * sigma on an axis, alpha < 1/255.
    with torch.no_grad():
        op = opacities[:, None, :].expand_as(z)
        bright = op >= ALPHA_MIN
        extend = torch.sqrt(2 * torch.log(op.clamp(min=ALPHA_MIN) / ALPHA_MIN)).clamp(max=EXTEND_MAX)
        rx = torch.ceil(extend * torch.sqrt(a.clamp(min=0)))
        ry = torch.ceil(extend * torch.sqrt(c.clamp(min=0)))
        mx, my = means2d.unbind(-1)
        on_screen = (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        keep = in_depth & positive & bright & ((rx > 0) | (ry > 0)) & on_screen
        radii = torch.stack([rx, ry], dim=-1).clamp(max=2**30).where(keep[..., None], 0).to(torch.int32)

    kf = keep[..., None].to(means2d.dtype)
    return radii, means2d * kf, means_c[..., 2] * keep, conics * kf


def tile_ranges(means2d: Tensor, radii: Tensor, tiles_x: int, tiles_y: int) -> Tensor:
    """Tiles [x0, x1) x [y0, y1) touched by each radius box (IntersectTile.cu)."""
    centre = means2d / TILE_SIZE
    r = radii.to(means2d.dtype) / TILE_SIZE
    lo = torch.floor(centre - r)
    hi = torch.ceil(centre + r)
    limit = torch.tensor([tiles_x, tiles_y], dtype=means2d.dtype)
    lo = torch.minimum(lo.clamp(min=0), limit)
    hi = torch.minimum(hi.clamp(min=0), limit)
    return torch.cat([lo, hi], dim=-1).long()  # [N, 4]: x0, y0, x1, y1


def composite_image(
    means2d: Tensor,  # [N, 2]
    conics: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D]
    radii: Tensor,  # [N, 2]
    depths: Tensor,  # [N]
    background: Tensor | None,  # [D]
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """Front-to-back compositing of one image, tile by tile as gsplat does.

    A tile sees the Gaussians whose radius box touches it, in depth order. Per
    pixel: sigma = 0.5 (a dx^2 + c dy^2) + b dx dy with dx = mean - (x + 0.5),
    alpha = min(0.999, o exp(-sigma)); skip sigma < 0 or alpha < 1/255; stop
    before the Gaussian that would bring T to <= 1e-4.
    Returns colors [H, W, D] and alphas [H, W, 1].
    """
    D = colors.shape[-1]
    tiles_x, tiles_y = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
    visible = (radii > 0).all(dim=-1).nonzero()[:, 0]
    visible = visible[torch.sort(depths[visible], stable=True).indices]
    ranges = tile_ranges(means2d[visible], radii[visible], tiles_x, tiles_y)

    pixel_ids, tile_colors, tile_trans = [], [], []
    for ty in range(tiles_y):
        for tx in range(tiles_x):
            ys = torch.arange(ty * TILE_SIZE, min((ty + 1) * TILE_SIZE, height))
            xs = torch.arange(tx * TILE_SIZE, min((tx + 1) * TILE_SIZE, width))
            py, px = torch.meshgrid(ys, xs, indexing="ij")
            pixel_ids.append((py * width + px).flatten())
            hit = (ranges[:, 0] <= tx) & (tx < ranges[:, 2]) & (ranges[:, 1] <= ty) & (ty < ranges[:, 3])
            ids = visible[hit]
            if len(ids) == 0:
                tile_colors.append(colors.new_zeros(px.numel(), D))
                tile_trans.append(colors.new_ones(px.numel()))
                continue
            centres = torch.stack([px.flatten(), py.flatten()], dim=-1).to(means2d.dtype) + 0.5
            d = means2d[ids][None] - centres[:, None]  # [P, L, 2]
            dx, dy = d.unbind(-1)
            a, b, c = conics[ids].unbind(-1)
            sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
            alpha = torch.clamp(opacities[ids] * torch.exp(-sigma), max=ALPHA_MAX)
            alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, 0.0)
            # T only decreases, so "stop at the first Gaussian that would bring
            # T to <= 1e-4" keeps exactly the Gaussians whose running product
            # stays above the threshold.
            with torch.no_grad():
                kept = torch.cumprod(1 - alpha, dim=-1) > TRANSMITTANCE_MIN
            alpha = torch.where(kept, alpha, 0.0)
            trans_after = torch.cumprod(1 - alpha, dim=-1)
            trans_before = torch.cat([torch.ones_like(trans_after[:, :1]), trans_after[:, :-1]], dim=-1)
            tile_colors.append((alpha * trans_before) @ colors[ids])
            tile_trans.append(trans_after[:, -1])

    inverse = torch.argsort(torch.cat(pixel_ids))
    color = torch.cat(tile_colors)[inverse]
    trans = torch.cat(tile_trans)[inverse][:, None]
    if background is not None:
        color = color + trans * background
    return color.reshape(height, width, D), (1 - trans).reshape(height, width, 1)


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
    """Returns colors [B,C,H,W,D], alphas [B,C,H,W,1], radii, means2d, depths, conics."""
    radii, means2d, depths, conics = project(
        means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d
    )
    B, C = viewmats.shape[:2]
    images, alphas = [], []
    for b in range(B):
        for c in range(C):
            img, alpha = composite_image(
                means2d[b, c], conics[b, c], opacities[b], colors[b, c if colors.shape[1] > 1 else 0],
                radii[b, c], depths[b, c], None if backgrounds is None else backgrounds[b, c],
                width, height,
            )
            images.append(img)
            alphas.append(alpha)
    shape = (B, C, height, width)
    return (
        torch.stack(images).reshape(*shape, -1),
        torch.stack(alphas).reshape(*shape, 1),
        radii,
        means2d.detach(),
        depths.detach(),
        conics.detach(),
    )
