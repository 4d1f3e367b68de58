"""Ground-truth data and scores from the procedural head.

``frames_from_head`` renders the head through the pipeline's motion script and cameras into
``frames``-schema rows (source, every edit of every attribute, interpolation references);
``score_avatar`` compares a trained avatar with exact renders at held-out cameras, held-out
expression values and never-trained latent midpoints, and measures attribute leakage.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import torch
from PIL import Image

from perse_ray.avatar.io import Avatar
from perse_ray.avatar.losses import psnr, ssim
from perse_ray.bench.procedural import ProceduralHead
from perse_ray.camera import camera_record
from perse_ray.config import Config
from perse_ray.render import rasterize
from perse_ray.synth.motion import motion_script

HELDOUT_YAWS = (-26.0, -13.0, 4.0, 17.0, 28.0)
HELDOUT_PITCHES = (-7.0, 6.0)
HELDOUT_EXPRESSIONS = ({"jaw_open": 0.5}, {"smile": 0.55}, {"brow_raise": 0.45},
                       {"jaw_open": 0.7, "smile": 0.35}, {"smile": 0.8, "brow_raise": 0.6})


def _render(g: dict[str, torch.Tensor], camera: dict, size: int, background=(1.0, 1.0, 1.0)) -> np.ndarray:
    view = torch.tensor(camera["viewmat"]).reshape(1, 4, 4)
    K = torch.tensor(camera["K"]).reshape(1, 3, 3)
    rgb, alpha, _ = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], view, K, size, size,
                              backgrounds=torch.tensor([background], dtype=torch.float32))
    return rgb[0].clamp(0, 1).numpy(), alpha[0, ..., 0].numpy()


def _png(image: np.ndarray) -> bytes:
    """[H, W, 3] RGB or [H, W] gray in [0, 1] → PNG bytes."""
    buf = io.BytesIO()
    arr = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def region_mask(head: ProceduralHead, attribute: str, expression: dict, camera: dict, size: int,
                dilate: int = 2) -> np.ndarray:
    """[H, W] float mask of the pixels an attribute can cover (its Gaussians made opaque), dilated."""
    g = head.gaussians({}, expression)
    inside = torch.from_numpy(head.region(attribute))
    g["opacities"] = torch.where(inside, torch.tensor(0.95), torch.tensor(0.0))
    _, alpha = _render(g, camera, size)
    mask = torch.from_numpy((alpha > 0.05).astype(np.float32))[None, None]
    if dilate:
        mask = torch.nn.functional.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)
    return mask[0, 0].numpy()


def _check_config(head: ProceduralHead, config: Config) -> None:
    for a in config.synth.attributes:
        head.region(a.name)
    head.gaussians({}, {e: 0.0 for e in config.synth.motion.expressions})


def frames_from_head(head: ProceduralHead, config: Config, subject_id: str = "procedural-head") -> list[dict]:
    """``frames``-schema rows: per script frame the source, every edit and the morph references."""
    _check_config(head, config)
    res, fov, dist = config.synth.resolution, config.render.fov_deg, config.render.distance
    rows = []
    for frame in motion_script(config.synth.motion):
        cam = camera_record(frame.yaw, frame.pitch, res, res, fov, dist)
        expr = dict(frame.expression)

        def row(attribute, edit, interp, values, mask):
            img, _ = _render(head.gaussians(values, expr), cam, res)
            return {"subject_id": subject_id, "attribute": attribute, "edit_index": edit,
                    "interpolation": interp, "frame_index": frame.index, "camera": cam, "expression": expr,
                    "image_png": _png(img), "mask_png": None if mask is None else _png(mask),
                    "id_score": 1.0, "kept": True, "drop_reason": None}

        rows.append(row("", 0, None, {}, None))
        for a in config.synth.attributes:
            mask = region_mask(head, a.name, expr, cam, res)
            k_count = len(a.edits) + 1
            for k in range(1, k_count):
                rows.append(row(a.name, k, None, {a.name: float(k)}, mask))
            for k, alpha in itertools.product(range(k_count - 1), config.synth.morph_alphas):
                interp = {"from_edit": k, "to_edit": k + 1, "alpha": float(alpha)}
                rows.append(row(a.name, k + 1, interp, {a.name: k + alpha}, mask))
    return rows


def _as_eval_image(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Through the same 8-bit PNG and resize path the training frames take."""
    from perse_ray.train.loop import decode_resized

    arr, _ = decode_resized(_png(image), width, height, "RGB")
    return torch.from_numpy(arr)


