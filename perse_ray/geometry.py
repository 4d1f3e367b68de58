"""Head geometry from 68 face landmarks, shared by the synthesis backends and the evaluation.

An aligned portrait's landmarks define a face frame (origin between the eyes, unit = interocular
distance, u along the eyes to the image right, v perpendicular pointing down) and a head: an
ellipsoid in world metres (``perse_ray.camera`` axes) carrying a generic face profile. The
landmarks are lifted along the front camera's pixel rays onto that profile, moved by the named
expressions and seen from the orbit camera of a ``MotionFrame``: ``move_landmarks`` is where the
classical animator draws them, and what the identity filter and the evaluation fall back on when
a detector misses a turned face.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perse_ray.camera import Camera, intrinsics, orbit_viewmat

JAW = slice(0, 17)
BROWS = slice(17, 27)
NOSE = slice(27, 36)
EYE_R = slice(36, 42)  # image-left eye
EYE_L = slice(42, 48)  # image-right eye
MOUTH = slice(48, 60)  # outer lip contour
INNER_MOUTH = slice(60, 68)

# iBUG-68 left-right mirror: MIRROR[i] is the landmark on the other side of the face (the midline
# points, nose bridge, tip and lip centres, map to themselves).
MIRROR = np.array(
    [16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,  # jaw
     26, 25, 24, 23, 22, 21, 20, 19, 18, 17,  # brows
     27, 28, 29, 30, 35, 34, 33, 32, 31,  # nose
     45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,  # eyes
     54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,  # outer lips
     64, 63, 62, 61, 60, 67, 66, 65])  # inner lips

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


@dataclass(frozen=True)
class FaceFrame:
    origin: np.ndarray  # midpoint of the eye centres, pixels
    u: np.ndarray  # unit vector, image-left eye -> image-right eye
    v: np.ndarray  # unit vector, u turned 90 degrees: "down" the face
    iod: float  # interocular distance, pixels

    @classmethod
    def from_landmarks(cls, landmarks: np.ndarray) -> FaceFrame:
        lm = np.asarray(landmarks, np.float64)
        eye_r, eye_l = lm[EYE_R].mean(0), lm[EYE_L].mean(0)
        d = eye_l - eye_r
        iod = float(np.hypot(*d))
        if not iod > 1e-6:
            raise ValueError("degenerate landmarks: both eye centres coincide")
        u = d / iod
        return cls((eye_r + eye_l) / 2, u, np.array([-u[1], u[0]]), iod)

    def to_image(self, pts) -> np.ndarray:
        """Face-frame coordinates (units of iod) -> pixels."""
        p = np.asarray(pts, np.float64)
        return self.origin + self.iod * (p[..., :1] * self.u + p[..., 1:2] * self.v)

    def to_face(self, pts) -> np.ndarray:
        d = np.asarray(pts, np.float64) - self.origin
        return np.stack([d @ self.u, d @ self.v], axis=-1) / self.iod

    def grid(self, shape: tuple[int, int]) -> np.ndarray:
        """Face-frame coordinates of every pixel centre: [H, W, 2]."""
        ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
        return self.to_face(np.stack([xs, ys], axis=-1))


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest rotation taking unit vector a to unit vector b (Rodrigues)."""
    v, c = np.cross(a, b), float(a @ b)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3)
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


class Head:
    """The head ellipsoid in world metres (``perse_ray.camera`` axes), as the front camera sees it.

    The world origin is where the orbit camera looks: the image centre at the head centre's depth,
    so one pixel there is D / f metres.

    Pixels here are image-array coordinates, as cv2.remap, the animator's rasterizer and dlib's
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

    def view(self, motion) -> np.ndarray:
        """World-to-camera 4x4 of a ``MotionFrame``'s orbit camera."""
        return orbit_viewmat(motion.yaw, motion.pitch, self.dist).astype(np.float64)

    def project(self, world: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and camera depths of world points."""
        cam = world @ view[:3, :3].T + view[:3, 3]
        return cam[:, :2] / cam[:, 2:3] * self.f + self.c, cam[:, 2]


def expression_offsets(expr: dict[str, float]) -> tuple[np.ndarray, float]:
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
                off[MIRROR[i]] += smile * np.array([out, -up])
        off[[40, 41, 46, 47], 1] -= 0.02 * smile  # cheeks push the lower lids up
    brow = value["brow_raise"]
    if brow:
        off[17:27, 1] -= 0.14 * brow
        off[[37, 38, 43, 44], 1] -= 0.02 * brow
    return off, value["eye_close"]


def expressed_landmarks(landmarks: np.ndarray, frame: FaceFrame, expression: dict[str, float]) -> np.ndarray:
    """The 68 landmarks (pixels) with the expression applied in the front view."""
    offsets, close = expression_offsets(expression)
    face = frame.to_face(landmarks) + offsets
    if close:
        for upper, lower in ((37, 41), (38, 40), (43, 47), (44, 46)):
            meet = face[upper] + 0.7 * (face[lower] - face[upper])
            face[upper] += close * (meet - face[upper])
            face[lower] += close * (meet - face[lower])
    return frame.to_image(face)


def landmarks_in_world(landmarks: np.ndarray, expression: dict[str, float], size: int,
                       camera: Camera = Camera()) -> np.ndarray:
    """The 3D points (world metres, ``perse_ray.camera`` axes) the 68 landmarks of an aligned
    ``size``-square portrait are put at, with ``expression`` applied: float64 [68, 3]."""
    lm = np.asarray(landmarks, np.float64)
    face = FaceFrame.from_landmarks(lm)
    return Head(face, size, camera).lift(expressed_landmarks(lm, face, expression), LANDMARK_DEPTH)


def move_landmarks(landmarks: np.ndarray, frame, size: int, camera: Camera = Camera()) -> np.ndarray:
    """Where the 68 landmarks land in ``frame`` (a ``MotionFrame``: expression, then head pose):
    float32 [68, 2]."""
    head = Head(FaceFrame.from_landmarks(np.asarray(landmarks, np.float64)), size, camera)
    uv, _ = head.project(landmarks_in_world(landmarks, frame.expression, size, camera), head.view(frame))
    return uv.astype(np.float32)
