"""Face geometry and colour statistics from 68 landmarks: the shared ground of the classical edits.

Everything is expressed in a face frame (origin between the eyes, unit = interocular distance, u
along the eyes to the image right, v perpendicular pointing down), so edits scale with the face and
follow head roll. Colour work happens in CIE Lab (OpenCV's float convention: L 0..100, a/b ~ +-127).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# The face frame and landmark groups live with the head geometry (backend-neutral); the edits
# import them from here.
from perse_ray.geometry import BROWS, EYE_L, EYE_R, INNER_MOUTH, JAW, MOUTH, NOSE, FaceFrame  # noqa: F401


def polygon_mask(shape: tuple[int, int], pts: np.ndarray, feather: float = 0.0) -> np.ndarray:
    """Anti-aliased filled polygon as float32 [H, W] in [0, 1], optionally Gaussian-feathered (px)."""
    mask = np.zeros(shape, np.float32)
    shift = 4  # sub-pixel vertex precision: 1/16 px
    # Pixel centres sit at integer coordinates; fillPoly's anti-aliasing expects the same.
    poly = np.round(np.asarray(pts, np.float64) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(mask, [poly], 1.0, lineType=cv2.LINE_AA, shift=shift)
    return feather_mask(mask, feather)


def feather_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return mask
    return cv2.GaussianBlur(mask, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REPLICATE)


def ellipse_mask(frame: FaceFrame, shape: tuple[int, int], centre, axes, feather: float = 0.0) -> np.ndarray:
    """Ellipse given in face-frame units (centre, semi-axes along u and v)."""
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    pts = np.stack([centre[0] + axes[0] * np.cos(t), centre[1] + axes[1] * np.sin(t)], axis=-1)
    return polygon_mask(shape, frame.to_image(pts), feather)


def to_lab(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def from_lab(lab: np.ndarray) -> np.ndarray:
    """Lab -> float RGB in [0, 255] (unrounded, so blends round once)."""
    rgb = cv2.cvtColor(np.ascontiguousarray(lab, dtype=np.float32), cv2.COLOR_Lab2RGB)
    return np.clip(rgb, 0.0, 1.0) * 255.0


def blend(image: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 image moved towards float RGB ``target`` by ``alpha``; exactly unchanged where alpha == 0."""
    src = image.astype(np.float32)
    a = alpha[..., None].astype(np.float32)
    out = np.rint(src + a * (target.astype(np.float32) - src))
    out = np.clip(out, 0, 255).astype(np.uint8)
    return np.where(a > 0, out, image)


# --------------------------------------------------------------------------- landmark regions


def face_core(landmarks: np.ndarray, lift: float) -> np.ndarray:
    """Polygon of the jaw line closed over the brows raised by ``lift`` (iod units)."""
    frame = FaceFrame.from_landmarks(landmarks)
    lm = np.asarray(landmarks, np.float64)
    brows = lm[BROWS][::-1] - lift * frame.iod * frame.v
    return np.concatenate([lm[JAW], brows])


def features_mask(landmarks: np.ndarray, shape: tuple[int, int], feather: float) -> np.ndarray:
    """Eyes, brows and lips: the parts of the face that are not skin."""
    frame = FaceFrame.from_landmarks(landmarks)
    lm = np.asarray(landmarks, np.float64)
    mask = np.zeros(shape, np.float32)
    for part in (EYE_R, EYE_L, MOUTH):
        centre = lm[part].mean(0)
        grown = centre + 1.25 * (lm[part] - centre)  # lids and lip edges, not only the contours
        mask = np.maximum(mask, polygon_mask(shape, grown))
    for brow in (slice(17, 22), slice(22, 27)):
        pts = lm[brow]
        band = np.concatenate([pts - 0.07 * frame.iod * frame.v, (pts + 0.07 * frame.iod * frame.v)[::-1]])
        mask = np.maximum(mask, polygon_mask(shape, band))
    return feather_mask(mask, feather)


