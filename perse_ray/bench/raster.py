"""A small z-buffer triangle rasterizer (torch, CPU): the mesh ground-truth head's renderer.

Independent of the Gaussian rasterizer on purpose: the mesh head is a ground truth the avatar's
own kind of model did not produce. Pixel centres sit at (j + 0.5, i + 0.5) in the camera's pixel
coordinates (the same convention as ``perse_ray.camera.intrinsics``). Every triangle is expanded
into the pixel centres of its bounding box; the nearest covering triangle per pixel wins through
one ``scatter_reduce`` on a key that packs the quantised depth above the triangle index (ties go
to the lower index). Barycentrics are perspective-correct. Anti-aliasing is the caller's:
render at ``s`` times the size and ``downsample`` by area.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_INDEX_BITS = 24  # triangle index bits of the depth key: up to 16.7M triangles per call
_DEPTH_LEVELS = (1 << 38) - 1  # depth quantisation (38 + 24 bits fit an int64 with room to spare)
_EMPTY = torch.iinfo(torch.int64).max


@dataclass
class Fragments:
    """Per pixel: the winning triangle (-1: none), its perspective-correct barycentrics, the depth
    (camera z, +inf where empty) and whether the triangle faces the camera."""

    face: torch.Tensor  # [H, W] int64
    bary: torch.Tensor  # [H, W, 3] float32
    depth: torch.Tensor  # [H, W] float32
    front: torch.Tensor  # [H, W] bool

    @property
    def covered(self) -> torch.Tensor:
        return self.face >= 0


def to_camera(verts: torch.Tensor, viewmat: torch.Tensor) -> torch.Tensor:
    """World points [V, 3] → camera space (OpenCV axes: z forward) with a 4x4 world-to-camera."""
    return verts @ viewmat[:3, :3].T + viewmat[:3, 3]


def _edge(a: torch.Tensor, b: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    return (b[..., 0] - a[..., 0]) * (py - a[..., 1]) - (b[..., 1] - a[..., 1]) * (px - a[..., 0])


def rasterize(verts_cam: torch.Tensor, faces: torch.Tensor, K: torch.Tensor, width: int, height: int, *,
              near: float = 1e-3, max_candidates: int = 1 << 22) -> Fragments:
    """Triangles ``faces`` [F, 3] over camera-space vertices [V, 3] → ``Fragments`` at width x height.

    Triangles with a vertex closer than ``near`` are left out (no clipping: the scenes here sit well
    in front of the camera). ``max_candidates`` bounds the memory of one pass; more pixels are
    handled in several passes into the same depth buffer.
    """
    if faces.numel() and (faces.min() < 0 or faces.max() >= len(verts_cam)):
        raise ValueError(f"faces index vertices outside 0..{len(verts_cam) - 1}")
    if len(faces) >= (1 << _INDEX_BITS):
        raise ValueError(f"{len(faces)} triangles: at most {(1 << _INDEX_BITS) - 1} per call")
    verts_cam = verts_cam.to(torch.float64)
    K = K.to(torch.float64)
    z = verts_cam[:, 2]
    screen = torch.stack([K[0, 0] * verts_cam[:, 0] / z + K[0, 2], K[1, 1] * verts_cam[:, 1] / z + K[1, 2]], 1)
    empty = Fragments(torch.full((height, width), -1, dtype=torch.int64), torch.zeros(height, width, 3),
                      torch.full((height, width), float("inf")), torch.zeros(height, width, dtype=torch.bool))
    if not len(faces):
        return empty
    tri_ids = torch.arange(len(faces))
    ok = (z[faces] > near).all(1)
    p = screen[faces]  # [F, 3, 2]
    area = _edge(p[:, 0], p[:, 1], p[:, 2, 0], p[:, 2, 1])
    ok &= area.abs() > 1e-12
    lo, hi = p.min(1).values, p.max(1).values
    j0 = torch.ceil(lo[:, 0] - 0.5).clamp(min=0)
    j1 = torch.floor(hi[:, 0] - 0.5).clamp(max=width - 1)
    i0 = torch.ceil(lo[:, 1] - 0.5).clamp(min=0)
    i1 = torch.floor(hi[:, 1] - 0.5).clamp(max=height - 1)
    nx = (j1 - j0 + 1).clamp(min=0)
    ny = (i1 - i0 + 1).clamp(min=0)
    ok &= (nx > 0) & (ny > 0)
    sel = tri_ids[ok]
    if not len(sel):
        return empty
    nx, ny, j0, i0 = nx[sel].long(), ny[sel].long(), j0[sel].long(), i0[sel].long()
    counts = nx * ny
    zmin, zmax = float(z[faces[sel]].min()), float(z[faces[sel]].max())
    scale = _DEPTH_LEVELS / max(zmax - zmin, 1e-12)
    inv_z = 1.0 / z

    zbuf = torch.full((height * width,), _EMPTY, dtype=torch.int64)
    cum = torch.cumsum(counts, 0)
    start = 0
    while start < len(sel):
        base = int(cum[start - 1]) if start else 0
        end = int(torch.searchsorted(cum, base + max_candidates, right=True))
        end = max(end, start + 1)  # one triangle larger than the budget still gets its pass
        c = counts[start:end]
        local = torch.repeat_interleave(torch.arange(end - start), c)
        offs = torch.arange(int(c.sum())) - torch.repeat_interleave(torch.cumsum(c, 0) - c, c)
        t = sel[start:end][local]
        px = j0[start:end][local] + offs % nx[start:end][local]
        py = i0[start:end][local] + offs // nx[start:end][local]
        cx, cy = px.to(torch.float64) + 0.5, py.to(torch.float64) + 0.5
        pt = p[t]
        a = area[t]
        b0 = _edge(pt[:, 1], pt[:, 2], cx, cy) / a
        b1 = _edge(pt[:, 2], pt[:, 0], cx, cy) / a
        b2 = 1.0 - b0 - b1
        inside = (b0 >= 0) & (b1 >= 0) & (b2 >= 0)
        f = faces[t[inside]]
        w = b0[inside] * inv_z[f[:, 0]] + b1[inside] * inv_z[f[:, 1]] + b2[inside] * inv_z[f[:, 2]]
        depth = 1.0 / w
        key = (((depth - zmin) * scale).clamp(0, _DEPTH_LEVELS).long() << _INDEX_BITS) | t[inside]
        zbuf.scatter_reduce_(0, py[inside] * width + px[inside], key, reduce="amin")
        start = end

    hit = zbuf != _EMPTY
    face = torch.where(hit, zbuf & ((1 << _INDEX_BITS) - 1), torch.full_like(zbuf, -1))
    idx = torch.nonzero(hit)[:, 0]
    t = face[idx]
    pt = p[t]
    cx = (idx % width).to(torch.float64) + 0.5
    cy = (idx // width).to(torch.float64) + 0.5
    a = area[t]
    b0 = _edge(pt[:, 1], pt[:, 2], cx, cy) / a
    b1 = _edge(pt[:, 2], pt[:, 0], cx, cy) / a
    b = torch.stack([b0, b1, 1.0 - b0 - b1], 1)
    f = faces[t]
    persp = b * inv_z[f]
    total = persp.sum(1, keepdim=True)
    v = verts_cam[f]  # [n, 3, 3]
    normal = torch.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=1)
    bary = torch.zeros(height * width, 3)
    bary[idx] = (persp / total).float()
    depth = torch.full((height * width,), float("inf"))
    depth[idx] = (1.0 / total[:, 0]).float()
    front = torch.zeros(height * width, dtype=torch.bool)
    front[idx] = (normal * v[:, 0]).sum(1) < 0  # the normal points back at the camera (origin)
    return Fragments(face.reshape(height, width), bary.reshape(height, width, 3), depth.reshape(height, width),
                     front.reshape(height, width))


def interpolate(frags: Fragments, faces: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    """Per-vertex attributes [V, C] → per-pixel [H, W, C] (zeros where no triangle covers)."""
    h, w = frags.face.shape
    out = torch.zeros(h, w, attrs.shape[1], dtype=attrs.dtype)
    cov = frags.covered
    tri = faces[frags.face[cov]]  # [n, 3]
    out[cov] = (attrs[tri] * frags.bary[cov][..., None].to(attrs.dtype)).sum(1)
    return out


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """[H*f, W*f, C] → [H, W, C] by area (box) averaging: the supersampling anti-aliasing."""
    if factor == 1:
        return image
    x = image.permute(2, 0, 1)[None]
    return torch.nn.functional.avg_pool2d(x, factor)[0].permute(1, 2, 0)
