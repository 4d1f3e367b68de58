"""What every job shares: config arguments, connecting to Ray, reporting a failure, exit codes.

Exit codes of the build jobs (synthesize, train, build_avatars):
    0  every subject finished, was skipped as already done, or was turned down at ingest with a
       reason (no face, not an image, …: outcomes, not failures)
    1  a job-level error (the cluster cannot hold the work, the output is unusable, …)
    2  unusable arguments, found before Ray starts
    3  some subjects failed (a synthesis stage error, all frames dropped, a training error); the
       others finished, and each failure is printed with its reason
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

from perse_ray.config import PRESETS


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="config preset (default: gpu when CUDA is usable, else cpu)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.steps=500 (repeatable; values are YAML)")


@contextlib.contextmanager
def connect_ray(num_cpus: int | None = None, include_dashboard: bool | None = None):
    """Join the cluster in RAY_ADDRESS (set under `ray job submit`), else start a local Ray with
    more logical CPUs than cores, so fractional actors and trials never starve each other; shut
    down what was started (never `ray stop`). Yields whether the Ray is a local one."""
    import ray

    env = {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        # Keep the dashboard for training (include_dashboard=None): without it Ray Train polls and warns.
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1),
                 include_dashboard=include_dashboard, runtime_env=env)
    else:
        ray.init(runtime_env=env)  # reads RAY_ADDRESS itself
    try:
        yield local
    finally:
        ray.shutdown()


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


def _subject_list(text: str) -> list[str]:
    from perse_ray.schema import validate_subject_id

    try:
        return [validate_subject_id(s.strip()) for s in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``train_subjects`` (jobs/train.py and jobs/build_avatars.py share them)."""
    parser.add_argument("--workers-per-subject", type=_positive(int), default=1, metavar="K",
                        help="Ray Train workers (DDP ranks) per subject (default 1)")
    parser.add_argument("--subjects", type=_subject_list, default=None, metavar="ID,ID,...",
                        help="train only these subjects (default: every subject with frames)")
    parser.add_argument("--max-concurrent", type=_positive(int), default=None, metavar="N",
                        help="subjects training at once (default: one per core on a local Ray, else as many as "
                             "the cluster's CPUs hold)")
    parser.add_argument("--cpus-per-worker", type=_positive(float), default=0.5, metavar="C",
                        help="logical CPUs each training process reserves (default 0.5)")
    parser.add_argument("--gpus-per-worker", type=_positive(float), default=1.0, metavar="G",
                        help="GPUs each training process reserves when training on GPUs (machine.device=cuda, or "
                             "auto on a cluster with GPUs); below 1 packs several subjects onto a GPU (default 1)")
    parser.add_argument("--max-failures", type=int, default=2, metavar="N",
                        help="restarts per subject after a worker or trial process dies (default 2)")
    parser.add_argument("--lease-ttl", type=_positive(float), default=60.0, metavar="S",
                        help="seconds after which a killed job's hold on a subject expires, so another job "
                             "may train it (default 60; live jobs renew theirs every S/4)")


def training_options(args: argparse.Namespace, local: bool, log_prefix: str = "") -> dict:
    """``train_subjects`` keyword arguments from ``add_training_arguments``'s options. On a local Ray
    one subject trains per core by default: its logical CPUs are raised above the cores for the
    synthesis actors, and single-threaded trials beyond the cores only take turns."""
    return {"workers_per_subject": args.workers_per_subject, "subjects": args.subjects,
            "max_failures": args.max_failures, "cpus_per_worker": args.cpus_per_worker,
            "lease_ttl_s": args.lease_ttl,
            "gpus_per_worker": args.gpus_per_worker,
            "max_concurrent": args.max_concurrent or ((os.cpu_count() or 1) if local else None),
            "log": lambda line: print(f"{log_prefix}{line}", flush=True)}


SUBJECTS_FAILED = 3
EXIT_CODES = __doc__.split("Exit codes of the build jobs (synthesize, train, build_avatars):\n", 1)[1]


