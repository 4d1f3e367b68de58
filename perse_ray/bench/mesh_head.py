"""A procedural head made of textured triangles: a ground truth that is not made of Gaussians.

The face is an ellipsoid shell deformed by an analytic face shape (nose, eye sockets, brow ridge,
lips, chin, cheekbones, ears, hair volume) whose features sit where a real portrait's 68 landmarks
put them (``fit_layout``). The front of the mesh carries that portrait, projected along the view
axis and faded into a skin colour sampled from its cheeks towards the sides; the neck is a
cylinder. Shading is Lambert plus ambient on interpolated per-vertex normals, with the light fixed
to the head (so colours do not depend on the view, as for the Gaussian head). Rendered by the
z-buffer rasterizer in ``perse_ray.bench.raster`` at ``supersample`` times the size and
area-downsampled, so edges are anti-aliased.

Attributes are real changes of geometry and texture, on the Gaussian head's slider semantics
(value v ∈ [0, K−1], per-edit key values, piecewise linear in v, so v = k + α is the exact reference
for the avatar's slider at the same value):
- ``hair``: the hair region's texture colour (``HAIR_COLORS`` times a fixed strand pattern);
- ``beard``: beard density in the texture of the lower face (coverage of a fixed stubble pattern);
- ``glasses``: rims, bridge and temples as tube meshes whose thickness follows the rim key, and
  lenses as alpha-blended discs whose opacity follows the tint key.
Expressions (``jaw_open``, ``smile``, ``brow_raise``) are vertex deformations: the jaw rotates
about a hinge with smooth skinning weights and the mesh is cut along the mouth line, so the mouth
opens onto the (dark) inside of the shell; mouth corners move up and out; the brows move up,
taking their texture with them.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from perse_ray.bench import raster
from perse_ray.bench.procedural import BEARD_DENSITY, EXPRESSIONS, GLASSES_KEYS, HAIR_COLORS, _piecewise

ATTRIBUTES = ("hair", "beard", "glasses")
PORTRAIT = Path(__file__).resolve().parents[2] / "examples" / "portraits" / "astronaut.png"
RADII = np.array([0.075, 0.098, 0.088])  # half-width, half-height, half-depth of the skull (m)
IOD = 0.062  # interocular distance (m) the portrait's landmarks are scaled to
EYE_Y = -0.02  # the eyes' height in the head frame (m; y is down)
LIGHT = np.array([-0.4, -0.5, -0.77]) / np.linalg.norm([-0.4, -0.5, -0.77])  # towards the light
AMBIENT, DIFFUSE = 0.55, 0.45
INTERIOR = np.array([0.30, 0.08, 0.09])  # inside of the shell (seen through the open mouth)
BEARD_COLOR = np.array([0.16, 0.10, 0.06])
RIM_COLOR = np.array([0.05, 0.05, 0.06])
LENS_COLOR = np.array([0.10, 0.12, 0.16])
RIM_WIDTH, RIM_DEPTH = 0.005, 0.003  # rim tube cross-section (m) at rim key 1
JAW_DEGREES = 16.0  # at jaw_open = 1, as the Gaussian head
JAW_PIVOT = np.array([0.0, 0.0, 0.03])


def _smoothstep(e0, e1, x):
    """0 at e0, 1 at e1 (either order), C1 in between."""
    t = np.clip((np.asarray(x, dtype=np.float64) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass(frozen=True)
class FaceLayout:
    """Feature positions in the head frame (metres) and the map to the portrait's pixels."""

    eye_x: float  # |x| of each eye centre
    eye_y: float
    brow_y: float
    nose_bridge_y: float
    nose_tip_y: float
    nose_base_y: float
    mouth_y: float  # the line between the lips: where the mesh is cut
    mouth_half_width: float
    chin_y: float
    face_half_width: float
    centre_px: tuple[float, float]  # portrait pixel of the head frame's (0, EYE_Y)
    px_per_m: float
    roll: float  # radians: the portrait's eye line angle

    def to_portrait(self, xy: np.ndarray) -> np.ndarray:
        """Head-frame (x, y) [N, 2] → portrait pixel coordinates (continuous, pixel centres at i + 0.5)."""
        c, s = math.cos(self.roll), math.sin(self.roll)
        rel = (xy - np.array([0.0, EYE_Y])) * self.px_per_m
        rot = np.stack([c * rel[:, 0] - s * rel[:, 1], s * rel[:, 0] + c * rel[:, 1]], 1)
        return rot + np.asarray(self.centre_px) + 0.5


