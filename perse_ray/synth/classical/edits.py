"""Landmark-driven parametric edits: glasses, beard, hair colour, skin tone.

Every edit is ``edit_<name>(image, landmarks, params, seed) -> (image, mask)``:
- params are floats and a missing key is 0; all zeros (or ``{}``) returns the input unchanged and a
  zero mask. Output pixels and the mask are continuous in every param, so the edit at
  ``lerp_params(p0, p1, 0.5)`` is a true midpoint of the two.
- ``mask`` is the edit's alpha: region times strength, float32 [H, W] in [0, 1]. Pixels change only
  where it is > 0.
- the same seed gives the same image (only the beard uses randomness: its strand texture).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from scipy.ndimage import map_coordinates

from perse_ray.synth.classical.regions import (
    MOUTH,
    FaceFrame,
    blend,
    disc_samples,
    from_lab,
    hair_probability,
    polygon_mask,
    skin_probability,
    to_lab,
)

EditResult = tuple[np.ndarray, np.ndarray]


def lerp_params(p_from: dict[str, float], p_to: dict[str, float], alpha: float) -> dict[str, float]:
    """Per-key (1 - alpha) * from + alpha * to, a missing key being 0; exact at alpha 0 and 1."""
    a = float(alpha)
    return {k: (1.0 - a) * float(p_from.get(k, 0.0)) + a * float(p_to.get(k, 0.0))
            for k in sorted(set(p_from) | set(p_to))}


def _params(name: str, params: dict[str, float], allowed: tuple[str, ...]) -> dict[str, float]:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{name} edit: unknown param {unknown[0]!r}; choices: {', '.join(allowed)}")
    return {k: float(params.get(k, 0.0)) for k in allowed}


def _unchanged(image: np.ndarray) -> EditResult:
    return image.copy(), np.zeros(image.shape[:2], np.float32)


# --------------------------------------------------------------------------- glasses


def lens_outline(centre: np.ndarray, frame: FaceFrame, half_w: float, half_h: float, squareness: float,
                 n: int = 48) -> np.ndarray:
    """Superellipse (exponent 2 = oval ... 6 = rounded rectangle) in pixels, closed polyline [n+1, 2]."""
    power = 2.0 + 4.0 * squareness
    t = np.linspace(0.0, 2.0 * np.pi, n + 1)
    c, s = np.cos(t), np.sin(t)
    x = half_w * np.sign(c) * np.abs(c) ** (2.0 / power)
    y = half_h * np.sign(s) * np.abs(s) ** (2.0 / power)
    # Lenses are a little wider at the top, like most frames.
    x = x * (1.0 + 0.12 * np.clip(-s, 0, 1))
    return centre + frame.iod * (x[:, None] * frame.u + y[:, None] * frame.v)


def _segment_distance(px: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points [P, 2] to the nearest of segments a[i]->b[i]: [P]."""
    ab = b - a
    denom = np.maximum((ab ** 2).sum(-1), 1e-12)
    t = np.clip(((px[:, None, :] - a[None]) * ab[None]).sum(-1) / denom, 0.0, 1.0)
    nearest = a[None] + t[..., None] * ab[None]
    return np.sqrt(((px[:, None, :] - nearest) ** 2).sum(-1)).min(1)


def _stroke(shape: tuple[int, int], polylines: list[np.ndarray], width: float) -> np.ndarray:
    """Anti-aliased coverage of polylines drawn ``width`` px wide; -> 0 continuously as width -> 0."""
    cover = np.zeros(shape, np.float32)
    if width <= 0:
        return cover
    pts = np.concatenate(polylines)
    pad = width + 2
    x0, y0 = np.floor(pts.min(0) - pad).astype(int)
    x1, y1 = np.ceil(pts.max(0) + pad).astype(int)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, shape[1] - 1), min(y1, shape[0] - 1)
    if x1 < x0 or y1 < y0:
        return cover
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    px = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)
    a = np.concatenate([p[:-1] for p in polylines])
    b = np.concatenate([p[1:] for p in polylines])
    d = _segment_distance(px, a, b)
    # Box-filtered line of half-width w/2 (1 px filter); thinner than a pixel fades in opacity.
    c = np.clip(width / 2 + 0.5 - d, 0.0, 1.0) * min(width, 1.0)
    cover[y0:y1 + 1, x0:x1 + 1] = c.reshape(ys.shape)
    return cover