def disc_samples(image_lab: np.ndarray, centres: np.ndarray, radius: float) -> np.ndarray:
    """Lab pixels within ``radius`` px of any of the ``centres``: [N, 3]."""
    h, w = image_lab.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    keep = np.zeros((h, w), bool)
    for cx, cy in centres:
        keep |= (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
    return image_lab[keep]


@dataclass(frozen=True)
class ColourModel:
    """Diagonal Gaussian clusters in Lab; ``distance`` is the Mahalanobis distance to the nearest."""

    means: np.ndarray  # [K, 3]
    stds: np.ndarray  # [K, 3]

    @classmethod
    def fit(cls, samples: np.ndarray, floor, clusters: int = 1) -> ColourModel:
        samples = np.asarray(samples, np.float32).reshape(-1, 3)
        floor = np.asarray(floor, np.float32)
        k = max(1, min(clusters, len(samples) // 8))
        if k == 1:
            med = np.median(samples, axis=0)
            mad = 1.4826 * np.median(np.abs(samples - med), axis=0)
            return cls(med[None], np.maximum(mad, floor)[None])
        # Deterministic k-means (fixed seed points: evenly spaced samples by lightness).
        order = np.argsort(samples[:, 0], kind="stable")
        means = samples[order[np.linspace(0, len(samples) - 1, k).astype(int)]].copy()
        for _ in range(8):
            label = np.argmin(((samples[:, None] - means[None]) ** 2).sum(-1), axis=1)
            means = np.stack([samples[label == j].mean(0) if np.any(label == j) else means[j]
                              for j in range(k)])
        stds = np.stack([samples[label == j].std(0) if np.sum(label == j) > 1 else floor
                         for j in range(k)])
        return cls(means, np.maximum(stds, floor))

    def distance(self, lab: np.ndarray) -> np.ndarray:
        z = (lab[..., None, :] - self.means) / self.stds
        return np.sqrt((z ** 2).sum(-1).min(-1))


def skin_model(image_lab: np.ndarray, landmarks: np.ndarray) -> ColourModel:
    """Skin colour from the cheeks, the nose bridge and the low forehead."""
    frame = FaceFrame.from_landmarks(landmarks)
    spots = frame.to_image(np.array([[-0.55, 0.5], [0.55, 0.5], [0.0, 0.3], [0.0, -0.55]]))
    return ColourModel.fit(disc_samples(image_lab, spots, 0.13 * frame.iod), floor=(5.0, 3.0, 3.0))


def background_model(image_lab: np.ndarray) -> ColourModel:
    """Background colours from the top corners and the upper sides, where an aligned head never is."""
    h, w = image_lab.shape[:2]
    bh, bw = max(2, int(0.3 * h)), max(2, int(0.12 * w))
    strips = [image_lab[:bh, :bw], image_lab[:bh, w - bw:], image_lab[:max(2, int(0.05 * h)), :]]
    samples = np.concatenate([s.reshape(-1, 3) for s in strips])
    return ColourModel.fit(samples, floor=(5.0, 3.0, 3.0), clusters=3)


def hair_probability(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Soft hair mask [H, W] in [0, 1] from a head-shaped prior and Lab colour statistics.

    Candidate pixels lie in an ellipse around the skull and down the sides of the face, outside
    the face itself. Hair colour is learned from the crown, from pixels that are neither skin-like
    nor background-like; each pixel then gets a soft posterior between hair, skin and background.
    """
    shape = image.shape[:2]
    frame = FaceFrame.from_landmarks(landmarks)
    lab = to_lab(image)
    skin, bg = skin_model(lab, landmarks), background_model(lab)
    head = ellipse_mask(frame, shape, (0.0, -0.2), (1.6, 1.85))
    sides = polygon_mask(shape, frame.to_image(np.array(
        [[-1.75, -0.2], [1.75, -0.2], [1.6, 1.7], [0.0, 1.2], [-1.6, 1.7]])))
    face = polygon_mask(shape, face_core(landmarks, lift=0.12), feather=0.04 * frame.iod)
    prior = np.clip(np.maximum(head, sides) - face, 0.0, 1.0)
    d_skin, d_bg = skin.distance(lab), bg.distance(lab)
    crown = ellipse_mask(frame, shape, (0.0, -1.25), (0.9, 0.45)) * (1.0 - face)
    seeds = lab[(crown > 0.5) & (d_skin > 3.0) & (d_bg > 3.0)]
    if len(seeds) < 12:  # bald, or hair the colour of skin/background: fall back to the crown's darkest
        crown_px = lab[crown > 0.5]
        if len(crown_px) == 0:
            return np.zeros(shape, np.float32)
        seeds = crown_px[crown_px[:, 0] <= np.percentile(crown_px[:, 0], 40)]
    hair = ColourModel.fit(seeds, floor=(12.0, 5.0, 5.0), clusters=2)
    d_hair = hair.distance(lab)
    like = np.exp(-0.5 * np.stack([d_hair, d_skin, d_bg]) ** 2)
    posterior = like[0] / (like.sum(0) + 1e-12)
    soft = np.clip(cv2.GaussianBlur(posterior.astype(np.float32), (0, 0), 0.03 * frame.iod + 0.5) * prior,
                   0.0, 1.0)
    # Hair is one piece with the crown: drop hair-coloured blobs (clothes, background) not joined to it.
    _, labels = cv2.connectedComponents((soft > 0.35).astype(np.uint8), connectivity=8)
    joined = np.unique(labels[(crown > 0.5) & (soft > 0.35)])
    keep = np.isin(labels, joined[joined > 0]).astype(np.float32)
    keep = feather_mask(cv2.dilate(keep, np.ones((3, 3), np.uint8)), 0.03 * frame.iod + 0.5)
    return np.clip(soft * keep, 0.0, 1.0).astype(np.float32)


def skin_probability(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Soft skin mask over face, forehead and neck, without eyes, brows and lips."""
    shape = image.shape[:2]
    frame = FaceFrame.from_landmarks(landmarks)
    lab = to_lab(image)
    skin, bg = skin_model(lab, landmarks), background_model(lab)
    lm = np.asarray(landmarks, np.float64)
    face = polygon_mask(shape, face_core(landmarks, lift=0.7))
    neck_pts = np.concatenate([lm[4:13], frame.to_image(np.array([[0.55, 2.3], [-0.55, 2.3]]))])
    region = np.maximum(face, polygon_mask(shape, neck_pts))
    d_skin, d_bg = skin.distance(lab), bg.distance(lab)
    # Skin-coloured and not better explained by the background (hair is excluded by the same test,
    # as its colour sits far from the skin cluster).
    like_skin = np.exp(-0.5 * (d_skin / 1.5) ** 2)
    posterior = like_skin / (like_skin + np.exp(-0.5 * d_bg ** 2) + 1e-12)
    soft = cv2.GaussianBlur((posterior * region).astype(np.float32), (0, 0), 0.04 * frame.iod + 0.5)
    keep = soft * (1.0 - features_mask(landmarks, shape, feather=0.03 * frame.iod))
    return np.clip(keep, 0.0, 1.0).astype(np.float32)