def check_frames(frames_root, config, args: argparse.Namespace) -> None:
    """Before Ray starts: the frames folder exists, the worker count splits the batch, and some
    partition was made by this synthesis config (else every subject would be refused)."""
    from perse_ray.train.data import FramesError, check_workers, discover

    check_workers(config, args.workers_per_subject)
    found = discover(frames_root, args.subjects, config)
    if found and not any(f.trainable for f in found):
        mismatch = [f.problem for f in found if "synthesis config" in f.problem]
        if len(mismatch) == len(found):
            raise FramesError(f"no subject can train: {mismatch[0]}")


def fail(error: BaseException, code: int) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code


def training_table(results) -> str:
    def num(value: float, fmt: str) -> str:
        return "-" if value is None or math.isnan(value) else format(value, fmt)

    header = f"{'subject':<24} {'status':<8} {'steps':>6} {'seconds':>8} {'final loss':>10} {'held-out PSNR':>13}  note"
    lines = [header, "-" * len(header)]
    for r in results:
        note = r.reason or (f"{r.version}, resumed from step {r.resumed_from}" if r.resumed_from else r.version)
        lines.append(f"{r.subject_id:<24} {r.status:<8} {r.steps:>6} {num(r.seconds, '.1f'):>8} "
                     f"{num(r.final_loss, '.4f'):>10} {num(r.heldout_psnr, '.2f'):>13}  {note}")
    done = sum(r.status == "done" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    lines.append(f"{done} trained, {skipped} skipped (already in the registry), {len(results) - done - skipped} failed")
    return "\n".join(lines)


def exit_code(training_results=(), synthesis_failed: dict[str, str] | None = None) -> int:
    """0, or ``SUBJECTS_FAILED`` (printing each failure) when a subject failed in any stage."""
    failures = dict(synthesis_failed or {})
    failures.update((r.subject_id, r.reason or "failed") for r in training_results if r.status == "failed")
    for sid, reason in sorted(failures.items()):
        print(f"failed: {sid}: {reason}", file=sys.stderr)
    return SUBJECTS_FAILED if failures else 0


def apply_deletion_records(discovery, output, rebuild: bool, log=print) -> list[str]:
    """Leave out the portraits a delete recorded (<output>/deletions.json, by content hash) so a
    re-run never quietly rebuilds a deleted person; with ``rebuild`` forget their records instead
    and build them. Returns the subject ids left out (or, with ``rebuild``, brought back)."""
    from perse_ray.deletion import deletion_records, forget_deletions

    records = deletion_records(output)
    if not records:
        return []
    hits = [c for c in discovery.candidates if c.content_sha256 in records]
    hits_q = [r for r in discovery.quarantined if r.get("content_sha256") in records]
    ids = [c.subject_id for c in hits] + [r["subject_id"] for r in hits_q]
    if rebuild:
        forget_deletions(output, [c.content_sha256 for c in hits] + [r["content_sha256"] for r in hits_q])
        for sid in ids:
            log(f"[rebuild] {sid}: deleted before, built again (--rebuild)")
        return ids
    discovery.candidates[:] = [c for c in discovery.candidates if c.content_sha256 not in records]
    discovery.quarantined[:] = [r for r in discovery.quarantined if r.get("content_sha256") not in records]
    for sid in ids:
        log(f"[deleted] {sid}: its portrait was deleted on request: skipped (--rebuild builds it again)")
    return ids


def delete_late_traces(output, since: float, log=print) -> list[str]:
    """Subjects deleted while this build ran may have been written again by its later stages
    (training results, evaluation, the report): delete them once more (idempotent)."""
    from perse_ray.deletion import delete_subject, deletion_records

    late = sorted({r["subject_id"] for r in deletion_records(output).values()
                   if r.get("deleted_at_s", 0) >= since and r.get("subject_id")})
    for sid in late:
        report = delete_subject(output, sid, "build_avatars (deleted during the build)", log=log)
        if report.found_anything:
            log(f"[deleted] {sid}: deleted during this build: its late traces removed")
    return late
