"""Camera conventions shared by the synthesis stages, the avatar and the renderer.

World space is head-centred, in metres, with OpenCV axes seen from the front view: x to the image
right, y down, z away from the camera. The head faces -z. A camera orbits the origin at
``distance``: yaw (degrees) swings it around the vertical axis (+yaw moves it towards the front
view's image-right, showing more of the subject's left cheek), pitch (degrees) raises it (+pitch
looks from above).
Intrinsics are pinhole with square pixels and the principal point at the image centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Camera:
    """The pinhole/orbit camera the frames are rendered for (``RenderConfig`` fov and distance)."""

    fov_deg: float = 30.0
    distance: float = 1.0


def intrinsics(width: int, height: int, fov_deg: float) -> np.ndarray:
    """3x3 K for a vertical field of view ``fov_deg``; principal point at the image centre."""
    f = 0.5 * height / math.tan(math.radians(fov_deg) / 2)
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=np.float32)


def orbit_viewmat(yaw_deg: float, pitch_deg: float, distance: float) -> np.ndarray:
    """4x4 world-to-camera matrix of a camera on a sphere of radius ``distance`` looking at the origin.

    The camera's down axis is the world's down as seen in the image: its right axis is the yaw's
    horizontal axis (cos yaw, 0, sin yaw), which is what cross(world down, forward) normalises to
    for every |pitch| < 90. Taking it directly keeps the view defined and orthonormal at exactly
    ±90 (straight above or below, where that cross product vanishes): the limit from inside.
    Beyond ±90 the camera has passed over the pole and right flips, so the image stays upright.
    The side is decided on the degrees: radians(90) rounds a float32 90 past pi/2 (cos < 0), which
    flipped the view at exactly 90 before.
    """
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    # Camera centre: front view is (0, 0, -distance); y is down, so looking from above is -y.
    centre = distance * np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch),
                                  -math.cos(yaw) * math.cos(pitch)])
    forward = np.array([-math.sin(yaw) * math.cos(pitch), math.sin(pitch),
                        math.cos(yaw) * math.cos(pitch)])  # camera +z, towards the origin
    over_the_pole = abs((float(pitch_deg) + 180.0) % 360.0 - 180.0) > 90.0  # not cos(pitch) < 0: float
    right = (-1.0 if over_the_pole else 1.0) * np.array([math.cos(yaw), 0.0, math.sin(yaw)])  # camera +x
    down = np.cross(forward, right)  # camera +y; unit: forward and right are orthonormal
    rot = np.stack([right, down, forward])  # rows: camera axes in world coordinates
    view = np.eye(4)
    view[:3, :3] = rot
    view[:3, 3] = -rot @ centre
    return view.astype(np.float32)


def camera_record(yaw_deg: float, pitch_deg: float, width: int, height: int, fov_deg: float,
                  distance: float) -> dict:
    """The ``camera`` struct of the frames schema."""
    return {
        "yaw": float(yaw_deg),
        "pitch": float(pitch_deg),
        "K": intrinsics(width, height, fov_deg).reshape(-1).tolist(),
        "viewmat": orbit_viewmat(yaw_deg, pitch_deg, distance).reshape(-1).tolist(),
    }
