"""Classical synthesis backends of the ``cpu`` presets: landmark-driven edits, a 2.5D animator and
exact morphs. They implement the stage protocols of ``perse_ray.synth.backends``.

Edits are parametric (``EditSpec.params``), so an interpolation reference is exact: the edit at
the interpolated params, animated with the same frame. For a morph to meet its endpoints exactly
the pipeline passes the same ``seed`` to every level of an attribute and to the morph (only the
beard's strand texture uses it).
"""

from __future__ import annotations

import numpy as np

from perse_ray.config import Config, EditSpec
from perse_ray.synth.classical.animator import Camera, animate
from perse_ray.synth.classical.edits import EDITS, lerp_params
from perse_ray.synth.motion import MotionFrame


def _edit(image: np.ndarray, landmarks: np.ndarray, attribute: str, params: dict[str, float] | None,
          seed: int) -> tuple[np.ndarray, np.ndarray]:
    if attribute not in EDITS:
        raise ValueError(f"no classical edit for attribute {attribute!r}; choices: {', '.join(sorted(EDITS))}")
    if params is None:
        return np.array(image, copy=True), np.zeros(np.shape(image)[:2], np.float32)
    return EDITS[attribute](np.asarray(image), np.asarray(landmarks, np.float32), params, seed)


class ClassicalEditor:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    def edit(self, image: np.ndarray, landmarks: np.ndarray, attribute: str, spec: EditSpec | None,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(edited image, edit mask); ``spec`` None is the source with a zero mask."""
        return _edit(image, landmarks, attribute, None if spec is None else spec.params, seed)


class ClassicalAnimator:
    """Deterministic: ``seed`` is accepted for the protocol and not needed."""

    def __init__(self, cfg: Config):
        self.camera = Camera(cfg.render.fov_deg, cfg.render.distance)

    def animate(self, image: np.ndarray, landmarks: np.ndarray, frame: MotionFrame, seed: int,
                mask: np.ndarray | None = None):
        return animate(image, landmarks, frame, mask, camera=self.camera)


class ExactMorpher:
    """Reference at ``alpha`` = the edit at ``lerp_params(from, to, alpha)``, animated with ``frame``.

    Exact for parametric edits, so ``frame_from``/``frame_to`` (the animated endpoints, which a
    diffusion morpher blends) are not needed; alpha 0 and 1 reproduce them bit for bit.
    """

    def __init__(self, cfg: Config):
        self.animator = ClassicalAnimator(cfg)

    def morph(self, source: np.ndarray, landmarks: np.ndarray, attribute: str, spec_from: EditSpec | None,
              spec_to: EditSpec | None, alpha: float, frame: MotionFrame, frame_from: np.ndarray,
              frame_to: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if spec_from is None and spec_to is None:
            params = None
        else:
            params = lerp_params({} if spec_from is None else spec_from.params,
                                 {} if spec_to is None else spec_to.params, alpha)
        edited, mask = _edit(source, landmarks, attribute, params, seed)
        image, _, _, warped = self.animator.animate(edited, landmarks, frame, seed, mask)
        return image, warped
