"""Registry cost against its size: put, get, find and list at 10, 1,000 and 10,000 avatars.

    python benchmarks/registry_bench.py --json [--quick] [--sizes 10,1000,10000]

Each registry is filled with N synthetic entries: copies of one small avatar laid out exactly as
``Registry.put`` lays them out (the version folder, its files, one index line), written directly
so a 10,000-avatar registry fills in seconds. Then, on that registry: ``put`` of new subjects
(real puts, fsyncs included), ``get``/``find`` of random existing subjects, ``list`` (one read of
the index) and a fresh ``RegistryIndex.refresh`` (what a Serve replica does at start). Each
figure is the median over its calls, and the growth ratios compare the largest registry with the
smallest in the same run. Gates (issue: state at thousands of subjects): put, get and find p50 at
10,000 within 1.5x of the p50 at 10; list at 10,000 under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perse_ray.avatar import Avatar, AvatarModel, LatentLayout  # noqa: E402
from perse_ray.avatar.io import META_FILE, MODEL_FILE  # noqa: E402
from perse_ray.config import load_config  # noqa: E402
from perse_ray.registry import INDEX, Registry, RegistryIndex  # noqa: E402


def small_avatar(seed: int = 0) -> Avatar:
    cfg = load_config("cpu-smoke")
    model = AvatarModel(LatentLayout.from_config(cfg.synth, cfg.avatar.code_dim), cfg.avatar, seed=seed)
    return Avatar(model, {"camera": {"fov_deg": cfg.render.fov_deg, "distance": cfg.render.distance},
                          "config_hash": cfg.training_hash(), "preset": cfg.preset,
                          "metrics": {"heldout_psnr": 30.0, "steps": 30.0}})


def fill_registry(root: Path, n: int, template: Path | None = None) -> list[str]:
    """N subjects ``bench-000000``… with one version each, copies of one put avatar; their ids."""
    registry = Registry(root)
    if template is None:
        template = registry.put("template-0", small_avatar()).path
    meta = json.loads((template / META_FILE).read_text())
    ids = [f"bench-{i:06d}" for i in range(n)]
    lines = []
    for sid in ids:
        version = root / sid / "v0001"
        version.mkdir(parents=True)
        os.link(template / MODEL_FILE, version / MODEL_FILE)  # same bytes, no copy
        (version / META_FILE).write_text(json.dumps({**meta, "subject_id": sid}, indent=1, sort_keys=True))
        entry, problem = registry.inspect(sid, "v0001")
        assert entry is not None, problem
        lines.append(entry.index_line())
    with open(root / INDEX, "a") as fh:
        fh.writelines(lines)
    return ids


def _ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 3)


def measure(root: Path, n: int, calls: int, put_calls: int, rng: random.Random) -> dict[str, float]:
    ids = fill_registry(root, n)
    registry = Registry(root)
    avatar = small_avatar(1)
    timings: dict[str, list[float]] = {"put": [], "get": [], "find": [], "list": [], "index_refresh": []}
    for i in range(put_calls):
        t = time.perf_counter()
        registry.put(f"new-{i:04d}", avatar)
        timings["put"].append(time.perf_counter() - t)
    training_hash = avatar.meta["config_hash"]
    for sid in rng.choices(ids, k=calls):
        t = time.perf_counter()
        registry.get(sid)
        timings["get"].append(time.perf_counter() - t)
        t = time.perf_counter()
        found = registry.find(sid, training_hash)
        timings["find"].append(time.perf_counter() - t)
        assert found is not None
    for _ in range(3):
        t = time.perf_counter()
        listed = registry.list()
        timings["list"].append(time.perf_counter() - t)
        t = time.perf_counter()
        RegistryIndex(root).refresh()
        timings["index_refresh"].append(time.perf_counter() - t)
    assert len(listed) == n + put_calls + 1  # + the template
    return {name: _ms(samples) for name, samples in timings.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON lines only (figure, value, unit, config)")
    p.add_argument("--quick", action="store_true", help="fewer calls per figure (about a minute)")
    p.add_argument("--sizes", default="10,1000,10000", help="registry sizes, comma-separated (default 10,1000,10000)")
    p.add_argument("--dir", default=None, help="where to build the registries (default: a temp dir, removed after)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    calls, put_calls = (50, 10) if args.quick else (300, 40)
    rng = random.Random(0)
    base = Path(args.dir or tempfile.mkdtemp(prefix="registry-bench-"))
    results = {}
    try:
        for n in sizes:
            root = base / f"n{n}"
            shutil.rmtree(root, ignore_errors=True)
            results[n] = measure(root, n, calls, put_calls, rng)
            shutil.rmtree(root, ignore_errors=True)
            if not args.json:
                print(f"# {n} avatars: {results[n]}", file=sys.stderr)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    lines = []
    for n, figures in results.items():
        for name, value in figures.items():
            stat = "median" if name in ("list", "index_refresh") else "p50"
            lines.append({"figure": f"registry_{name}_{stat}", "value": value, "unit": "ms",
                          "config": {"avatars": n, "calls": put_calls if name == "put" else
                                     3 if name in ("list", "index_refresh") else calls}})
    small, large = min(results), max(results)
    for name in ("put", "get", "find"):
        ratio = results[large][name] / max(results[small][name], 1e-9)
        lines.append({"figure": f"registry_{name}_growth", "value": round(ratio, 3), "unit": "x",
                      "config": {"p50_at": large, "over_p50_at": small, "gate": "<= 1.5"}})
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
