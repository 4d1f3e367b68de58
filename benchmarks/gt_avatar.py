#!/usr/bin/env python
"""Ground-truth avatar benchmark: train on the procedural head, score against exact renders.

    python benchmarks/gt_avatar.py [--json] [--quick] [--preset cpu] [--ablation] [--curve-every 500]

Renders the procedural head (perse_ray/bench/procedural.py) through the preset's motion script
and cameras into frames-schema rows, trains with the real ``train_avatar`` and the preset's
config unchanged, then prints JSON lines (figure, value, unit, config): held-out views,
held-out expressions, never-trained latent midpoints (α = 0.5), per-attribute leakage, timings.
``--ablation`` trains again without the interpolation regularization (train.lambda_interp=0).
``--quick`` uses the ``cpu-smoke`` preset (unless --preset is given): a check that the benchmark
runs, in seconds; its scores say nothing about quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

UNITS = {"psnr": "dB", "ssim": "", "leakage": "ratio", "seconds": "s"}


def emit(figure: str, value: float, unit: str, config: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"figure": figure, "value": round(float(value), 4), "unit": unit, "config": config}),
              flush=True)
    else:
        print(f"{figure:42s} {value:10.4f} {unit}", flush=True)


def unit_of(figure: str) -> str:
    return next((u for k, u in UNITS.items() if figure.startswith(k) or k in figure), "")


def run(preset: str, overrides: list[str], curve_every: int, as_json: bool, output: Path | None,
        progress: bool) -> dict[str, float]:
    from perse_ray.avatar.io import save_avatar
    from perse_ray.bench.ground_truth import Scorer, frames_from_head, score_avatar, score_views
    from perse_ray.bench.procedural import ProceduralHead
    from perse_ray.config import load_config
    from perse_ray.train.loop import train_avatar

    cfg = load_config(preset, overrides)
    info = {"preset": preset, "overrides": overrides, "resolution": f"{cfg.render.width}x{cfg.render.height}",
            "num_gaussians": cfg.avatar.num_gaussians, "steps": cfg.train.steps}
    head = ProceduralHead(seed=0)
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
        save_avatar(result.avatar, output / "avatar")
    scores.update(train_seconds=train_seconds, steps_per_second=cfg.train.steps / max(train_seconds, 1e-9),
                  data_seconds=data_seconds, eval_seconds=eval_seconds, num_frames=len(rows),
                  num_gaussians=cfg.avatar.num_gaussians, resolution=cfg.render.width)
    return scores, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="config preset (default: cpu; cpu-smoke with --quick)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.steps=500 (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON lines (figure, value, unit, config)")
    p.add_argument("--quick", action="store_true", help="the cpu-smoke preset: seconds, no quality claim")
    p.add_argument("--ablation", action="store_true",
                   help="also train without the interpolation regularization and report the midpoint gap")
    p.add_argument("--curve-every", type=int, default=0, metavar="STEPS",
                   help="score held-out views every STEPS steps (PSNR vs training time)")
    p.add_argument("--output", type=Path, help="save the trained avatar here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    args.preset = args.preset or ("cpu-smoke" if args.quick else "cpu")

    t0 = time.perf_counter()
    scores, info = run(args.preset, args.overrides, args.curve_every, args.json, args.output, not args.no_progress)
    for figure, value in scores.items():
        unit = {"steps_per_second": "steps/s", "num_frames": "frames", "num_gaussians": "gaussians",
                "resolution": "px"}.get(figure, unit_of(figure))
        emit(figure, value, unit, info, args.json)
    if args.ablation:
        ablated, _ = run(args.preset, args.overrides + ["train.lambda_interp=0"], 0, args.json, None,
                         not args.no_progress)
        emit("ablation_no_interp_reg_psnr_latent_midpoints", ablated["psnr_latent_midpoints"], "dB", info, args.json)
        emit("ablation_no_interp_reg_midpoints_db", scores["psnr_latent_midpoints"] - ablated["psnr_latent_midpoints"],
             "dB", {**info, "meaning": "midpoint PSNR with minus without the interpolation regularization"}, args.json)
    emit("benchmark_seconds", time.perf_counter() - t0, "s", info, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
