"""Ground-truth data and scores from a procedural head (Gaussian or triangle mesh).

A head is anything with the ``GroundTruthHead`` protocol: ``render(values, expression, camera, size)``
→ (rgb over white, alpha), ``region_mask(attribute, expression, camera, size)``, the ``attributes`` and
``expressions`` it models and ``num_levels(attribute)``. ``ProceduralHead`` (Gaussians,
``perse_ray.bench.procedural``) and ``MeshHead`` (textured triangles, ``perse_ray.bench.mesh_head``)
implement it. ``frames_from_head`` renders a head through the pipeline's motion script and cameras
into ``frames``-schema rows (source, every edit of every attribute, interpolation references, and
``synth.combined_frames`` rows with every attribute edited at once); ``score_avatar`` compares a
trained avatar with exact renders at held-out cameras (to ±40° yaw, with per-|yaw| buckets),
held-out expression values, never-trained latent midpoints and never-trained combinations of
edits (overall and inside each attribute's region, against the matching single edit), and
measures attribute leakage.
"""

from __future__ import annotations

import io
import itertools
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from perse_ray.avatar.io import Avatar
from perse_ray.avatar.losses import psnr, ssim
from perse_ray.camera import camera_record
from perse_ray.config import Config
from perse_ray.synth.edit import combined_levels
from perse_ray.synth.motion import motion_script

# Held-out yaws reach ±40°, beyond the ±30° of older motion scripts; none is a training yaw (the
# script's yaws are seeded, non-round). Buckets by |yaw|: [0, 15), [15, 30), [30, 45].
HELDOUT_YAWS = (-40.0, -33.0, -26.0, -13.0, 4.0, 17.0, 28.0, 36.0, 40.0)
HELDOUT_PITCHES = (-7.0, 6.0)
YAW_BUCKETS = ((0.0, 15.0), (15.0, 30.0), (30.0, 45.0))
HELDOUT_EXPRESSIONS = ({"jaw_open": 0.5}, {"smile": 0.55}, {"brow_raise": 0.45},
                       {"jaw_open": 0.7, "smile": 0.35}, {"smile": 0.8, "brow_raise": 0.6})
COMBINED_POSES = ((0.0, 0.0), (-26.0, 6.0), (17.0, -7.0), (36.0, 6.0))
PICTURE_POSES = ((-33.0, 6.0), (4.0, -7.0), (36.0, 6.0))


@runtime_checkable
class GroundTruthHead(Protocol):
    """A procedural head with known attributes and expression knobs, rendered exactly at any value."""

    name: str
    attributes: tuple[str, ...]
    expressions: tuple[str, ...]

    def num_levels(self, attribute: str) -> int: ...

    def render(self, values: dict[str, float] | None, expression: dict[str, float] | None, camera: dict,
               size: int) -> tuple[np.ndarray, np.ndarray]: ...

    def region_mask(self, attribute: str, expression: dict[str, float] | None, camera: dict,
                    size: int) -> np.ndarray: ...


def make_head(name: str, seed: int = 0) -> GroundTruthHead:
    """``gaussian`` (ProceduralHead) or ``mesh`` (MeshHead, textured from an example portrait)."""
    if name == "gaussian":
        from perse_ray.bench.procedural import ProceduralHead

        return ProceduralHead(seed=seed)
    if name == "mesh":
        from perse_ray.bench.mesh_head import MeshHead

        return MeshHead(seed=seed)
    raise ValueError(f"unknown ground-truth head {name!r}; choices: gaussian, mesh")


def _png(image: np.ndarray) -> bytes:
    """[H, W, 3] RGB or [H, W] gray in [0, 1] → PNG bytes."""
    buf = io.BytesIO()
    arr = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def region_mask(head: GroundTruthHead, attribute: str, expression: dict, camera: dict, size: int) -> np.ndarray:
    """[H, W] float mask of the pixels an attribute can cover (dilated): the head's own definition."""
    return head.region_mask(attribute, expression, camera, size)