def edit_glasses(image: np.ndarray, landmarks: np.ndarray, params: dict[str, float], seed: int) -> EditResult:
    """Eyeglasses drawn from the eye landmarks.

    rim: frame thickness (1 = about 8% of the interocular distance); tint: lens darkness (0 clear,
    1 opaque sunglasses); shape: 0 oval ... 1 rectangular; size: lens scale offset (+-, 0 = default);
    frame_lightness: 0 black ... 1 light metal.
    """
    p = _params("glasses", params, ("rim", "tint", "shape", "size", "frame_lightness"))
    rim, tint = max(p["rim"], 0.0), float(np.clip(p["tint"], 0.0, 1.0))
    if rim == 0.0 and tint == 0.0:
        return _unchanged(image)
    shape = image.shape[:2]
    lm = np.asarray(landmarks, np.float64)
    frame = FaceFrame.from_landmarks(lm)
    scale = 1.0 + 0.35 * p["size"]
    half_w, half_h = 0.40 * scale, 0.27 * scale
    squareness = float(np.clip(p["shape"], 0.0, 1.0))
    # Lens centres: the eye centres pushed slightly down and outwards (frames sit on the nose).
    centres = [lm[36:42].mean(0) + frame.iod * (0.06 * frame.v - 0.03 * frame.u),
               lm[42:48].mean(0) + frame.iod * (0.06 * frame.v + 0.03 * frame.u)]
    lenses = [lens_outline(c, frame, half_w, half_h, squareness) for c in centres]
    inner_r = centres[0] + frame.iod * (half_w * frame.u - 0.08 * frame.v)
    inner_l = centres[1] - frame.iod * (half_w * frame.u + 0.08 * frame.v)
    bridge_mid = (inner_r + inner_l) / 2 - 0.06 * frame.iod * frame.v
    bridge = np.stack([inner_r, bridge_mid, inner_l])
    # Temples run from the outer lens edge to the jaw-line points beside the ears.
    outer_r = centres[0] - frame.iod * (1.06 * half_w * frame.u + 0.1 * frame.v)
    outer_l = centres[1] + frame.iod * (1.06 * half_w * frame.u - 0.1 * frame.v)
    temples = [np.stack([outer_r, lm[0] + frame.iod * (0.03 * frame.u - 0.1 * frame.v)]),
               np.stack([outer_l, lm[16] - frame.iod * (0.03 * frame.u + 0.1 * frame.v)])]
    width = rim * 0.085 * frame.iod
    frame_cover = _stroke(shape, lenses + [bridge], width)
    frame_cover = np.maximum(frame_cover, 0.8 * _stroke(shape, temples, 0.75 * width))

    lens_mask = np.maximum(polygon_mask(shape, lenses[0]), polygon_mask(shape, lenses[1]))
    grid = frame.grid(shape)
    # Sunglasses get darker towards the top; clear lenses only catch a faint diagonal glare.
    gradient = np.clip(0.85 + 0.25 * (centres[0] @ frame.v / frame.iod - grid[..., 1]) / half_h, 0.6, 1.0)
    lens_alpha = lens_mask * 0.93 * tint * gradient
    glare = 0.5 + 0.5 * np.cos(2 * np.pi * (grid[..., 0] + grid[..., 1]) / 0.6)
    glare_alpha = lens_mask * 0.12 * min(rim, 1.0) * glare ** 4 * (1.0 - tint)

    frame_colour = np.array([25.0, 22.0, 22.0]) + float(np.clip(p["frame_lightness"], 0, 1)) * 170.0
    lens_colour = np.array([28.0, 24.0, 22.0])
    out = image.astype(np.float32)
    for colour, a in ((np.full(3, 255.0), glare_alpha), (lens_colour, lens_alpha), (frame_colour, frame_cover)):
        out = out + a[..., None] * (colour - out)
    mask = 1.0 - (1.0 - glare_alpha) * (1.0 - lens_alpha) * (1.0 - frame_cover)
    return blend(image, out, (mask > 0).astype(np.float32)), mask.astype(np.float32)


# --------------------------------------------------------------------------- beard


