"""Synthesis throughput with 1 vs 2 actors per model stage, measured in one run.

    scripts/isolated env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synth_bench.py [--json] [--quick]
                                                 [--preset cpu-smoke] [--subjects 6] [--repeats 3]

Starts a local Ray (run it inside a private network namespace), builds a folder of real portraits
(Grace Hopper and the astronaut, distinct crops so each is its own subject), and runs the whole
graph (ingest → edit → animate → morph → id_filter) repeatedly, alternating 1 and 2 actors per
stage (machine.actors_per_stage). Throughput is steady-state frames/s: frames that arrived after
the first output block, over the time from that block to the last (actor start-up and model
loading excluded — they are reported apart). Prints JSON lines {"figure", "value", "unit",
"config"} (a table with progress lines otherwise): medians over ``--repeats``, the 2-vs-1 ratio,
and busy seconds per stage (where the time goes). Every figure's config names the preset and the
backends that ran (faces, editor, animator, morpher: the classes the stages load for it).

The default preset is ``cpu-smoke`` (dlib faces, the classical editor and animator, exact morphs at
the smallest sizes); ``tiny`` runs the random-weight twins of the ``gpu`` preset's diffusion
loaders, which produce noise: throughput figures either way, never quality. ``--quick``: 2
subjects, 1 run per actor count (about a minute; no median). ``--no-ray`` measures only the
in-process figure below.

``synth_subject_cpu_s`` (and ``synth_subject_stage_cpu_s`` per stage): process CPU seconds to
synthesize one subject in this process, without Ray: the edit, animate and morph stage functions
over the whole motion script with the preset's backends (``--frames`` as above), the cost per
subject that the actors divide among themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perse_ray.config import load_config  # noqa: E402
from perse_ray.faces import BACKENDS as FACE_BACKENDS  # noqa: E402
from perse_ray.pipeline import STAGES, frames_per_subject, local_num_cpus, run_pipeline  # noqa: E402
from perse_ray.portraits import discover_subjects  # noqa: E402
from perse_ray.synth.backends import REGISTRIES  # noqa: E402
from perse_ray.synth.write import FramesWriter, OutputFolder  # noqa: E402

QUICK = {"subjects": 2, "repeats": 1}


def write_portraits(folder: Path, count: int) -> None:
    """``count`` distinct real portraits: shifted crops of two public-domain/sample faces."""
    import matplotlib
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True)
    grace = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    astronaut = data.astronaut()[:300, 40:420]  # without the suit patch dlib also calls a face
    for i in range(count):
        source = grace if i % 2 == 0 else astronaut
        d = 4 * (i // 2)
        Image.fromarray(source[d:, d:]).save(folder / f"portrait-{i:02d}.png")


def backends(cfg) -> dict[str, str]:
    """The backend each stage loads for ``cfg``: the config's name and the class it resolves to."""
    names = {"faces": (cfg.faces.backend, FACE_BACKENDS), "editor": (cfg.synth.edit_backend, REGISTRIES["editor"]),
             "animator": (cfg.synth.animate_backend, REGISTRIES["animator"]),
             "morpher": (cfg.synth.morph_backend, REGISTRIES["morpher"])}
    out = {kind: f"{name} ({registry[name]})" for kind, (name, registry) in names.items()}
    if cfg.faces.identity_model:
        out["identity"] = f"arcface ({cfg.faces.identity_model})"
    return out


def subject_cpu_seconds(cfg, folder: Path) -> dict[str, float]:
    """Process CPU seconds per stage to synthesize the first portrait of ``folder`` in-process."""
    from perse_ray.faces import align, load_face_model
    from perse_ray.synth.animate import animate_frame
    from perse_ray.synth.backends import load_animator, load_editor, load_morpher
    from perse_ray.synth.edit import edit_subject
    from perse_ray.synth.morph import morph_frame
    from perse_ray.synth.motion import motion_script
    from PIL import Image

    image = np.asarray(Image.open(sorted(folder.iterdir())[0]).convert("RGB"))
    faces = load_face_model(cfg.faces)
    portrait, landmarks, _ = align(image, faces.detect(image)[0], cfg.synth.resolution)
    editor, animator, morpher = load_editor(cfg), load_animator(cfg), load_morpher(cfg)
    singles = 1 + sum(len(a.edits) for a in cfg.synth.attributes)  # composed edits come after these
    times = {"edit": 0.0, "animate": 0.0, "morph": 0.0}
    t = time.process_time()
    edits = edit_subject("bench", portrait, landmarks, editor, cfg)[:singles]
    times["edit"] = time.process_time() - t
    for frame in motion_script(cfg.synth.motion):
        t = time.process_time()
        animated = animate_frame("bench", edits, landmarks, frame, animator, cfg)
        times["animate"] += time.process_time() - t
        t = time.process_time()
        morph_frame("bench", portrait, landmarks, animated, frame, morpher, cfg)
        times["morph"] += time.process_time() - t
    return times


