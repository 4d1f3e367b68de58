"""Hundreds of subjects through a multi-node Ray cluster: does orchestration stay flat per subject?

    python benchmarks/scale_bench.py --nodes 2 --subjects 10,100,400 --json [--quick]

Makes max(N) distinct portraits from the project's real faces (``perse_ray.bench.portraits``),
starts a Ray head (no CPUs: it runs the job driver only, as on a real cluster) and ``--nodes``
worker nodes (2 CPUs each), each
in its own network namespace on a private bridge (``scripts/local_cluster.py``), and for each N
submits ``jobs/build_avatars.py --preset scale`` with ``ray job submit`` on a fresh output, exactly
as a user would. The ``scale`` preset computes almost nothing per subject, so the wall time is
orchestration. A 2-subject build first warms the nodes up (unpacking the job's working dir,
loading the kernels), so the figures hold no one-off costs. Per N and stage it prints the wall time, the wall time per subject and the
overhead per subject: wall x concurrency / N minus the compute of the same stage functions run
in-process on a few of the same portraits (synthesis: the five stage classes called directly;
training: ``train_avatar``). Also: growth wall(largest N) / wall(next N) per stage (linear: <= 4.6
for 400 vs 100), how subjects spread over the nodes, the head node's and the driver's peak
memory, and what the run leaves on disk per subject. ``--quick``: N = 5,15 and no warm-up (a check
that the benchmark runs, not a measurement).
Evaluation is left out (``--no-evaluation``): it runs on the driver and measures nothing about
orchestration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

CONCURRENT = 2  # subjects training at once (the overhead target is stated at 2)


def emit(figure: str, value, unit: str, **config) -> None:
    print(json.dumps({"figure": figure, "value": value, "unit": unit, "config": config}), flush=True)


def in_process_compute(portraits: list[Path], cfg, samples: int) -> dict[str, float]:
    """Median seconds per subject of the synthesis stages and of training, run in this process."""
    from perse_ray.pipeline import STAGE_CLASSES, candidate_row, resolve_models, stream_table
    from perse_ray.portraits import discover_subjects
    from perse_ray.train.loop import train_avatar

    folder = Path(tempfile.mkdtemp(prefix="scale-compute-"))
    try:
        for p in portraits[:samples]:
            os.link(p, folder / p.name)
        candidates = discover_subjects(folder).candidates
        cfg = resolve_models(cfg)
        stages = [cls(cfg) for cls in STAGE_CLASSES]  # model loading: once per actor, not per subject
        synth, train = [], []
        for c in candidates:
            t = time.perf_counter()
            table = stream_table([candidate_row(c)])
            for stage in stages:
                table = stage(table)
            synth.append(time.perf_counter() - t)
            rows = [r for r in table.to_pylist() if r["kind"] == "frame"]
            frames = [{k: r[k] for k in ("subject_id", "attribute", "edit_index", "interpolation", "frame_index",
                                         "camera", "expression", "image_png", "mask_png", "id_score", "kept",
                                         "drop_reason")} for r in rows]
            for f in frames:
                f["expression"] = dict(f["expression"] or [])
            t = time.perf_counter()
            train_avatar(frames, cfg, progress=False)
            train.append(time.perf_counter() - t)
        return {"synthesize": statistics.median(synth), "train": statistics.median(train)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_build(cluster, portraits: list[Path], work: Path, n: int, timeout: float) -> dict:
    """One ``ray job submit`` of the build over the first ``n`` portraits; its build.json and memory."""
    inputs = work / f"in-{n}"
    inputs.mkdir()
    for p in portraits[:n]:
        os.link(p, inputs / p.name)
    output = work / f"out-{n}"
    peaks = {"head_rss_mib": 0.0, "driver_rss_mib": 0.0}
    done = threading.Event()

    def sample() -> None:
        from local_cluster import process_memory_kb

        while not done.wait(1.0):
            try:
                memory = cluster.memory()
                peaks["head_rss_mib"] = max(peaks["head_rss_mib"], memory["head"]["rss_mib"])
                for pid in cluster.node_pids("head"):
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"jobs/build_avatars.py" in cmdline:
                        peaks["driver_rss_mib"] = max(peaks["driver_rss_mib"], process_memory_kb(pid)[0] / 1024)
            except (OSError, KeyError, RuntimeError):
                continue

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        run = cluster.submit(["python", "jobs/build_avatars.py", "--input", str(inputs), "--output", str(output),
                              "--preset", "scale", "--no-evaluation", "--max-concurrent", str(CONCURRENT)],
                             working_dir=REPO, timeout=timeout, extra=["--submission-id", f"scale-{n}-{uuid.uuid4().hex[:6]}"])
    finally:
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    summary_path = output / "build.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the build of {n} subjects wrote no build.json (exit {run.returncode}):\n"
                           + (run.stdout or "")[-3000:] + (run.stderr or "")[-2000:])
    summary = json.loads(summary_path.read_text())
    disk = {name: sum(f.stat().st_size for f in (output / name).rglob("*") if f.is_file())
            for name in ("synth", "avatars", "ray_train") if (output / name).exists()}
    return {"summary": summary, "submit_wall": wall, "peaks": peaks, "disk": disk, "returncode": run.returncode}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="JSON lines only (figure, value, unit, config)")
    p.add_argument("--quick", action="store_true", help="N = 5,15, no warm-up (a few minutes)")
    p.add_argument("--nodes", type=int, default=2, help="worker nodes beside the head (default 2)")
    p.add_argument("--subjects", default="10,100,400", help="values of N, comma-separated (default 10,100,400)")
    p.add_argument("--worker-cpus", type=int, default=2, help="logical CPUs per worker node (default 2)")
    p.add_argument("--samples", type=int, default=3, help="subjects timed in-process for the compute (default 3)")
    p.add_argument("--keep", default=None, help="keep the portraits and outputs in this folder")
    args = p.parse_args(argv)
    if args.quick:
        args.subjects = "5,15"
    sizes = sorted(int(s) for s in args.subjects.split(","))

    from local_cluster import LocalCluster

    from perse_ray.bench.portraits import write_scale_portraits
    from perse_ray.config import load_config
    from perse_ray.faces import load_face_model

    cfg = load_config("scale")
    work = Path(args.keep or tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    portraits = write_scale_portraits(work / "portraits", max(sizes), load_face_model(cfg.faces), cfg.faces)
    log = (lambda *a: None) if args.json else (lambda msg: print(f"# {msg}", file=sys.stderr, flush=True))
    log(f"{len(portraits)} portraits in {time.perf_counter() - t:.1f} s")
    compute = in_process_compute(portraits, cfg, args.samples)
    log(f"in-process compute per subject: {compute}")
    common = {"nodes": args.nodes, "worker_cpus": args.worker_cpus, "head_cpus": 0, "preset": "scale",
              "concurrent_subjects": CONCURRENT}
    runs = {}
    try:
        with LocalCluster(workers=args.nodes, cpus_head=0, cpus_worker=args.worker_cpus, output=work) as cluster:
            # one-off costs (each node unpacks the job's working dir, loads the kernels) stay out of the figures
            if not args.quick:
                run_build(cluster, portraits, work, 2, timeout=900)
            for n in sizes:
                runs[n] = run_build(cluster, portraits, work, n, timeout=600 + 6 * n)
                log(f"N={n}: {runs[n]['summary']['seconds_per_stage']} exit {runs[n]['returncode']}")
            node_ips = {n["node_id"]: n.get("node_ip") for n in cluster.ray_nodes()}
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    for n, run in runs.items():
        summary, seconds = run["summary"], run["summary"]["seconds_per_stage"]
        cfg_n = {**common, "subjects": n}
        subjects = summary["subjects"]
        ok = summary["synthesis"]["subjects"].get("ok", 0)
        emit("scale_subjects_synthesized", ok, "subjects", **cfg_n)
        emit("scale_subjects_trained", sum(s["status"] == "done" for s in subjects), "subjects", **cfg_n)
        emit("scale_exit_code", summary["exit_code"], "code", **cfg_n)
        for stage in ("synthesize", "train"):
            wall = seconds[stage]
            concurrency = CONCURRENT if stage == "train" else 1
            emit(f"scale_{stage}_wall", round(wall, 2), "s", **cfg_n)
            emit(f"scale_{stage}_wall_per_subject", round(wall / n, 3), "s", **cfg_n)
            emit(f"scale_{stage}_overhead_per_subject", round(wall * concurrency / n - compute[stage], 3), "s",
                 **cfg_n, compute_per_subject_s=round(compute[stage], 3), concurrency=concurrency)
        emit("scale_submit_wall", round(run["submit_wall"], 2), "s", **cfg_n)
        spread: dict[str, int] = {}
        for s in subjects:
            if s.get("node"):
                ip = node_ips.get(s["node"], s["node"][:8])
                spread[ip] = spread.get(ip, 0) + 1
        for ip, count in sorted(spread.items()):
            emit("scale_subjects_on_node", count, "subjects", **cfg_n, node_ip=ip)
        emit("scale_head_peak_rss", round(run["peaks"]["head_rss_mib"], 1), "MiB", **cfg_n)
        emit("scale_driver_peak_rss", round(run["peaks"]["driver_rss_mib"], 1), "MiB", **cfg_n)
        for name, size in run["disk"].items():
            emit(f"scale_disk_{name}_per_subject", round(size / n / 1024, 1), "KiB", **cfg_n)
    for small, large in zip(sizes, sizes[1:]):
        for stage in ("synthesize", "train"):
            ratio = runs[large]["summary"]["seconds_per_stage"][stage] / runs[small]["summary"]["seconds_per_stage"][stage]
            emit(f"scale_{stage}_growth", round(ratio, 3), "x", **common, subjects=large, over=small,
                 linear=round(large / small, 3), gate=round(1.15 * large / small, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
