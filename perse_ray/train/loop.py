"""``train_avatar``: the per-subject training loop, plain PyTorch (Ray wiring lives elsewhere).

Reads ``frames``-schema rows (only kept frames), draws random batches of (frame, camera, z) and
fits the avatar with L1 + λ·(1−SSIM) (+ LPIPS where real weights exist), a small latent prior,
an optional L1 prior on what the attribute branches change (``train.lambda_attr_delta``: edits
that stay small where their frames do not ask for change combine better), and the interpolation
regularization: morph frames carry (from, to, α) and are rendered at
lerp(code_from, code_to, α) and compared with their reference inside the edit's mask.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from perse_ray.avatar.io import Avatar, load_avatar, save_avatar
from perse_ray.avatar.layout import LatentLayout
from perse_ray.avatar.losses import load_lpips, psnr, ssim
from perse_ray.avatar.model import AvatarModel
from perse_ray.avatar.relocate import relocate_dead
from perse_ray.config import Config
from perse_ray.schema import rows_from_table

CHECKPOINT_PREFIX = "ckpt-"
STATE_FILE, TRAINER_FILE = "trainer_state.safetensors", "trainer.json"
KEEP_CHECKPOINTS = 2


@dataclasses.dataclass
class FrameSet:
    """Decoded training frames at the render resolution, as tensors (M frames)."""

    images: torch.Tensor  # [M, H, W, 3] in [0, 1]
    weights: torch.Tensor  # [M, H, W]: the edit mask on morph frames, ones elsewhere
    viewmats: torch.Tensor  # [M, 4, 4]
    Ks: torch.Tensor  # [M, 3, 3], scaled to the render resolution
    expression: torch.Tensor  # [M, E]
    selections: torch.Tensor  # [M, A, 3] = (from_edit, to_edit, alpha) per attribute
    is_morph: torch.Tensor  # [M] bool
    frame_index: torch.Tensor  # [M] index into the motion script

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> "FrameSet":
        return FrameSet(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def to(self, device: torch.device) -> "FrameSet":
        return FrameSet(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def resolve_device(name: str) -> torch.device:
    """``machine.device``: ``auto`` is this process's current GPU when it sees one (Ray Train pins one
    per worker), else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("machine.device=cuda but this process sees no CUDA GPU")
    return torch.device("cuda", torch.cuda.current_device())


