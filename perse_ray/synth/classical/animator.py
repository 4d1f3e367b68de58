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
   newly opened gap is painted (dark throat, teeth).
The same landmarks and frame give the same warp, so every edit of a subject animates pixel-aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import Delaunay

from perse_ray.camera import intrinsics, orbit_viewmat
from perse_ray.synth.classical.regions import FaceFrame
from perse_ray.synth.motion import MotionFrame

EXPRESSIONS = ("jaw_open", "smile", "brow_raise", "eye_close")

# Head ellipsoid in face-frame units (interocular distances): centre below the eyes on the yaw axis
# (near ear level) and semi-axes across, down and in depth. It carries forehead, scalp and the
# outline; the top reaches the crown of the hair.
HEAD_CENTRE = (0.0, 0.3)
HEAD_RADII = (1.25, 1.85, 1.35)
# Landmark heights in front of the ellipsoid's centre plane (iod), a generic face profile: the jaw
# line runs from beside the ears (0, 16) round to the chin, the nose tip stands out most.
LANDMARK_DEPTH = np.array(
    [0.1, 0.2, 0.35, 0.55, 0.75, 0.95, 1.1, 1.2, 1.25, 1.2, 1.1, 0.95, 0.75, 0.55, 0.35, 0.2, 0.1,  # jaw
     0.95, 1.15, 1.25, 1.3, 1.3, 1.3, 1.3, 1.25, 1.15, 0.95,  # brows
     1.3, 1.4, 1.5, 1.65, 1.35, 1.45, 1.5, 1.45, 1.35,  # nose
     1.0, 1.15, 1.15, 1.15, 1.12, 1.12, 1.15, 1.15, 1.15, 1.0, 1.12, 1.12,  # eyes
     1.15, 1.3, 1.37, 1.4, 1.37, 1.3, 1.15, 1.3, 1.35, 1.37, 1.35, 1.3,  # outer lips
     1.15, 1.3, 1.35, 1.3, 1.15, 1.3, 1.33, 1.3])  # inner lips
NECK_DEPTH = 0.5
CONTOUR_ANGLES = np.arange(170.0, 371.0, 20.0)  # the outline beside the jaw and over the top (270 = up)
HALO_SCALE = 1.35  # hair volume and nearby background: a ring outside the outline
HALO_FOLLOW = 0.5  # share of its outline vertex's motion a halo vertex takes
NECK_FOLLOW = 0.4  # share of the head's motion the neck takes
STRETCH_INVALID = 3.0  # triangles magnified more than this show invented texture: not valid
RIGID, CONTOUR, HALO, NECK, FIXED = range(5)
# iBUG-68 mirror images of the image-left mouth points.
_MIRROR = {48: 54, 49: 53, 50: 52, 59: 55, 58: 56, 60: 64, 61: 63, 67: 65}


