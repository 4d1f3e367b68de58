"""Delete a person from a build output: frames, rejected records, report pages, checkpoints, every
registry version, evaluation caches.

    python jobs/delete_subject.py --output out/demo --subject alice-1a2b3c4d [--delete-source]

The portrait's content hash is recorded in <output>/deletions.json, so a re-run of build_avatars
over a folder that still holds the portrait skips it (``build_avatars --rebuild`` builds it again),
and one JSON line goes to <output>/audit.jsonl (who, what, when; no face data). A running Serve
stops serving the subject within its index_refresh_s (1 s by default). Idempotent: a second run
reports that there is nothing to delete. Safe beside a build of other subjects (it waits while a
synthesis stage or a trainer of this subject runs). Needs no Ray.

exit codes: 0 deleted (or nothing left to delete), 1 the subject's trainer held it past
--lease-timeout or the output could not be changed, 2 unusable arguments.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perse_ray.deletion import delete_subject  # noqa: E402
from perse_ray.lease import LeaseHeld  # noqa: E402
from perse_ray.schema import validate_subject_id  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="delete_subject.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the build output folder (build_avatars --output)")
    p.add_argument("--subject", required=True, help="the subject id, e.g. alice-1a2b3c4d")
    p.add_argument("--delete-source", action="store_true",
                   help="also delete the source portrait file (it belongs to the user: off by default)")
    p.add_argument("--actor", default=None, help="who asks, for the audit line (default: cli:<user>)")
    p.add_argument("--lease-timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for a running trainer of this subject (default 600)")
    args = p.parse_args(argv)
    output = Path(args.output).expanduser()
    try:
        validate_subject_id(args.subject)
        if not output.is_dir():
            raise ValueError(f"output {output} is not a folder")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    actor = args.actor or f"cli:{getpass.getuser()}"
    try:
        report = delete_subject(output, args.subject, actor, delete_source=args.delete_source,
                                lease_timeout_s=args.lease_timeout, log=lambda line: print(line, flush=True))
    except LeaseHeld as e:
        print(f"error: {args.subject} is being trained ({e}): nothing was removed but the deletion record; "
              "run this again once the trainer is done", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if report.found_anything:
        print(f"deleted {args.subject}: {report.registry_versions} registry version(s), "
              f"{len(report.removed)} path(s) removed, {len(report.rewritten)} file(s) rewritten"
              + (f", {len(report.source_removed)} source file(s) removed" if report.source_removed else ""))
    else:
        print(f"nothing left to delete for {args.subject}")
    if report.content_sha256:
        print(f"recorded: a re-run of build_avatars skips this portrait (--rebuild builds it again)")
    print(json.dumps(report.audit, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
