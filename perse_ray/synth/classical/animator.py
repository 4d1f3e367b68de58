"""Classical 2.5D animator: a landmark mesh on an ellipsoidal head, re-posed and re-rendered.

One aligned portrait becomes a triangle mesh whose vertices are the 68 landmarks, points on the
forehead and scalp, the head's outline, a halo outside it (hair volume), the neck and the image
border. Vertices are lifted along the front camera's pixel rays onto a head-shaped depth prior:
landmarks to a generic face profile, forehead and scalp onto an ellipsoid. A ``MotionFrame`` then
1. moves landmark groups for the expressions (jaw_open, smile, brow_raise, eye_close),
2. views the head from the orbit camera of ``perse_ray.camera`` (+yaw: the camera moves to the
   front view's image right, so the nose moves to the image left) with its pinhole intrinsics; the
   outline vertices move to the rotated ellipsoid's outline (exact under perspective: the polar
   plane of the eye), the halo and neck follow part way and the border stays (background never
   tears),
3. renders the mesh with a z-buffer (back faces lose) as a piecewise-affine backward warp of the
   source; inside the lips the portrait's own mouth interior splits between the lips and the
   newly opened gap is painted (dark throat, teeth);
4. completes what the portrait saw badly: a face triangle the target magnifies whose left-right
   mirror image the portrait saw clearly larger (a portrait turned away from that side) blends in
   the mirror image, weighted by how much better it was seen, continuously across the face.
The same landmarks and frame give the same warp, so every edit of a subject animates pixel-aligned:
``build_mesh`` (per subject) and ``frame_warp`` (per frame) do everything but the sampling, which
``apply_warp`` does for each image; ``animate`` is the three in one.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import Delaunay

from perse_ray.camera import Camera
# The head geometry is backend-neutral; EXPRESSIONS, landmarks_in_world and move_landmarks are
# named here too for code that imported them from the animator.
from perse_ray.geometry import (  # noqa: F401
    EXPRESSIONS,
    HEAD_CENTRE,
    HEAD_RADII,
    LANDMARK_DEPTH,
    MIRROR,
    FaceFrame,
    Head,
    expressed_landmarks,
    landmarks_in_world,
    move_landmarks,
)
from perse_ray.synth.motion import MotionFrame

NECK_DEPTH = 0.5
CONTOUR_ANGLES = np.arange(170.0, 371.0, 20.0)  # the outline beside the jaw and over the top (270 = up)
HALO_SCALE = 1.35  # hair volume and nearby background: a ring outside the outline
HALO_FOLLOW = 0.5  # share of its outline vertex's motion a halo vertex takes
NECK_FOLLOW = 0.4  # share of the head's motion the neck takes
STRETCH_INVALID = 3.0  # triangles magnified more than this show invented texture: not valid
# Mirrored completion of what the portrait saw badly: a face triangle magnified past
# COMPLETE_STRETCH whose mirror image (the other half of the face) is magnified COMPLETE_GAIN
# times less starts taking the mirror image; fully COMPLETE_RAMP beyond both.
COMPLETE_STRETCH = 1.5
COMPLETE_GAIN = 1.2
COMPLETE_RAMP = 0.8
RIGID, CONTOUR, HALO, NECK, FIXED = range(5)


def _ring(scale: float, angles_deg: np.ndarray) -> np.ndarray:
    """Points on the head ellipse (face-frame units) scaled around its centre."""
    t = np.radians(angles_deg)
    return np.stack([HEAD_CENTRE[0] + scale * HEAD_RADII[0] * np.cos(t),
                     HEAD_CENTRE[1] + scale * HEAD_RADII[1] * np.sin(t)], axis=-1)


@dataclass
class _Mesh:
    """Everything about a subject's mesh that no frame changes (built once per portrait)."""

    face: FaceFrame
    head: Head
    size: int
    src: np.ndarray  # [V, 2] source pixels; the first 68 are the landmarks
    kind: np.ndarray  # [V] RIGID (landmarks, scalp), CONTOUR, HALO, NECK or FIXED
    angle: np.ndarray  # [V] outline angle of CONTOUR vertices (their HALO partners follow in order)
    world: np.ndarray  # [V, 3] front-view world points (RIGID, NECK)
    tris: np.ndarray  # [T, 3]
    tri_area: np.ndarray  # [T] signed source areas as triangulated (orientation reference)
    src_area: np.ndarray  # [T] unsigned true source areas
    cavity: np.ndarray  # [T] bool, triangles inside the inner lip contour
    mirror_src: np.ndarray  # [V, 2] source pixels of each vertex's left-right mirror image (itself if none)
    mirror_area: np.ndarray  # [T] unsigned source areas of the mirrored triangles
    symmetric: np.ndarray  # [T] bool, face triangles whose every vertex has a mirror image


