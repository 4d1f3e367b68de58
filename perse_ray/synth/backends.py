"""Stage protocols and the registry of model-stage backends, chosen by name from the config.

Backends are imported lazily by ``"module:Class"`` so a preset only imports what it runs (the
cpu presets never import diffusers). An unknown name raises ``ValueError`` listing the choices.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from perse_ray.config import Config, EditSpec
from perse_ray.synth.motion import MotionFrame


class Editor(Protocol):
    def __init__(self, cfg: Config): ...

    def edit(self, image: np.ndarray, landmarks: np.ndarray, attribute: str, spec: EditSpec | None,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(edited image, mask of the changed region). ``spec`` None: the source and a zero mask."""


class Animator(Protocol):
    def __init__(self, cfg: Config): ...

    def animate(self, image: np.ndarray, landmarks: np.ndarray, frame: MotionFrame, seed: int,
                mask: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(frame image, its landmarks, valid-pixel mask, ``mask`` carried into the frame or None)."""


class Morpher(Protocol):
    def __init__(self, cfg: Config): ...

    def morph(self, source: np.ndarray, landmarks: np.ndarray, attribute: str,
              spec_from: EditSpec | None, spec_to: EditSpec | None, alpha: float, frame: MotionFrame,
              frame_from: np.ndarray, frame_to: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Interpolation reference at ``alpha`` between the animated frames of two adjacent edits."""


EDITORS = {
    "classical": "perse_ray.synth.classical:ClassicalEditor",
    "instruct_pix2pix": "perse_ray.synth.diffusion:InstructPix2PixEditor",
}
ANIMATORS = {
    "classical": "perse_ray.synth.classical:ClassicalAnimator",
    "controlnet": "perse_ray.synth.diffusion:ControlNetAnimator",
}
MORPHERS = {
    "exact": "perse_ray.synth.classical:ExactMorpher",
    "diffusion": "perse_ray.synth.diffusion:DiffusionMorpher",
}
REGISTRIES = {"editor": EDITORS, "animator": ANIMATORS, "morpher": MORPHERS}


def backend_class(kind: str, name: str) -> type:
    """The class registered as ``name`` for stage ``kind`` (editor | animator | morpher)."""
    if kind not in REGISTRIES:
        raise ValueError(f"unknown stage kind {kind!r}; choices: {', '.join(REGISTRIES)}")
    registry = REGISTRIES[kind]
    if name not in registry:
        raise ValueError(f"unknown {kind} backend {name!r}; choices: {', '.join(sorted(registry))}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def load_editor(cfg: Config) -> Editor:
    return backend_class("editor", cfg.synth.edit_backend)(cfg)


def load_animator(cfg: Config) -> Animator:
    return backend_class("animator", cfg.synth.animate_backend)(cfg)


def load_morpher(cfg: Config) -> Morpher:
    return backend_class("morpher", cfg.synth.morph_backend)(cfg)