def fit_layout(landmarks: np.ndarray) -> FaceLayout:
    """The face shape's features from 68 iBUG landmarks (pixels): scale, roll and placement."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2) or not np.isfinite(lm).all():
        raise ValueError(f"landmarks must be a finite [68, 2] array, got shape {lm.shape}")
    left, right = lm[36:42].mean(0), lm[42:48].mean(0)
    d = right - left
    iod_px = float(np.hypot(*d))
    if iod_px < 8:
        raise ValueError(f"the portrait's eyes are {iod_px:.1f} px apart: too small a face for a texture")
    roll = math.atan2(d[1], d[0])
    mid = (left + right) / 2
    c, s = math.cos(-roll), math.sin(-roll)
    rel = lm - mid
    m = np.stack([c * rel[:, 0] - s * rel[:, 1], s * rel[:, 0] + c * rel[:, 1]], 1) * (IOD / iod_px)
    m[:, 1] += EYE_Y
    return FaceLayout(
        eye_x=IOD / 2, eye_y=EYE_Y, brow_y=float(m[17:27, 1].mean()), nose_bridge_y=float(m[27, 1]),
        nose_tip_y=float(m[30, 1]), nose_base_y=float(m[31:36, 1].mean()),
        mouth_y=float(np.r_[m[61:64, 1], m[65:68, 1]].mean()),
        mouth_half_width=float(abs(m[54, 0] - m[48, 0]) / 2), chin_y=float(m[8, 1]),
        face_half_width=float(abs(m[16, 0] - m[0, 0]) / 2), centre_px=(float(mid[0]), float(mid[1])),
        px_per_m=iod_px / IOD, roll=roll)


@functools.lru_cache(maxsize=4)
def portrait_landmarks(path: str) -> np.ndarray:
    """The 68 landmarks of the largest face in a portrait (the project's dlib face model)."""
    from PIL import Image

    from perse_ray.config import FacesConfig
    from perse_ray.faces import load_face_model

    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    faces = load_face_model(FacesConfig()).detect(image)
    if not faces:
        raise ValueError(f"no face found in {path}: the mesh head needs a portrait to take its texture from")
    return faces[0].landmarks.astype(np.float64)


class _Waves:
    """A smooth seeded 3D pattern: a sum of plane waves (roughly unit variance)."""

    def __init__(self, rng, n: int, wavelength: tuple[float, float], vertical: float = 1.0):
        d = rng.standard_normal((n, 3))
        d[:, 1] *= vertical  # < 1: waves vary mostly horizontally (vertical strands)
        self.k = d / np.linalg.norm(d, axis=1, keepdims=True) * (2 * math.pi / rng.uniform(*wavelength, n))[:, None]
        self.phase = rng.uniform(0, 2 * math.pi, n)
        self.norm = math.sqrt(2.0 / n)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.sin(p @ self.k.T + self.phase).sum(1) * self.norm


def _grid_faces(rows: int, cols: int, index) -> list[tuple[int, int, int]]:
    faces = []
    for i in range(rows - 1):
        for j in range(cols):
            a, b, c, d = index(i, j), index(i + 1, j), index(i + 1, j + 1), index(i, j + 1)
            faces += [(a, b, c), (a, c, d)]
    return faces


def _orient(verts: np.ndarray, faces: np.ndarray, outward: np.ndarray) -> np.ndarray:
    """Flip triangles whose winding normal points against ``outward`` [F, 3]."""
    v = verts[faces]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    flip = (n * outward).sum(1) < 0
    faces = faces.copy()
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return faces


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted per-vertex normals (unit)."""
    v = verts[faces]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    out = np.zeros_like(verts)
    for k in range(3):
        np.add.at(out, faces[:, k], n)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _tube(path: np.ndarray, side: np.ndarray, up: np.ndarray, width: float, depth: float, closed: bool):
    """A tube of rectangular cross-section (width along ``side``, depth along ``up``) along a path."""
    n = len(path)
    corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    verts = np.concatenate([path + a * width / 2 * side + b * depth / 2 * up for a, b in corners], 0)
    idx = lambda k, m: (m % 4) * n + (k % n)  # noqa: E731
    faces, outward = [], []
    for k in range(n if closed else n - 1):
        for m in range(4):
            faces += [(idx(k, m), idx(k + 1, m), idx(k + 1, m + 1)), (idx(k, m), idx(k + 1, m + 1), idx(k, m + 1))]
            mid = (verts[idx(k, m)] + verts[idx(k, m + 1)]) / 2 - path[k]
            outward += [mid, mid]
    if not closed:
        for k, sign in ((0, -1), (n - 1, 1)):
            t = path[min(k + 1, n - 1)] - path[max(k - 1, 0)]
            faces += [(idx(k, 0), idx(k, 1), idx(k, 2)), (idx(k, 0), idx(k, 2), idx(k, 3))]
            outward += [sign * t, sign * t]
    faces = np.array(faces)
    return verts, _orient(verts, faces, np.array(outward))


class MeshHead:
    """Build once (from a portrait), then ``render(values, expression, camera, size)`` for any values."""

    name = "mesh"
    attributes = ATTRIBUTES
    expressions = EXPRESSIONS
    keys = {"hair": HAIR_COLORS, "beard": BEARD_DENSITY, "glasses": GLASSES_KEYS}

    def __init__(self, portrait: str | Path = PORTRAIT, landmarks: np.ndarray | None = None, seed: int = 0,
                 supersample: int = 3, rows: int = 120, cols: int = 160):
        from PIL import Image

        if supersample < 1 or int(supersample) != supersample:
            raise ValueError(f"supersample must be a positive integer, got {supersample!r}")
        self.supersample = int(supersample)
        path = Path(portrait)
        if not path.is_file():
            raise ValueError(f"portrait {str(path)!r} is not a file")
        if landmarks is None:
            landmarks = portrait_landmarks(str(path.resolve()))
        self.layout = fit_layout(landmarks)
        with Image.open(path) as im:
            self.portrait = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        rng = np.random.default_rng(seed)
        self._skin_noise = _Waves(rng, 12, (0.02, 0.06))
        self._hairline_noise = _Waves(rng, 8, (0.01, 0.03))
        self._strands = _Waves(rng, 16, (0.0025, 0.006), vertical=0.15)
        self._stubble = _Waves(rng, 16, (0.002, 0.005))
        self._stubble_tone = _Waves(rng, 8, (0.003, 0.008))
        self.skin = self._skin_colour()
        self._build(rows, cols)
        self._portrait_t = torch.from_numpy(self.portrait).permute(2, 0, 1)[None]
        self._deformed: OrderedDict = OrderedDict()
        self._frags: OrderedDict = OrderedDict()

    # ----------------------------------------------------------------- geometry

    def _skin_colour(self) -> np.ndarray:
        lay = self.layout
        y = (lay.eye_y + lay.nose_tip_y) / 2 + 0.008
        px = lay.to_portrait(np.array([[-0.034, y], [0.034, y]]))
        h, w = self.portrait.shape[:2]
        samples = []
        for x0, y0 in px.astype(int):
            patch = self.portrait[max(y0 - 3, 0):y0 + 4, max(x0 - 3, 0):x0 + 4].reshape(-1, 3)
            if len(patch):
                samples.append(patch)
        if not samples:
            raise ValueError("the portrait's cheeks fall outside the image: no skin colour to sample")
        return np.median(np.concatenate(samples), 0)

    def _front_shape(self, p: np.ndarray) -> np.ndarray:
        """Outward displacement (m) of the face features at ellipsoid points p [N, 3]."""
        lay = self.layout
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        g = lambda cx, cy, sx, sy: np.exp(-((x - cx) ** 2 / (2 * sx**2) + (y - cy) ** 2 / (2 * sy**2)))  # noqa: E731
        # Nose: a ridge rising from the bridge to the tip, dropping quickly below it.
        t = np.clip((y - lay.nose_bridge_y) / max(lay.nose_tip_y - lay.nose_bridge_y, 1e-3), 0, None)
        height = np.where(t <= 1, 0.006 + 0.016 * t, 0.022 * np.clip(1 - (t - 1) * 2.2, 0, 1))
        height *= _smoothstep(lay.nose_bridge_y - 0.012, lay.nose_bridge_y, y)
        width = 0.006 + 0.005 * np.clip(t, 0, 1)
        d = height * np.exp(-x**2 / (2 * width**2))
        for side in (-1, 1):
            d += 0.005 * g(side * 0.013, lay.nose_tip_y + 0.002, 0.006, 0.005)  # nostril wings
            d -= 0.007 * g(side * lay.eye_x, lay.eye_y, 0.013, 0.009)  # eye sockets
            d += 0.003 * g(side * lay.eye_x, lay.eye_y, 0.007, 0.005)  # eyeballs under the lids
            d += 0.004 * g(side * 0.045, (lay.eye_y + lay.nose_tip_y) / 2 + 0.01, 0.015, 0.014)  # cheekbones
        d += 0.004 * np.exp(-(y - lay.brow_y) ** 2 / (2 * 0.006**2)) * np.exp(-x**2 / (2 * 0.04**2))  # brow ridge
        d += 0.004 * g(0, lay.mouth_y - 0.004, 0.016, 0.004) + 0.004 * g(0, lay.mouth_y + 0.005, 0.016, 0.0045)
        d += 0.007 * g(0, lay.chin_y - 0.012, 0.015, 0.01)
        front = np.clip(-z / RADII[2] * 2.5, 0, 1)
        ears = sum(0.014 * np.exp(-((z - 0.01) ** 2 / (2 * 0.01**2) + (y - lay.eye_y - 0.018) ** 2 / (2 * 0.017**2)))
                   * np.clip(side * x / RADII[0] * 3 - 2, 0, 1) for side in (-1, 1))
        return d * front + ears

    def hair_mask(self, p: np.ndarray, soft: float = 0.003) -> np.ndarray:
        """[N] in [0, 1]: the scalp's hair region at texture points p (on the skull part); ``soft``:
        the width of the edge above the hairline (wide for the hair's volume, so its rise is gentle)."""
        lay = self.layout
        u = np.arctan2(p[:, 0], -p[:, 2])
        front_y, back_y = lay.brow_y - 0.024, 0.045
        line = front_y + (back_y - front_y) * (1 - np.cos(u)) / 2 + 0.002 * self._hairline_noise(p)
        return _smoothstep(line + 0.003, line + 0.003 - 2 * soft, p[:, 1])

    def beard_mask(self, p: np.ndarray) -> np.ndarray:
        """[N] in [0, 1]: the lower face where a beard grows (not on the lips) at rest points p."""
        lay = self.layout
        u = np.abs(np.arctan2(p[:, 0], -p[:, 2]))
        below = _smoothstep(lay.nose_base_y + 0.001, lay.nose_base_y + 0.007, p[:, 1])
        r = np.sqrt((p[:, 0] / (lay.mouth_half_width + 0.003)) ** 2 + ((p[:, 1] - lay.mouth_y) / 0.009) ** 2)
        return below * _smoothstep(1.75, 1.45, u) * _smoothstep(0.85, 1.1, r)

    def _build(self, rows: int, cols: int) -> None:
        lay = self.layout
        if not (RADII[1] * -0.9 < lay.mouth_y < RADII[1] * 0.9):
            raise ValueError(f"the portrait's mouth maps to y = {lay.mouth_y:.3f} m, outside the head")
        # Latitude rows (polar angle from the top), one of them exactly on the mouth line.
        v = np.linspace(0, math.pi, rows + 1)[1:-1]
        v_mouth = math.acos(-lay.mouth_y / RADII[1])
        r_mouth = int(np.argmin(np.abs(v - v_mouth)))
        v[r_mouth] = v_mouth
        u = 2 * math.pi * np.arange(cols) / cols
        vv, uu = np.meshgrid(v, u, indexing="ij")
        unit = np.stack([np.sin(vv) * np.sin(uu), -np.cos(vv), -np.sin(vv) * np.cos(uu)], -1).reshape(-1, 3)
        unit = np.concatenate([unit, [[0, -1, 0], [0, 1, 0]]])  # poles
        base = unit * RADII
        normal = unit / RADII
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        volume = self.hair_mask(base, soft=0.01)
        pts = base + normal * (self._front_shape(base) + 0.006 * volume)[:, None]
        n_grid = rows - 1
        top, bottom = len(unit) - 2, len(unit) - 1
        index = lambda i, j: i * cols + (j % cols)  # noqa: E731
        faces = _grid_faces(n_grid, cols, index)
        faces += [(top, index(0, j + 1), index(0, j)) for j in range(cols)]
        faces += [(bottom, index(n_grid - 1, j), index(n_grid - 1, j + 1)) for j in range(cols)]
        faces = np.array(faces)
        # Cut along the mouth line: the triangles below it take copies of the line's inner vertices.
        row = np.arange(cols) + r_mouth * cols
        inner = row[(np.abs(pts[row, 0]) < lay.mouth_half_width - 1e-4) & (pts[row, 2] < 0)]
        copies = len(pts) + np.arange(len(inner))
        remap = np.arange(len(pts))
        remap[inner] = copies
        below = np.isin(faces, np.arange(cols) + (r_mouth + 1) * cols).any(1)
        faces[below] = remap[faces[below]]
        pts = np.concatenate([pts, pts[inner]])
        base = np.concatenate([base, base[inner]])
        lower = np.zeros(len(pts), dtype=bool)
        lower[copies] = True
        lower[:len(unit)] |= np.arange(len(unit)) // cols > r_mouth
        lower[bottom] = True
        lower[top] = False
        head_faces = _orient(pts, faces, pts[faces].mean(1))

        # Neck: an open cylinder from inside the skull down out of the frame.
        t = 2 * math.pi * np.arange(48) / 48
        ys = np.linspace(0.03, 0.32, 12)
        tt, yy = np.meshgrid(t, ys, indexing="ij")
        neck = np.stack([0.047 * np.sin(tt), yy, 0.012 - 0.05 * np.cos(tt)], -1).reshape(-1, 3)
        off = len(pts)
        neck_faces = []
        for a in range(48):
            for b in range(11):
                q = [off + a * 12 + b, off + ((a + 1) % 48) * 12 + b, off + ((a + 1) % 48) * 12 + b + 1,
                     off + a * 12 + b + 1]
                neck_faces += [(q[0], q[1], q[2]), (q[0], q[2], q[3])]
        neck_faces = np.array(neck_faces)
        centre = np.stack([np.zeros(len(neck)), neck[:, 1], np.full(len(neck), 0.012)], 1)
        neck_faces = _orient(np.concatenate([pts, neck]), neck_faces,
                             (np.concatenate([pts, neck]) - np.concatenate([pts, centre]))[neck_faces].mean(1))

        self.rest = np.concatenate([pts, neck])
        # Texture coordinates: the undisplaced ellipsoid point (smooth across the feature relief).
        self.tex = np.concatenate([base, neck])
        self.faces = np.concatenate([head_faces, neck_faces])
        self.part = np.concatenate([np.zeros(len(pts)), np.ones(len(neck))])  # 0 skull, 1 neck
        self.rest_normals = vertex_normals(self.rest, self.faces)
        x, y, z = self.rest[:, 0], self.rest[:, 1], self.rest[:, 2]
        skull = self.part == 0
        # Jaw skinning weight: 0 above the mouth line, fading in below it and towards the back.
        a = _smoothstep(lay.mouth_half_width, 0.7 * lay.mouth_half_width, np.abs(x))
        b = _smoothstep(0.0, 0.025, y - lay.mouth_y)
        lower = np.concatenate([lower, np.zeros(len(neck), dtype=bool)])
        self.jaw_weight = np.where(lower & skull, np.maximum(a, b) * _smoothstep(0.03, -0.03, z), 0.0)
        self.mouth_row = r_mouth
        self._slit = (inner, copies)
        self._glasses_frame()
        self._faces_t = torch.from_numpy(self.faces)

    def _glasses_frame(self) -> None:
        """Where the glasses sit: a lens plane clear of the face, temples clear of the skull."""
        lay = self.layout
        half_w, half_h = 0.021, 0.015
        self._lens = (lay.eye_x, lay.eye_y - 0.002, half_w, half_h)
        p = self.rest[self.part == 0]
        near = (np.abs(p[:, 0]) < lay.eye_x + half_w + 0.004) & (np.abs(p[:, 1] - lay.eye_y) < half_h + 0.004) & \
            (p[:, 2] < 0)
        self._lens_z = float(p[near, 2].min()) - 0.005
        zs = np.linspace(self._lens_z + 0.01, 0.0, 10)
        band = np.abs(p[:, 1] - lay.eye_y) < 0.012
        xs = []
        for zk in zs:
            sel = band & (np.abs(p[:, 2] - zk) < 0.008)
            xs.append(np.abs(p[sel, 0]).max() + 0.004 if sel.any() else RADII[0] + 0.01)
        self._temple = (zs, np.maximum.accumulate(np.maximum(xs, lay.eye_x + half_w)))

    def _glasses(self, rim: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(rim verts, rim faces, lens verts, lens faces) at a rim key value (tube size ∝ rim)."""
        ex, ey, hw, hh = self._lens
        zl = self._lens_z
        s = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        c, si = np.cos(s), np.sin(s)
        e = 2 / 2.6  # a rounded rectangle (super-ellipse)
        ring = np.stack([np.sign(c) * np.abs(c) ** e * hw, np.sign(si) * np.abs(si) ** e * hh], 1)
        out = np.stack([np.sign(c) * np.abs(c) ** (2 - e) / hw, np.sign(si) * np.abs(si) ** (2 - e) / hh], 1)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        up = np.tile([0.0, 0.0, -1.0], (48, 1))
        verts, faces, lverts, lfaces = [], [], [], []

        def add(v, f, into_v, into_f):
            into_f.append(f + sum(len(x) for x in into_v))
            into_v.append(v)

        width, depth = RIM_WIDTH * rim, RIM_DEPTH * rim
        for side in (-1, 1):
            path = np.stack([side * ex + ring[:, 0], ey + ring[:, 1], np.full(48, zl)], 1)
            side_dir = np.concatenate([out * [1, 1], np.zeros((48, 1))], 1)
            add(*_tube(path, side_dir, up, width, depth, closed=True), verts, faces)
            centre = np.array([[side * ex, ey, zl]])
            lens = np.concatenate([centre, path])
            lf = np.array([(0, 1 + k, 1 + (k + 1) % 48) for k in range(48)])
            add(lens, lf, lverts, lfaces)
            # Temple: from the rim's outer edge back along the skull.
            zs, xs = self._temple
            tpath = np.concatenate([[[side * (ex + hw), ey, zl]], np.stack([side * xs, np.full(len(zs), ey), zs], 1)])
            tan = np.gradient(tpath, axis=0)
            tan /= np.linalg.norm(tan, axis=1, keepdims=True)
            vert = np.tile([0.0, -1.0, 0.0], (len(tpath), 1))
            horiz = np.cross(tan, vert)
            add(*_tube(tpath, vert, horiz, width, depth, closed=False), verts, faces)
        bx = np.linspace(-(ex - hw), ex - hw, 8)
        bridge = np.stack([bx, np.full(8, ey - hh * 0.45), zl - 0.002 * (1 - (bx / (ex - hw)) ** 2)], 1)
        add(*_tube(bridge, np.tile([0.0, 1.0, 0.0], (8, 1)), np.tile([0.0, 0.0, -1.0], (8, 1)), width, depth,
                   closed=False), verts, faces)
        return np.concatenate(verts), np.concatenate(faces), np.concatenate(lverts), np.concatenate(lfaces)

    def deformed(self, expression: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """(vertices, unit vertex normals) of the mesh with an expression applied."""
        key = tuple(sorted(expression.items()))
        if key in self._deformed:
            return self._deformed[key]
        lay = self.layout
        p = self.rest.copy()
        x, y = self.rest[:, 0], self.rest[:, 1]
        skull = (self.part == 0).astype(float)
        brow = float(expression.get("brow_raise", 0.0))
        if brow:
            w = np.exp(-(y - lay.brow_y) ** 2 / (2 * 0.01**2)) * _smoothstep(0.065, 0.045, np.abs(x))
            p[:, 1] -= 0.010 * brow * w * skull * (self.rest[:, 2] < 0)
        smile = float(expression.get("smile", 0.0))
        if smile:
            for side in (-1, 1):
                g = np.exp(-((x - side * lay.mouth_half_width) ** 2 + (y - lay.mouth_y) ** 2) / (2 * 0.011**2)) * skull
                p[:, 0] += side * 0.004 * smile * g
                p[:, 1] -= 0.007 * smile * g
                p[:, 2] += 0.002 * smile * g
        jaw = float(expression.get("jaw_open", 0.0))
        if jaw:
            angle = math.radians(JAW_DEGREES) * jaw * self.jaw_weight
            c, s = np.cos(angle), np.sin(angle)
            rel = p - JAW_PIVOT
            p[:, 1] = JAW_PIVOT[1] + c * rel[:, 1] - s * rel[:, 2]
            p[:, 2] = JAW_PIVOT[2] + s * rel[:, 1] + c * rel[:, 2]
        out = (p, vertex_normals(p, self.faces))
        self._deformed[key] = out
        while len(self._deformed) > 4:
            self._deformed.popitem(last=False)
        return out

    # ----------------------------------------------------------------- rendering

    def _check(self, values: dict, expression: dict) -> None:
        for name, v in values.items():
            if name not in self.attributes:
                raise ValueError(f"the mesh head models attributes {list(self.attributes)}; got {name!r}")
            if not (np.isfinite(v) and 0 <= v <= len(self.keys[name]) - 1):
                raise ValueError(f"{name}={v!r}: the mesh head's slider runs 0..{len(self.keys[name]) - 1}")
        unknown = set(expression) - set(self.expressions)
        if unknown:
            raise ValueError(f"the mesh head models expressions {list(self.expressions)}; got {sorted(unknown)}")

    def num_levels(self, attribute: str) -> int:
        if attribute not in self.keys:
            raise ValueError(f"the mesh head models attributes {list(self.attributes)}; got {attribute!r}")
        return len(self.keys[attribute])

    def _camera(self, camera: dict, size: int):
        s = self.supersample
        view = torch.tensor(camera["viewmat"], dtype=torch.float64).reshape(4, 4)
        K = torch.tensor(camera["K"], dtype=torch.float64).reshape(3, 3).clone()
        K[:2] *= s  # pixel centres (j + 0.5) / s of the fine grid average to the coarse ones
        return view, K, size * s

    def _head_fragments(self, expression: dict, camera: dict, size: int):
        """Per fine pixel of the skull + neck: depth, rest point, rest/deformed normal, part, facing."""
        key = (tuple(sorted(expression.items())), tuple(camera["viewmat"]), tuple(camera["K"]), size)
        if key in self._frags:
            return self._frags[key]
        verts, normals = self.deformed(expression)
        view, K, n = self._camera(camera, size)
        frags = raster.rasterize(raster.to_camera(torch.from_numpy(verts), view), self._faces_t, K, n, n)
        attrs = torch.from_numpy(np.concatenate([self.tex, self.rest_normals, normals, self.part[:, None]], 1))
        cov = frags.covered
        per = raster.interpolate(frags, self._faces_t, attrs)[cov].numpy()
        out = {"covered": cov.numpy(), "depth": frags.depth.numpy(), "front": frags.front[cov].numpy(),
               "tex": per[:, :3], "rest_normal": per[:, 3:6], "normal": per[:, 6:9], "part": per[:, 9],
               "size": n}
        out.update(self._layers(out))
        self._frags[key] = out
        while len(self._frags) > 2:
            self._frags.popitem(last=False)
        return out

    def _shade(self, normal: np.ndarray) -> np.ndarray:
        n = normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
        return AMBIENT + DIFFUSE * np.clip(n @ LIGHT, 0, 1)  # at most 1: no colour clips, edits stay linear

    def _layers(self, f: dict) -> dict:
        """The attribute-independent texture layers of the covered fine pixels (shaded)."""
        lay = self.layout
        p, rn, part = f["tex"], f["rest_normal"], f["part"]
        skull = np.clip(1 - part, 0, 1)
        shade = self._shade(f["normal"])[:, None]
        col = self.skin[None] * (1 + 0.03 * self._skin_noise(p))[:, None]
        col = np.where(part[:, None] > 0.5, col * 0.93, col)
        # The portrait, projected along z onto the front of the face.
        rnz = rn[:, 2] / np.maximum(np.linalg.norm(rn, axis=1), 1e-12)
        cy = (lay.brow_y - 0.01 + lay.chin_y) / 2
        ry = (lay.chin_y - lay.brow_y + 0.01) / 2 + 0.006
        r = np.sqrt((p[:, 0] / (lay.face_half_width * 0.95)) ** 2 + ((p[:, 1] - cy) / ry) ** 2)
        w_face = _smoothstep(1.0, 0.8, r) * _smoothstep(-0.25, -0.6, rnz) * skull
        sel = w_face > 0
        if sel.any():
            px = lay.to_portrait(p[sel, :2])
            h, w = self.portrait.shape[:2]
            grid = torch.from_numpy(np.stack([px[:, 0] / w * 2 - 1, px[:, 1] / h * 2 - 1], 1)).float()
            sampled = torch.nn.functional.grid_sample(self._portrait_t, grid[None, None], mode="bilinear",
                                                      padding_mode="border", align_corners=False)
            photo = sampled[0, :, 0].T.numpy().astype(np.float64)
            col[sel] = col[sel] * (1 - w_face[sel, None]) + photo * w_face[sel, None]
        # The shell's inside (seen through the open mouth), and the neck where it is inside the skull.
        inside = ((p / RADII) ** 2).sum(1) < 1.0
        interior = ~f["front"] | ((part > 0.5) & inside)
        beard_mask = self.beard_mask(p) * skull
        return {
            "base": col * shade, "interior": interior,
            "beard_unit": beard_mask * (0.8 + 0.35 * self._stubble(p)), "beard_mask": beard_mask,
            "beard": BEARD_COLOR[None] * (1 + 0.25 * self._stubble_tone(p))[:, None] * shade,
            "hair": self.hair_mask(p) * skull,
            "hair_tone": np.clip(1 + 0.15 * self._strands(p), 0.6, 1.08)[:, None] * shade,
        }

    def _texture(self, f: dict, values: dict) -> np.ndarray:
        """Shaded colours [M, 3] of the covered fine pixels of the skull and neck at attribute values."""
        col = f["base"]
        # Beard: a stubble pattern whose coverage follows the density key.
        density = float(_piecewise(BEARD_DENSITY, values.get("beard", 0.0)))
        if density > 0:
            cover = np.clip(density * f["beard_unit"], 0, 1)[:, None]
            col = col * (1 - cover) + f["beard"] * cover
        # Hair: the region's colour, times a fixed strand pattern.
        hair = f["hair"][:, None]
        col = col * (1 - hair) + _piecewise(HAIR_COLORS, values.get("hair", 0.0))[None] * f["hair_tone"] * hair
        return np.where(f["interior"][:, None], INTERIOR[None] * 0.8, col)

    def render(self, values: dict[str, float] | None = None, expression: dict[str, float] | None = None,
               camera: dict | None = None, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """(rgb [H, W, 3] over a white background, alpha [H, W]) in [0, 1] for a ``camera_record``."""
        values, expression = dict(values or {}), dict(expression or {})
        self._check(values, expression)
        if camera is None:
            raise ValueError("render needs a camera (perse_ray.camera.camera_record)")
        f = self._head_fragments(expression, camera, size)
        n = f["size"]
        rgb = np.ones((n * n, 3))
        alpha = np.zeros(n * n)
        cov = f["covered"].reshape(-1)
        rgb[cov] = self._texture(f, values)
        alpha[cov] = 1.0
        depth = f["depth"].reshape(-1).astype(np.float64)
        rim, tint = _piecewise(GLASSES_KEYS, values.get("glasses", 0.0))
        if rim > 0 or tint > 0:
            view, K, _ = self._camera(camera, size)
            rv, rf, lv, lf = self._glasses(max(rim, 1e-9))
            if rim > 0:
                fr = raster.rasterize(raster.to_camera(torch.from_numpy(rv), view), torch.from_numpy(rf), K, n, n)
                hit = (fr.covered.reshape(-1) & (fr.depth.reshape(-1) < torch.from_numpy(depth))).numpy()
                normal = raster.interpolate(fr, torch.from_numpy(rf), torch.from_numpy(vertex_normals(rv, rf)))
                normal = normal.reshape(-1, 3).numpy()[hit]
                rgb[hit] = RIM_COLOR[None] * self._shade(normal)[:, None]
                alpha[hit] = 1.0
                depth[hit] = fr.depth.reshape(-1).numpy()[hit]
            if tint > 0:
                fl = raster.rasterize(raster.to_camera(torch.from_numpy(lv), view), torch.from_numpy(lf), K, n, n)
                over = (fl.covered.reshape(-1) & (fl.depth.reshape(-1) < torch.from_numpy(depth))).numpy()
                a = 0.9 * tint
                rgb[over] = rgb[over] * (1 - a) + LENS_COLOR[None] * a
                alpha[over] = alpha[over] * (1 - a) + a
        s = self.supersample
        img = torch.from_numpy(np.concatenate([rgb, alpha[:, None]], 1).reshape(n, n, 4).astype(np.float32))
        out = raster.downsample(img, s).numpy()
        return np.clip(out[..., :3], 0, 1).astype(np.float32), np.clip(out[..., 3], 0, 1).astype(np.float32)

    def region_mask(self, attribute: str, expression: dict[str, float] | None, camera: dict, size: int,
                    dilate: int = 2) -> np.ndarray:
        """[H, W] float mask of the pixels an attribute can change (at its largest extent), dilated."""
        expression = dict(expression or {})
        self._check({attribute: 0.0}, expression)
        n = size * self.supersample
        if attribute == "glasses":
            view, K, _ = self._camera(camera, size)
            rv, rf, lv, lf = self._glasses(max(k[0] for k in GLASSES_KEYS))
            verts = np.concatenate([rv, lv])
            faces = np.concatenate([rf, lf + len(rv)])
            fr = raster.rasterize(raster.to_camera(torch.from_numpy(verts), view), torch.from_numpy(faces), K, n, n)
            fine = fr.covered.numpy().astype(np.float32).reshape(-1)
        else:
            f = self._head_fragments(expression, camera, size)
            fine = np.zeros(n * n, dtype=np.float32)
            region = f["hair"] if attribute == "hair" else f["beard_mask"]
            fine[f["covered"].reshape(-1)] = region * ~f["interior"]
        coarse = raster.downsample(torch.from_numpy((fine > 0.02).astype(np.float32)).reshape(n, n, 1),
                                   self.supersample)[..., 0]
        mask = (coarse > 0).float()[None, None]
        if dilate:
            mask = torch.nn.functional.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)
        return mask[0, 0].numpy()
