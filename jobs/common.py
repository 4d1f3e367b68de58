"""What every job shares: config arguments, connecting to Ray, reporting a failure."""

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


def local_training_concurrency(local: bool, requested: int | None = None) -> int | None:
    """Subjects training at once: as asked, else one per core on a local Ray (its logical CPUs are
    raised above the cores for the synthesis actors; single-threaded trials beyond the cores only
    take turns), else what the cluster's CPUs hold (None)."""
    return requested or ((os.cpu_count() or 1) if local else None)


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
