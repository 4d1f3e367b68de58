"""Animate: every edit (and the source) rendered at one frame of the shared motion script.

All edits of a subject use the same seed at a given frame, so a stochastic animator renders frame
k of every edit with the same noise: videos differ by the edit, not by chance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perse_ray.camera import camera_record
from perse_ray.config import Config
from perse_ray.synth.backends import Animator
from perse_ray.synth.edit import Edit, check_image, check_mask, combined_levels, edit_levels_of
from perse_ray.synth.ingest import stage_seed
from perse_ray.synth.motion import MotionFrame


@dataclass
class Frame:
    attribute: str
    edit_index: int
    image: np.ndarray  # uint8 [S, S, 3]
    landmarks: np.ndarray  # [68, 2] where the face is in this frame
    mask: np.ndarray | None  # edit region carried into the frame; None for source frames
    interpolation: tuple[int, int, float] | None = None  # (from_edit, to_edit, alpha) for morphs
    also_edits: dict[str, int] | None = None  # a composed edit's other attributes (see synth/edit.py)


def animate_frame(subject_id: str, edits: list[Edit], landmarks: np.ndarray, frame: MotionFrame,
                  animator: Animator, cfg: Config) -> list[Frame]:
    seed = stage_seed(cfg.synth.seed, subject_id, "animate", frame.index)
    combined_here = dict(combined_levels(cfg)).get(frame.index)
    frames = []
    for e in edits:
        if e.also_edits is not None and edit_levels_of(e) != combined_here:
            continue  # a composed edit is animated only at its own frame of the script
        who = f"{type(animator).__name__} ({e.attribute or 'source'} edit {e.edit_index}, frame {frame.index})"
        image, moved, _valid, mask = animator.animate(e.image, landmarks, frame, seed, mask=e.mask)
        image = check_image(image, e.image.shape, who)
        if e.mask is not None:
            if mask is None:
                raise ValueError(f"{who} dropped the edit mask")
            mask = check_mask(mask, e.image.shape, who)
        frames.append(Frame(e.attribute, e.edit_index, image, np.asarray(moved, np.float32),
                            mask if e.mask is not None else None, also_edits=e.also_edits))
    return frames


def frame_camera(frame: MotionFrame, cfg: Config) -> dict:
    res = cfg.synth.resolution
    return camera_record(frame.yaw, frame.pitch, res, res, cfg.render.fov_deg, cfg.render.distance)
