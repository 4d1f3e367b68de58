"""Camera conventions: the orbit camera everywhere on its sphere, and pixel centres shared by the
classical animator (integer-indexed image arrays) and the renderer (continuous, centres at +0.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perse_ray.camera import intrinsics, orbit_viewmat

DISTANCE = 0.65


def _upright_view(yaw_deg: float, pitch_deg: float, distance: float) -> np.ndarray:
    """Independent look-at for |pitch| < 90: camera down = world down projected onto the image plane."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    centre = distance * np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), -math.cos(yaw) * math.cos(pitch)])
    forward = -centre / np.linalg.norm(centre)
    world_down = np.array([0.0, 1.0, 0.0])
    down = world_down - (world_down @ forward) * forward
    down /= np.linalg.norm(down)
    rot = np.stack([np.cross(down, forward), down, forward])
    view = np.eye(4)
    view[:3, :3], view[:3, 3] = rot, -rot @ centre
    return view


def _check_view(view: np.ndarray, distance: float):
    rot = view[:3, :3].astype(np.float64)
    assert np.isfinite(view).all()
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(rot) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(view[:3, 3], [0.0, 0.0, distance], atol=1e-6)  # looks at the origin
    np.testing.assert_allclose(view[3], [0, 0, 0, 1])


@pytest.mark.parametrize("yaw", [-150.0, -30.0, 0.0, 20.0, 90.0])
@pytest.mark.parametrize("pitch", [-85.0, -40.0, -5.0, 0.0, 12.0, 60.0, 85.0])
def test_orbit_view_is_the_upright_look_at(yaw, pitch):
    view = orbit_viewmat(yaw, pitch, DISTANCE)
    _check_view(view, DISTANCE)
    np.testing.assert_allclose(view, _upright_view(yaw, pitch, DISTANCE), atol=1e-6)


@pytest.mark.parametrize("yaw", [0.0, 33.0, -120.0, 180.0])
@pytest.mark.parametrize("pole", [90.0, -90.0])
def test_orbit_view_at_and_near_the_poles(yaw, pole):
    sign = math.copysign(1.0, pole)
    at = orbit_viewmat(yaw, pole, DISTANCE)
    _check_view(at, DISTANCE)
    # Straight above (+90) or below (-90): the camera sits on the vertical axis and looks along it.
    np.testing.assert_allclose(at[2, :3], [0.0, sign, 0.0], atol=1e-6)
    # The yaw still turns the image there, as it does just inside the pole: the limit is taken.
    np.testing.assert_allclose(at[0, :3], [math.cos(math.radians(yaw)), 0.0, math.sin(math.radians(yaw))], atol=1e-6)
    for inside in (1e-9, 1e-6, 1e-3):
        near = orbit_viewmat(yaw, pole - sign * inside, DISTANCE)
        _check_view(near, DISTANCE)
        np.testing.assert_allclose(near, at, atol=2 * math.radians(inside) + 1e-6)
    # The same pole named by another turn (±270, ±450, ...) is the same camera and the same view:
    # the side of the pole is not left to the rounding sign of cos(pitch), which is 0 there.
    for turns in (-2, -1, 1, 2):
        np.testing.assert_allclose(orbit_viewmat(yaw, pole + 360.0 * turns, DISTANCE), at, atol=1e-6)


def test_orbit_view_over_the_pole_stays_upright():
    # Past +90 the camera has crossed the top: the view is the upright one of the mirrored position.
    over = orbit_viewmat(30.0, 120.0, DISTANCE)
    _check_view(over, DISTANCE)
    np.testing.assert_allclose(over, _upright_view(30.0 + 180.0, 60.0, DISTANCE), atol=1e-6)


# --------------------------------------------------------------------------- pixel centres


@pytest.fixture(scope="module")
def astronaut_landmarks():
    from skimage import data

    from perse_ray.config import FacesConfig
    from perse_ray.faces import align, load_face_model

    image = data.astronaut()
    return align(image, load_face_model(FacesConfig()).detect(image)[0], PORTRAIT_SIZE)[1]


PORTRAIT_SIZE = 128  # the cpu preset's frame size


