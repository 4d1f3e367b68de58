"""What every job shares: config arguments, connecting to Ray, reporting a failure."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from perse_ray.config import PRESETS


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="config preset (default: gpu when CUDA is usable, else cpu)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.steps=500 (repeatable; values are YAML)")


@contextlib.contextmanager
def connect_ray(num_cpus: int | None = None):
    """Join the cluster in RAY_ADDRESS (set under `ray job submit`), else start a local Ray with
    more logical CPUs than cores, so fractional actors and trials never starve each other; shut
    down what was started (never `ray stop`)."""
    import ray

    env = {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env)  # reads RAY_ADDRESS itself
    else:
        # The dashboard stays on: without it Ray Train polls and warns, and slows down.
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), runtime_env=env)
    try:
        yield ray
    finally:
        ray.shutdown()


def fail(error: BaseException, code: int) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code