def _check_config(head: GroundTruthHead, config: Config) -> None:
    for a in config.synth.attributes:
        if a.name not in head.attributes:
            raise ValueError(f"the {head.name} head models attributes {list(head.attributes)}; "
                             f"the config asks for {a.name!r}")
        if len(a.edits) + 1 > head.num_levels(a.name):
            raise ValueError(f"attribute {a.name!r} has {len(a.edits) + 1} levels in the config; the {head.name} "
                             f"head models {head.num_levels(a.name)}")
    unknown = set(config.synth.motion.expressions) - set(head.expressions)
    if unknown:
        raise ValueError(f"the {head.name} head models expressions {list(head.expressions)}; "
                         f"the config asks for {sorted(unknown)}")


def frames_from_head(head: GroundTruthHead, config: Config, subject_id: str = "procedural-head") -> list[dict]:
    """``frames``-schema rows: per script frame the source, every edit and the morph references; at
    ``synth.combined_frames`` frames also one row with every attribute edited at once."""
    _check_config(head, config)
    res, fov, dist = config.synth.resolution, config.render.fov_deg, config.render.distance
    script = motion_script(config.synth.motion)
    attrs = config.synth.attributes
    combined = dict(combined_levels(config))
    rows = []
    for frame in script:
        cam = camera_record(frame.yaw, frame.pitch, res, res, fov, dist)
        expr = dict(frame.expression)

        def row(attribute, edit, interp, values, mask, also=None):
            img, _ = head.render(values, expr, cam, res)
            return {"subject_id": subject_id, "attribute": attribute, "edit_index": edit,
                    "interpolation": interp, "frame_index": frame.index, "camera": cam, "expression": expr,
                    "image_png": _png(img), "mask_png": None if mask is None else _png(mask),
                    "id_score": 1.0, "kept": True, "drop_reason": None, "also_edits": also}

        rows.append(row("", 0, None, {}, None))
        masks = {}
        for a in attrs:
            mask = masks[a.name] = head.region_mask(a.name, expr, cam, res)
            k_count = len(a.edits) + 1
            for k in range(1, k_count):
                rows.append(row(a.name, k, None, {a.name: float(k)}, mask))
            for k, alpha in itertools.product(range(k_count - 1), config.synth.morph_alphas):
                interp = {"from_edit": k, "to_edit": k + 1, "alpha": float(alpha)}
                rows.append(row(a.name, k + 1, interp, {a.name: k + alpha}, mask))
        if frame.index in combined:
            levels = combined[frame.index]
            first = next(iter(levels))
            union = np.maximum.reduce([masks[a] for a in levels])
            rows.append(row(first, int(levels[first]), None, levels, union,
                            also={k: v for k, v in levels.items() if k != first}))
    return rows