def _strand_texture(frame: FaceFrame, shape: tuple[int, int], length: float, seed: int) -> np.ndarray:
    """Hair-like texture: seeded sparse noise smeared along a wavy, downward growth field (line
    integral convolution), standardised to zero mean and unit variance."""
    rng = np.random.default_rng(seed)
    # Sparse roots make separate strands; dense noise would smear into a uniform weave.
    noise = rng.random(shape).astype(np.float32)
    roots = np.clip((noise - 0.65) / 0.35, 0.0, 1.0)
    # Slow random swirl (a few whorls per face) so strands are not parallel lines.
    coarse = max(2, int(round(max(shape) / (0.25 * frame.iod))))
    swirl = cv2.resize(rng.standard_normal((coarse, coarse)).astype(np.float32), shape[::-1],
                       interpolation=cv2.INTER_CUBIC)
    grid = frame.grid(shape)
    x, y = grid[..., 0], grid[..., 1]
    # Growth direction in the face frame: down, fanning outwards on the cheeks; the moustache
    # (above the mouth) grows down and out more steeply.
    above_mouth = np.clip((0.95 - y) / 0.15, 0.0, 1.0)
    angle = np.arctan((0.35 + 0.9 * above_mouth) * np.tanh(2.0 * x)) + 0.3 * swirl
    du, dv = np.sin(angle), np.cos(angle)
    dx = du * frame.u[0] + dv * frame.v[0]
    dy = du * frame.u[1] + dv * frame.v[1]
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    steps = 9
    acc = np.zeros(shape, np.float32)
    for k in np.linspace(-0.5, 0.5, steps):
        acc += map_coordinates(roots, [ys + k * length * dy, xs + k * length * dx], order=1, mode="reflect")
    acc /= steps
    # Whole-image statistics (the field is stationary) keep the texture continuous in ``length``.
    return ((acc - acc.mean()) / max(float(acc.std()), 1e-6)).astype(np.float32)


def brow_colour(lab: np.ndarray, landmarks: np.ndarray, iod: float) -> np.ndarray:
    """Lab colour of the brows' darker half: the person's natural facial-hair colour."""
    px = disc_samples(lab, np.asarray(landmarks, np.float64)[17:27], 0.06 * iod + 0.75)
    dark = px[px[:, 0] <= np.median(px[:, 0])]
    return np.median(dark, axis=0)


def edit_beard(image: np.ndarray, landmarks: np.ndarray, params: dict[str, float], seed: int) -> EditResult:
    """Beard over jaw, chin, cheeks and upper lip, textured as strands.

    density: 0 none, ~0.35 stubble, ~0.9 full beard (coverage, opacity, strand length and volume
    below the jaw all grow with it); lightness: colour lightness offset (+-1); grey: 0 natural
    colour (taken from the brows) ... 1 white.
    """
    p = _params("beard", params, ("density", "lightness", "grey"))
    density = float(np.clip(p["density"], 0.0, 1.0))
    if density == 0.0:
        return _unchanged(image)
    shape = image.shape[:2]
    lm = np.asarray(landmarks, np.float64)
    frame = FaceFrame.from_landmarks(lm)
    # Outline: jaw points pushed outwards (beard volume grows with density, most at the chin),
    # closed along a cheek line from the sideburns to the nose wings and under the nose.
    nose_tip = lm[30]
    jaw = lm[1:16].copy()
    out_dir = jaw - nose_tip
    out_dir /= np.linalg.norm(out_dir, axis=1, keepdims=True)
    chin_weight = np.cos(np.linspace(-np.pi / 2, np.pi / 2, len(jaw))) ** 2
    grow = (0.04 + 0.22 * density * chin_weight)[:, None] * frame.iod
    jaw = jaw + grow * out_dir
    cheek_r = lm[2] + 0.45 * (lm[31] - lm[2]) + 0.08 * frame.iod * frame.v
    cheek_l = lm[14] + 0.45 * (lm[35] - lm[14]) + 0.08 * frame.iod * frame.v
    under_nose = lm[[35, 34, 33, 32, 31]] + 0.06 * frame.iod * frame.v
    outline = np.concatenate([jaw, [cheek_l], under_nose, [cheek_r]])
    region = polygon_mask(shape, outline, feather=0.07 * frame.iod)
    centre = lm[MOUTH].mean(0)
    lips = centre + 1.08 * (lm[MOUTH] - centre)
    region = np.clip(region - polygon_mask(shape, lips, feather=0.02 * frame.iod), 0.0, 1.0)

    length = frame.iod * (0.05 + 0.25 * density ** 2)  # stubble is short; a full beard flows
    texture = _strand_texture(frame, shape, length, seed)
    # Sparse beards are a soft shadow of short hairs; dense ones a solid mat with strand texture.
    threshold = 1.2 - 2.6 * density
    softness = 0.8 + 1.6 * (1.0 - density)
    cover = np.clip((texture - threshold) / softness + 0.5, 0.0, 1.0)
    opacity = min(1.0, 1.8 * density) * 0.92
    mask = (region * cover * opacity).astype(np.float32)

    lab = to_lab(image)
    base = brow_colour(lab, lm, frame.iod)
    # Dense facial hair reads darker than the brows (self-shadowing between strands).
    base_l = float(np.clip(0.85 * base[0] + 40.0 * p["lightness"], 5.0, 95.0))
    grey = float(np.clip(p["grey"], 0.0, 1.0))
    colour = np.empty(shape + (3,), np.float32)
    # Strands: lighter along their crests, darker between (keeps the texture visible when dense).
    colour[..., 0] = np.clip((1 - grey) * base_l + grey * 82.0 + 7.0 * np.tanh(texture), 0.0, 100.0)
    colour[..., 1] = (1 - grey) * base[1]
    colour[..., 2] = (1 - grey) * base[2]
    return blend(image, from_lab(colour), mask), mask


