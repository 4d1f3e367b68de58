"""Edits after training: fit one new edit level, or one new attribute, into a trained avatar.

``extend_avatar`` makes the new part's 2D frames from the subject's aligned portrait with the
synthesis stages themselves (``pipeline.synthesize_subject``: edit, animate with the shared motion
script, morph references, identity filter), for that one attribute only; grows the model
(``perse_ray.avatar.extend``) and fits only what the growth may change:

- a new level: its code and a residual branch on the attribute (anchored: zero at the source
  code), on the new level's frames plus the attribute's old levels replayed (re-synthesized: the
  stages are seeded, so they are the frames it was trained on) so the old levels stay put;
- a new attribute: its anchored branch and codes, on its own frames.

A fit starts from a trained avatar and is short, so its learning rates start at ``LR_SCALE`` times
the training's (decaying the same way); at the training's own rates a few hundred steps barely
move a fresh branch.

Every frozen entry is put back after each step, so renders that do not use the new part stay
bit-identical. The result is a new ``Avatar`` whose ``meta["edits"]`` records what was added, from
what, and its scores; its ``config_hash`` stays the base's, so a re-run of the build still finds it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import sys
import time
from typing import Any, Callable

import torch

from perse_ray.avatar.extend import Trainable, grow_attribute, grow_level
from perse_ray.avatar.io import Avatar
from perse_ray.avatar.model import AvatarModel
from perse_ray.config import AttributeSpec, Config, EditSpec, from_dict
from perse_ray.train.loop import (FrameSet, attribute_prior, branch_region_mask, edit_regions, evaluate,
                                  frameset_from_rows, photometric_loss, render_frames, resolve_device, split_holdout)


LR_SCALE = 10.0  # measured on the procedural head: x1 left a new level 10 dB short after 300 steps


@dataclasses.dataclass(frozen=True)
class Extension:
    """What to add: one level of an existing attribute (``kind="level"``, one edit) or a new
    attribute (``kind="attribute"``, one or more edits); ``origin`` says where the edits came from
    (explicit params, a prompt, a reference portrait and what was measured in it)."""

    kind: str
    attribute: str
    edits: tuple[EditSpec, ...]
    origin: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("level", "attribute"):
            raise ValueError(f"extension kind {self.kind!r}; choices: level, attribute")
        if not self.edits or (self.kind == "level" and len(self.edits) != 1):
            raise ValueError("a new level takes exactly one edit, a new attribute one or more"
                             f" ({len(self.edits)} given)")


def avatar_config(avatar: Avatar) -> Config:
    """The config the avatar was trained with (its ``avatar.json``)."""
    return from_dict(Config, avatar.meta["config"], "config")


def attribute_specs(avatar: Avatar) -> dict[str, list[EditSpec]]:
    """Every attribute's edit specs (levels 1..K-1) as this avatar knows them: its training
    config's, then those added by earlier extensions."""
    specs = {a.name: list(a.edits) for a in avatar_config(avatar).synth.attributes}
    for record in avatar.meta.get("edits", []):
        specs.setdefault(record["attribute"], []).extend(from_dict(EditSpec, e, "edits") for e in record["edits"])
    return specs


def check_extension(avatar: Avatar, ext: Extension) -> None:
    """Refuse, naming the problem, an extension the avatar cannot take."""
    names = [a.name for a in avatar.layout.attributes]
    labels = [e.label for e in ext.edits]
    if ext.kind == "level":
        if ext.attribute not in names:
            raise ValueError(f"unknown attribute {ext.attribute!r}; the avatar has {names}")
        known = avatar.layout.attribute(ext.attribute).edit_labels
        if labels[0] in known:
            raise ValueError(f"attribute {ext.attribute!r} already has a level {labels[0]!r} ({known})")
    elif ext.attribute in names:
        raise ValueError(f"the avatar already has an attribute {ext.attribute!r}: use a new name, or add a level")
    if len(set(labels)) != len(labels) or "source" in labels or not all(labels):
        raise ValueError(f"edit labels must be distinct, non-empty and not 'source': {labels}")


def extension_config(avatar: Avatar, ext: Extension) -> Config:
    """The synthesis config of the frames the extension needs: its attribute alone, with every
    level (old ones replayed, then the new), no composed frames."""
    cfg = copy.deepcopy(avatar_config(avatar))
    old = attribute_specs(avatar).get(ext.attribute, []) if ext.kind == "level" else []
    cfg.synth.attributes = [AttributeSpec(ext.attribute, [*old, *ext.edits])]
    cfg.synth.combined_frames = 0
    return cfg


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _grow(avatar: Avatar, ext: Extension, seed: int) -> tuple[AvatarModel, Trainable]:
    if ext.kind == "level":
        return grow_level(avatar.model, ext.attribute, ext.edits[0].label, seed=seed)
    return grow_attribute(avatar.model, ext.attribute, [e.label for e in ext.edits], seed=seed)