def run_once(cfg, candidates) -> dict:
    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as out:
        # The real driver path (validation, parts, markers) so the figure is the job's throughput.
        folder = OutputFolder(Path(out), cfg.synthesis_hash())
        folder.prepare()
        writer = FramesWriter(folder, frames_per_subject(cfg), log=lambda _: None)
        for block in run_pipeline(cfg, candidates):
            writer.add_block(block)
            n = sum(1 for k in block.column("kind").to_pylist() if k == "frame")
            if n:
                arrivals.append((time.perf_counter(), n))
        failed = dict(writer.failed)
        busy = dict(writer.seconds)
    if failed or not arrivals:
        raise RuntimeError(f"benchmark run failed: {failed or 'no frames'}")
    (t0, n0), t_end = arrivals[0], arrivals[-1][0]
    total = sum(n for _, n in arrivals)
    return {"frames": total, "wall_s": t_end - start, "first_output_s": t0 - start,
            "steady_fps": (total - n0) / max(t_end - t0, 1e-9), "busy_s": busy}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON lines only")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['subjects']} subjects, {QUICK['repeats']} run per actor count (about a minute)")
    p.add_argument("--preset", default="cpu-smoke", choices=["cpu-smoke", "cpu", "tiny"])
    p.add_argument("--subjects", type=int, default=None, help="portraits (default 6)")
    p.add_argument("--frames", type=int, default=8, help="motion frames per edit")
    p.add_argument("--repeats", type=int, default=None, help="runs per actor count (default 3)")
    p.add_argument("--batch-size", type=int, default=2, help="machine.synth_batch_size")
    p.add_argument("--no-ray", action="store_true", help="only the in-process per-subject figure")
    args = p.parse_args(argv)
    args.subjects = args.subjects or (QUICK["subjects"] if args.quick else 6)
    args.repeats = args.repeats or (QUICK["repeats"] if args.quick else 3)

    import ray

    if args.preset == "tiny":
        from perse_ray.models.tiny import ensure_tiny_models

        ensure_tiny_models()

    base = [f"synth.motion.num_frames={args.frames}", f"machine.synth_batch_size={args.batch_size}"]
    configs = {n: load_config(args.preset, base + [f"machine.actors_per_stage={n}"]) for n in (1, 2)}
    conf = {"preset": args.preset, "backends": backends(configs[1]), "subjects": args.subjects,
            "motion_frames": args.frames, "frames_per_subject": frames_per_subject(configs[1]),
            "synth_batch_size": args.batch_size, "repeats": args.repeats, "quick": args.quick,
            "cpus": os.cpu_count(), "device": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        write_portraits(Path(tmp) / "in", args.subjects)
        per_stage = subject_cpu_seconds(configs[1], Path(tmp) / "in")
        subject_lines = [{"figure": "synth_subject_cpu_s", "value": round(sum(per_stage.values()), 3),
                          "unit": "s CPU per subject (in-process)", "config": conf}]
        subject_lines += [{"figure": "synth_subject_stage_cpu_s", "value": round(v, 3),
                           "unit": "s CPU per subject (in-process)", "config": {**conf, "stage": k}}
                          for k, v in per_stage.items()]
        if args.no_ray:
            for line in subject_lines:
                print(json.dumps(line) if args.json else f"{line['figure']:<36} {line['value']:>10} "
                      f"{line['unit']:<24} {line['config'].get('stage', '')}", flush=True)
            return 0
        candidates = discover_subjects(Path(tmp) / "in").candidates
        ray.init(num_cpus=local_num_cpus(configs[2]), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        try:
            results: dict[int, list[dict]] = {1: [], 2: []}
            for rep in range(args.repeats):
                for n in ((1, 2) if rep % 2 == 0 else (2, 1)):  # interleaved: drift hits both alike
                    results[n].append(run_once(configs[n], candidates))
                    if not args.json:
                        r = results[n][-1]
                        print(f"repeat {rep} actors {n}: {r['steady_fps']:.2f} frames/s steady, "
                              f"{r['frames']} frames, wall {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
        finally:
            ray.shutdown()

    fps = {n: statistics.median(r["steady_fps"] for r in results[n]) for n in (1, 2)}
    lines = [{"figure": f"synth_steady_frames_per_s_{n}_actor", "value": round(fps[n], 3), "unit": "frames/s",
              "config": {**conf, "actors_per_stage": n}} for n in (1, 2)]
    lines += subject_lines
    lines.append({"figure": "synth_speedup_2_vs_1_actors", "value": round(fps[2] / fps[1], 3), "unit": "ratio",
                  "config": conf})
    for n in (1, 2):
        lines.append({"figure": f"synth_first_output_s_{n}_actor", "unit": "s",
                      "value": round(statistics.median(r["first_output_s"] for r in results[n]), 2),
                      "config": {**conf, "actors_per_stage": n}})
        for stage in STAGES:  # where the time goes
            busy = statistics.median(r["busy_s"].get(stage, 0.0) for r in results[n])
            lines.append({"figure": f"synth_busy_s_{n}_actor", "value": round(busy, 3),
                          "unit": "s (summed over actors)",
                          "config": {**conf, "actors_per_stage": n, "stage": stage}})
    for line in lines:
        if args.json:
            print(json.dumps(line), flush=True)
        else:
            where = " ".join(f"{k}={line['config'][k]}" for k in ("actors_per_stage", "stage") if k in line["config"])
            print(f"{line['figure']:<36} {line['value']:>10} {line['unit']:<24} {where}")
    if not args.json:
        print(f"preset {args.preset}; backends: " + ", ".join(f"{k} {v}" for k, v in conf["backends"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