# --------------------------------------------------------------------------- hair


def hue_direction(hue: float) -> np.ndarray:
    """Unit (a, b) direction in Lab of the fully saturated colour with HSV hue ``hue`` (turns)."""
    hsv = np.array([[[hue % 1.0 * 360.0, 1.0, 1.0]]], np.float32)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    ab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)[0, 0, 1:]
    return ab / max(float(np.hypot(*ab)), 1e-6)


def edit_hair(image: np.ndarray, landmarks: np.ndarray, params: dict[str, float], seed: int) -> EditResult:
    """Recolour the hair in Lab.

    hue: target hue in turns of the HSV colour wheel (0.05 auburn, 0.13 golden blond);
    amount: 0..1, how far the hair's chroma moves to that hue; lightness: -1..1, towards black /
    white. Per-pixel lightness texture is kept. Hair is found by ``regions.hair_probability``.
    """
    p = _params("hair", params, ("hue", "amount", "lightness"))
    amount = float(np.clip(p["amount"], 0.0, 1.0))
    lightness = float(np.clip(p["lightness"], -1.0, 1.0))
    if amount == 0.0 and lightness == 0.0:
        return _unchanged(image)
    prob = hair_probability(image, landmarks)
    lab = to_lab(image)
    # Chroma of dyed hair: clearly coloured, paler for light dyes (platinum is nearly neutral).
    chroma = 32.0 * (1.0 - 0.6 * max(lightness, 0.0))
    target_ab = chroma * hue_direction(p["hue"])
    out = lab.copy()
    out[..., 1:] = lab[..., 1:] + amount * (target_ab - lab[..., 1:])
    light = out[..., 0]
    out[..., 0] = light + lightness * (96.0 - light) if lightness >= 0 else light * (1.0 + lightness)
    mask = (prob * max(amount, abs(lightness))).astype(np.float32)
    return blend(image, from_lab(out), prob), mask


# --------------------------------------------------------------------------- skin


def edit_skin(image: np.ndarray, landmarks: np.ndarray, params: dict[str, float], seed: int) -> EditResult:
    """Skin tone shift over face, forehead and neck with feathered edges.

    tone: -1..1, darker / lighter (up to 25 L units); warmth: -1..1, cooler / warmer (red-yellow).
    """
    p = _params("skin", params, ("tone", "warmth"))
    tone, warmth = float(np.clip(p["tone"], -1, 1)), float(np.clip(p["warmth"], -1, 1))
    if tone == 0.0 and warmth == 0.0:
        return _unchanged(image)
    prob = skin_probability(image, landmarks)
    lab = to_lab(image)
    out = lab.copy()
    light = lab[..., 0]
    # Lightening slows near white and darkening near black, so highlights and shadows survive.
    headroom = (100.0 - light) / 60.0 if tone > 0 else light / 60.0
    out[..., 0] = np.clip(light + 25.0 * tone * headroom, 0.0, 100.0)
    out[..., 1] = lab[..., 1] + 6.0 * warmth
    out[..., 2] = lab[..., 2] + 14.0 * warmth
    mask = (prob * max(abs(tone), abs(warmth))).astype(np.float32)
    return blend(image, from_lab(out), prob), mask


EDITS: dict[str, Callable[..., EditResult]] = {
    "glasses": edit_glasses,
    "beard": edit_beard,
    "hair": edit_hair,
    "skin": edit_skin,
}