def fit(model: AvatarModel, trainable: Trainable, frames: FrameSet, config: Config, steps: int, *,
        coarse: FrameSet | None = None, region_of: int | None = None, progress: bool = False, desc: str = "",
        lr_scale: float = LR_SCALE, on_log: Callable[[dict], None] | None = None) -> list[dict]:
    """Fit ``trainable``'s entries of ``model`` to ``frames`` for ``steps`` (the training loss and
    schedule of ``config.train``, its learning rates times ``lr_scale``); every other entry stays
    exactly as it is.
    ``coarse``: the same frames at half size, for the first ``train.coarse_fraction`` of the steps
    (as training does). ``region_of``: the attribute whose branch region is set from these frames'
    masks. Returns the log records (step, seconds, loss, psnr)."""
    from tqdm import tqdm

    tcfg, machine = config.train, config.machine
    device = frames.images.device
    if region_of is not None and getattr(model, "branch_regions", None) is not None:
        regions = edit_regions(frames, len(model.layout.attributes))
        mask = model.branch_regions.clone()
        mask[region_of] = branch_region_mask(model.means.detach(), [regions[region_of]])[0]
        model.set_branch_regions(mask)
    for p in model.parameters():
        p.requires_grad_(False)
    params = trainable.parameters(model)
    for p in params:
        p.requires_grad_(True)
    lr = {"decoder": lr_scale * tcfg.lr_decoder, "codes": lr_scale * tcfg.lr_codes}
    groups = [{"params": [p], "lr": lr[name.split(".")[0]], "initial_lr": lr[name.split(".")[0]]}
              for name, p in zip(trainable.masks, params)]
    optimizer = torch.optim.Adam(groups, eps=1e-15)
    snapshot = trainable.snapshot(model)
    gen = torch.Generator().manual_seed(tcfg.seed)
    morph_weight = torch.where(frames.is_morph, tcfg.lambda_interp, 1.0)
    coarse_steps = int(round(tcfg.coarse_fraction * steps)) if coarse is not None else 0
    codes = [p for name, p in zip(trainable.masks, params) if name.startswith("codes.")]
    batch_size = min(tcfg.batch_size, len(frames))
    history, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        decay = tcfg.lr_final_ratio ** ((step - 1) / max(steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * decay
        index = torch.randint(len(frames), (batch_size,), generator=gen)
        latent_groups = model.latent_groups(frames.expression[index].cpu(), frames.selections[index].cpu())
        index = index.to(device)
        batch = (coarse if step <= coarse_steps else frames).subset(index)
        rgb, g = render_frames(model, batch, machine.render_backend, latent_groups, tcfg.lambda_attr_delta > 0)
        per_frame = photometric_loss(rgb, batch.images, batch.weights, tcfg.lambda_ssim)
        # the training prior too: frozen branches add a constant, so only the new branch feels it
        loss = (per_frame * morph_weight[index]).mean() + attribute_prior(g, tcfg)
        if tcfg.lambda_latent:
            loss = loss + tcfg.lambda_latent * sum((c**2).sum() for c in codes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trainable.restore(model, snapshot)
        if step % machine.log_every == 0 or step == steps:
            from perse_ray.avatar.losses import psnr

            record = {"step": step, "seconds": time.perf_counter() - t0, "loss": loss.item(),
                      "psnr": float(psnr(rgb.detach().clamp(0, 1), batch.images))}
            history.append(record)
            if on_log:
                on_log(record)
            if progress:
                # stderr, as training's progress bar: stdout belongs to the caller (JSON lines in benchmarks)
                tqdm.write(f"{desc} step {step}/{steps}: loss {record['loss']:.4f}, psnr {record['psnr']:.2f}",
                           file=sys.stderr)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history


def extend_avatar(avatar: Avatar, subject: dict[str, Any], ext: Extension, *, steps: int | None = None,
                  base_version: str | None = None, progress: bool = True,
                  frames_fn: Callable[[Config, dict], list[dict]] | None = None,
                  log: Callable[[str], None] = _to_stderr) -> Avatar:
    """``avatar`` with ``ext`` added (a new ``Avatar``; the input is not changed).

    ``subject``: the subject's ``subjects`` row (its aligned portrait, landmarks and identity).
    ``steps``: fit steps (default: a fifth of the avatar's training steps). ``frames_fn(cfg,
    subject)`` makes the frames (default: the synthesis stages, ``pipeline.synthesize_subject``).
    """
    check_extension(avatar, ext)
    cfg = extension_config(avatar, ext)
    steps = int(steps if steps is not None else max(1, cfg.train.steps // 5))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    start = time.perf_counter()
    if frames_fn is None:
        from perse_ray.pipeline import synthesize_subject as frames_fn
    rows = [r for r in frames_fn(cfg, subject) if r["attribute"]]  # the source frames teach nothing new
    kept = sum(bool(r["kept"]) for r in rows)
    log(f"{len(rows)} frames of {ext.attribute!r} synthesized, {kept} kept by the identity filter, "
        f"in {time.perf_counter() - start:.1f} s")
    if not kept:
        raise ValueError(f"the identity filter kept none of the {len(rows)} frames of the new edit")
    seconds_frames = time.perf_counter() - start

    regions = getattr(avatar.model, "branch_regions", None)
    if ext.kind == "level" and regions is not None and not regions[
            [a.name for a in avatar.layout.attributes].index(ext.attribute)].any():
        raise ValueError(f"the avatar's {ext.attribute!r} branch acts on no Gaussian (its training masks covered "
                         "none), so a new level of it cannot change any render: add it as a new attribute instead")
    device = resolve_device(cfg.machine.device)
    model, trainable = _grow(avatar, ext, cfg.train.seed)
    model = model.to(device)
    data = frameset_from_rows(rows, model.layout, cfg.render.width, cfg.render.height).to(device)
    train_idx, held_idx = split_holdout(data, cfg.train.holdout_fraction, cfg.train.seed)
    a = [x.name for x in model.layout.attributes].index(ext.attribute)
    newest = len(model.layout.attributes[a].edit_labels) - 1
    backend = cfg.machine.render_backend

    def psnr_of(m: AvatarModel, frames: FrameSet, new: bool) -> dict[str, float]:
        """PSNR of the (non-morph) frames of the new edit (``new``) or of the attribute's old levels."""
        level = frames.selections[:, a, 1].long()
        is_new = level == newest if ext.kind == "level" else torch.ones_like(level, dtype=torch.bool)
        index = torch.nonzero(~frames.is_morph & (is_new if new else ~is_new)).flatten()
        return evaluate(m, frames.subset(index), backend)["psnr"] if len(index) else None

    train_set, held = data.subset(train_idx), data.subset(held_idx)
    scores = {"fit_psnr_new_before": psnr_of(model, train_set, True)}
    if ext.kind == "level":
        scores["heldout_psnr_old_levels_before"] = psnr_of(avatar.model.to(device), held, False)
        avatar.model.cpu()
    log(f"fitting {'the new level' if ext.kind == 'level' else 'the new attribute'} {ext.attribute!r}: "
        f"{steps} steps on {len(train_idx)} frames ({len(held_idx)} held out)")
    # the coarse phase decodes the same PNGs at half size, as training does
    coarse = (frameset_from_rows(rows, model.layout, max(cfg.render.width // 2, 1), max(cfg.render.height // 2, 1))
              .to(device).subset(train_idx) if cfg.train.coarse_fraction else None)
    history = fit(model, trainable, train_set, cfg, steps, coarse=coarse,
                  region_of=a if ext.kind == "attribute" else None, progress=progress,
                  desc=f"{avatar.meta.get('subject_id', '')} {ext.attribute}".strip())
    scores.update(fit_psnr_new=psnr_of(model, train_set, True), heldout_psnr_new=psnr_of(model, held, True))
    if ext.kind == "level":
        scores["heldout_psnr_old_levels"] = psnr_of(model, held, False)
    scores = {k: round(v, 3) for k, v in scores.items() if v is not None}
    fit_seconds = history[-1]["seconds"] if history else 0.0
    base_seconds = float(avatar.meta.get("metrics", {}).get("train_seconds", 0.0)) or None
    record = {
        "kind": ext.kind, "attribute": ext.attribute, "edits": [dataclasses.asdict(e) for e in ext.edits],
        "origin": ext.origin, "base_version": base_version, "steps": steps,
        "frames": len(rows), "frames_kept": kept, "seconds_frames": round(seconds_frames, 3),
        "seconds_fit": round(fit_seconds, 3),
        "fit_time_over_base_training": round(fit_seconds / base_seconds, 4) if base_seconds else None,
        "scores": scores,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta = {k: v for k, v in avatar.meta.items() if k not in ("created_at", "layout", "format", "format_version",
                                                                "avatar_config")}
    meta["edits"] = [*avatar.meta.get("edits", []), record]
    log(f"added {ext.kind} {ext.attribute!r} ({', '.join(e.label for e in ext.edits)}) in {fit_seconds:.1f} s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return Avatar(model.cpu(), meta)

