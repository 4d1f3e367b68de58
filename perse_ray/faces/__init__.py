"""Face detection, 68-point landmarks, identity embeddings and head-preserving alignment.

Images are uint8 HxWx3 RGB; landmarks float32 [68, 2] (x, y) pixels in dlib/iBUG-68 order.
``load_face_model(cfg.faces)`` returns a ``FaceModel`` picked by ``cfg.backend``; when
``cfg.identity_model`` names an ArcFace ONNX, its embeddings replace the backend's own.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from perse_ray.config import FacesConfig

# "module:callable(cfg)"; imported only when asked for, so dlib and insightface stay optional.
BACKENDS = {
    "dlib": "perse_ray.faces.dlib_backend:DlibFaces",
    "insightface": "perse_ray.faces.insightface_backend:InsightFaceModel",
}

# Aligned-frame positions (fractions of the side) of the image-left eye centre, the image-right eye
# centre and the mouth centre. The eyes sit a little below the middle and the interocular distance
# is a fifth of the side, so the whole head (hair, a hat), some neck and background fit in the frame.
ALIGN_TEMPLATE = np.array([[0.40, 0.48], [0.60, 0.48], [0.50, 0.705]], dtype=np.float64)
# Beyond the source picture the aligned frame fades to a plain backdrop within this share of its side.
FILL_FADE = 1 / 16


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 pixels
    score: float  # detector confidence (backend-specific scale)
    landmarks: np.ndarray  # [68, 2] float32, (x, y) pixels

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


@runtime_checkable
class FaceModel(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]: ...

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray: ...

    def id_score(self, a: np.ndarray, b: np.ndarray) -> float: ...


def load_face_model(cfg: FacesConfig) -> FaceModel:
    """The backend named by ``cfg.backend``, with ArcFace identity when ``cfg.identity_model`` is set."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown faces backend {cfg.backend!r}; choices: {', '.join(sorted(BACKENDS))}")
    module, attr = BACKENDS[cfg.backend].split(":")
    model = getattr(importlib.import_module(module), attr)(cfg)
    if cfg.identity_model:
        from perse_ray.faces.arcface import ArcFaceEmbedder

        model = ArcFaceIdentity(model, ArcFaceEmbedder(cfg.identity_model))
    return model


class ArcFaceIdentity:
    """A backend's detector and landmarks with ArcFace embeddings and ArcFace's ``id_score``."""

    def __init__(self, detector: FaceModel, embedder):
        self.detector = detector
        self.embedder = embedder
        self.name = f"{detector.name}+{embedder.name}"

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.detector.detect(image)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        return self.embedder.embed(image, face.landmarks)

    def id_score(self, a: np.ndarray, b: np.ndarray) -> float:
        return self.embedder.id_score(a, b)


def embed_frame(model: FaceModel, image: np.ndarray,
                known_landmarks: np.ndarray | None = None) -> tuple[np.ndarray | None, str]:
    """Identity embedding of the dominant face in ``image`` and where its landmarks came from.

    Returns ``(embedding, "detector")`` when the detector finds a face; otherwise, given the
    landmarks the frame was rendered with (large yaw defeats frontal detectors),
    ``(embedding, "landmarks")``; else ``(None, "none")``.
    """
    faces = model.detect(image)
    if faces:
        return model.embed(image, faces[0]), "detector"
    if known_landmarks is not None:
        return model.embed(image, face_from_landmarks(known_landmarks)), "landmarks"
    return None, "none"


def face_from_landmarks(landmarks: np.ndarray) -> Face:
    """A ``Face`` for known landmarks (every backend embeds from ``face.landmarks``); score 0."""
    lm = np.asarray(landmarks, dtype=np.float32).reshape(68, 2)
    x0, y0 = lm.min(0)
    x1, y1 = lm.max(0)
    return Face((float(x0), float(y0), float(x1), float(y1)), 0.0, lm)


