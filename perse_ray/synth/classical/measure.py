"""Attribute measures on aligned portraits, and the classical edit params that carry one portrait's
attribute onto another.

Colours are CIE Lab means computed with ``regions.to_lab``, the editor's own conversion, so a
measure and an edit speak the same numbers; ``lab_distance`` is CIE76. ``transfer_params`` reads an
attribute off a REFERENCE portrait and returns the params for which the editor, applied to the
SOURCE portrait, reproduces the reference's measure. Each solve starts from the editor's own formula
and is refined by applying the edit to the source and measuring it (cheap at the synthesis
resolution), because soft masks, gamut clipping and 8-bit rounding bend those formulas a little.

What the classical editor can carry is colour and density, never shape: hair colour (not its style,
length or volume), beard density and colour (not its cut), glasses' frame darkness, thickness, lens
outline and tint (not their material), skin tone and warmth (not its texture).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.ndimage import map_coordinates

from perse_ray.synth.classical.edits import (
    brow_colour,
    hue_direction,
    lens_outline,
    edit_beard,
    edit_glasses,
    edit_hair,
    edit_skin,
)
from perse_ray.synth.classical.regions import (
    EYE_L,
    EYE_R,
    MOUTH,
    FaceFrame,
    hair_probability,
    polygon_mask,
    skin_model,
    skin_probability,
    to_lab,
)

Params = dict[str, float]
_SEED = 0  # only the beard's strand texture is seeded; its statistics hardly depend on the seed


def mean_lab(image: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted mean CIE Lab colour [3] of a uint8 RGB image; the weight must not be all zero."""
    w = np.asarray(weight, np.float64)
    total = float(w.sum())
    if not total > 0:
        raise ValueError("mean_lab: the weight is zero everywhere (nothing to measure)")
    lab = to_lab(np.asarray(image)).astype(np.float64)
    return (lab * w[..., None]).sum((0, 1)) / total


def lab_distance(a, b) -> float:
    """CIE76 colour difference: Euclidean distance in Lab (about 2.3 is just noticeable)."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def hair_lab(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Mean Lab colour in the hair mask (``regions.hair_probability``), the hair-colour measure."""
    try:
        return mean_lab(image, hair_probability(image, landmarks))
    except ValueError:
        raise ValueError("the portrait shows no hair to measure") from None


