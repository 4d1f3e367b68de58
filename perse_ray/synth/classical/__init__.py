"""Classical synthesis backends of the ``cpu`` presets: landmark-driven edits, a 2.5D animator and
exact morphs. They implement the stage protocols of ``perse_ray.synth.backends``.

Edits are parametric (``EditSpec.params``), so an interpolation reference is exact: the edit at
the interpolated params, animated with the same frame. For a morph to meet its endpoints exactly
the pipeline passes the same ``seed`` to every level of an attribute and to the morph (only the
beard's strand texture uses it).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from perse_ray.camera import Camera
from perse_ray.config import Config, EditSpec
from perse_ray.synth.classical.animator import apply_warp, build_mesh, frame_warp
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


class _LRU:
    """A small least-recently-used map, bounded by entries or by bytes (``size_of``): the stages'
    per-subject and per-frame caches."""

    def __init__(self, capacity: int, size_of=lambda value: 1):
        self.capacity, self.size_of, self.items, self.used = capacity, size_of, OrderedDict(), 0

    def get(self, key, make):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key][0]
        value = make()
        cost = self.size_of(value)
        self.items[key] = (value, cost)
        self.used += cost
        while self.used > self.capacity and len(self.items) > 1:
            _, (_, old) = self.items.popitem(last=False)
            self.used -= old
        return value


def _warp_bytes(warp) -> int:
    arrays = [warp.map_xy, warp.valid, warp.landmarks, warp.gap, warp.gap_colour, *sum(warp.layers, ())]
    return sum(a.nbytes for a in arrays)


def _edit_bytes(edit) -> int:
    return sum(np.asarray(a).nbytes for a in edit)


def _frame_key(frame: MotionFrame) -> tuple:
    return float(frame.yaw), float(frame.pitch), tuple(sorted((k, float(v)) for k, v in frame.expression.items()))


class ClassicalAnimator:
    """Deterministic: ``seed`` is accepted for the protocol and not needed.

    The warp depends on the landmarks and the frame only, so the subject's mesh is built once and
    each frame's warp once, then applied to the source and every edit (bit-identical to
    ``animator.animate``)."""

    MESHES = 8  # subjects
    WARP_BYTES = 64 << 20  # ~100 frames' warps at 128 px: a whole cpu motion script and then some

    def __init__(self, cfg: Config):
        self.camera = Camera(cfg.render.fov_deg, cfg.render.distance)
        self._meshes, self._warps = _LRU(self.MESHES), _LRU(self.WARP_BYTES, _warp_bytes)

    def warp(self, landmarks: np.ndarray, size: int, frame: MotionFrame):
        lm = np.ascontiguousarray(landmarks, np.float64)
        subject = (lm.tobytes(), lm.shape, int(size))
        mesh = self._meshes.get(subject, lambda: build_mesh(lm, size, self.camera))
        return self._warps.get((subject, _frame_key(frame)), lambda: frame_warp(mesh, frame))

    def animate(self, image: np.ndarray, landmarks: np.ndarray, frame: MotionFrame, seed: int,
                mask: np.ndarray | None = None):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[0] != image.shape[1]:
            raise ValueError(f"animate expects a square HxWx3 image, got {image.shape}")
        return apply_warp(image, self.warp(landmarks, image.shape[0], frame), mask)


def _image_key(image: np.ndarray) -> tuple:
    a = np.ascontiguousarray(image)
    return a.shape, str(a.dtype), hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


class ExactMorpher:
    """Reference at ``alpha`` = the edit at ``lerp_params(from, to, alpha)``, animated with ``frame``.

    Exact for parametric edits, so ``frame_from``/``frame_to`` (the animated endpoints, which a
    diffusion morpher blends) are not needed; alpha 0 and 1 reproduce them bit for bit. An edit
    does not depend on the frame: each (source, attribute, params, seed) is edited once and the
    animator's cached warps animate it at every frame.
    """

    EDIT_BYTES = 16 << 20  # a subject's morph levels (attributes x pairs x alphas) at 128 px, several times

    def __init__(self, cfg: Config):
        self.animator = ClassicalAnimator(cfg)
        self._edits = _LRU(self.EDIT_BYTES, _edit_bytes)

    def morph(self, source: np.ndarray, landmarks: np.ndarray, attribute: str, spec_from: EditSpec | None,
              spec_to: EditSpec | None, alpha: float, frame: MotionFrame, frame_from: np.ndarray,
              frame_to: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if spec_from is None and spec_to is None:
            params = None
        else:
            params = lerp_params({} if spec_from is None else spec_from.params,
                                 {} if spec_to is None else spec_to.params, alpha)
        key = (_image_key(source), _image_key(np.asarray(landmarks, np.float32)), attribute,
               None if params is None else tuple(sorted(params.items())), int(seed))
        edited, mask = self._edits.get(key, lambda: _edit(source, landmarks, attribute, params, seed))
        image, _, _, warped = self.animator.animate(edited, landmarks, frame, seed, mask)
        return image, warped