def decode_resized(data: bytes, width: int, height: int, mode: str) -> tuple[np.ndarray, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        im = im.convert(mode)
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.BOX if im.width > width else Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0, size


def frameset_from_rows(rows: Iterable[dict[str, Any]], layout: LatentLayout, width: int, height: int) -> FrameSet:
    """Kept rows of the ``frames`` schema → a FrameSet; rows naming unknown attributes/edits raise."""
    attr_index = {a.name: i for i, a in enumerate(layout.attributes)}
    images, weights, views, Ks, exps, sels, morph, fidx = [], [], [], [], [], [], [], []
    for row in rows:
        if not row["kept"]:
            continue
        img, (w0, h0) = decode_resized(row["image_png"], width, height, "RGB")
        sel = np.zeros((len(layout.attributes), 3), dtype=np.float32)
        interp = row.get("interpolation")
        if row["attribute"]:
            if row["attribute"] not in attr_index:
                raise ValueError(f"frame attribute {row['attribute']!r} is not in the latent layout "
                                 f"{list(attr_index)}")
            i = attr_index[row["attribute"]]
            k_max = layout.attributes[i].num_edits - 1
            lo, hi, alpha = ((interp["from_edit"], interp["to_edit"], interp["alpha"]) if interp
                             else (row["edit_index"], row["edit_index"], 0.0))
            if not (0 <= lo <= k_max and 0 <= hi <= k_max):
                raise ValueError(f"frame edit {lo}->{hi} out of range for attribute {row['attribute']!r}")
            sel[i] = (lo, hi, alpha)
        for name, level in (row.get("also_edits") or {}).items():
            if name not in attr_index or name == row["attribute"]:
                raise ValueError(f"frame also_edits names {name!r}: not another attribute of the latent layout "
                                 f"{list(attr_index)}")
            k_max = layout.attributes[attr_index[name]].num_edits - 1
            if not 0 <= level <= k_max:
                raise ValueError(f"frame also_edits {name}={level} out of range 0..{k_max}")
            lo = min(int(math.floor(level)), k_max)
            sel[attr_index[name]] = (lo, min(lo + 1, k_max), level - lo)
        weight = np.ones((height, width), dtype=np.float32)
        if interp and row.get("mask_png"):
            weight, _ = decode_resized(row["mask_png"], width, height, "L")
        cam = row["camera"]
        K = np.asarray(cam["K"], dtype=np.float32).reshape(3, 3).copy()
        K[0] *= width / w0
        K[1] *= height / h0
        images.append(img)
        weights.append(weight)
        views.append(np.asarray(cam["viewmat"], dtype=np.float32).reshape(4, 4))
        Ks.append(K)
        exps.append([float(row["expression"].get(n, 0.0)) for n in layout.expressions])
        sels.append(sel)
        morph.append(interp is not None)
        fidx.append(int(row["frame_index"]))
    if not images:
        raise ValueError("no kept frames to train on")
    t = torch.from_numpy
    return FrameSet(t(np.stack(images)), t(np.stack(weights)), t(np.stack(views)), t(np.stack(Ks)),
                    torch.tensor(exps, dtype=torch.float32).reshape(len(images), layout.exp_dim),
                    t(np.stack(sels)), torch.tensor(morph), torch.tensor(fidx))


def split_holdout(frames: FrameSet, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out whole motion-script frames (every edit of them), never frame 0 (the portrait view)."""
    script = sorted(set(frames.frame_index.tolist()) - {0})
    n = int(round(fraction * len(script)))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(script, size=n, replace=False).tolist()) if n else set()
    is_held = torch.tensor([f in held for f in frames.frame_index.tolist()])
    train = torch.nonzero(~is_held).flatten()
    return train, torch.nonzero(is_held & ~frames.is_morph).flatten()


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """This process's place in an initialised ``torch.distributed`` group. ``train_avatar`` then
    trains on its own share of every step's batch (``train.batch_size`` frames over all ranks, so the
    result does not depend on the worker count), sums the ranks' gradients, merges the
    ranks' relocation statistics wherever they are used (relocation, checkpoints), and writes
    checkpoints on rank 0 only."""

    rank: int
    world_size: int

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """One all-reduce over every gradient, flattened (a missing gradient counts as zero). Each
        rank's loss is its share of the global-batch mean, so the sum is the global gradient."""
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)

    def max_(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


@dataclasses.dataclass
class TrainResult:
    avatar: Avatar
    metrics: dict[str, float]
    history: list[dict[str, float]]  # one entry per log step: step, seconds, loss, psnr


def _param_groups(model: AvatarModel, cfg) -> list[dict]:
    groups = [("means", [model.means], cfg.lr_means), ("scales", [model.log_scales], cfg.lr_scales),
              ("quats", [model.quats], cfg.lr_quats), ("opacity", [model.opacity_logits], cfg.lr_opacity),
              ("colors", [model.color_logits], cfg.lr_colors), ("features", [model.features], cfg.lr_features),
              ("decoder", list(model.decoder.parameters()), cfg.lr_decoder),
              ("codes", list(model.codes.parameters()), cfg.lr_codes)]
    if model.backdrop is not None:
        groups.append(("backdrop", [model.backdrop], cfg.lr_backdrop))
    return [{"name": n, "params": p, "lr": lr, "initial_lr": lr} for n, p, lr in groups if p]


def photometric_loss(render: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                     lambda_ssim: float, lpips_model=None, lambda_lpips: float = 0.0) -> torch.Tensor:
    """Per-frame (1−λ)·L1 + λ·(1−SSIM) (+ λ_lpips·LPIPS) with pixel weights; returns [B]."""
    w = weight[..., None]
    l1 = ((render - target).abs() * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * 3).clamp_min(1e-6)
    loss = (1 - lambda_ssim) * l1
    if lambda_ssim:
        loss = loss + lambda_ssim * (1 - ssim(render, target, weight=weight, reduce=False))
    if lpips_model is not None and lambda_lpips:
        nchw = lambda x: x.permute(0, 3, 1, 2) * 2 - 1  # noqa: E731 - LPIPS wants [-1, 1] NCHW
        loss = loss + lambda_lpips * lpips_model(nchw(render), nchw(target)).flatten()
    return loss


def attribute_prior(g: dict[str, torch.Tensor], tcfg) -> torch.Tensor | float:
    """``train.lambda_attr_delta`` × the attribute branches' mean |output| (0 when off) for Gaussians
    decoded with ``attribute_l1=tcfg.lambda_attr_delta > 0``."""
    return tcfg.lambda_attr_delta * g["attribute_l1"] if tcfg.lambda_attr_delta else 0.0


def render_frames(model: AvatarModel, frames: FrameSet, backend: str, groups=None, attribute_l1: bool = False):
    z = model.compose(frames.expression, frames.selections)
    rgb, _, g = model.render(z, frames.viewmats[:, None], frames.Ks[:, None],
                             frames.images.shape[2], frames.images.shape[1], backend=backend, groups=groups,
                             attribute_l1=attribute_l1)
    return rgb[:, 0], g


@torch.no_grad()
def evaluate(model: AvatarModel, frames: FrameSet, backend: str = "auto", batch: int = 8) -> dict[str, float]:
    """Mean PSNR and SSIM over ``frames`` (each frame scored alone, then averaged)."""
    scores = {"psnr": [], "ssim": []}
    for start in range(0, len(frames), batch):
        part = frames.subset(torch.arange(start, min(start + batch, len(frames))))
        rgb, _ = render_frames(model, part, backend)
        rgb = rgb.clamp(0, 1)
        for r, t in zip(rgb, part.images):
            scores["psnr"].append(float(psnr(r, t)))
            scores["ssim"].append(float(ssim(r, t)))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def _camera_meta(cfg: Config) -> dict[str, Any]:
    return {"fov_deg": cfg.render.fov_deg, "distance": cfg.render.distance,
            "conventions": "head-centred metres, OpenCV axes (x right, y down, z forward), "
                           "orbit cameras by yaw/pitch in degrees (perse_ray.camera)"}


def train_avatar(frames: pa.Table | list[dict[str, Any]], config: Config, checkpoint_dir: str | os.PathLike | None = None,
                 resume: bool = True, *, progress: bool = True, subject_id: str = "",
                 on_log: Callable[[dict[str, float], AvatarModel], None] | None = None,
                 on_checkpoint: Callable[[Path | None, int], None] | None = None,
                 parallel: DataParallel | None = None) -> TrainResult:
    """Train one subject's avatar. Deterministic for ``config.train.seed`` (given thread count).

    ``checkpoint_dir`` gets ``ckpt-<step>/`` folders (avatar files + optimizer state) every
    ``machine.checkpoint_every`` steps; with ``resume`` the newest complete one is continued.
    ``on_log(record, model)`` sees every log record, ``on_checkpoint(path, step)`` every checkpoint
    written (Ray reporting, curves). With ``parallel`` (data-parallel training) every rank resumes
    from ``checkpoint_dir``, only rank 0 writes there, and the others see ``on_checkpoint(None, step)``.
    """
    tcfg, rcfg, machine = config.train, config.render, config.machine
    rank, world = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    torch.manual_seed(tcfg.seed)
    rows = rows_from_table(frames) if isinstance(frames, pa.Table) else list(frames)
    layout = training_layout(config)
    device = resolve_device(machine.device)
    data = frameset_from_rows(rows, layout, rcfg.width, rcfg.height)
    train_idx, held_idx = split_holdout(data, tcfg.holdout_fraction, tcfg.seed)
    latents_cpu = (data.expression[train_idx], data.selections[train_idx])  # for the decoder's row groups
    train_idx, held_idx = train_idx.to(device), held_idx.to(device)
    data = data.to(device)
    train_set = data.subset(train_idx)
    # Coarse-to-fine: the first train.coarse_fraction of the steps see the same frames at half the
    # size (decoded from the same PNGs, as a half-size preset would), where a step costs less and
    # the Gaussians still move far; the rest refine at full size.
    if not 0.0 <= tcfg.coarse_fraction <= 1.0:
        raise ValueError(f"train.coarse_fraction must be in [0, 1], got {tcfg.coarse_fraction}")
    coarse_steps = int(round(tcfg.coarse_fraction * tcfg.steps))
    coarse_set = (frameset_from_rows(rows, layout, max(rcfg.width // 2, 1), max(rcfg.height // 2, 1))
                  .to(device).subset(train_idx) if coarse_steps else None)

    regions = edit_regions(train_set, len(layout.attributes)) if config.avatar.branch_regions else None
    model = AvatarModel(layout, config.avatar, seed=tcfg.seed).to(device)
    optimizer = torch.optim.Adam(_param_groups(model, tcfg), eps=1e-15)
    gen = torch.Generator().manual_seed(tcfg.seed)  # on the CPU: the same draws on every device
    lpips_model = load_lpips().to(device) if tcfg.lambda_lpips > 0 else None
    step, history, seconds_before = 0, [], 0.0
    peak_opacity = torch.zeros(config.avatar.num_gaussians, device=device)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else None
    latest = latest_checkpoint(ckpt_root) if ckpt_root and resume else None
    if latest is not None:
        step, history, seconds_before = _load_checkpoint(latest, model, optimizer, gen, peak_opacity)
    else:
        init_from_portrait(model, train_set)
        if regions is not None:
            model.set_branch_regions(branch_region_mask(model.means, regions))
    morph_weight = torch.where(train_set.is_morph, tcfg.lambda_interp, 1.0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    global_batch = min(tcfg.batch_size, len(train_set))
    if world > global_batch:
        raise ValueError(f"{world} workers cannot split a batch of {global_batch} frames: use at most "
                         f"train.batch_size={tcfg.batch_size} workers per subject")
    t0 = time.perf_counter() - seconds_before
    bar = _progress(tcfg.steps, step, progress, subject_id)
    while step < tcfg.steps:
        decay = tcfg.lr_final_ratio ** (step / max(tcfg.steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * decay
        # One draw for the whole group, so the generator (also used by relocation, and saved in
        # checkpoints) stays identical on every rank; each rank trains on its own share of it.
        draw = torch.randint(len(train_set), (global_batch,), generator=gen)
        batch_idx = draw[rank::world]
        groups = model.latent_groups(latents_cpu[0][batch_idx], latents_cpu[1][batch_idx])
        batch_idx = batch_idx.to(device)
        batch = (coarse_set if step < coarse_steps else train_set).subset(batch_idx)
        rgb, g = render_frames(model, batch, machine.render_backend, groups, tcfg.lambda_attr_delta > 0)
        per_frame = photometric_loss(rgb, batch.images, batch.weights, tcfg.lambda_ssim, lpips_model, tcfg.lambda_lpips)
        loss = (per_frame * morph_weight[batch_idx]).sum() / global_batch
        loss = loss + attribute_prior(g, tcfg) * len(batch_idx) / global_batch  # this rank's share, by its frames
        if tcfg.lambda_latent:  # once over the group: each rank adds its share
            loss = loss + tcfg.lambda_latent / world * sum((c**2).sum() for c in model.codes.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if parallel:
            parallel.sum_gradients(params)
        optimizer.step()
        step += 1
        peak_opacity = torch.maximum(peak_opacity, g["opacities"].detach().amax(dim=0))
        relocate_now = tcfg.relocate_every and step % tcfg.relocate_every == 0 and step < 0.8 * tcfg.steps
        checkpoint_now = ckpt_root and (step % machine.checkpoint_every == 0 or step == tcfg.steps)
        if parallel and (relocate_now or checkpoint_now):
            parallel.max_(peak_opacity)  # ranks agree where it is used, with one collective per use, not per step
        if relocate_now:
            relocate_dead(model, optimizer, peak_opacity, tcfg.dead_opacity, gen)
            peak_opacity.zero_()
            if regions is not None:  # Gaussians moved: which region each is in now
                model.set_branch_regions(branch_region_mask(model.means, regions))
        if step % machine.log_every == 0 or step == tcfg.steps:
            record = {"step": step, "seconds": time.perf_counter() - t0, "loss": loss.item() * world,  # rank 0's share, scaled
                      "psnr": float(psnr(rgb.detach().clamp(0, 1), batch.images))}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['psnr']:.1f}")
            if on_log:
                on_log(record, model)
        bar.update(1)
        if checkpoint_now:
            path = _save_checkpoint(ckpt_root, step, _make_avatar(model, config, {}, subject_id), optimizer, gen,
                                    peak_opacity, history, time.perf_counter() - t0) if rank == 0 else None
            if on_checkpoint:
                on_checkpoint(path, step)
    bar.close()

    model.eval()
    metrics = {"steps": float(step), "train_seconds": history[-1]["seconds"] if history else 0.0,
               "final_loss": history[-1]["loss"] if history else float("nan"),
               "num_frames": float(len(train_set)), "num_heldout_frames": float(len(held_idx))}
    if len(held_idx):
        held = evaluate(model, data.subset(held_idx), machine.render_backend)
        metrics.update(heldout_psnr=held["psnr"], heldout_ssim=held["ssim"])
    return TrainResult(_make_avatar(model.cpu(), config, metrics, subject_id), metrics, history)


def project(means: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel positions [..., N, 2] and depths [..., N] of points ``means`` [N, 3] in cameras
    viewmats [..., 4, 4], Ks [..., 3, 3]."""
    cam = means @ viewmats[..., :3, :3].transpose(-1, -2) + viewmats[..., None, :3, 3]
    return (cam @ Ks.transpose(-1, -2))[..., :2] / cam[..., 2:3].clamp_min(1e-6), cam[..., 2]


@torch.no_grad()
def edit_regions(frames: FrameSet, num_attributes: int, dilate: int = 2) -> list[tuple | None]:
    """Per attribute, (viewmats, Ks, masks [F, H, W] bool) of its morph frames, whose weights are its
    edit mask, dilated by ``dilate`` px; None for an attribute without any. Fixed for a training run.

    A mask is the edit's region times its strength (a morph halfway to a 0.6-strength recolour peaks
    at 0.3), so the region is where a frame's weight reaches a quarter of that frame's peak, not a
    fixed level: a fixed 0.5 left weak edits' branches acting on no Gaussian at all."""
    out = []
    for a in range(num_attributes):
        index = torch.nonzero(frames.is_morph & (frames.selections[:, a, 1] > 0)).flatten()
        pooled = torch.nn.functional.max_pool2d(frames.weights[index, None], 2 * dilate + 1, 1, dilate)[:, 0]
        peak = pooled.amax(dim=(1, 2), keepdim=True)
        masks = (pooled >= 0.25 * peak) & (peak > 0)
        out.append((frames.viewmats[index], frames.Ks[index], masks) if len(index) else None)
    return out


def training_layout(config: Config) -> LatentLayout:
    """The latent layout an avatar trains with. Under the "owned" composition the attribute branches
    are anchored: an attribute's share of a Gaussian is measured against its source level, where it
    must add exactly nothing."""
    return LatentLayout.from_config(config.synth, config.avatar.code_dim,
                                    anchored=config.avatar.attribute_composition == "owned")


@torch.no_grad()
def branch_region_mask(means: torch.Tensor, regions: list[tuple | None]) -> torch.Tensor:
    """[A, N] bool: the Gaussians whose centre falls inside attribute a's mask in any of its frames
    (``edit_regions``). An attribute without masked frames keeps every Gaussian."""
    out = torch.ones(len(regions), means.shape[0], dtype=torch.bool, device=means.device)
    for a, region in enumerate(regions):
        if region is None:
            continue
        viewmats, Ks, masks = region
        h, w = masks.shape[1:]
        uv, depth = project(means, viewmats, Ks)
        px, py = uv[..., 0].floor().long(), uv[..., 1].floor().long()
        valid = (depth > 0) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
        frame = torch.arange(len(masks), device=means.device)[:, None].expand_as(px)
        out[a] = (masks[frame, py.clamp(0, h - 1), px.clamp(0, w - 1)] & valid).any(0)
    return out


@torch.no_grad()
def init_from_portrait(model: AvatarModel, frames: FrameSet) -> None:
    """Colour every Gaussian from the source portrait view (frame 0 of the unedited video) where it
    projects, and the backdrop from that frame's border: training starts from the right colours."""
    front = torch.nonzero((frames.frame_index == 0) & (frames.selections[..., :2].abs().sum((1, 2)) == 0)).flatten()
    if len(front) == 0:
        return
    i = int(front[0])
    image, view, K = frames.images[i], frames.viewmats[i], frames.Ks[i]
    h, w = image.shape[:2]
    uv, _ = project(model.means, view, K)
    px = uv[:, 0].long().clamp(0, w - 1)
    py = uv[:, 1].long().clamp(0, h - 1)
    colors = image[py, px].clamp(0.02, 0.98)
    model.color_logits.copy_(torch.logit(colors))
    if model.backdrop is not None:
        border = torch.cat([image[0], image[-1], image[:, 0], image[:, -1]]).mean(0).clamp(0.02, 0.98)
        model.backdrop.copy_(torch.logit(border)[:, None, None].expand_as(model.backdrop))


def _make_avatar(model: AvatarModel, config: Config, metrics: dict, subject_id: str) -> Avatar:
    return Avatar(model, {"subject_id": subject_id, "camera": _camera_meta(config), "config": config.to_dict(),
                          "metrics": metrics, "preset": config.preset, "config_hash": config.training_hash(),
                          "synthesis_hash": config.synthesis_hash()})


def _progress(total: int, initial: int, enabled: bool, subject_id: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=f"train {subject_id}".strip(),
                unit="step", dynamic_ncols=True, mininterval=1.0)


# ----------------------------------------------------------------------------- checkpoints


def latest_checkpoint(root: Path) -> Path | None:
    """Newest complete checkpoint (complete = its trainer.json exists; folders appear by rename)."""
    if not root.is_dir():
        return None
    done = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_FILE).is_file()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _save_checkpoint(root: Path, step: int, avatar: Avatar, optimizer, gen: torch.Generator,
                     peak_opacity: torch.Tensor, history: list, seconds: float) -> Path:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=root))
    try:
        save_avatar(avatar, tmp / "avatar")
        state, groups = _optimizer_tensors(optimizer)
        state["generator_state"] = gen.get_state()
        state["peak_opacity"] = peak_opacity.cpu().clone()
        save_file(state, str(tmp / STATE_FILE))
        (tmp / TRAINER_FILE).write_text(json.dumps({"step": step, "seconds": seconds, "history": history,
                                                     "param_groups": groups}))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = sorted(root.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: p.name)[:-KEEP_CHECKPOINTS]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"state.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _load_checkpoint(path: Path, model: AvatarModel, optimizer, gen: torch.Generator, peak_opacity: torch.Tensor):
    from safetensors.torch import load_file

    avatar = load_avatar(path / "avatar")
    model.load_state_dict(avatar.model.state_dict())
    tensors = load_file(str(path / STATE_FILE))
    meta = json.loads((path / TRAINER_FILE).read_text())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    gen.set_state(tensors["generator_state"])
    peak_opacity.copy_(tensors["peak_opacity"])
    return int(meta["step"]), list(meta["history"]), float(meta["seconds"])