class Scorer:
    """Compares an avatar with the head on (attributes, expression, yaw, pitch) cases; caches targets."""

    def __init__(self, head: ProceduralHead, config: Config, backend: str):
        self.head, self.cfg, self.backend = head, config, backend
        self.neutral = {e: 0.0 for e in config.synth.motion.expressions}
        self.attrs = {a.name: len(a.edits) + 1 for a in config.synth.attributes}
        self._targets: dict = {}

    def target(self, values: dict, expr: dict, yaw: float, pitch: float) -> torch.Tensor:
        key = (tuple(sorted(values.items())), tuple(sorted(expr.items())), yaw, pitch)
        if key not in self._targets:
            c = self.cfg
            res = c.synth.resolution
            cam = camera_record(yaw, pitch, res, res, c.render.fov_deg, c.render.distance)
            img = _render(self.head.gaussians(values, expr), cam, res)[0]
            self._targets[key] = _as_eval_image(img, c.render.width, c.render.height)
        return self._targets[key]

    def compare(self, avatar: Avatar, cases) -> tuple[float, float]:
        ps, ss = [], []
        w, h = self.cfg.render.width, self.cfg.render.height
        for values, expr, yaw, pitch in cases:
            z = avatar.latent(values, {**self.neutral, **expr})
            pred = avatar.render(z, [(yaw, pitch)], w, h, background=[1.0, 1.0, 1.0], backend=self.backend)[0, 0]
            target = self.target(values, expr, yaw, pitch)
            ps.append(float(psnr(pred, target)))
            ss.append(float(ssim(pred, target)))
        return float(np.mean(ps)), float(np.mean(ss))

    def view_cases(self):
        edits = [{}] + [{a: float(k)} for a, n in self.attrs.items() for k in range(1, n)]
        return [(e, {}, y, p) for e in edits for y, p in itertools.product(HELDOUT_YAWS, HELDOUT_PITCHES)]


def score_views(model, scorer: "Scorer") -> float:
    """Held-out-view PSNR of a model in training (for PSNR-vs-time curves)."""
    avatar = Avatar(model, {"camera": {"fov_deg": scorer.cfg.render.fov_deg, "distance": scorer.cfg.render.distance}})
    return scorer.compare(avatar, scorer.view_cases())[0]


def score_avatar(avatar: Avatar, head: ProceduralHead, config: Config, backend: str = "auto",
                 scorer: Scorer | None = None) -> dict[str, float]:
    """Held-out views / expressions / latent midpoints (PSNR, SSIM) and per-attribute leakage."""
    scorer = scorer or Scorer(head, config, backend)
    res, fov, dist = config.synth.resolution, config.render.fov_deg, config.render.distance
    w, h = config.render.width, config.render.height
    attrs, neutral = scorer.attrs, scorer.neutral
    compare = lambda cases: scorer.compare(avatar, cases)  # noqa: E731
    views = list(itertools.product(HELDOUT_YAWS, HELDOUT_PITCHES))
    out = {}
    out["psnr_heldout_views"], out["ssim_heldout_views"] = compare(scorer.view_cases())
    expr_poses = [(0.0, 0.0), (-15.0, 4.0), (20.0, -5.0)]
    known = [{k: v for k, v in e.items() if k in neutral} for e in HELDOUT_EXPRESSIONS]
    out["psnr_heldout_expressions"], out["ssim_heldout_expressions"] = compare(
        [({}, e, y, p) for e in known if e for y, p in expr_poses])
    mids = [{a: k + 0.5} for a, n in attrs.items() for k in range(n - 1)]
    mid_poses = [(0.0, 0.0)] + views[::2]
    out["psnr_latent_midpoints"], out["ssim_latent_midpoints"] = compare(
        [(m, {}, y, p) for m in mids for y, p in mid_poses])

    for a, n in attrs.items():
        outside, inside = [], []
        for yaw, pitch in [(0.0, 0.0), (-20.0, 5.0), (20.0, -5.0)]:
            cam = camera_record(yaw, pitch, res, res, fov, dist)
            region = torch.from_numpy(region_mask(head, a, {}, cam, res))
            region = torch.nn.functional.interpolate(region[None, None], size=(h, w), mode="area")[0, 0] > 0
            z = torch.stack([avatar.latent({}, neutral), avatar.latent({a: float(n - 1)}, neutral)])
            img = avatar.render(z, [(yaw, pitch)], w, h, background=[1.0, 1.0, 1.0], backend=backend)[:, 0]
            diff = (img[1] - img[0]).abs().mean(-1)
            inside.append(float(diff[region].mean()))
            outside.append(float(diff[~region].mean()))
        out[f"leakage_{a}"] = float(np.mean(outside) / max(np.mean(inside), 1e-8))
    return out
