"""The benchmarks' one output line: a JSON record (figure, value, unit, config), or a table row."""

from __future__ import annotations

import json
import math


def emit(figure: str, value, unit: str, config: dict, as_json: bool) -> None:
    """A figure with nothing to measure (None, or NaN: e.g. a region never in view) is null."""
    known = value is not None and math.isfinite(float(value))
    if as_json:
        print(json.dumps({"figure": figure, "value": round(float(value), 4) if known else None, "unit": unit,
                          "config": config}), flush=True)
    else:
        print(f"{figure:48s} {float(value) if known else float('nan'):10.4f} {unit}", flush=True)
