"""Evaluation of a trained avatar: identity across views, slider smoothness, disentanglement.

Pure functions over an ``Avatar`` (no Ray). Figures:
- ``identity_mean`` / ``identity_min`` / ``identity_detected``: the preset's face embedder scores
  renders across a yaw sweep against the source portrait (id_score in [0, 1], higher = same
  person); ``identity_detected`` is the fraction of views where the detector found the face. Where
  it does not (large yaw, a soft render), the face is cut at the source landmarks moved to that
  view as the animator moves them — the synthesis identity filter's fallback; a view with neither
  scores 0. ``identity_yaw_<deg>`` (e.g. ``identity_yaw_m40``, ``identity_yaw_30``) is each view's
  score, so wide turns can be compared with the near-frontal ones.
- ``smoothness_<attribute>``: the largest per-step image change along the slider divided by the
  mean step (1.0 = perfectly even; a jump makes it large).
- ``leakage_<attribute>``: mean pixel change outside the attribute's edit mask when only its
  slider moves end to end, relative to the change inside (0 = perfectly disentangled).
- ``heldout_psnr`` / ``heldout_ssim``: from training, on motion-script frames never trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from perse_ray.avatar.io import Avatar, load_avatar

IDENTITY_YAWS = (-40.0, -30.0, -15.0, 0.0, 15.0, 30.0, 40.0)
FIGURES_VERSION = 3  # part of the cache key and file name: raise it when a figure's definition changes
SLIDER_STEPS = 16


def slider_smoothness(images: list[np.ndarray] | torch.Tensor) -> float:
    """max / mean of consecutive mean-absolute image differences along a slider sweep."""
    imgs = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    steps = (imgs[1:] - imgs[:-1]).abs().flatten(1).mean(1)
    mean = float(steps.mean())
    return float(steps.max()) / mean if mean > 1e-8 else 1.0


def leakage(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    """Mean change outside ``mask`` (bool [H, W]) relative to the mean change inside it."""
    diff = np.abs(np.asarray(after, np.float32) - np.asarray(before, np.float32)).mean(-1)
    inside = diff[mask].mean() if mask.any() else 0.0
    outside = diff[~mask].mean() if (~mask).any() else 0.0
    return float(outside / max(inside, 1e-8))


def _u8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def attribute_masks(frame_rows: list[dict], size: int) -> dict[str, np.ndarray]:
    """Union of each attribute's edit masks on the front view (script frame 0), resized to ``size``."""
    masks: dict[str, np.ndarray] = {}
    for row in frame_rows:
        if row["frame_index"] != 0 or not row["attribute"] or not row.get("mask_png"):
            continue
        with Image.open(io.BytesIO(row["mask_png"])) as im:
            m = np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR)) > 32
        masks[row["attribute"]] = masks.get(row["attribute"], np.zeros_like(m)) | m
    return masks


def evaluate_avatar(avatar: Avatar, *, face_model=None, source_embedding: np.ndarray | None = None,
                    source_landmarks: np.ndarray | None = None, masks: dict[str, np.ndarray] | None = None,
                    size: int = 128) -> dict[str, float]:
    """All figures the inputs allow: identity needs ``face_model`` + ``source_embedding`` (and uses
    ``source_landmarks``, aligned-portrait pixels at ``size``, when the detector misses); leakage
    needs ``masks`` (attribute → bool [size, size], e.g. from ``attribute_masks``)."""
    from perse_ray.faces import embed_frame
    from perse_ray.camera import Camera
    from perse_ray.geometry import move_landmarks
    from perse_ray.synth.motion import MotionFrame

    out: dict[str, float] = {}
    layout = avatar.layout
    neutral = avatar.latent({}, {})
    if face_model is not None and source_embedding is not None:
        views = avatar.render(neutral, [(y, 0.0) for y in IDENTITY_YAWS], size, size)[0]
        camera = Camera(avatar.meta["camera"]["fov_deg"], avatar.meta["camera"]["distance"])
        scores, found = [], 0
        for yaw, view in zip(IDENTITY_YAWS, views):
            known = None if source_landmarks is None else \
                move_landmarks(source_landmarks, MotionFrame(0, yaw, 0.0), size, camera)
            emb, how = embed_frame(face_model, _u8(view), known)
            found += how == "detector"
            scores.append(face_model.id_score(np.asarray(source_embedding), emb) if emb is not None else 0.0)
            out[f"identity_yaw_{'m' if yaw < 0 else ''}{abs(yaw):.0f}"] = float(scores[-1])
        out.update(identity_mean=float(np.mean(scores)), identity_min=float(np.min(scores)),
                   identity_detected=found / len(IDENTITY_YAWS))
    for a in layout.attributes:
        last = a.num_edits - 1
        values = np.linspace(0.0, last, SLIDER_STEPS)
        z = torch.stack([avatar.latent({a.name: float(v)}, {}) for v in values])
        sweep = avatar.render(z, [(0.0, 0.0)], size, size)[:, 0]
        out[f"smoothness_{a.name}"] = slider_smoothness(sweep)
        if masks and a.name in masks:
            out[f"leakage_{a.name}"] = leakage(sweep[0].numpy(), sweep[-1].numpy(), masks[a.name])
    for key in ("heldout_psnr", "heldout_ssim"):
        if key in avatar.meta.get("metrics", {}):
            out[key] = float(avatar.meta["metrics"][key])
    return out


