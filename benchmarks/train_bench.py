#!/usr/bin/env python
"""Training benchmark: the plain loop against the same subject trained on Ray with 1 and 2 workers.

    scripts/isolated env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_bench.py --json [--full]
                                                 [--repeats 3] [--grid-subjects 4] [--steps 300]

Subject: the procedural ground-truth head's frames (perse_ray.bench) at the ``cpu-smoke`` sizes,
written as a synthesis output. Every single-subject run trains the same --steps from scratch and
checkpoints once, at the end: a Ray Train report made sooner than the controller's next poll
(2 s) waits for it, which the preset's checkpoint every 10 steps (well under a second apart at
these sizes) would mostly time, while real checkpoints are minutes apart. Timed, median of
--repeats runs:

- plain: ``train_avatar`` in this process (no Ray);
- 1 worker: ``train_subjects`` (Tune trial running the loop itself) for that one subject;
- 2 workers: ``train_subjects`` with a 2-worker Ray Train DDP run: each step then trains two
  batches, one per worker, so it is compared per trained frame as well as per subject.

"overhead" is Ray's extra wall time over plain for one subject, as a percentage and in seconds:
at smoke sizes it is almost all fixed start-up (a trial process, a worker group), which a real
subject's minutes of training amortize. "loop" figures time only the training loop (the
``train_seconds`` metric), so they show what Ray costs per step. subjects/hour runs a grid of
--grid-subjects subjects of the ``cpu-smoke`` preset as it is, at the default concurrency.
``--full`` adds one ``cpu``-preset subject (its preset steps and checkpoints, once each): plain,
1 worker, the overhead between them, and subjects/hour.
The three are run interleaved, repeat by repeat. Ray starts once (excluded from the timings, up
for the plain runs too) with 4 logical CPUs; run it inside a private network
namespace (scripts/isolated) as Ray binds to the machine's outward address. Prints JSON lines
{"figure", "value", "unit", "config"} with --json, a table otherwise; Ray's and Tune's own
console output goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perse_ray.bench.ground_truth import frames_from_head  # noqa: E402
from perse_ray.bench.procedural import ProceduralHead  # noqa: E402
from perse_ray.config import Config, load_config  # noqa: E402
from perse_ray.train.data import write_partition  # noqa: E402
from perse_ray.train.loop import train_avatar  # noqa: E402

LOGICAL_CPUS = 4


def plain_run(rows: list[dict], cfg: Config, scratch: Path) -> tuple[float, float]:
    """(wall seconds, loop seconds) of the loop in this process, checkpointing as the job does."""
    start = time.perf_counter()
    result = train_avatar(rows, cfg, tempfile.mkdtemp(dir=scratch), progress=False, subject_id="bench")
    return time.perf_counter() - start, result.metrics["train_seconds"]


def ray_run(synth: Path, cfg: Config, workers: int, scratch: Path, subjects: list[str]) -> tuple[float, list]:
    """(wall seconds, results) of ``train_subjects`` into a fresh output folder (nothing to skip)."""
    from perse_ray.registry import Registry
    from perse_ray.train.distributed import train_subjects

    out = Path(tempfile.mkdtemp(dir=scratch))
    start = time.perf_counter()
    results = train_subjects(synth, out, cfg, workers, subjects, log=lambda line: None)
    wall = time.perf_counter() - start
    failed = [r for r in results if r.status != "done"]
    if failed:
        raise RuntimeError(f"benchmark subject failed: {failed}")
    loops = [Registry(out / "avatars").get(r.subject_id).metrics["train_seconds"] for r in results]
    return wall, loops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--full", action="store_true", help="also one cpu-preset subject: plain, 1 worker, subjects/hour")
    p.add_argument("--repeats", type=int, default=3, help="runs per single-subject figure (median)")
    p.add_argument("--grid-subjects", type=int, default=4, help="subjects in the subjects/hour grid")
    p.add_argument("--steps", type=int, default=300, help="steps of the single-subject runs")
    args = p.parse_args(argv)

    smoke = load_config("cpu-smoke")
    cfg = load_config("cpu-smoke", [f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}"])
    scratch = Path(tempfile.mkdtemp(prefix="train-bench-"))
    rows = frames_from_head(ProceduralHead(seed=0), cfg)
    synth = scratch / "synth"
    subjects = [f"head-{i}" for i in range(max(args.grid_subjects, 1))]
    for sid in subjects:
        write_partition(synth, sid, rows)
    common = {"preset": "cpu-smoke", "steps": cfg.train.steps, "checkpoint_every": cfg.train.checkpoint_every,
              "gaussians": cfg.avatar.num_gaussians,
              "size": f"{cfg.render.width}x{cfg.render.height}", "batch_per_worker": cfg.train.batch_size,
              "frames": len(rows), "logical_cpus": LOGICAL_CPUS, "repeats": args.repeats}
    figures: list[dict] = []
    stdout = sys.stdout

    def emit(figure: str, value: float, unit: str, **config) -> None:
        figures.append({"figure": figure, "value": round(value, 3), "unit": unit, "config": {**common, **config}})
        if args.json:
            print(json.dumps(figures[-1]), file=stdout, flush=True)

    with contextlib.redirect_stdout(sys.stderr):  # Ray's and Tune's console output
        measure(args, rows, cfg, smoke, synth, subjects, scratch, emit)
    if not args.json:
        for f in figures:
            print(f"{f['figure']:<42} {f['value']:>10} {f['unit']}")
    return 0


def measure(args, rows, cfg, smoke, synth, subjects, scratch, emit) -> None:
    import ray

    ray.init(address="local", num_cpus=LOGICAL_CPUS, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        plain, one, two = [], [], []
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all three alike
            plain.append(plain_run(rows, cfg, scratch))
            one.append(ray_run(synth, cfg, 1, scratch, subjects[:1]))
            two.append(ray_run(synth, cfg, 2, scratch, subjects[:1]))
        wall = {"plain": statistics.median(w for w, _ in plain),
                1: statistics.median(w for w, _ in one), 2: statistics.median(w for w, _ in two)}
        loop = {"plain": statistics.median(s for _, s in plain),
                1: statistics.median(s[0] for _, s in one), 2: statistics.median(s[0] for _, s in two)}
        emit("plain_subject_seconds", wall["plain"], "s", method="train_avatar, no Ray")
        for k, name in ((1, "ray_1worker"), (2, "ray_2workers")):
            emit(f"{name}_subject_seconds", wall[k], "s", workers=k)
            emit(f"{name}_overhead", 100 * (wall[k] - wall["plain"]) / wall["plain"], "%", workers=k,
                 target="<= 15 % (1 worker)" if k == 1 else "")
            emit(f"{name}_overhead_seconds", wall[k] - wall["plain"], "s", workers=k)
            emit(f"{name}_loop_seconds", loop[k], "s", workers=k, plain_loop_seconds=round(loop["plain"], 3))
        # two workers train two batches per step: frames per second of loop time against one worker
        emit("ray_2workers_frames_per_second_speedup", 2 * loop[1] / loop[2], "x", workers=2,
             note="2 workers x batch per step vs 1 worker; 2 physical cores shared with other processes")

        n = len(subjects)
        for k in (1, 2):
            grid_wall, _ = ray_run(synth, smoke, k, scratch, subjects)
            emit("subjects_per_hour", 3600 * n / grid_wall, "subjects/h", workers=k, subjects=n,
                 steps=smoke.train.steps, checkpoint_every=smoke.train.checkpoint_every, repeats=1,
                 wall_seconds=round(grid_wall, 1), concurrency="default (cluster CPUs / CPUs per subject)")
        if args.full:
            full = load_config("cpu")
            full_rows = frames_from_head(ProceduralHead(seed=0), full)
            full_synth = scratch / "synth-cpu"
            write_partition(full_synth, "head-cpu", full_rows)
            full_config = {"preset": "cpu", "steps": full.train.steps, "checkpoint_every": full.train.checkpoint_every,
                           "gaussians": full.avatar.num_gaussians, "size": f"{full.render.width}x{full.render.height}",
                           "batch_per_worker": full.train.batch_size, "frames": len(full_rows), "repeats": 1}
            full_plain, _ = plain_run(full_rows, full, scratch)
            full_wall, _ = ray_run(full_synth, full, 1, scratch, ["head-cpu"])
            emit("plain_subject_seconds", full_plain, "s", **full_config, method="train_avatar, no Ray")
            emit("ray_1worker_subject_seconds", full_wall, "s", **full_config, workers=1)
            emit("ray_1worker_overhead", 100 * (full_wall - full_plain) / full_plain, "%", **full_config, workers=1,
                 target="<= 15 %")
            emit("subjects_per_hour", 3600 / full_wall, "subjects/h", **full_config, workers=1, subjects=1)
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
