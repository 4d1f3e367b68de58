"""Train one avatar per subject of a synthesis output on Ray (PERSE's 3D half).

    python jobs/train.py --frames synth/ --output out/ --preset cpu --workers-per-subject 2

Reads --frames/frames/subject_id=<id>/ as jobs/synthesize.py writes it (complete partitions only,
kept frames only). A Ray Tune grid runs the subjects side by side; each subject trains with Ray
Train DDP over --workers-per-subject workers (one worker: the loop runs in the trial itself).
Avatars go to --output/avatars (the registry), Ray's run state (checkpoints, Tune's experiment)
to --output/ray_train. Re-running the same command skips subjects already in the registry for
this training config and resumes unfinished ones from their last checkpoint; frames made by
another synthesis config are refused. Two jobs on one output never train a subject twice (the
second waits for the first, then skips it). Connects to RAY_ADDRESS when set, else starts a
local Ray.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import (  # noqa: E402
    EXIT_CODES, add_config_arguments, add_training_arguments, check_frames, connect_ray, exit_code, fail,
    training_options, training_table)
from perse_ray.config import ConfigError, load_config  # noqa: E402
from perse_ray.train.data import FramesError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2] + "\nexit codes:\n" + EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", required=True, help="output folder of jobs/synthesize.py (or its frames/ folder)")
    p.add_argument("--output", required=True, help="folder for avatars/ (the registry) and ray_train/ (created)")
    add_training_arguments(p)
    add_config_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.preset, args.set)
        check_frames(args.frames, cfg, args)
        output = Path(args.output).expanduser().resolve()
        if output.exists() and not output.is_dir():
            raise ValueError(f"output {output} exists and is not a folder")
    except (ConfigError, FramesError, ValueError) as e:
        return fail(e, 2)
    print(f"preset {cfg.preset}, training config {cfg.training_hash()}, {args.workers_per_subject} worker(s) per subject, "
          f"{cfg.train.steps} steps", flush=True)

    from perse_ray.train.distributed import train_subjects

    with connect_ray() as local:
        try:
            results = train_subjects(args.frames, output, cfg, **training_options(args, local))
        except RuntimeError as e:  # e.g. a subject's workers that cannot fit the cluster
            return fail(e, 1)
    print(training_table(results))
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