def read_partition(frames_root: Path, subject_id: str) -> tuple[list[dict], dict | None]:
    """A subject's frames rows and its ``subjects`` row from a synthesis output (if present)."""
    import pyarrow.parquet as pq

    from perse_ray.schema import rows_from_table

    part = Path(frames_root) / f"subject_id={subject_id}"
    if not part.is_dir():
        return [], None
    files = sorted(p for p in part.glob("*.parquet") if not p.name.startswith(("_", ".")))
    rows = [r for f in files for r in rows_from_table(pq.read_table(f))]
    for r in rows:
        r["subject_id"] = subject_id
    subject_file = part / "_subject.parquet"
    subject = rows_from_table(pq.read_table(subject_file))[0] if subject_file.is_file() else None
    return rows, subject


def cache_key(entry, frames_root: Path | None) -> dict:
    """What an avatar's figures are computed from, for the evaluation cache: the figures' version,
    the avatar (version, training hash and its avatar.json, which changes with every save) and the
    frames (none given, no partition for the subject, or the partition's ``_COMPLETE`` marker and
    its files' names and sizes: a rewritten partition is a different one)."""
    from perse_ray.avatar.io import META_FILE

    meta = Path(entry.path) / META_FILE
    key = {"figures_version": FIGURES_VERSION, "subject_id": entry.subject_id, "version": entry.version,
           "training_hash": entry.config_hash,
           "avatar_json": hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else None,
           "frames": None}
    if frames_root is not None:
        from perse_ray.synth.write import COMPLETE

        part = Path(frames_root) / f"subject_id={entry.subject_id}"
        if not part.is_dir():
            key["frames"] = "no partition"
        else:
            marker = part / COMPLETE
            key["frames"] = {
                "complete": marker.read_text(errors="replace") if marker.is_file() else None,
                "files": sorted((f.name, f.stat().st_size) for f in part.iterdir()
                                if f.is_file() and not f.name.startswith(".")),
            }
    return key


def cache_file(cache_dir: Path, entry, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / entry.subject_id / f"{entry.version}.figures-v{FIGURES_VERSION}.{digest}.json"


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temp file of this writer's own, so concurrent evaluators never share one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate_registry(registry_root: Path, frames_root: Path | None = None, cache_dir: Path | None = None,
                      log=print) -> dict[str, dict[str, float]]:
    """Figures for the newest version of every avatar; cached as JSON in ``cache_dir`` under a key
    of everything they are computed from (``cache_key``): figures made without frames, or from
    other frames, are not reused for these."""
    from perse_ray.config import Config, from_dict
    from perse_ray.faces import load_face_model
    from perse_ray.registry import Registry

    results, face_models = {}, {}
    for entry in Registry(registry_root).latest():
        cached = cache_file(cache_dir, entry, cache_key(entry, frames_root)) if cache_dir else None
        if cached and cached.is_file():
            results[entry.subject_id] = json.loads(cached.read_text())
            continue
        avatar = load_avatar(entry.path)
        cfg = from_dict(Config, avatar.meta["config"]) if "config" in avatar.meta else None
        size = cfg.synth.resolution if cfg else 128
        rows, subject = read_partition(frames_root, entry.subject_id) if frames_root else ([], None)
        face_model = source = landmarks = None
        if cfg is not None and subject and subject.get("identity"):
            key = json.dumps(cfg.faces.__dict__, sort_keys=True)
            if key not in face_models:
                face_models[key] = load_face_model(cfg.faces)
            face_model, source = face_models[key], np.asarray(subject["identity"], dtype=np.float32)
            landmarks = np.asarray(subject["landmarks"], dtype=np.float32) if subject.get("landmarks") else None
        figures = evaluate_avatar(avatar, face_model=face_model, source_embedding=source,
                                  source_landmarks=landmarks, masks=attribute_masks(rows, size) if rows else None,
                                  size=size)
        results[entry.subject_id] = figures
        log(f"[eval] {entry.subject_id} {entry.version}: " + ", ".join(f"{k}={v:.3f}" for k, v in figures.items()))
        if cached:
            _write_atomic(cached, json.dumps(figures, indent=1, sort_keys=True))
    return results