def _as_eval_image(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Through the same 8-bit PNG and resize path the training frames take."""
    from perse_ray.train.loop import decode_resized

    arr, _ = decode_resized(_png(image), width, height, "RGB")
    return torch.from_numpy(arr)


class Scorer:
    """Compares an avatar with the head on (attributes, expression, yaw, pitch) cases; caches targets."""

    def __init__(self, head: GroundTruthHead, config: Config, backend: str):
        _check_config(head, config)
        self.head, self.cfg, self.backend = head, config, backend
        self.neutral = {e: 0.0 for e in config.synth.motion.expressions}
        self.attrs = {a.name: len(a.edits) + 1 for a in config.synth.attributes}
        self._targets: dict = {}
        self._regions: dict = {}

    def _camera(self, yaw: float, pitch: float) -> dict:
        c = self.cfg
        res = c.synth.resolution
        return camera_record(yaw, pitch, res, res, c.render.fov_deg, c.render.distance)

    def target(self, values: dict, expr: dict, yaw: float, pitch: float) -> torch.Tensor:
        key = (tuple(sorted(values.items())), tuple(sorted(expr.items())), yaw, pitch)
        if key not in self._targets:
            c = self.cfg
            img, _ = self.head.render(values, expr, self._camera(yaw, pitch), c.synth.resolution)
            self._targets[key] = _as_eval_image(img, c.render.width, c.render.height)
        return self._targets[key]

    def region(self, attribute: str, yaw: float, pitch: float) -> torch.Tensor:
        """[h, w] bool at the avatar's resolution: pixels the attribute can cover (neutral expression)."""
        key = (attribute, yaw, pitch)
        if key not in self._regions:
            c = self.cfg
            mask = torch.from_numpy(self.head.region_mask(attribute, {}, self._camera(yaw, pitch), c.synth.resolution))
            mask = torch.nn.functional.interpolate(mask[None, None], size=(c.render.height, c.render.width),
                                                   mode="area")[0, 0]
            self._regions[key] = mask > 0
        return self._regions[key]

    def predict(self, avatar: Avatar, values: dict, expr: dict, yaw: float, pitch: float) -> torch.Tensor:
        w, h = self.cfg.render.width, self.cfg.render.height
        z = avatar.latent(values, {**self.neutral, **expr})
        return avatar.render(z, [(yaw, pitch)], w, h, background=[1.0, 1.0, 1.0], backend=self.backend)[0, 0]

    def scores(self, avatar: Avatar, cases, regions: tuple[str, ...] = ()) -> list[dict]:
        """Per case: {"psnr", "ssim", "region_<a>": PSNR inside a's region (absent where none shows)}."""
        out = []
        for values, expr, yaw, pitch in cases:
            pred = self.predict(avatar, values, expr, yaw, pitch)
            target = self.target(values, expr, yaw, pitch)
            rec = {"psnr": float(psnr(pred, target)), "ssim": float(ssim(pred, target))}
            for a in regions:
                m = self.region(a, yaw, pitch)
                if m.any():
                    rec[f"region_{a}"] = float(psnr(pred[m], target[m]))
            out.append(rec)
        return out

    def compare(self, avatar: Avatar, cases) -> tuple[float, float]:
        recs = self.scores(avatar, cases)
        return float(np.mean([r["psnr"] for r in recs])), float(np.mean([r["ssim"] for r in recs]))

    def view_cases(self):
        edits = [{}] + [{a: float(k)} for a, n in self.attrs.items() for k in range(1, n)]
        return [(e, {}, y, p) for e in edits for y, p in itertools.product(HELDOUT_YAWS, HELDOUT_PITCHES)]

    def combined_levels(self) -> list[dict[str, float]]:
        """Up to two combinations of every attribute at a non-source level that training never saw
        (not in ``synth.combined_frames``' plan): all at the top level, an alternation, else the
        first untrained ones; when every combination was trained, all one half-level below the top."""
        names = list(self.attrs)
        trained = {tuple(sorted(levels.items())) for _, levels in combined_levels(self.cfg)}
        top = {a: float(self.attrs[a] - 1) for a in names}
        mixed = {a: float(1 + (i % (self.attrs[a] - 1))) for i, a in enumerate(names)}
        grid = [dict(zip(names, map(float, ks))) for ks in itertools.product(*(range(1, self.attrs[a]) for a in names))]
        held = []
        for levels in [top, mixed, *grid]:
            if tuple(sorted((a, int(v)) for a, v in levels.items())) not in trained and levels not in held:
                held.append(levels)
        return held[:2] or [{a: self.attrs[a] - 1.5 for a in names}]


def score_views(model, scorer: "Scorer") -> float:
    """Held-out-view PSNR of a model in training (for PSNR-vs-time curves)."""
    avatar = Avatar(model, {"camera": {"fov_deg": scorer.cfg.render.fov_deg, "distance": scorer.cfg.render.distance}})
    return scorer.compare(avatar, scorer.view_cases())[0]


def _mean(recs: list[dict], key: str) -> float:
    vals = [r[key] for r in recs if key in r]
    return float(np.mean(vals)) if vals else float("nan")


def score_avatar(avatar: Avatar, head: GroundTruthHead, config: Config, backend: str = "auto",
                 scorer: Scorer | None = None) -> dict[str, float]:
    """Held-out views (overall and per |yaw| bucket), expressions, latent midpoints, combined edits
    (PSNR, SSIM; per-attribute region PSNR against the matching single edits) and leakage."""
    scorer = scorer or Scorer(head, config, backend)
    res, fov, dist = config.synth.resolution, config.render.fov_deg, config.render.distance
    w, h = config.render.width, config.render.height
    attrs, neutral = scorer.attrs, scorer.neutral
    compare = lambda cases: scorer.compare(avatar, cases)  # noqa: E731
    views = list(itertools.product(HELDOUT_YAWS, HELDOUT_PITCHES))
    out = {}
    cases = scorer.view_cases()
    recs = scorer.scores(avatar, cases)
    out["psnr_heldout_views"], out["ssim_heldout_views"] = _mean(recs, "psnr"), _mean(recs, "ssim")
    for i, (lo, hi) in enumerate(YAW_BUCKETS):
        last = i == len(YAW_BUCKETS) - 1
        sel = [r for r, c in zip(recs, cases) if lo <= abs(c[2]) < hi or (last and abs(c[2]) == hi)]
        if sel:
            out[f"psnr_heldout_views_yaw_{lo:.0f}_{hi:.0f}"] = _mean(sel, "psnr")
    expr_poses = [(0.0, 0.0), (-15.0, 4.0), (20.0, -5.0)]
    known = [{k: v for k, v in e.items() if k in neutral} for e in HELDOUT_EXPRESSIONS]
    out["psnr_heldout_expressions"], out["ssim_heldout_expressions"] = compare(
        [({}, e, y, p) for e in known if e for y, p in expr_poses])
    mids = [{a: k + 0.5} for a, n in attrs.items() for k in range(n - 1)]
    mid_poses = [(0.0, 0.0)] + views[::2]
    out["psnr_latent_midpoints"], out["ssim_latent_midpoints"] = compare(
        [(m, {}, y, p) for m in mids for y, p in mid_poses])

    if len(attrs) > 1:
        names = tuple(attrs)
        combos = [(levels, {}, y, p) for levels in scorer.combined_levels() for y, p in COMBINED_POSES]
        combined = scorer.scores(avatar, combos, regions=names)
        out["psnr_combined_edits"], out["ssim_combined_edits"] = _mean(combined, "psnr"), _mean(combined, "ssim")
        gaps = []
        for a in names:
            singles = scorer.scores(avatar, [({a: levels[a]}, e, y, p) for levels, e, y, p in combos], regions=(a,))
            out[f"psnr_combined_region_{a}"] = _mean(combined, f"region_{a}")
            out[f"psnr_single_region_{a}"] = _mean(singles, f"region_{a}")
            gaps.append(out[f"psnr_single_region_{a}"] - out[f"psnr_combined_region_{a}"])
            out[f"combined_region_gap_{a}"] = gaps[-1]
        out["combined_region_gap_max"] = float(np.max(gaps))

    for a, n in attrs.items():
        outside, inside = [], []
        for yaw, pitch in [(0.0, 0.0), (-20.0, 5.0), (20.0, -5.0)]:
            cam = camera_record(yaw, pitch, res, res, fov, dist)
            region = torch.from_numpy(head.region_mask(a, {}, cam, res))
            region = torch.nn.functional.interpolate(region[None, None], size=(h, w), mode="area")[0, 0] > 0
            z = torch.stack([avatar.latent({}, neutral), avatar.latent({a: float(n - 1)}, neutral)])
            img = avatar.render(z, [(yaw, pitch)], w, h, background=[1.0, 1.0, 1.0], backend=backend)[:, 0]
            diff = (img[1] - img[0]).abs().mean(-1)
            inside.append(float(diff[region].mean()))
            outside.append(float(diff[~region].mean()))
        out[f"leakage_{a}"] = float(np.mean(outside) / max(np.mean(inside), 1e-8))
    return out


def picture(avatar: Avatar, scorer: Scorer, poses=PICTURE_POSES) -> np.ndarray:
    """[h, 2 * (len(poses) + 1) * w, 3] in [0, 1]: ground truth and avatar side by side at held-out
    views of the source, then once with every attribute at its top level (the combined edit)."""
    cases = [({}, yaw, pitch) for yaw, pitch in poses]
    if len(scorer.attrs) > 1:
        cases.append((scorer.combined_levels()[0], *COMBINED_POSES[0]))
    tiles = []
    for values, yaw, pitch in cases:
        tiles.append(scorer.target(values, {}, yaw, pitch).numpy())
        tiles.append(scorer.predict(avatar, values, {}, yaw, pitch).numpy())
    return np.concatenate(tiles, 1)
