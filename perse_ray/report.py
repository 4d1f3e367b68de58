"""A static HTML report (``<output>/report/index.html`` + PNGs) that opens from disk, no network.

Per subject: the source portrait, a contact sheet of the synthetic frames (kept ones framed in
green, dropped ones in red, identity score under each), a turntable strip, one interpolation strip
per attribute, an expression strip and the evaluation figures; then a summary table across
subjects and the quarantined inputs with their reasons.
"""

from __future__ import annotations

import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from perse_ray.avatar.io import Avatar

THUMB = 64
STRIP_SIZE = 128
TURNTABLE_YAWS = (-40.0, -30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0, 40.0)
STRIP_STEPS = 7


@dataclass
class SubjectReport:
    subject_id: str
    status: str  # done | skipped | failed | quarantined
    reason: str = ""
    source_path: str = ""
    portrait_png: bytes | None = None
    frames: list[dict] = field(default_factory=list)  # frames-schema rows
    avatar: Avatar | None = None
    version: str = ""
    figures: dict[str, float] = field(default_factory=dict)


def _save_png(array: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path.name


def _u8(t: torch.Tensor) -> np.ndarray:
    return (t.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def contact_sheet(frames: list[dict]) -> np.ndarray:
    """Rows = source, each edit and each morph; columns = motion-script frames; border = kept."""
    def row_key(r):
        interp = r.get("interpolation")
        return (r["attribute"], r["edit_index"], (interp or {}).get("alpha", -1.0),
                tuple(sorted((r.get("also_edits") or {}).items())))

    rows = sorted({row_key(r) for r in frames})
    cols = sorted({r["frame_index"] for r in frames})
    cell = THUMB + 14
    sheet = Image.new("RGB", (len(cols) * cell + 110, len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r in frames:
        y, x = rows.index(row_key(r)), cols.index(r["frame_index"])
        with Image.open(io.BytesIO(r["image_png"])) as im:
            thumb = im.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
        ox, oy = 110 + x * cell, y * cell
        draw.rectangle([ox, oy, ox + THUMB + 3, oy + THUMB + 3], fill=(40, 160, 60) if r["kept"] else (200, 40, 40))
        sheet.paste(thumb, (ox + 2, oy + 2))
        score = r.get("id_score")
        draw.text((ox + 2, oy + THUMB + 3), "-" if score is None else f"{score:.2f}", fill=(60, 60, 60))
    for i, (attr, edit, alpha, also) in enumerate(rows):
        label = "source" if not attr else f"{attr} {edit}" + (f" a={alpha:.2f}" if alpha >= 0 else "")  # ASCII: PIL default font
        label += "".join(f"+{a[:5]} {int(k)}" for a, k in also)
        draw.text((4, i * cell + THUMB // 2), label, fill=(0, 0, 0))
    return np.asarray(sheet)


def avatar_strips(avatar: Avatar) -> dict[str, np.ndarray]:
    """Turntable, one interpolation strip per attribute and an expression strip, as images."""
    size = STRIP_SIZE
    neutral = avatar.latent({}, {})
    strips = {"turntable": avatar.render(neutral, [(y, 0.0) for y in TURNTABLE_YAWS], size, size)[0]}
    for a in avatar.layout.attributes:
        values = np.linspace(0.0, a.num_edits - 1, STRIP_STEPS)
        z = torch.stack([avatar.latent({a.name: float(v)}, {}) for v in values])
        strips[f"interp_{a.name}"] = avatar.render(z, [(0.0, 0.0)], size, size)[:, 0]
    if avatar.layout.expressions:
        z = torch.stack([avatar.latent({}, {e: v}) for e in avatar.layout.expressions for v in (0.5, 1.0)])
        strips["expressions"] = avatar.render(z, [(0.0, 0.0)], size, size)[:, 0]
    return {k: np.concatenate(list(_u8(v)), axis=1) for k, v in strips.items()}


def write_report(root: Path, subjects: list[SubjectReport]) -> Path:
    """Write ``root/index.html`` and its PNGs; returns the index path."""
    root.mkdir(parents=True, exist_ok=True)
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>perse-ray report</title>",
             "<style>body{font:14px system-ui,sans-serif;margin:1.5rem;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}img{max-width:100%;"
             "image-rendering:pixelated}section{margin:2rem 0;border-top:1px solid #ddd}.bad{color:#b3261e}</style>",
             "<h1>perse-ray report</h1>"]
    figures = sorted({k for s in subjects for k in s.figures})
    parts.append("<h2>Summary</h2><table><tr><th>subject</th><th>status</th><th>version</th><th>kept frames</th>"
                 + "".join(f"<th>{e(f)}</th>" for f in figures) + "</tr>")
    for s in subjects:
        kept = f"{sum(r['kept'] for r in s.frames)}/{len(s.frames)}" if s.frames else ""
        cells = "".join(f"<td>{s.figures[f]:.3f}</td>" if f in s.figures else "<td></td>" for f in figures)
        parts.append(f"<tr><td><a href='#{e(s.subject_id)}'>{e(s.subject_id)}</a></td><td>{e(s.status)}</td>"
                     f"<td>{e(s.version)}</td><td>{kept}</td>{cells}</tr>")
    parts.append("</table>")
    bad = [s for s in subjects if s.status in ("quarantined", "failed")]
    parts.append("<h2>Quarantined or failed inputs</h2>")
    parts.append("<p>None.</p>" if not bad else "<table><tr><th>input</th><th>subject</th><th>status</th>"
                 "<th>reason</th></tr>" + "".join(
                     f"<tr><td>{e(s.source_path)}</td><td>{e(s.subject_id)}</td><td class='bad'>{e(s.status)}</td>"
                     f"<td>{e(s.reason)}</td></tr>" for s in bad) + "</table>")
    for s in subjects:
        if s.status == "quarantined":
            continue
        sub = root / s.subject_id
        parts.append(f"<section id='{e(s.subject_id)}'><h2>{e(s.subject_id)}</h2>"
                     f"<p>{e(s.source_path)} — {e(s.status)} {e(s.version)} {e(s.reason)}</p>")
        if s.portrait_png:
            sub.mkdir(parents=True, exist_ok=True)
            (sub / "portrait.png").write_bytes(s.portrait_png)
            parts.append(f"<h3>Source portrait (aligned)</h3><img src='{e(s.subject_id)}/portrait.png'>")
        if s.frames:
            name = _save_png(contact_sheet(s.frames), sub / "frames.png")
            parts.append("<h3>Synthetic frames</h3><p>Green: kept; red: dropped by the identity filter; number: "
                         f"identity score.</p><img src='{e(s.subject_id)}/{name}'>")
        if s.avatar is not None:
            for key, image in avatar_strips(s.avatar).items():
                name = _save_png(image, sub / f"{key}.png")
                parts.append(f"<h3>{e(key.replace('_', ' '))}</h3><img src='{e(s.subject_id)}/{name}'>")
        if s.figures:
            parts.append("<h3>Evaluation</h3><table>" + "".join(
                f"<tr><td>{e(k)}</td><td>{v:.4f}</td></tr>" for k, v in sorted(s.figures.items())) + "</table>")
        parts.append("</section>")
    index = root / "index.html"
    tmp = index.with_name(".index.html.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, index)
    return index