def template_points(landmarks: np.ndarray) -> np.ndarray:
    """The three alignment points (image-left eye centre, image-right eye centre, mouth centre)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[48:68].mean(0)])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation (no reflection) taking src to dst; 2x3."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    # Points as complex numbers: the best similarity is one complex multiplier.
    zs, zd = s[:, 0] + 1j * s[:, 1], d[:, 0] + 1j * d[:, 1]
    k = np.vdot(zs, zd) / max(float(np.vdot(zs, zs).real), 1e-12)
    a, b = k.real, k.imag
    rot = np.array([[a, -b], [b, a]])
    return np.hstack([rot, (mu_d - rot @ mu_s)[:, None]])


def align(image: np.ndarray, face: Face, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarity-align ``face`` to ``ALIGN_TEMPLATE`` in a ``size``-square frame.

    Returns the aligned uint8 image, the landmarks in aligned pixels and the 2x3 matrix M taking
    source pixels to aligned pixels. Where the frame reaches beyond the source (a tight face crop)
    it is filled with a plain backdrop (``fill_outside``).
    """
    m = similarity_transform(template_points(face.landmarks), ALIGN_TEMPLATE * size)
    scale = float(np.hypot(m[0, 0], m[1, 0]))
    src, warp = image, m
    if scale < 2 / 3:
        # Area-downscale first so the warp does not alias (warpAffine samples, it does not average).
        pre = scale * 1.5
        h, w = image.shape[:2]
        pw, ph = max(int(round(w * pre)), 1), max(int(round(h * pre)), 1)
        src = cv2.resize(image, (pw, ph), interpolation=cv2.INTER_AREA)
        sx, sy = w / pw, h / ph
        # Source pixel centres map as x_pre = (x + 0.5) / sx - 0.5.
        undo = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
        warp = m @ undo
    aligned = cv2.warpAffine(np.ascontiguousarray(src), warp, (size, size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
    coverage = cv2.warpAffine(np.ones(src.shape[:2], np.float32), warp, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    if coverage.min() < 1.0:
        aligned = fill_outside(aligned, coverage, FILL_FADE * size)
    lm = np.asarray(face.landmarks, np.float64)
    lm_aligned = lm @ m[:, :2].T + m[:, 2]
    return aligned, lm_aligned.astype(np.float32), m.astype(np.float32)


def fill_outside(image: np.ndarray, coverage: np.ndarray, fade: float) -> np.ndarray:
    """``image`` (uint8 [S, S, 3]) where ``coverage`` ([S, S], 1 inside the source picture) is
    below 1 replaced by a plain backdrop: the picture's colours diffused outwards (push-pull over
    an image pyramid), fading to the mean colour of the picture's edge within about ``fade`` pixels.

    A replicated border would streak outwards from the crop (a band of forehead over the head), and
    every head turn would bend the streaks; a smooth fill stays smooth however the animator warps it.
    """
    known = coverage >= 0.999
    if not known.any():
        return image
    picture = image.astype(np.float32)
    weight = known.astype(np.float32)
    levels = [(picture * weight[..., None], weight)]
    while min(levels[-1][1].shape) > 1:  # pull: area-average colour and weight up the pyramid
        colour, weight = levels[-1]
        half = (max(weight.shape[1] // 2, 1), max(weight.shape[0] // 2, 1))
        levels.append((cv2.resize(colour, half, interpolation=cv2.INTER_AREA).reshape(half[1], half[0], 3),
                       cv2.resize(weight, half, interpolation=cv2.INTER_AREA)))
    colour, weight = levels[-1]
    estimate = colour / np.maximum(weight, 1e-6)[..., None]
    for colour, weight in reversed(levels[:-1]):  # push: a level's own colour where it saw enough
        coarse = cv2.resize(estimate, (weight.shape[1], weight.shape[0]),
                            interpolation=cv2.INTER_LINEAR).reshape(colour.shape)
        trust = np.clip(4.0 * weight, 0.0, 1.0)[..., None]
        estimate = trust * colour / np.maximum(weight, 1e-6)[..., None] + (1.0 - trust) * coarse
    edge = known & ~cv2.erode(known.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    backdrop = picture[edge].mean(0) if edge.any() else picture[known].mean(0)
    distance = cv2.distanceTransform((~known).astype(np.uint8), cv2.DIST_L2, 5)
    near = np.exp(-distance / max(fade, 1e-6))[..., None]
    fill = near * estimate + (1.0 - near) * backdrop
    cover = coverage[..., None]
    return np.clip(np.rint(cover * picture + (1.0 - cover) * fill), 0, 255).astype(np.uint8)


def outside_fraction(m: np.ndarray, image_shape: tuple[int, ...], size: int) -> float:
    """The share of an aligned ``size``-square frame (``align``'s matrix ``m``) that lies outside the
    source image: what ``align`` fills with a plain backdrop (a tight face crop)."""
    inverse = np.linalg.inv(np.vstack([np.asarray(m, np.float64), [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    x, y = inverse @ np.stack([xs.ravel(), ys.ravel(), np.ones(size * size)])
    h, w = image_shape[:2]
    return float(1.0 - np.mean((x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)))