def skin_lab(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Mean Lab colour in the skin mask (``regions.skin_probability``)."""
    return mean_lab(image, skin_probability(image, landmarks))


def _fixed_point(solve: Callable[[np.ndarray], Params], measure: Callable[[Params], np.ndarray],
                 start: np.ndarray, target: np.ndarray, zero: Params, steps: int = 4) -> Params:
    """Params whose measured result is closest to ``target``.

    ``solve`` inverts the editor's formula; each step aims past the target by what the last one
    fell short. The unedited source (``zero``, measured as ``start``) competes too, so a transfer
    never measures farther from the reference than doing nothing.
    """
    best = (lab_distance(start, target), zero)
    aim = np.asarray(target, np.float64).copy()
    for _ in range(steps):
        params = solve(aim)
        got = measure(params)
        distance = lab_distance(got, target)
        if distance < best[0]:
            best = (distance, params)
        aim = aim + (target - got)
    return best[1]


def _rounded(params: Params) -> Params:
    return {k: round(float(v), 4) + 0.0 for k, v in params.items()}  # + 0.0: no -0.0


# --------------------------------------------------------------------------- hair


@lru_cache(maxsize=1)
def _hue_table(steps: int = 720) -> tuple[np.ndarray, np.ndarray]:
    """HSV hues (turns) and their unit Lab ab directions, as ``edit_hair`` maps them."""
    hues = np.arange(steps) / steps
    return hues, np.stack([hue_direction(h) for h in hues])


def _solve_hair(source: np.ndarray, target: np.ndarray) -> Params:
    """edit_hair's params that take the mean hair colour ``source`` to ``target`` by its formulas.

    Lightness: L moves by ``lightness`` towards 96 (or 0). Chroma: ab moves by ``amount`` towards
    the dye point chroma * direction(hue) on a circle; the hue that lets the straight path from the
    source's ab pass closest to the target's wins, with the least-squares amount along it.
    """
    s_l, t_l = float(source[0]), float(target[0])
    if t_l >= s_l:
        lightness = (t_l - s_l) / max(96.0 - s_l, 1e-6)
    else:
        lightness = t_l / max(s_l, 1e-6) - 1.0
    lightness = float(np.clip(lightness, -1.0, 1.0))
    chroma = 32.0 * (1.0 - 0.6 * max(lightness, 0.0))
    s_ab, t_ab = np.asarray(source[1:], np.float64), np.asarray(target[1:], np.float64)

    def best(hues: np.ndarray, dirs: np.ndarray) -> tuple[float, float, float]:
        step = chroma * dirs - s_ab  # [N, 2]: the path from the source to each dye point
        amount = np.clip((step @ (t_ab - s_ab)) / np.maximum((step ** 2).sum(-1), 1e-12), 0.0, 1.0)
        miss = np.linalg.norm(s_ab + amount[:, None] * step - t_ab, axis=-1)
        k = int(np.argmin(miss))
        return float(hues[k]), float(amount[k]), float(miss[k])

    hues, dirs = _hue_table()
    hue, _, _ = best(hues, dirs)
    fine = (hue + np.linspace(-1.0, 1.0, 41) / len(hues)) % 1.0
    hue, amount, _ = best(fine, np.stack([hue_direction(h) for h in fine]))
    return {"hue": round(hue, 4) % 1.0, "amount": amount, "lightness": lightness}  # 0.99999 -> 0


def transfer_hair(source: np.ndarray, source_landmarks: np.ndarray, reference: np.ndarray,
                  reference_landmarks: np.ndarray) -> Params:
    """Hair colour (hue, amount, lightness) that recolours the source's hair to the reference's."""
    target = hair_lab(reference, reference_landmarks)
    start = hair_lab(source, source_landmarks)

    def measure(params: Params) -> np.ndarray:
        return hair_lab(edit_hair(source, source_landmarks, params, _SEED)[0], source_landmarks)

    zero = {"hue": 0.0, "amount": 0.0, "lightness": 0.0}
    return _fixed_point(lambda aim: _solve_hair(start, aim), measure, start, target, zero)


# --------------------------------------------------------------------------- skin


def _solve_skin(source: np.ndarray, target: np.ndarray) -> Params:
    """edit_skin's params by its formulas: L moves by 25 * tone * headroom, ab by warmth * (6, 14)."""
    d_l = float(target[0] - source[0])
    headroom = (100.0 - source[0]) / 60.0 if d_l > 0 else source[0] / 60.0
    tone = d_l / max(25.0 * float(headroom), 1e-6)
    warm = np.array([6.0, 14.0])
    warmth = float((np.asarray(target[1:]) - source[1:]) @ warm / (warm @ warm))
    return {"tone": float(np.clip(tone, -1.0, 1.0)), "warmth": float(np.clip(warmth, -1.0, 1.0))}


def transfer_skin(source: np.ndarray, source_landmarks: np.ndarray, reference: np.ndarray,
                  reference_landmarks: np.ndarray) -> Params:
    """Skin tone and warmth that move the source's mean skin colour to the reference's. Only the
    lightness and the red-yellow axis can move: a green or blue cast of the reference stays."""
    target = skin_lab(reference, reference_landmarks)
    start = skin_lab(source, source_landmarks)

    def measure(params: Params) -> np.ndarray:
        return skin_lab(edit_skin(source, source_landmarks, params, _SEED)[0], source_landmarks)

    return _fixed_point(lambda aim: _solve_skin(start, aim), measure, start, target,
                        {"tone": 0.0, "warmth": 0.0})


# --------------------------------------------------------------------------- beard


def beard_region(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Where ``edit_beard`` grows a beard, at its smallest volume: jaw, chin, lower cheeks and upper
    lip, without the lips; float32 [H, W] in [0, 1]. Same outline recipe as the editor."""
    lm = np.asarray(landmarks, np.float64)
    frame = FaceFrame.from_landmarks(lm)
    jaw = lm[1:16].copy()
    out_dir = jaw - lm[30]
    out_dir /= np.linalg.norm(out_dir, axis=1, keepdims=True)
    jaw = jaw + 0.04 * frame.iod * out_dir
    cheek_r = lm[2] + 0.45 * (lm[31] - lm[2]) + 0.08 * frame.iod * frame.v
    cheek_l = lm[14] + 0.45 * (lm[35] - lm[14]) + 0.08 * frame.iod * frame.v
    under_nose = lm[[35, 34, 33, 32, 31]] + 0.06 * frame.iod * frame.v
    region = polygon_mask(shape, np.concatenate([jaw, [cheek_l], under_nose, [cheek_r]]),
                          feather=0.07 * frame.iod)
    centre = lm[MOUTH].mean(0)
    lips = polygon_mask(shape, centre + 1.08 * (lm[MOUTH] - centre), feather=0.02 * frame.iod)
    return np.clip(region - lips, 0.0, 1.0).astype(np.float32)


def beard_lab(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Mean Lab colour over the beard region: skin and beard together, the colour the lower face reads as."""
    return mean_lab(image, beard_region(landmarks, image.shape[:2]))


def beard_stats(image: np.ndarray, landmarks: np.ndarray) -> tuple[float, np.ndarray | None]:
    """(coverage, beard colour) of the lower face.

    A pixel of the beard region counts as hair as far as it is unlike the face's own skin (the
    Mahalanobis distance to ``regions.skin_model``, fitted on cheeks, nose and forehead, softly
    between 2 and 4 standard deviations). Coverage is the region's weighted hair fraction; the
    beard colour is the mean Lab of those hair pixels (None when there are almost none).
    Shadows under the nose and chin and a jaw line against a dark background read as a little
    coverage too, which is why coverage is only ever compared to the source's own under an edit.
    """
    lab = to_lab(image).astype(np.float64)
    region = beard_region(landmarks, image.shape[:2]).astype(np.float64)
    hairlike = np.clip((skin_model(lab, landmarks).distance(lab) - 2.0) / 2.0, 0.0, 1.0)
    w = region * hairlike
    coverage = float(w.sum() / max(region.sum(), 1e-9))
    if w.sum() < 2.0:  # fewer than about two pixels' worth: no colour to speak of
        return coverage, None
    return coverage, (lab * w[..., None]).sum((0, 1)) / w.sum()


def _solve_beard_colour(brow: np.ndarray, colour: np.ndarray) -> Params:
    """edit_beard's lightness and grey for a beard colour, from its formula: colour =
    (1 - grey) * (0.85 * brow L + 40 * lightness, brow a, brow b) + grey * (82, 0, 0)."""
    brow_ab = np.asarray(brow[1:], np.float64)
    if float(brow_ab @ brow_ab) > 4.0:  # grey shows as lost chroma, so it needs coloured brows
        grey = float(np.clip(1.0 - (colour[1:] @ brow_ab) / (brow_ab @ brow_ab), 0.0, 1.0))
    else:
        grey = 0.0
    if grey >= 0.999:
        return {"lightness": 0.0, "grey": 1.0}
    base_l = (float(colour[0]) - 82.0 * grey) / (1.0 - grey)
    lightness = float(np.clip((base_l - 0.85 * float(brow[0])) / 40.0, -1.0, 1.0))
    return {"lightness": lightness, "grey": grey}


def transfer_beard(source: np.ndarray, source_landmarks: np.ndarray, reference: np.ndarray,
                   reference_landmarks: np.ndarray) -> Params:
    """Beard density, lightness and grey read off the reference's lower face (see ``beard_stats``).

    Density is found by bisection so that the beard edit on the source covers as much of its beard
    region as the reference's beard covers of its own; lightness and grey come from the reference's
    beard colour against the source's brows (the editor's colour base), refined by measuring the
    edit. A reference with no more coverage than the source gets density 0. It cannot see the cut:
    a goatee, sideburns or a moustache alone all become a beard over the whole region.
    """
    ref_coverage, ref_colour = beard_stats(reference, reference_landmarks)
    src_coverage, src_colour = beard_stats(source, source_landmarks)
    zero = {"density": 0.0, "lightness": 0.0, "grey": 0.0}
    if ref_colour is None or ref_coverage <= src_coverage:
        return zero
    lm = np.asarray(source_landmarks, np.float64)
    brow = brow_colour(to_lab(source), lm, FaceFrame.from_landmarks(lm).iod)

    def stats(params: Params) -> tuple[float, np.ndarray | None]:
        return beard_stats(edit_beard(source, source_landmarks, params, _SEED)[0], source_landmarks)

    def miss(coverage: float, colour: np.ndarray | None) -> float:
        """Distance to the reference's measures; 0.1 of coverage weighs as 10 Lab units."""
        colour_miss = 0.0 if colour is None else lab_distance(colour, ref_colour)
        return colour_miss + 100.0 * abs(coverage - ref_coverage)

    def density_for(colour: Params) -> float:
        lo, hi = 0.0, 1.0
        if stats({**colour, "density": hi})[0] <= ref_coverage:
            return hi
        for _ in range(7):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if stats({**colour, "density": mid})[0] < ref_coverage else (lo, mid)
        return (lo + hi) / 2

    # The unedited source competes: a beard the source's brows cannot colour may only make it worse.
    best = (miss(src_coverage, src_colour), zero)
    aim = ref_colour.copy()
    for _ in range(3):
        colour = _solve_beard_colour(brow, aim)
        params = {"density": density_for(colour), **colour}
        coverage, got = stats(params)
        if got is None:
            break
        if miss(coverage, got) < best[0]:
            best = (miss(coverage, got), params)
        aim = aim + (ref_colour - got)
    return best[1]


# --------------------------------------------------------------------------- glasses

_ACROSS = np.linspace(-0.15, 0.15, 31)  # sample offsets across a lens outline, iod units, + outwards
_FRAME_LINE_MIN = 15.0  # L units a frame must stand out from both its sides (bare eyes: under 10)
_TINT_MIN = 0.3  # lens darkening beyond the source's bare eye area (bare faces differ by up to ~0.2)
_TINT_SPREAD = 0.1  # lens darkening within this of the source's is a bare face's, not a tint
_SHAPES = np.linspace(0.0, 1.0, 5)  # the default (0) first
_SIZES = np.array([0.0, -0.2, 0.2, -0.4, 0.4])  # the default first: see _OUTLINE_MARGIN
_OUTLINE_MARGIN = 1.1
_LENS_RGB = (28, 24, 22)  # edit_glasses' lens colour


@dataclass(frozen=True)
class GlassesMeasure:
    """Rim and lens measures on the lens geometry ``edit_glasses`` uses."""

    line: float  # L units the lens outline is darker (+) or lighter (-) than both sides of it
    rim: float  # the line's width in the editor's rim units (1 = 8.5% of the interocular distance)
    frame_l: float  # Lab L on the outline
    shape: float  # the editor's lens shape and size whose outline fits best
    size: float
    tint: float  # see lens_darkening


def _lens_centres(lm: np.ndarray, frame: FaceFrame) -> list[np.ndarray]:
    """Lens centres as ``edit_glasses`` places them: eye centres a little down and outwards."""
    return [lm[EYE_R].mean(0) + frame.iod * (0.06 * frame.v - 0.03 * frame.u),
            lm[EYE_L].mean(0) + frame.iod * (0.06 * frame.v + 0.03 * frame.u)]


def _across_outlines(light: np.ndarray, lm: np.ndarray, frame: FaceFrame, shape: float,
                     size: float) -> np.ndarray:
    """L sampled across both lens outlines of the editor's (shape, size): [offsets, points]."""
    scale = 1.0 + 0.35 * size
    columns = []
    for centre in _lens_centres(lm, frame):
        pts = lens_outline(centre, frame, 0.40 * scale, 0.27 * scale, shape)[:-1]
        tangent = np.roll(pts, -1, axis=0) - np.roll(pts, 1, axis=0)
        normal = np.stack([tangent[:, 1], -tangent[:, 0]], -1)
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
        normal *= np.where(((pts - centre) * normal).sum(1, keepdims=True) < 0, -1.0, 1.0)  # outwards
        at = pts[None] + (_ACROSS * frame.iod)[:, None, None] * normal[None]
        columns.append(map_coordinates(light, [at[..., 1], at[..., 0]], order=1, mode="nearest"))
    return np.concatenate(columns, axis=1)


def _line_strength(samples: np.ndarray) -> np.ndarray:
    """Per outline point: how much darker (+) or lighter (-) the outline is than outside it, when
    it also stands out from the inside. The inside counts four times over, as a tinted lens
    leaves a dark frame little contrast there; a bare lens edge (tinted inside, lighter outline,
    bare outside) is no line and scores 0."""
    inside, middle, outside = samples[0], samples[len(_ACROSS) // 2], samples[-1]
    dark = np.minimum(outside - middle, 4.0 * (inside - middle))
    light = np.minimum(middle - outside, 4.0 * (middle - inside))
    return np.where(dark >= light, np.maximum(dark, 0.0), -np.maximum(light, 0.0))


def _lens_interior(lm: np.ndarray, frame: FaceFrame, shape_hw: tuple[int, int]) -> np.ndarray:
    """Inner part of the default lenses, away from the rim and without the eyes: where a tint shows."""
    mask = np.zeros(shape_hw, np.float32)
    for centre in _lens_centres(lm, frame):
        outline = lens_outline(centre, frame, 0.40 * 0.75, 0.27 * 0.75, 0.0)
        mask = np.maximum(mask, polygon_mask(shape_hw, outline))
    for eye in (EYE_R, EYE_L):
        c = lm[eye].mean(0)
        mask = mask * (1.0 - polygon_mask(shape_hw, c + 1.4 * (lm[eye] - c)))
    return mask


def lens_darkening(image: np.ndarray, landmarks: np.ndarray) -> float:
    """How far the lens interior (without the eyes) has moved from the face's skin lightness (the
    cheeks, nose and forehead of ``regions.skin_model``) towards ``edit_glasses``' lens colour:
    about 0.1-0.3 on bare faces (lids and under-eye shadow), 0.5 at tint 0.5."""
    lm = np.asarray(landmarks, np.float64)
    lab = to_lab(image)
    lens_l = float(to_lab(np.array([[_LENS_RGB]], np.uint8))[0, 0, 0])
    skin_l = float(skin_model(lab, lm).means[0, 0])
    interior = _lens_interior(lm, FaceFrame.from_landmarks(lm), image.shape[:2])
    inside_l = float((lab[..., 0] * interior).sum() / max(float(interior.sum()), 1e-9))
    return (skin_l - inside_l) / max(skin_l - lens_l, 1e-6)


def measure_glasses(image: np.ndarray, landmarks: np.ndarray,
                    outline: tuple[float, float] | None = None) -> GlassesMeasure:
    """Glasses measures of a portrait; ``outline`` (shape, size) fixes the lens outline, else the
    editor's outline along which the frame line is strongest on average is searched for.

    The line's strength is its median over the outline points; its width is the darkness profile
    (median across the outline) integrated outwards, doubled and divided by its peak, so a
    tinted lens inside does not widen it.
    """
    lm = np.asarray(landmarks, np.float64)
    frame = FaceFrame.from_landmarks(lm)
    light = to_lab(image)[..., 0].astype(np.float64)
    candidates = [outline] if outline is not None else [(a, b) for a in _SHAPES for b in _SIZES]
    best = None
    for shape, size in candidates:
        samples = _across_outlines(light, lm, frame, shape, size)
        score = abs(float(_line_strength(samples).mean()))
        # A thick frame fits several outlines about equally: keep the default unless one fits clearly better.
        if best is None or score > _OUTLINE_MARGIN * best[0]:
            best = (score, samples, shape, size)
    _, samples, shape, size = best
    line = float(np.median(_line_strength(samples)))
    profile = np.median(samples, axis=1)
    middle = len(_ACROSS) // 2
    contrast = np.sign(line) * (profile[-1] - profile[middle:])  # outwards from the outline
    width = 0.0
    if abs(line) >= 1.0:  # below that there is no line to have a width
        peak = max(float(contrast[0]), 1.0)
        width = 2.0 * float(np.trapezoid(np.clip(contrast, 0.0, None), _ACROSS[middle:])) / peak
    return GlassesMeasure(line=line, rim=width / 0.085, frame_l=float(profile[middle]), shape=float(shape),
                          size=float(size), tint=lens_darkening(image, lm))


@lru_cache(maxsize=1)
def _frame_lightness_table() -> tuple[np.ndarray, np.ndarray]:
    """Lab L of ``edit_glasses``' frame colour over frame_lightness 0..1 (increasing)."""
    levels = np.linspace(0.0, 1.0, 21)
    grey = np.array([25.0, 22.0, 22.0])[None] + levels[:, None] * 170.0
    return levels, to_lab(np.round(grey).astype(np.uint8)[None])[0, :, 0]


def transfer_glasses(source: np.ndarray, source_landmarks: np.ndarray, reference: np.ndarray,
                     reference_landmarks: np.ndarray) -> Params:
    """Glasses measured on the reference (``measure_glasses``); ValueError when it shows none.

    Present means a frame line along a lens outline (|line| >= 15 L) or lenses darker than the
    source's bare eye area by 0.3 (tint). shape and size are the outline that fits; tint is found
    by bisection so that the edit darkens the source's lenses as much; rim and frame_lightness
    start from the line's width and lightness and are refined until the edit on the source
    measures the same. It cannot see frames about the colour of the skin, rimless or half-rim
    frames (they read as absent or thin), lens reflections, or frames far from where the editor
    puts lenses.
    """
    ref = measure_glasses(reference, reference_landmarks)
    bare = lens_darkening(source, source_landmarks)
    has_frame = abs(ref.line) >= _FRAME_LINE_MIN
    if not has_frame and ref.tint - bare < _TINT_MIN:
        raise ValueError(f"the reference shows no glasses (frame line {ref.line:.1f} L, needs "
                         f"{_FRAME_LINE_MIN:g}; lens darkening {ref.tint - bare:.2f} over the source's, "
                         f"needs {_TINT_MIN:g})")
    levels, frame_l = _frame_lightness_table()

    def params_for(aim: np.ndarray, tint: float) -> Params:
        """aim: (rim, frame L) to draw."""
        return {"rim": float(np.clip(aim[0], 0.05, 3.0)) if has_frame else 0.0, "tint": tint,
                "shape": ref.shape, "size": ref.size,
                "frame_lightness": float(np.interp(aim[1], frame_l, levels)) if has_frame else 0.0}

    def edited(params: Params) -> np.ndarray:
        return edit_glasses(source, source_landmarks, params, _SEED)[0]

    target = np.array([ref.rim, ref.frame_l])
    tint = 0.0
    if ref.tint - bare >= _TINT_SPREAD:
        lo, hi = 0.0, 1.0
        for _ in range(8):
            mid = (lo + hi) / 2
            darker = lens_darkening(edited(params_for(target, mid)), source_landmarks) >= ref.tint
            lo, hi = (lo, mid) if darker else (mid, hi)
        tint = (lo + hi) / 2
    if not has_frame:
        return params_for(target, tint)
    best: tuple[float, Params] | None = None
    aim = target.copy()
    for _ in range(4):
        params = params_for(aim, tint)
        got = measure_glasses(edited(params), source_landmarks, outline=(ref.shape, ref.size))
        measured = np.array([got.rim, got.frame_l])
        miss = abs(measured[0] - target[0]) / max(target[0], 0.1) + abs(measured[1] - target[1]) / 30.0
        if best is None or miss < best[0]:
            best = (miss, params)
        aim = aim + (target - measured)
    return best[1]


# --------------------------------------------------------------------------- entry point

TRANSFERS: dict[str, Callable[..., Params]] = {
    "glasses": transfer_glasses,
    "beard": transfer_beard,
    "hair": transfer_hair,
    "skin": transfer_skin,
}


def transfer_params(attribute: str, source: np.ndarray, source_landmarks: np.ndarray, reference: np.ndarray,
                    reference_landmarks: np.ndarray) -> dict[str, float]:
    """The classical editor's params for ``attribute`` that give the SOURCE portrait the REFERENCE
    portrait's attribute, as measured on the reference (both aligned, with their 68 landmarks).
    Plain floats rounded to 4 decimals, exactly the keys ``edits.edit_<attribute>`` accepts."""
    if attribute not in TRANSFERS:
        raise ValueError(f"no transfer for attribute {attribute!r}; choices: {', '.join(sorted(TRANSFERS))}")
    params = TRANSFERS[attribute](np.asarray(source), np.asarray(source_landmarks, np.float64),
                                  np.asarray(reference), np.asarray(reference_landmarks, np.float64))
    return _rounded(params)
