"""Synthesize training frames for every portrait in a folder (PERSE's 2D half) on Ray.

    python jobs/synthesize.py --input portraits/ --output synth/ --preset cpu --set synth.motion.num_frames=8

Each image at the top of --input is one subject; each sub-folder is one subject with several
images (the best face is kept). Writes --output/subjects.parquet (every input, ok or quarantined
with a reason), --output/frames/subject_id=<id>/part-*.parquet, motion.json and summary.json.
Re-running on the same output skips subjects already complete for the same synthesis settings
(faces, synth, camera: training and machine settings do not matter here). Connects to
RAY_ADDRESS when set, else starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.common import EXIT_CODES, add_config_arguments, connect_ray, exit_code, fail  # noqa: E402
from perse_ray.config import ConfigError, load_config  # noqa: E402
from perse_ray.models import ModelNotFoundError  # noqa: E402
from perse_ray.pipeline import local_num_cpus, resolve_models, synthesize  # noqa: E402
from perse_ray.portraits import InputError, discover_subjects  # noqa: E402
from perse_ray.synth.write import OutputError, check_output_dir  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="synthesize.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2] + "\nexit codes:\n" + EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of portraits (files and/or one folder per subject)")
    p.add_argument("--output", required=True, help="output folder (created; must not be inside --input)")
    add_config_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.preset, args.set)
        output = check_output_dir(args.output, args.input)
        discovery = discover_subjects(args.input)
        resolve_models(cfg)
    except (ConfigError, InputError, OutputError, ModelNotFoundError) as e:
        return fail(e, 2)
    print(f"{len(discovery.candidates)} subject(s) to synthesize, {len(discovery.quarantined)} input(s) "
          f"quarantined at discovery; preset {cfg.preset}, synthesis config {cfg.synthesis_hash()}", flush=True)

    with connect_ray(local_num_cpus(cfg), include_dashboard=False):
        try:
            summary = synthesize(cfg, discovery, output)
        except (OutputError, RuntimeError) as e:  # output in use; actor pools that cannot fit the cluster
            return fail(e, 1)
    print(json.dumps({k: summary[k] for k in ("subjects", "reasons", "frames", "seconds_per_stage",
                                               "wall_seconds")}, indent=1))
    return exit_code(synthesis_failed=summary["failed"])


if __name__ == "__main__":
    sys.exit(main())