def _rendered_centres(points: np.ndarray, poses, size: int, camera) -> np.ndarray:
    """Where the renderer draws each 3D point in the image array: the alpha-weighted centroid, in
    array index coordinates (pixel [i, j] at x = j, y = i), of a small round Gaussian placed there
    alone: [P, C, 2]."""
    import torch

    from perse_ray.render import rasterize

    n = len(points)
    means = torch.as_tensor(points, dtype=torch.float64).reshape(n, 1, 3)
    views = torch.from_numpy(np.stack([orbit_viewmat(y, p, camera.distance) for y, p in poses])).double()
    K = torch.from_numpy(intrinsics(size, size, camera.fov_deg)).double()
    _, alphas, meta = rasterize(
        means, torch.tensor([1.0, 0, 0, 0], dtype=torch.float64).expand(n, 1, 4),
        torch.full((n, 1, 3), 0.004, dtype=torch.float64), torch.full((n, 1), 0.5, dtype=torch.float64),
        torch.ones(n, 1, 1, dtype=torch.float64), views.expand(n, -1, -1, -1), K.expand(n, len(poses), 3, 3),
        size, size, backend="cpu")
    a = alphas[..., 0].numpy()  # [P, C, H, W]
    assert (a[..., 0, :] == 0).all() and (a[..., -1, :] == 0).all()  # whole footprints inside the image
    assert (a[..., :, 0] == 0).all() and (a[..., :, -1] == 0).all()
    ys, xs = np.mgrid[0:size, 0:size]
    mass = a.sum((-2, -1))
    centres = np.stack([(a * xs).sum((-2, -1)) / mass, (a * ys).sum((-2, -1)) / mass], -1)
    # The footprints are big enough (sigma ~1.7 px) for the sampled centroid to be the projected
    # mean: in the renderer's continuous coordinates pixel centres are at +0.5.
    np.testing.assert_allclose(centres, meta["means2d"][:, :, 0].numpy() - 0.5, atol=0.01)
    return centres


def test_animator_landmarks_land_where_the_renderer_draws_them(astronaut_landmarks):
    """The animator warps image arrays (cv2.remap, its rasterizer, dlib's landmarks: pixel centres
    at integers); the renderer the avatar learns with puts them at +0.5. A landmark the animator
    moves must land where the renderer draws the 3D point the animator put it at, or every frame is
    shifted against the avatar's renders."""
    from perse_ray.camera import Camera
    from perse_ray.geometry import landmarks_in_world, move_landmarks
    from perse_ray.synth.motion import MotionFrame

    from perse_ray.config import RenderConfig

    camera = Camera(RenderConfig().fov_deg, RenderConfig().distance)
    lm = astronaut_landmarks
    frames = [MotionFrame(0, 0.0, 0.0, {}), MotionFrame(1, 25.0, -10.0, {"smile": 0.6}),
              MotionFrame(2, -30.0, 12.0, {"jaw_open": 0.8, "brow_raise": 0.5})]
    worst = 0.0
    for frame in frames:
        points = landmarks_in_world(lm, frame.expression, PORTRAIT_SIZE, camera)
        drawn = _rendered_centres(points, [(frame.yaw, frame.pitch)], PORTRAIT_SIZE, camera)[:, 0]
        moved = move_landmarks(lm, frame, PORTRAIT_SIZE, camera)
        if frame.yaw == frame.pitch == 0 and not frame.expression:
            np.testing.assert_allclose(moved, lm, atol=1e-3)  # the front view keeps the portrait's own
        worst = max(worst, float(np.abs(moved - drawn).max()))
    assert worst < 0.1, f"animator and renderer disagree by {worst:.3f} px"


def test_head_geometry_needs_no_synthesis_backend(astronaut_landmarks):
    """The evaluation and the gpu path move landmarks with ``perse_ray.geometry``; it must not pull
    in a cpu synthesis backend, and its mirror map must pair the two halves of the face."""
    import subprocess
    import sys

    code = ("import sys, perse_ray.geometry, perse_ray.evaluate; "
            "print(sorted(m for m in sys.modules if m.startswith('perse_ray.synth.classical')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

    from perse_ray.geometry import MIRROR, FaceFrame, move_landmarks
    from perse_ray.synth.motion import MotionFrame

    assert np.array_equal(MIRROR[MIRROR], np.arange(68))  # an involution
    assert set(np.flatnonzero(MIRROR == np.arange(68))) == {8, 27, 28, 29, 30, 33, 51, 57, 62, 66}
    lm = astronaut_landmarks
    face = FaceFrame.from_landmarks(lm).to_face(lm)
    # The portrait's face is near symmetric: each landmark's mirror sits at its mirrored position.
    assert np.abs(face[MIRROR] * [-1, 1] - face).max() < 0.35
    # A turn moves each half as its mirror image moves for the opposite turn.
    right = FaceFrame.from_landmarks(lm).to_face(move_landmarks(lm, MotionFrame(1, 30.0, 0.0), PORTRAIT_SIZE))
    left = FaceFrame.from_landmarks(lm).to_face(move_landmarks(lm, MotionFrame(2, -30.0, 0.0), PORTRAIT_SIZE))
    assert np.abs((right - face) * [-1, 1] - (left - face)[MIRROR]).max() < 0.35
