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

import numpy as np


def intrinsics(width: int, height: int, fov_deg: float) -> np.ndarray:
    """3x3 K for a vertical field of view ``fov_deg``; principal point at the image centre."""
    f = 0.5 * height / math.tan(math.radians(fov_deg) / 2)
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=np.float32)


def orbit_viewmat(yaw_deg: float, pitch_deg: float, distance: float) -> np.ndarray:
    """4x4 world-to-camera matrix of a camera on a sphere of radius ``distance`` looking at the origin."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    # Camera centre: front view is (0, 0, -distance); y is down, so looking from above is -y.
    centre = distance * np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch),
                                  -math.cos(yaw) * math.cos(pitch)])
    forward = -centre / np.linalg.norm(centre)  # camera +z
    down = np.array([0.0, 1.0, 0.0])
    right = np.cross(down, forward)  # camera +x
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)  # camera +y
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
