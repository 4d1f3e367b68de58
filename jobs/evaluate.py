"""Evaluate the avatars of a registry: identity across views, slider smoothness, disentanglement.

    python jobs/evaluate.py --registry out/avatars --frames out/synth/frames [--json]

Scores the newest version of every avatar (see perse_ray/evaluate.py for each figure's meaning).
--frames (a synthesis output's frames/ folder) adds identity against the source portrait and
attribute leakage inside/outside the edit masks. Prints one JSON line per figure with --json.
No Ray needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perse_ray.evaluate import evaluate_registry  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", required=True, type=Path, help="the avatars/ folder of a build")
    p.add_argument("--frames", type=Path, default=None, help="the synthesis frames/ folder (optional)")
    p.add_argument("--cache", type=Path, default=None,
                   help="reuse/write results here (keyed by the avatar version, its training hash and the frames)")
    p.add_argument("--json", action="store_true", help="print JSON lines (figure, value, unit, config)")
    args = p.parse_args(argv)
    if not args.registry.is_dir():
        print(f"error: registry {args.registry} is not a folder", file=sys.stderr)
        return 2
    if args.frames is not None and not args.frames.is_dir():
        print(f"error: frames {args.frames} is not a folder", file=sys.stderr)
        return 2
    results = evaluate_registry(args.registry, args.frames, args.cache, log=lambda line: None if args.json else print(line))
    for subject, figures in sorted(results.items()):
        for figure, value in sorted(figures.items()):
            unit = "dB" if "psnr" in figure else "ratio" if figure.startswith(("smoothness", "leakage")) else ""
            if args.json:
                print(json.dumps({"figure": figure, "value": round(value, 5), "unit": unit,
                                  "config": {"subject_id": subject}}))
    if not results:
        print("no avatars in the registry", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
