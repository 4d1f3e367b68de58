#!/usr/bin/env python
"""Training benchmark: the plain loop against the same subject trained on Ray with 1 and 2 workers.

    scripts/isolated env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_bench.py [--json] [--quick]
                                 [--full] [--repeats 3] [--grid-subjects 4] [--steps 300] [--batch-size 2]

Subject: the procedural ground-truth head's frames (perse_ray.bench) at the ``cpu-smoke`` sizes,
written as a synthesis output. Every single-subject run trains the same --steps from scratch and
checkpoints once, at the end: a Ray Train report made sooner than the controller's next poll
(2 s) waits for it, which the preset's checkpoint every 10 steps (well under a second apart at
these sizes) would mostly time, while real checkpoints are minutes apart. Timed, median of
--repeats runs:

- plain: ``train_avatar`` in this process (no Ray);
- 1 worker: ``train_subjects`` (Tune trial running the loop itself) for that one subject;
- 2 workers: ``train_subjects`` with a 2-worker Ray Train DDP run.

All three do the same work: the same --steps of the same global batch (``train.batch_size``
frames per step, --batch-size; DDP ranks split it, so each of two workers trains half of it) from
the same seed. Every figure's config says so (global_batch, batch_per_rank, steps), and the
2-worker speed-ups (loop time and wall time, 1 worker over 2) are per identical run.

"overhead" is Ray's extra wall time over plain for one subject, as a percentage and in seconds:
at smoke sizes it is almost all fixed start-up (a trial process, a worker group), which a real
subject's minutes of training amortize. "loop" figures time only the training loop (the
``train_seconds`` metric), so they show what Ray costs per step. subjects/hour runs a grid of
--grid-subjects subjects of the ``cpu-smoke`` preset as it is, at the default concurrency.
``--quick``: 1 repeat of 60 steps and no subjects/hour grid (under a minute; the 2-worker
group's start-up alone is about 18 s on 2 cores).
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
QUICK = {"repeats": 1, "steps": 60, "grid_subjects": 1, "grid_workers": ()}


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
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['repeats']} repeat of {QUICK['steps']} steps, no subjects/hour grid")
    p.add_argument("--full", action="store_true", help="also one cpu-preset subject: plain, 1 worker, subjects/hour")
    p.add_argument("--repeats", type=int, default=None, help="runs per single-subject figure (median; default 3)")
    p.add_argument("--grid-subjects", type=int, default=None, help="subjects in the subjects/hour grid (default 4)")
    p.add_argument("--steps", type=int, default=None, help="steps of the single-subject runs (default 300)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="train.batch_size, the global batch every run trains per step (default: the preset's)")
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {"repeats": 3, "steps": 300, "grid_subjects": 4, "grid_workers": (1, 2)}
    args.grid_workers = quick["grid_workers"]
    args.repeats = args.repeats or quick["repeats"]
    args.steps = args.steps or quick["steps"]
    args.grid_subjects = args.grid_subjects or quick["grid_subjects"]

    smoke = load_config("cpu-smoke")
    batch = [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    cfg = load_config("cpu-smoke", [f"train.steps={args.steps}", f"machine.checkpoint_every={args.steps}", *batch])
    if cfg.train.batch_size < 2:
        p.error(f"--batch-size {cfg.train.batch_size}: two workers need a global batch of at least 2 frames")
    scratch = Path(tempfile.mkdtemp(prefix="train-bench-"))
    rows = frames_from_head(ProceduralHead(seed=0), cfg)
    synth = scratch / "synth"
    subjects = [f"head-{i}" for i in range(max(args.grid_subjects, 1))]
    for sid in subjects:
        write_partition(synth, sid, rows, cfg)
    common = {"preset": "cpu-smoke", "steps": cfg.train.steps, "checkpoint_every": cfg.machine.checkpoint_every,
              "gaussians": cfg.avatar.num_gaussians, "size": f"{cfg.render.width}x{cfg.render.height}",
              "global_batch": cfg.train.batch_size, "frames": len(rows), "logical_cpus": LOGICAL_CPUS,
              "repeats": args.repeats, "quick": args.quick}
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
        global_batch = cfg.train.batch_size
        same = "same steps, same global batch, same seed as plain and 1 worker"
        emit("plain_subject_seconds", wall["plain"], "s", method="train_avatar, no Ray", workers=0,
             batch_per_rank=global_batch)
        for k, name in ((1, "ray_1worker"), (2, "ray_2workers")):
            work = {"workers": k, "batch_per_rank": global_batch / k, "work": same}
            emit(f"{name}_subject_seconds", wall[k], "s", **work)
            emit(f"{name}_overhead", 100 * (wall[k] - wall["plain"]) / wall["plain"], "%", **work,
                 baseline="plain", target="<= 15 % (1 worker)" if k == 1 else "")
            emit(f"{name}_overhead_seconds", wall[k] - wall["plain"], "s", **work, baseline="plain")
            emit(f"{name}_loop_seconds", loop[k], "s", **work, plain_loop_seconds=round(loop["plain"], 3))
        # the same run on 1 and 2 workers: what splitting each step's batch over two ranks buys
        work = {"workers": 2, "batch_per_rank": global_batch / 2, "work": same, "baseline": "ray_1worker",
                "note": "2 physical cores shared with other processes"}
        emit("ray_2workers_loop_speedup", loop[1] / loop[2], "x", **work, ratio="1-worker loop s / 2-worker loop s")
        emit("ray_2workers_wall_speedup", wall[1] / wall[2], "x", **work, ratio="1-worker wall s / 2-worker wall s")

        n = len(subjects)
        for k in args.grid_workers:
            grid_wall, _ = ray_run(synth, smoke, k, scratch, subjects)
            emit("subjects_per_hour", 3600 * n / grid_wall, "subjects/h", workers=k, subjects=n,
                 steps=smoke.train.steps, checkpoint_every=smoke.machine.checkpoint_every,
                 global_batch=smoke.train.batch_size, batch_per_rank=smoke.train.batch_size / k, repeats=1,
                 wall_seconds=round(grid_wall, 1), concurrency="default (cluster CPUs / CPUs per subject)")
        if args.full:
            full = load_config("cpu")
            full_rows = frames_from_head(ProceduralHead(seed=0), full)
            full_synth = scratch / "synth-cpu"
            write_partition(full_synth, "head-cpu", full_rows, full)
            full_config = {"preset": "cpu", "steps": full.train.steps,
                           "checkpoint_every": full.machine.checkpoint_every, "gaussians": full.avatar.num_gaussians,
                           "size": f"{full.render.width}x{full.render.height}", "global_batch": full.train.batch_size,
                           "frames": len(full_rows), "repeats": 1}
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