@dataclass(frozen=True)
class Camera:
    """The pinhole/orbit camera the frames are rendered for (``RenderConfig`` fov and distance)."""

    fov_deg: float = 30.0
    distance: float = 1.0


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest rotation taking unit vector a to unit vector b (Rodrigues)."""
    v, c = np.cross(a, b), float(a @ b)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3)
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


class _Head:
    """The head ellipsoid in world metres (``perse_ray.camera`` axes), as the front camera sees it.

    The world origin is where the orbit camera looks: the image centre at the head centre's depth,
    so one pixel there is D / f metres.

    Pixels here are image-array coordinates, as cv2.remap, the rasterizer below and dlib's
    landmarks use them: pixel [i, j] is centred at (x, y) = (j, i). The intrinsics (and the
    renderer) put that centre at (j + 0.5, i + 0.5), so the principal point here is K's minus 0.5:
    the one place the two conventions meet.
    """

    def __init__(self, frame: FaceFrame, size: int, camera: Camera):
        k = intrinsics(size, size, camera.fov_deg).astype(np.float64)
        self.f, self.c, self.dist = float(k[0, 0]), float(k[0, 2]) - 0.5, float(camera.distance)
        metres_per_px = self.dist / self.f
        self.unit = frame.iod * metres_per_px  # one iod in metres
        centre = frame.to_image(np.array(HEAD_CENTRE))
        self.centre = np.array([(centre[0] - self.c) * metres_per_px, (centre[1] - self.c) * metres_per_px, 0.0])
        axes = np.array([[frame.u[0], frame.v[0], 0.0], [frame.u[1], frame.v[1], 0.0], [0.0, 0.0, 1.0]])
        self.axes = axes @ np.diag(HEAD_RADII) * self.unit  # columns: the semi-axes
        self.axes_inv = np.linalg.inv(self.axes)
        self.front_eye = np.array([0.0, 0.0, -self.dist])

    def cast(self, px: np.ndarray) -> np.ndarray:
        """World points where the front camera's rays through ``px`` meet the ellipsoid (the ray's
        closest approach where it misses): [N, 3]."""
        d = np.concatenate([(px - self.c) / self.f, np.ones((len(px), 1))], axis=1)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        q = d @ self.axes_inv.T
        r = self.axes_inv @ (self.front_eye - self.centre)
        a, b, c = (q * q).sum(1), q @ r, r @ r - 1.0
        disc = b * b - a * c
        lam = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0.0))) / a, -b / a)
        return self.front_eye + lam[:, None] * d

    def lift(self, px: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """World points on the front camera's rays through ``px``, ``depth`` iod in front of the
        head centre's plane: [N, 3]."""
        z = -np.asarray(depth, np.float64) * self.unit
        scale = (self.dist + z) / self.f
        return np.stack([(px[:, 0] - self.c) * scale, (px[:, 1] - self.c) * scale, z], axis=-1)

    def _polar_circle(self, eye: np.ndarray):
        """The outline seen from ``eye`` lies on its polar plane: in ellipsoid coordinates
        s = A^-1 (x - centre), the unit-sphere circle s . n = 1 / |c'| with c' = A^-1 (eye - centre)."""
        cp = self.axes_inv @ (eye - self.centre)
        n = float(np.linalg.norm(cp))
        axis = cp / n
        return axis / n, np.sqrt(max(1.0 - 1.0 / n ** 2, 0.0)), axis

    def contour(self, angles_deg: np.ndarray, eye: np.ndarray) -> np.ndarray:
        """World points of the outline seen from ``eye`` at ``angles_deg`` around it. The front
        view's circle basis is carried to the new view by the smallest rotation, so an angle names
        the same part of the outline in every view."""
        _, _, n0 = self._polar_circle(self.front_eye)
        k1, rho1, n1 = self._polar_circle(eye)
        e1 = np.array([1.0, 0.0, 0.0]) - n0[0] * n0
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(n0, e1)
        e2 *= np.sign(e2[1])  # growing angles turn towards image-down, like the face frame
        rot = _rotation_between(n0, n1)
        t = np.radians(angles_deg)[:, None]
        s = k1 + rho1 * (np.cos(t) * (rot @ e1) + np.sin(t) * (rot @ e2))
        return self.centre + s @ self.axes.T

    def view(self, motion: MotionFrame) -> np.ndarray:
        return orbit_viewmat(motion.yaw, motion.pitch, self.dist).astype(np.float64)

    def project(self, world: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and camera depths of world points."""
        cam = world @ view[:3, :3].T + view[:3, 3]
        return cam[:, :2] / cam[:, 2:3] * self.f + self.c, cam[:, 2]


def _ring(scale: float, angles_deg: np.ndarray) -> np.ndarray:
    """Points on the head ellipse (face-frame units) scaled around its centre."""
    t = np.radians(angles_deg)
    return np.stack([HEAD_CENTRE[0] + scale * HEAD_RADII[0] * np.cos(t),
                     HEAD_CENTRE[1] + scale * HEAD_RADII[1] * np.sin(t)], axis=-1)


def _expression_offsets(expr: dict[str, float]) -> tuple[np.ndarray, float]:
    """Landmark displacements [68, 2] in face-frame units (u right, v down) for the named
    expressions, and the eye closure (applied apart: the lids meet rather than shift)."""
    unknown = sorted(set(expr) - set(EXPRESSIONS))
    if unknown:
        raise ValueError(f"unknown expression {unknown[0]!r}; choices: {', '.join(EXPRESSIONS)}")
    value = {name: float(np.clip(expr.get(name, 0.0), 0.0, 1.0)) for name in EXPRESSIONS}
    off = np.zeros((68, 2))
    jaw = value["jaw_open"]
    if jaw:
        drop = 0.32 * jaw
        for i in range(3, 14):  # the jaw line swings down, most at the chin
            off[i, 1] += drop * np.cos(min(abs(i - 8) / 6, 1.0) * np.pi / 2)
        for idx, w in (((56, 57, 58, 65, 66, 67), 0.85), ((55, 59), 0.6), ((48, 54, 60, 64), 0.25)):
            off[list(idx), 1] += drop * w  # the lower lip rides on the jaw
        off[[48, 60], 0] += 0.04 * jaw  # an open mouth narrows a little
        off[[54, 64], 0] -= 0.04 * jaw
    smile = value["smile"]
    if smile:
        # (image-left points, outwards, upwards); their mirror images move mirrored.
        for idx, out, up in (((48, 60), 0.13, 0.10), ((49, 59), 0.07, 0.05), ((61, 67, 50, 58), 0.03, 0.02)):
            for i in idx:
                off[i] += smile * np.array([-out, -up])
                off[_MIRROR[i]] += smile * np.array([out, -up])
        off[[40, 41, 46, 47], 1] -= 0.02 * smile  # cheeks push the lower lids up
    brow = value["brow_raise"]
    if brow:
        off[17:27, 1] -= 0.14 * brow
        off[[37, 38, 43, 44], 1] -= 0.02 * brow
    return off, value["eye_close"]


def _expressed(landmarks: np.ndarray, frame: FaceFrame, expression: dict[str, float]) -> np.ndarray:
    """The 68 landmarks (pixels) with the expression applied in the front view."""
    offsets, close = _expression_offsets(expression)
    face = frame.to_face(landmarks) + offsets
    if close:
        for upper, lower in ((37, 41), (38, 40), (43, 47), (44, 46)):
            meet = face[upper] + 0.7 * (face[lower] - face[upper])
            face[upper] += close * (meet - face[upper])
            face[lower] += close * (meet - face[lower])
    return frame.to_image(face)


def landmarks_in_world(landmarks: np.ndarray, expression: dict[str, float], size: int,
                       camera: Camera = Camera()) -> np.ndarray:
    """The 3D points (world metres, ``perse_ray.camera`` axes) the animator puts the 68 landmarks
    of an aligned ``size``-square portrait at, with ``expression`` applied: float64 [68, 3]."""
    lm = np.asarray(landmarks, np.float64)
    face = FaceFrame.from_landmarks(lm)
    return _Head(face, size, camera).lift(_expressed(lm, face, expression), LANDMARK_DEPTH)


def move_landmarks(landmarks: np.ndarray, frame: MotionFrame, size: int, camera: Camera = Camera()) -> np.ndarray:
    """Where the 68 landmarks land in ``frame`` (expression, then head pose): float32 [68, 2]."""
    head = _Head(FaceFrame.from_landmarks(np.asarray(landmarks, np.float64)), size, camera)
    uv, _ = head.project(landmarks_in_world(landmarks, frame.expression, size, camera), head.view(frame))
    return uv.astype(np.float32)


@dataclass
class _Mesh:
    src: np.ndarray  # [V, 2] source pixels; the first 68 are the landmarks
    kind: np.ndarray  # [V] RIGID (landmarks, scalp), CONTOUR, HALO, NECK or FIXED
    angle: np.ndarray  # [V] outline angle of CONTOUR vertices (their HALO partners follow in order)
    world: np.ndarray  # [V, 3] front-view world points (RIGID, NECK)
    tris: np.ndarray  # [T, 3]
    tri_area: np.ndarray  # [T] signed source areas as triangulated (orientation reference)
    src_area: np.ndarray  # [T] unsigned true source areas
    cavity: np.ndarray  # [T] bool, triangles inside the inner lip contour


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


def _build_mesh(landmarks: np.ndarray, frame: FaceFrame, head: _Head, size: int) -> _Mesh:
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
    return _Mesh(src, kind, angle, world, tris, _signed_area(tri_pts, tris),
                 np.abs(_signed_area(src, tris)), np.all((tris >= 60) & (tris < 68), axis=1))


_FRONT = MotionFrame(0, 0.0, 0.0, {})


def _target_vertices(mesh: _Mesh, frame: FaceFrame, head: _Head, motion: MotionFrame):
    """Pixels and z-buffer depths of every mesh vertex in ``motion``."""
    view = head.view(motion)
    world = mesh.world.copy()
    world[:68] = head.lift(_expressed(mesh.src[:68], frame, motion.expression), LANDMARK_DEPTH)
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


def animate(image: np.ndarray, landmarks: np.ndarray, frame: MotionFrame, mask: np.ndarray | None = None,
            camera: Camera = Camera()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Render ``frame`` from an aligned square portrait with its 68 landmarks.

    Returns (frame uint8 [S, S, 3], landmarks float32 [68, 2] where they moved to, valid float32
    [S, S] (0 where the texture is invented: strongly magnified or seen from behind), ``mask``
    warped the same way or None). yaw = pitch = 0 with no expression returns the input exactly.
    """
    image = np.asarray(image)
    size = image.shape[0]
    if image.ndim != 3 or image.shape[:2] != (size, size):
        raise ValueError(f"animate expects a square HxWx3 image, got {image.shape}")
    lm = np.asarray(landmarks, np.float64)
    face = FaceFrame.from_landmarks(lm)
    head = _Head(face, size, camera)
    mesh = _build_mesh(lm, face, head, size)
    dst, depth = _target_vertices(mesh, face, head, frame)
    area = _signed_area(dst, mesh.tris)
    back = np.sign(area) != np.sign(mesh.tri_area)
    tri_id, weights = _rasterize(dst, depth, mesh.tris, back, size)
    covered = tri_id >= 0
    tid = np.where(covered, tri_id, 0)
    src_xy = (weights[:, :, None] * mesh.src[mesh.tris[tid]]).sum(1)
    ys, xs = np.divmod(np.arange(size * size), size)
    src_xy = np.where(covered[:, None], src_xy, np.stack([xs, ys], -1))
    stretch = np.abs(area) / np.maximum(mesh.src_area, 1e-6)
    invalid = ~covered | back[tid] | ((stretch[tid] > STRETCH_INVALID) & ~mesh.cavity[tid])
    gap = np.zeros(size * size, bool)
    mouth = None
    if frame.expression.get("jaw_open", 0.0) or frame.expression.get("smile", 0.0):
        mouth = _mouth_layer(lm, dst[:68], face, size)
    if mouth is not None:
        ids, mouth_xy, mouth_gap, _ = mouth
        src_xy[ids] = mouth_xy
        gap[ids[mouth_gap]] = True
        invalid[ids] = False
    map_x = src_xy[:, 0].reshape(size, size).astype(np.float32)
    map_y = src_xy[:, 1].reshape(size, size).astype(np.float32)
    out = cv2.remap(np.ascontiguousarray(image), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if mouth is not None and np.any(gap):
        out = out.reshape(-1, 3)
        out[gap] = np.clip(np.rint(mouth[3]), 0, 255).astype(np.uint8)
        out = out.reshape(size, size, 3)
    valid = (~invalid).astype(np.float32).reshape(size, size)
    warped = None
    if mask is not None:
        warped = cv2.remap(np.ascontiguousarray(mask, dtype=np.float32), map_x, map_y, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        warped[gap.reshape(size, size)] = 0.0
    return out, dst[:68].astype(np.float32), valid, warped
