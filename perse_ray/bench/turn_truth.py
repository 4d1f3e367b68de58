"""The classical animator against a true head turn, on the mesh ground-truth head.

The head's front render is the portrait; its renders at other yaws are what a perfect animator
would make of it. Per yaw: the animator's frame against the true turn (PSNR over the head), the
unmoved front render against it (the do-nothing baseline an animator must beat), and the face
model's identity of both against the front render. The true turn's identity says how much of a
wide-yaw identity loss belongs to the face model itself: it is what a perfect synthesis of the
head would score (an imperfect one may score higher, the face model is no judge of geometry).
Where the detector misses a turned face, both are embedded at the landmarks the animator moved
(the evaluation's own fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from perse_ray.avatar.losses import psnr
from perse_ray.camera import Camera, camera_record
from perse_ray.faces import FaceModel, embed_frame
from perse_ray.synth.classical.animator import apply_warp, build_mesh, frame_warp
from perse_ray.synth.motion import MotionFrame


@dataclass(frozen=True)
class TurnScore:
    yaw: float
    psnr_animated: float  # dB over the head (covered in the true turn or the front view)
    psnr_unmoved: float  # the front render itself, same pixels
    identity_truth: float  # face model id_score, true turn vs front render
    identity_animated: float
    detected: int  # how many of the two the detector found (the rest: embedded at moved landmarks)


def _u8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """The project's PSNR over the pixels ``where`` selects (uint8 images)."""
    pixels = (torch.from_numpy(x[where]).double() / 255.0 for x in (a, b))
    return float(psnr(*pixels))


def score_turns(head, face_model: FaceModel, yaws, size: int, camera: Camera) -> tuple[list[TurnScore], np.ndarray]:
    """Scores per yaw and a picture (true turns over the animator's frames, a column per yaw).

    ``head`` is a ground-truth head (``render(values, expression, camera_record, size)``); the face
    model finds the front render's landmarks, which the animator needs, and scores identity."""
    def render(yaw: float):
        rgb, alpha = head.render({}, {}, camera_record(yaw, 0.0, size, size, camera.fov_deg, camera.distance), size)
        return _u8(rgb), alpha > 0.5

    front, front_head = render(0.0)
    faces = face_model.detect(front)
    if not faces:
        raise ValueError(f"{face_model.name} finds no face in the head's {size}-px front render")
    face = max(faces, key=lambda f: f.area)
    mesh = build_mesh(face.landmarks, size, camera)
    source = face_model.embed(front, face)
    scores, columns = [], []
    for yaw in yaws:
        truth, on_head = render(float(yaw))
        animated, moved, _, _ = apply_warp(front, frame_warp(mesh, MotionFrame(0, float(yaw), 0.0, {})))
        where = on_head | front_head
        ids, found = [], 0
        for image in (truth, animated):
            emb, how = embed_frame(face_model, image, moved)  # never None: moved landmarks are known
            found += how == "detector"
            ids.append(face_model.id_score(source, emb))
        scores.append(TurnScore(float(yaw), _psnr(animated, truth, where), _psnr(front, truth, where),
                                ids[0], ids[1], found))
        columns.append(np.concatenate([truth, animated], axis=0))
    return scores, np.concatenate(columns, axis=1)
