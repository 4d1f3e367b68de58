#!/usr/bin/env python
"""Ground-truth avatar benchmark: train on a procedural head, score against exact renders.

    python benchmarks/gt_avatar.py [--json] [--quick] [--preset cpu] [--head gaussian|mesh|both]
                                   [--ablation] [--curve-every 500] [--picture out.png]

Renders a procedural head through the preset's motion script and cameras into frames-schema rows,
trains with the real ``train_avatar`` and the preset's config unchanged, then prints JSON lines
(figure, value, unit, config; ``config.head`` names the head): held-out views to ±40° yaw (overall
and per |yaw| bucket), held-out expressions, never-trained latent midpoints (α = 0.5), combined
edits (every attribute at a non-source level at once; overall PSNR and, per attribute, PSNR inside
its region for the combined and the matching single edit, and their gap), per-attribute leakage,
timings. Heads: ``gaussian`` (perse_ray/bench/procedural.py, the default) is made of Gaussians like
the avatar; ``mesh`` (perse_ray/bench/mesh_head.py) is a textured triangle mesh from an example
portrait, rendered by a z-buffer rasterizer; ``both`` runs one after the other, scored the same way.
``--picture`` writes ground truth and avatar side by side at three held-out views, then at every
attribute's top level at once (the combined edit), a row per head.
``--ablation`` trains again without the interpolation regularization (train.lambda_interp=0);
``--ablate KEY=VALUE`` (repeatable) trains again with that override and prints every figure of that
run with ``config.ablation`` set, e.g. ``--ablate synth.combined_frames=0``; one value with several
space-separated overrides is one run, e.g. ``--ablate "train.steps=4000 train.coarse_fraction=0.75"``.
``--quick`` uses the ``cpu-smoke`` preset (unless --preset is given): a check that the benchmark
runs, in seconds; its scores say nothing about quality.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import emit  # noqa: E402

UNITS = {"psnr": "dB", "ssim": "", "leakage": "ratio", "seconds": "s", "gap": "dB"}
HEADS = ("gaussian", "mesh")


def unit_of(figure: str) -> str:
    return next((u for k, u in UNITS.items() if figure.startswith(k) or k in figure), "")


def run(preset: str, overrides: list[str], curve_every: int, as_json: bool, output: Path | None,
        progress: bool, head_name: str = "gaussian", picture: list | None = None) -> dict[str, float]:
    from perse_ray.avatar.io import save_avatar
    from perse_ray.bench.ground_truth import Scorer, frames_from_head, make_head, score_avatar, score_views
    from perse_ray.bench.ground_truth import picture as side_by_side
    from perse_ray.config import load_config
    from perse_ray.train.loop import train_avatar

    cfg = load_config(preset, overrides)
    info = {"preset": preset, "overrides": overrides, "resolution": f"{cfg.render.width}x{cfg.render.height}",
            "num_gaussians": cfg.avatar.num_gaussians, "steps": cfg.train.steps, "head": head_name}
    head = make_head(head_name, seed=0)
    t0 = time.perf_counter()
    rows = frames_from_head(head, cfg)
    data_seconds = time.perf_counter() - t0

    scorer = Scorer(head, cfg, cfg.machine.render_backend)
    curve_t = [0.0]

    def on_log(record, model):
        if record["step"] % curve_every == 0:
            t = time.perf_counter()
            value = score_views(model, scorer)
            curve_t[0] += time.perf_counter() - t
            emit("curve_psnr_heldout_views", value, "dB",
                 {**info, "step": record["step"], "train_seconds": round(record["seconds"] - curve_t[0], 1)}, as_json)

    result = train_avatar(rows, cfg, progress=progress, subject_id="procedural-head",
                          on_log=on_log if curve_every else None)
    train_seconds = result.metrics["train_seconds"] - curve_t[0]
    t1 = time.perf_counter()
    scores = score_avatar(result.avatar, head, cfg, scorer=scorer)
    eval_seconds = time.perf_counter() - t1
    if output:
        save_avatar(result.avatar, output / (f"avatar-{head_name}" if head_name != "gaussian" else "avatar"))
    if picture is not None:
        picture.append((head_name, side_by_side(result.avatar, scorer)))
    scores.update(train_seconds=train_seconds, steps_per_second=cfg.train.steps / max(train_seconds, 1e-9),
                  data_seconds=data_seconds, eval_seconds=eval_seconds, num_frames=len(rows),
                  num_gaussians=cfg.avatar.num_gaussians, resolution=cfg.render.width)
    return scores, info


def _unit(figure: str) -> str:
    return {"steps_per_second": "steps/s", "num_frames": "frames", "num_gaussians": "gaussians",
            "resolution": "px"}.get(figure, unit_of(figure))


def write_picture(path: Path, rows: list) -> None:
    """Rows of (head, [h, W, 3] image) → one PNG, each row labelled, scaled up for viewing."""
    import numpy as np
    from PIL import Image, ImageDraw

    scale = max(1, 256 // rows[0][1].shape[0])
    label_w = 90
    tiles = []
    for name, image in rows:
        img = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        row = Image.new("RGB", (img.width + label_w, img.height), "white")
        row.paste(img, (label_w, 0))
        ImageDraw.Draw(row).text((6, img.height // 2 - 12), f"{name}\nGT | avatar", fill="black")
        tiles.append(row)
    canvas = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)), "white")
    y = 0
    for t in tiles:
        canvas.paste(t, (0, y))
        y += t.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="config preset (default: cpu; cpu-smoke with --quick)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.steps=500 (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON lines (figure, value, unit, config)")
    p.add_argument("--quick", action="store_true", help="the cpu-smoke preset: seconds, no quality claim")
    p.add_argument("--head", choices=(*HEADS, "both"), default="gaussian",
                   help="ground-truth head: gaussian (default), mesh (textured triangles) or both")
    p.add_argument("--ablation", action="store_true",
                   help="also train without the interpolation regularization and report the midpoint gap")
    p.add_argument("--ablate", action="append", default=[], metavar="KEY=VALUE",
                   help="also train with this override and print that run's figures (repeatable: a run each; "
                        "several space-separated overrides in one value make one run)")
    p.add_argument("--curve-every", type=int, default=0, metavar="STEPS",
                   help="score held-out views every STEPS steps (PSNR vs training time)")
    p.add_argument("--output", type=Path, help="save the trained avatar here")
    p.add_argument("--picture", type=Path, metavar="PNG",
                   help="write ground truth and avatar side by side at 3 held-out views (a row per head)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    args.preset = args.preset or ("cpu-smoke" if args.quick else "cpu")
    if args.picture is not None and args.picture.suffix.lower() != ".png":
        p.error(f"--picture must name a .png file, got {str(args.picture)!r}")

    t0 = time.perf_counter()
    heads = HEADS if args.head == "both" else (args.head,)
    pictures = [] if args.picture is not None else None
    info = {}
    for head in heads:
        scores, info = run(args.preset, args.overrides, args.curve_every, args.json, args.output,
                           not args.no_progress, head, pictures)
        for figure, value in scores.items():
            emit(figure, value, _unit(figure), info, args.json)
        for override in args.ablate:
            ablated, _ = run(args.preset, args.overrides + override.split(), 0, args.json, None, not args.no_progress,
                             head)
            for figure, value in ablated.items():
                emit(figure, value, _unit(figure), {**info, "ablation": override}, args.json)
        if args.ablation:
            ablated, _ = run(args.preset, args.overrides + ["train.lambda_interp=0"], 0, args.json, None,
                             not args.no_progress, head)
            emit("ablation_no_interp_reg_psnr_latent_midpoints", ablated["psnr_latent_midpoints"], "dB", info,
                 args.json)
            emit("ablation_no_interp_reg_midpoints_db",
                 scores["psnr_latent_midpoints"] - ablated["psnr_latent_midpoints"], "dB",
                 {**info, "meaning": "midpoint PSNR with minus without the interpolation regularization"}, args.json)
    if pictures:
        write_picture(args.picture, pictures)
    emit("benchmark_seconds", time.perf_counter() - t0, "s", {**info, "head": args.head}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