def _border(size: int, n: int = 5) -> np.ndarray:
    e = np.linspace(0.0, size - 1.0, n)
    lo, hi = np.zeros(n), np.full(n, size - 1.0)
    return np.concatenate([np.stack([e, lo], -1), np.stack([e, hi], -1),
                           np.stack([lo[1:-1], e[1:-1]], -1), np.stack([hi[1:-1], e[1:-1]], -1)])


def _triangulation_points(src: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """Vertices as triangulated: a closed mouth is opened a little, so the inner lip contour gets
    triangles of its own (the cavity) instead of triangles reaching across the lips."""
    pts = src.copy()
    gap = 0.035 * frame.iod
    for a, b in ((61, 67), (62, 66), (63, 65)):
        d = (pts[b] - pts[a]) @ frame.v
        if d < 2 * gap:
            push = (2 * gap - d) / 2
            pts[a] -= push * frame.v
            pts[b] += push * frame.v
    return pts


def _signed_area(pts: np.ndarray, tris: np.ndarray) -> np.ndarray:
    a, b, c = pts[tris[:, 0]], pts[tris[:, 1]], pts[tris[:, 2]]
    return 0.5 * ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))


def _mirror_partners(src: np.ndarray, kind: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """Each vertex's left-right mirror image across the face's midline (-1: none). Landmarks pair by
    the iBUG-68 symmetry; the scalp, outline, halo and neck are built symmetric in the face frame,
    so they pair with the nearest vertex of their kind at the mirrored position."""
    partner = np.full(len(src), -1)
    partner[:68] = MIRROR
    face = frame.to_face(src)
    for k in (RIGID, CONTOUR, HALO, NECK):
        ids = np.flatnonzero(kind == k)
        ids = ids[ids >= 68]
        if len(ids) == 0:
            continue
        mirrored = face[ids] * np.array([-1.0, 1.0])
        d = np.linalg.norm(mirrored[:, None] - face[ids][None], axis=-1)
        best = d.argmin(1)
        ok = d[np.arange(len(ids)), best] < 0.25
        partner[ids[ok]] = ids[best[ok]]
    return partner


def _build_mesh(landmarks: np.ndarray, frame: FaceFrame, head: Head, size: int) -> _Mesh:
    lm = np.asarray(landmarks, np.float64)
    # Forehead and scalp: two arcs over the face's width (beside it the jaw line is the face's own
    # outline, well behind where the ellipsoid would put a point).
    scalp = frame.to_image(np.concatenate([_ring(0.5, np.arange(210.0, 331.0, 30.0)),
                                           _ring(0.8, np.arange(220.0, 321.0, 25.0))]))
    contour, _ = head.project(head.contour(CONTOUR_ANGLES, head.front_eye), head.view(_FRONT))
    centre = frame.to_image(np.array(HEAD_CENTRE))
    halo = centre + HALO_SCALE * (contour - centre)
    neck = frame.to_image(np.concatenate([frame.to_face(lm[3:14]) + np.array([0.0, 0.55]),
                                          [[-0.75, 2.6], [0.75, 2.6]]]))
    def inside(p):
        return np.all((p >= 0.5) & (p <= size - 1.5), axis=1)

    # Outline vertices and their halo partners are kept or dropped together (in the image or not).
    pair = inside(contour) & inside(halo)
    scalp, neck = scalp[inside(scalp)], neck[inside(neck)]
    parts = [(lm, RIGID), (scalp, RIGID), (contour[pair], CONTOUR), (halo[pair], HALO), (neck, NECK),
             (_border(size), FIXED)]
    src = np.concatenate([p for p, _ in parts])
    kind = np.concatenate([np.full(len(p), k) for p, k in parts])
    angle = np.full(len(src), np.nan)
    angle[kind == CONTOUR] = CONTOUR_ANGLES[pair]
    world = np.zeros((len(src), 3))
    world[:68] = head.lift(lm, LANDMARK_DEPTH)
    scalp_ids = np.arange(68, 68 + len(scalp))
    world[scalp_ids] = head.cast(src[scalp_ids])
    world[kind == NECK] = head.lift(src[kind == NECK], np.full(np.sum(kind == NECK), NECK_DEPTH))
    tri_pts = _triangulation_points(src, frame)
    tris = Delaunay(tri_pts, qhull_options="QJ Qbb Qc").simplices
    cavity = np.all((tris >= 60) & (tris < 68), axis=1)
    partner = _mirror_partners(src, kind, frame)
    mirror_src = np.where((partner >= 0)[:, None], src[np.maximum(partner, 0)], src)
    on_face = np.isin(kind, (RIGID, CONTOUR))
    symmetric = np.all(on_face[tris] & (partner[tris] >= 0), axis=1) & ~cavity
    return _Mesh(frame, head, size, src, kind, angle, world, tris, _signed_area(tri_pts, tris),
                 np.abs(_signed_area(src, tris)), cavity, mirror_src, np.abs(_signed_area(mirror_src, tris)),
                 symmetric)


def build_mesh(landmarks: np.ndarray, size: int, camera: Camera = Camera()) -> _Mesh:
    """The subject's mesh for an aligned ``size``-square portrait's 68 landmarks: the same for every
    frame and every edit of the subject (a stage builds it once)."""
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
        raise ValueError(f"animate expects 68 finite (x, y) landmarks, got shape {lm.shape}")
    face = FaceFrame.from_landmarks(lm)
    head = Head(face, size, camera)
    return _build_mesh(lm, face, head, size)


_FRONT = MotionFrame(0, 0.0, 0.0, {})


def _target_vertices(mesh: _Mesh, frame: FaceFrame, head: Head, motion: MotionFrame):
    """Pixels and z-buffer depths of every mesh vertex in ``motion``."""
    view = head.view(motion)
    world = mesh.world.copy()
    world[:68] = head.lift(expressed_landmarks(mesh.src[:68], frame, motion.expression), LANDMARK_DEPTH)
    posed, depth = head.project(world, view)
    dst = mesh.src.copy()
    rigid, contour, halo, neck = (mesh.kind == k for k in (RIGID, CONTOUR, HALO, NECK))
    dst[rigid] = posed[rigid]
    eye = -view[:3, :3].T @ view[:3, 3]
    dst[contour], depth[contour] = head.project(head.contour(mesh.angle[contour], eye), view)
    dst[halo] = mesh.src[halo] + HALO_FOLLOW * (dst[contour] - mesh.src[contour])
    dst[neck] = mesh.src[neck] + NECK_FOLLOW * (posed[neck] - mesh.src[neck])
    # The background (halo, border) sits well behind the head.
    depth[halo | (mesh.kind == FIXED)] = head.dist + 4.0 * head.unit * HEAD_RADII[2]
    return dst, depth


def _rasterize(dst: np.ndarray, depth: np.ndarray, tris: np.ndarray, back: np.ndarray, size: int):
    """Per pixel centre: the winning triangle (-1: none) and its barycentric weights, by z-buffer
    (back faces lose to any front face)."""
    p = dst[tris]  # [T, 3, 2]
    lo = np.clip(np.ceil(p.min(1) - 1e-6), 0, size - 1).astype(np.int64)
    hi = np.clip(np.floor(p.max(1) + 1e-6), 0, size - 1).astype(np.int64)
    bw, bh = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0), np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    counts = bw * bh
    t = np.repeat(np.arange(len(tris)), counts)
    off = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    px = (lo[t, 0] + off % bw[t]).astype(np.float64)
    py = (lo[t, 1] + off // bw[t]).astype(np.float64)
    a, b, c = p[t, 0], p[t, 1], p[t, 2]
    den = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    ok = np.abs(den) > 1e-9
    den = np.where(ok, den, 1.0)
    l0 = ((b[:, 1] - c[:, 1]) * (px - c[:, 0]) + (c[:, 0] - b[:, 0]) * (py - c[:, 1])) / den
    l1 = ((c[:, 1] - a[:, 1]) * (px - c[:, 0]) + (a[:, 0] - c[:, 0]) * (py - c[:, 1])) / den
    l2 = 1.0 - l0 - l1
    hit = ok & (l0 >= -1e-7) & (l1 >= -1e-7) & (l2 >= -1e-7)
    t, px, py = t[hit], px[hit], py[hit]
    bary = np.stack([l0[hit], l1[hit], l2[hit]], -1)
    z = (bary * depth[tris[t]]).sum(-1) + np.where(back[t], 1e6, 0.0)
    pix = py.astype(np.int64) * size + px.astype(np.int64)
    order = np.lexsort((z, pix))
    first = np.ones(len(order), bool)
    first[1:] = pix[order][1:] != pix[order][:-1]
    win = order[first]
    tri_id = np.full(size * size, -1, np.int64)
    weights = np.zeros((size * size, 3))
    tri_id[pix[win]] = t[win]
    weights[pix[win]] = bary[win]
    return tri_id, weights


def _mouth_colour(t: np.ndarray, teeth_alpha: np.ndarray) -> np.ndarray:
    """Colour of the newly opened gap by depth t into it (0 under the upper lip ... 1 at the lower
    lip): upper teeth under the upper lip, a dark throat, a hint of lower teeth."""
    throat = np.array([62.0, 28.0, 32.0])
    teeth = np.array([214.0, 204.0, 190.0])
    upper = np.clip((0.32 - t) / 0.1, 0.0, 1.0)
    lower = 0.5 * np.clip((t - 0.86) / 0.08, 0.0, 1.0)
    shade = 0.75 + 0.25 * np.abs(2 * t - 1)
    w = (np.maximum(upper, lower) * teeth_alpha)[:, None]
    return (1 - w) * throat * shade[:, None] + w * teeth


def _mouth_layer(src_lm: np.ndarray, dst_lm: np.ndarray, frame: FaceFrame, size: int):
    """Inside the target's inner lip contour: where each pixel samples the source, and the colour
    of the pixels the source never showed.

    The source's own mouth interior (teeth, tongue) splits at its middle: the upper half stays
    under the upper lip, the lower half rides on the lower lip. The gap between them is painted;
    upper teeth are drawn only when the portrait showed none (else its own move with the lips).
    Returns (pixel ids, source xy [N, 2], gap mask [N], gap colour [G, 3]) or None.
    """
    inside = np.zeros((size, size), np.uint8)
    cv2.fillPoly(inside, [np.round(dst_lm[60:68] * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    ids = np.flatnonzero(inside)
    if len(ids) == 0:
        return None
    ys, xs = np.divmod(ids, size)
    f = frame.to_face(np.stack([xs, ys], -1).astype(np.float64))

    def lips(lm):
        up, lo = frame.to_face(lm[[60, 61, 62, 63, 64]]), frame.to_face(lm[[60, 67, 66, 65, 64]])
        return up[np.argsort(up[:, 0])], lo[np.argsort(lo[:, 0])]

    up_t, lo_t = lips(dst_lm)
    up_s, lo_s = lips(src_lm)
    xl_t, xr_t = min(up_t[0, 0], lo_t[0, 0]), max(up_t[-1, 0], lo_t[-1, 0])
    xl_s, xr_s = min(up_s[0, 0], lo_s[0, 0]), max(up_s[-1, 0], lo_s[-1, 0])
    r = np.clip((f[:, 0] - xl_t) / max(xr_t - xl_t, 1e-6), 0.0, 1.0)
    x_s = xl_s + r * (xr_s - xl_s)
    top_t, bot_t = np.interp(f[:, 0], *up_t.T), np.interp(f[:, 0], *lo_t.T)
    top_s, bot_s = np.interp(x_s, *up_s.T), np.interp(x_s, *lo_s.T)
    h_s = np.maximum(bot_s - top_s, 0.0)
    h_t = np.maximum(bot_t - top_t, 1e-6)
    k = np.minimum(1.0, h_t / np.maximum(h_s, 1e-6))  # a narrower opening squeezes the source's
    half = 0.5 * h_s * k
    d_top, d_bot = f[:, 1] - top_t, bot_t - f[:, 1]
    upper, lower = d_top < half, d_bot < half
    y_s = np.where(upper, top_s + d_top / np.maximum(k, 1e-6), bot_s - d_bot / np.maximum(k, 1e-6))
    gap = ~upper & ~lower
    t = np.clip((d_top[gap] - half[gap]) / np.maximum(h_t[gap] - 2 * half[gap], 1e-6), 0.0, 1.0)
    teeth_alpha = 1.0 - np.clip(h_s[gap] / 0.06, 0.0, 1.0)
    src_xy = frame.to_image(np.stack([x_s, y_s], -1))
    return ids, src_xy, gap, _mouth_colour(t, teeth_alpha)


@dataclass(frozen=True)
class Warp:
    """One frame's warp of a subject: everything ``animate`` does that no image changes, so every
    edit of the subject (and every morph) at that frame reuses it. Arrays are read-only."""

    map_xy: np.ndarray  # float32 [2, S, S]: where each pixel samples the source
    # Completions blended over it in order: (float32 [2, S, S] where they sample, float32 [S, S]
    # their share); only those with a share somewhere.
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    valid: np.ndarray  # float32 [S, S]
    landmarks: np.ndarray  # float32 [68, 2]
    gap: np.ndarray  # bool [S, S]: the newly opened mouth gap, painted
    gap_colour: np.ndarray  # uint8 [G, 3], in the gap's row-major order


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _mirror_weight(mesh: _Mesh, area: np.ndarray, back: np.ndarray) -> np.ndarray:
    """Per vertex: how much of the mirror image to show. A face triangle the source saw badly
    (stretched into the target) whose mirror image the source saw clearly better takes the mirror;
    vertex weights are the mean of their triangles', so the blend is continuous across the face."""
    stretch = np.abs(area) / np.maximum(mesh.src_area, 1e-6)
    mirrored = np.abs(area) / np.maximum(mesh.mirror_area, 1e-6)
    return _vertex_mean(mesh, _completion_weight(stretch, mirrored) * (mesh.symmetric & ~back))


def _vertex_mean(mesh: _Mesh, w_tri: np.ndarray) -> np.ndarray:
    total = np.zeros(len(mesh.src))
    count = np.zeros(len(mesh.src))
    np.add.at(total, mesh.tris, np.repeat(w_tri[:, None], 3, axis=1))
    np.add.at(count, mesh.tris, 1.0)
    return total / np.maximum(count, 1.0)


def _completion_weight(stretch: np.ndarray, completed_stretch: np.ndarray) -> np.ndarray:
    """Per triangle: the share of a completion where the direct sample is stretched and the
    completion's is clearly less so."""
    gain = stretch / np.maximum(completed_stretch, 1e-6)
    return (_smoothstep((stretch - COMPLETE_STRETCH) / COMPLETE_RAMP)
            * _smoothstep((gain - COMPLETE_GAIN) / COMPLETE_RAMP))


def frame_warp(mesh: _Mesh, frame: MotionFrame) -> Warp:
    """The warp of ``frame`` for a subject's mesh (``build_mesh``)."""
    face, head, size = mesh.face, mesh.head, mesh.size
    dst, depth = _target_vertices(mesh, face, head, frame)
    area = _signed_area(dst, mesh.tris)
    back = np.sign(area) != np.sign(mesh.tri_area)
    tri_id, weights = _rasterize(dst, depth, mesh.tris, back, size)
    covered = tri_id >= 0
    tid = np.where(covered, tri_id, 0)
    ys, xs = np.divmod(np.arange(size * size), size)
    own = np.stack([xs, ys], -1).astype(np.float64)

    def sample(coords):  # per pixel, the barycentric blend of per-vertex texture coordinates
        return np.where(covered[:, None], (weights[:, :, None] * coords[mesh.tris[tid]]).sum(1), own)

    def share(w_vertex, where):
        return np.where(covered & where[tid], (weights * w_vertex[mesh.tris[tid]]).sum(1), 0.0)

    src_xy = sample(mesh.src)
    stretch = np.abs(area) / np.maximum(mesh.src_area, 1e-6)
    shown = stretch[tid]  # magnification of the texture shown, blended like the texture
    layers = []
    w_mirror = share(_mirror_weight(mesh, area, back), mesh.symmetric)
    if np.any(w_mirror > 0):
        layers.append((sample(mesh.mirror_src), w_mirror))
        shown = (1 - w_mirror) * shown + w_mirror * (np.abs(area) / np.maximum(mesh.mirror_area, 1e-6))[tid]
    invalid = ~covered | back[tid] | ((shown > STRETCH_INVALID) & ~mesh.cavity[tid])
    gap = np.zeros(size * size, bool)
    gap_colour = np.zeros((0, 3), np.uint8)
    if frame.expression.get("jaw_open", 0.0) or frame.expression.get("smile", 0.0):
        mouth = _mouth_layer(mesh.src[:68], dst[:68], face, size)
        if mouth is not None:
            ids, mouth_xy, mouth_gap, colour = mouth
            src_xy[ids] = mouth_xy
            for _, w in layers:
                w[ids] = 0.0  # the mouth interior is the portrait's own, split between the lips
            gap[ids[mouth_gap]] = True
            invalid[ids] = False
            gap_colour = np.clip(np.rint(colour), 0, 255).astype(np.uint8)  # ids ascend: row-major

    def frozen(a):
        a = np.ascontiguousarray(a)
        a.flags.writeable = False
        return a

    def grid(xy):  # [S*S, 2] pixel coordinates -> float32 [2, S, S] (cv2.remap's map_x, map_y)
        return frozen(xy.T.reshape(2, size, size).astype(np.float32))

    return Warp(map_xy=grid(src_xy),
                layers=tuple((grid(xy), frozen(w.reshape(size, size).astype(np.float32)))
                             for xy, w in layers if np.any(w > 0)),
                valid=frozen((~invalid).astype(np.float32).reshape(size, size)),
                landmarks=frozen(dst[:68].astype(np.float32)), gap=frozen(gap.reshape(size, size)),
                gap_colour=frozen(gap_colour))


def _remap(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return cv2.remap(image, xy[0], xy[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def apply_warp(image: np.ndarray, warp: Warp, mask: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Render a frame from a square portrait (or an edit of it) with its subject's ``warp``: the
    same returns as ``animate``."""
    image = np.asarray(image)
    size = warp.map_xy.shape[1]
    if image.ndim != 3 or image.shape != (size, size, 3):
        raise ValueError(f"animate expects a {size}x{size}x3 image (the landmarks' portrait), got {image.shape}")
    image = np.ascontiguousarray(image)
    out = _remap(image, warp.map_xy)
    if warp.layers:
        blended = out.astype(np.float32)
        for xy, w in warp.layers:
            blended += w[..., None] * (_remap(image, xy).astype(np.float32) - blended)
        out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if len(warp.gap_colour):
        out[warp.gap] = warp.gap_colour
    warped = None
    if mask is not None:
        m = np.ascontiguousarray(mask, dtype=np.float32)
        if m.shape != (size, size):
            raise ValueError(f"mask must be {size}x{size}, got {m.shape}")
        warped = _remap(m, warp.map_xy)
        for xy, w in warp.layers:
            warped += w * (_remap(m, xy) - warped)
        warped[warp.gap] = 0.0
    return out, warp.landmarks.copy(), warp.valid.copy(), warped


def animate(image: np.ndarray, landmarks: np.ndarray, frame: MotionFrame, mask: np.ndarray | None = None,
            camera: Camera = Camera()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Render ``frame`` from an aligned square portrait with its 68 landmarks.

    Returns (frame uint8 [S, S, 3], landmarks float32 [68, 2] where they moved to, valid float32
    [S, S] (0 where the texture is invented: strongly magnified or seen from behind), ``mask``
    warped the same way or None). yaw = pitch = 0 with no expression returns the input exactly.
    Where the source saw a surface badly and its mirror image well, the mirror image is blended in.
    Pure: ``build_mesh`` once and ``frame_warp`` per frame give the same result for every edit.
    """
    image = np.asarray(image)
    size = image.shape[0]
    if image.ndim != 3 or image.shape[:2] != (size, size):
        raise ValueError(f"animate expects a square HxWx3 image, got {image.shape}")
    return apply_warp(image, frame_warp(build_mesh(landmarks, size, camera), frame), mask)
