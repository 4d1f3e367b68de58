#!/usr/bin/env python
"""Passes a benchmark's stdout through and checks the benchmark contract on it (``make bench``).

    .venv/bin/python benchmarks/render_bench.py --json --quick | .venv/bin/python benchmarks/_check_output.py NAME

Every non-empty line must be a JSON object with ``figure`` (string), ``value`` (number or null),
``unit`` (string) and ``config`` (object), and there must be at least one such line. Lines are
echoed as they arrive; a broken one is reported on stderr with its number and the run fails
(exit 1). Files whose name starts with ``_`` in benchmarks/ are helpers, not benchmarks.
"""

from __future__ import annotations

import json
import sys

REQUIRED = {"figure": str, "unit": str, "config": dict}


def problem(line: str) -> str | None:
    """Why ``line`` breaks the contract, or None."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not JSON ({e.msg})"
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, kind in REQUIRED.items():
        if not isinstance(record.get(key), kind):
            return f"{key!r} missing or not a {kind.__name__}"
    value = record.get("value", ...)
    if value is ... or isinstance(value, bool) or not (value is None or isinstance(value, (int, float))):
        return "'value' missing or not a number or null"
    extra = set(record) - {"figure", "value", "unit", "config"}
    if extra:
        return f"keys outside the contract: {sorted(extra)} (labels belong in config)"
    return None


def main(argv: list[str]) -> int:
    name = argv[1] if len(argv) > 1 else "benchmark"
    good = bad = 0
    for number, line in enumerate(sys.stdin, start=1):
        sys.stdout.write(line)
        sys.stdout.flush()
        if not line.strip():
            continue
        why = problem(line)
        if why is None:
            good += 1
        else:
            bad += 1
            print(f"# {name}: stdout line {number}: {why}: {line.strip()[:200]}", file=sys.stderr)
    if good == 0:
        print(f"# {name}: printed no figure", file=sys.stderr)
    return 1 if bad or good == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
