"""Portrait folder → trained, registered, evaluated avatars and an HTML report, on Ray.

    python jobs/build_avatars.py --input examples/portraits --output out/demo [--preset cpu]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/build_avatars.py --input /abs/portraits --output /abs/out

Stages: synthesize (<output>/synth: aligned portraits, edits, animations, morphs, identity
filter) → train one avatar per subject (<output>/avatars, the registry Serve reads) → evaluate
(<output>/eval) → report (<output>/report/index.html). <output>/build.json sums the run up for
machines: seconds per stage, every subject's outcome and the node it trained on, the exit code. Every stage skips finished work, so a
re-run with the same input, output and config does nothing new and a killed run resumes; new
portraits added to the folder are processed alone. Each stage keys its outputs by the hash of
what changes them: a new training setting (--set train.steps=…) reuses every synthesized frame,
and the machine section (actors, CPUs, device, …) is in no hash. Two builds on one output at once
train each subject once. Connects to RAY_ADDRESS (or the job's cluster under `ray job submit`)
when set, else starts a local Ray.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import (  # noqa: E402
    EXIT_CODES, add_config_arguments, add_training_arguments, apply_deletion_records, connect_ray,
    delete_late_traces, exit_code, fail, training_options, training_table)
from perse_ray.config import ConfigError, load_config  # noqa: E402
from perse_ray.models import ModelNotFoundError  # noqa: E402
from perse_ray.pipeline import local_num_cpus, resolve_models  # noqa: E402
from perse_ray.portraits import InputError, discover_subjects  # noqa: E402
from perse_ray.synth.write import OutputError, check_output_dir  # noqa: E402
from perse_ray.train.data import check_workers  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="build_avatars.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1] + "\nexit codes:\n" + EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of portraits (files and/or one folder per subject)")
    p.add_argument("--output", required=True, help="output folder (created; use absolute paths on a cluster)")
    p.add_argument("--rebuild", action="store_true",
                   help="build again the portraits that jobs/delete_subject.py deleted (by default a re-run "
                        "skips every portrait recorded in <output>/deletions.json)")
    p.add_argument("--no-evaluation", action="store_true",
                   help="stop after training: no evaluation figures and no HTML report (large builds)")
    add_training_arguments(p)
    add_config_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    try:
        cfg = load_config(args.preset, args.set)
        output = Path(args.output).expanduser().resolve()
        synth_dir = check_output_dir(output / "synth", args.input)
        discovery = discover_subjects(args.input)
        apply_deletion_records(discovery, output, args.rebuild, log=lambda line: print(line, flush=True))
        resolve_models(cfg)
        check_workers(cfg, args.workers_per_subject)
    except (ConfigError, InputError, OutputError, ModelNotFoundError, ValueError) as e:
        return fail(e, 2)
    print(f"{len(discovery.candidates)} portrait subject(s), {len(discovery.quarantined)} input(s) quarantined at "
          f"discovery; preset {cfg.preset}, synthesis config {cfg.synthesis_hash()}, training config "
          f"{cfg.training_hash()}", flush=True)

    from perse_ray.evaluate import evaluate_registry
    from perse_ray.pipeline import synthesize
    from perse_ray.train.distributed import train_subjects

    seconds, summary, stage = {}, None, "connecting to Ray"
    try:
        with connect_ray(local_num_cpus(cfg)) as local:
            t, stage = time.perf_counter(), "synthesis"
            summary = synthesize(cfg, discovery, synth_dir, log=lambda line: print(f"[synth] {line}", flush=True))
            seconds["synthesize"], stage = time.perf_counter() - t, "training"
            t = time.perf_counter()
            results = train_subjects(synth_dir / "frames", output, cfg, **training_options(args, local, "[train] "))
            seconds["train"] = time.perf_counter() - t
    except Exception as e:  # a stopped run still leaves its build.json, naming the stage and the reason
        write_build_summary(output, 1, seconds, summary, [], error=f"{stage}: {e}")
        if isinstance(e, (OutputError, RuntimeError)):
            return fail(e, 1)
        raise
    index = None
    if not args.no_evaluation:
        t = time.perf_counter()
        figures = evaluate_registry(output / "avatars", synth_dir / "frames", output / "eval",
                                    log=lambda line: print(line, flush=True))
        seconds["evaluate"] = time.perf_counter() - t
        t = time.perf_counter()
        index = write_build_report(output, synth_dir, results, figures)
        seconds["report"] = time.perf_counter() - t

    print(training_table(results))
    print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if index is not None:
        print(f"report: {index}")
    print(f"serve it: PERSE_REGISTRY={output / 'avatars'} serve run serve/config.yaml")
    code = exit_code(results, summary["failed"])
    write_build_summary(output, code, seconds, summary, results)
    delete_late_traces(output, started, log=lambda line: print(line, flush=True))
    return code


def write_build_summary(output: Path, code: int, seconds: dict, synthesis: dict | None, results,
                        error: str | None = None) -> Path:
    """<output>/build.json; a run that stopped at a stage says which and why in ``error``."""
    import dataclasses
    import json

    from perse_ray.synth.write import atomic_write_bytes

    payload = {"exit_code": code, "seconds_per_stage": {k: round(v, 3) for k, v in seconds.items()},
               "synthesis": synthesis and {k: synthesis[k] for k in ("subjects", "reasons", "failed",
                                                                     "skipped_complete", "seconds_per_stage",
                                                                     "synthesis_hash")},
               "subjects": [dataclasses.asdict(r) for r in results], "error": error}
    path = output / "build.json"
    atomic_write_bytes(path, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())
    return path


def write_build_report(output: Path, synth_dir: Path, results, figures) -> Path:
    """Gather subjects, frames, avatars and figures into the HTML report."""
    import pyarrow.parquet as pq

    from perse_ray.avatar.io import load_avatar
    from perse_ray.evaluate import read_partition
    from perse_ray.registry import Registry, RegistryError
    from perse_ray.report import SubjectReport, write_report
    from perse_ray.schema import rows_from_table

    registry = Registry(output / "avatars")
    trained = {r.subject_id: r for r in results}
    reports = []
    for row in rows_from_table(pq.read_table(synth_dir / "subjects.parquet")):
        sid = row["subject_id"]
        if row["status"] != "ok":
            reports.append(SubjectReport(sid, "quarantined", row["reason"] or "", row["source_path"]))
            continue
        frames, _ = read_partition(synth_dir / "frames", sid)
        result = trained.get(sid)
        rep = SubjectReport(sid, result.status if result else "not trained", result.reason if result else "",
                            row["source_path"], row["portrait_png"], frames, figures=figures.get(sid, {}))
        try:
            entry = registry.get(sid)
        except RegistryError:  # not trained (failed, or left out with --subjects): reported without one
            entry = None
        if entry is not None:
            rep.avatar, rep.version = load_avatar(entry.path), entry.version
        reports.append(rep)
    return write_report(output / "report", reports)


if __name__ == "__main__":
    sys.exit(main())
