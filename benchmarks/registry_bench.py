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

Serve over the registry (``--serve-sizes``, default 10,1000; ``--no-serve`` skips it; needs Ray:
run inside ``scripts/isolated``): the catalog a Serve Ingress keeps (``serve.api.Catalog``: its
first read, and a refresh when nothing changed), then one Serve application per size, all up at
once, taking sequential requests in alternating rounds so load from other processes hits every
size alike: GET /v1/avatars, gRPC ListAvatars, GET /v1/avatars/{id} and a render of one warm
avatar (64x64). Gates: GET /v1/avatars p50 at 1,000 avatars <= 50 ms; the warm render p50 at
1,000 equal to the one at 10 within noise (``serve_render_warm_noise``: how far the two halves of
one size's samples differ).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perse_ray.avatar import Avatar, AvatarModel  # noqa: E402
from perse_ray.avatar.io import META_FILE, MODEL_FILE  # noqa: E402
from perse_ray.config import load_config  # noqa: E402
from perse_ray.registry import INDEX, Registry, RegistryIndex  # noqa: E402
from perse_ray.train.loop import training_layout  # noqa: E402


def small_avatar(seed: int = 0) -> Avatar:
    cfg = load_config("cpu-smoke")
    model = AvatarModel(training_layout(cfg), cfg.avatar, seed=seed)
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


# --------------------------------------------------------------------------- Serve over the registry

SERVE_SIDE = 64
SERVICER = "serve.grpc_servicer.add_RendererServicer_to_server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_catalog(root: Path, n: int, calls: int) -> dict[str, float]:
    """What the Ingress does with the registry, without Ray: the first read (at start) and a refresh
    when nothing changed (every index_refresh_s)."""
    from serve.api import Catalog, ServeConfig

    opens, noops = [], []
    for _ in range(3):
        t = time.perf_counter()
        catalog = Catalog.open(root, ServeConfig())
        opens.append(time.perf_counter() - t)
    assert len(catalog.summaries()) == n + 1, len(catalog.summaries())  # + the template
    for _ in range(calls):
        t = time.perf_counter()
        changed = catalog.refresh()
        noops.append(time.perf_counter() - t)
        assert not changed
    return {"catalog_open": _ms(opens), "catalog_refresh_unchanged": _ms(noops)}


def measure_serve(base: Path, sizes: list[int], rounds: int) -> list[dict]:
    """One Serve application per registry size, measured in alternating rounds (module docstring)."""
    import grpc
    import httpx
    import ray
    from ray import serve

    from serve import render_pb2, render_pb2_grpc
    from serve.app import build_app

    roots = {n: base / f"serve-n{n}" for n in sizes}
    for n, root in roots.items():
        shutil.rmtree(root, ignore_errors=True)
        fill_registry(root, n)
    figures = {n: measure_catalog(root, n, 200) for n, root in roots.items()}
    if "RAY_AUTH_TOKEN_PATH" not in os.environ:  # this run's own token, not ~/.ray's
        (base / "token").write_text(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(base / "token")
    os.environ.pop("PERSE_REGISTRY", None)
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    http_port, grpc_port = _free_port(), _free_port()
    with contextlib.redirect_stdout(sys.stderr):  # Ray prints notices on stdout: keep it JSON lines
        ray.init(num_cpus=2 + len(sizes), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER]})
    samples: dict[int, dict[str, list[float]]] = {n: {"list": [], "grpc_list": [], "manifest": [], "render": []}
                                                  for n in sizes}
    try:
        for n, root in roots.items():
            serve.run(build_app({"registry": str(root), "auth": "none"}), name=f"n{n}", route_prefix=f"/n{n}")
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = render_pb2_grpc.RendererStub(channel)
        body = {"attributes": {"hair": 0.5}, "camera": {"yaw": 10}, "width": SERVE_SIDE, "height": SERVE_SIDE}
        subject = "bench-000000"
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:

            def once(n: int) -> None:
                prefix = f"/n{n}"
                t = time.perf_counter()
                listing = http.get(f"{prefix}/v1/avatars")
                samples[n]["list"].append(time.perf_counter() - t)
                assert listing.status_code == 200 and len(listing.json()) == n + 1, listing.text[:200]
                t = time.perf_counter()
                reply = stub.ListAvatars(render_pb2.ListAvatarsRequest(), metadata=(("application", f"n{n}"),))
                samples[n]["grpc_list"].append(time.perf_counter() - t)
                assert len(reply.avatars) == n + 1
                t = time.perf_counter()
                manifest = http.get(f"{prefix}/v1/avatars/{subject}")
                samples[n]["manifest"].append(time.perf_counter() - t)
                assert manifest.status_code == 200, manifest.text
                t = time.perf_counter()
                render = http.post(f"{prefix}/v1/avatars/{subject}/render", json=body)
                samples[n]["render"].append(time.perf_counter() - t)
                assert render.status_code == 200, render.text

            for n in sizes:  # warm-up: the avatar's load, the first requests of every route
                for _ in range(5):
                    once(n)
                for series in samples[n].values():
                    series.clear()
            for i in range(rounds):
                for n in (sizes if i % 2 == 0 else sizes[::-1]):
                    once(n)
        channel.close()
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            serve.shutdown()
            ray.shutdown()
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)

    base_config = {"side": SERVE_SIDE, "rounds": rounds, "cpus": os.cpu_count(), "omp_threads": int(threads),
                   "client": "one sequential HTTP/gRPC client", "machine": "shared CPU machine, timings noisy"}
    lines = []
    for n in sizes:
        config = {**base_config, "avatars": n}
        for name, value in figures[n].items():
            lines.append({"figure": f"serve_{name}_median" if name == "catalog_open" else f"serve_{name}_p50",
                          "value": value, "unit": "ms",
                          "config": {"avatars": n, "calls": 3 if name == "catalog_open" else 200}})
        gates = {"list": {"gate": "<= 50 at 1000 avatars"}}
        for name, series in samples[n].items():
            lines.append({"figure": f"serve_{name}_p50" if name != "render" else "serve_render_warm_p50",
                          "value": _ms(series), "unit": "ms", "config": {**config, **gates.get(name, {})}})
    small, large = min(sizes), max(sizes)
    renders = {n: samples[n]["render"] for n in sizes}
    noise = max(abs(statistics.median(s[: len(s) // 2]) / statistics.median(s[len(s) // 2:]) - 1)
                for s in renders.values())
    lines.append({"figure": "serve_render_warm_growth",
                  "value": round(statistics.median(renders[large]) / statistics.median(renders[small]), 3), "unit": "x",
                  "config": {"p50_at": large, "over_p50_at": small, "gate": "within 1 +- serve_render_warm_noise"}})
    lines.append({"figure": "serve_render_warm_noise", "value": round(noise, 3), "unit": "x",
                  "config": {"what": "largest |p50(first half) / p50(second half) - 1| over the sizes"}})
    lines.append({"figure": "serve_list_growth",
                  "value": round(statistics.median(samples[large]["list"])
                                 / statistics.median(samples[small]["list"]), 3), "unit": "x",
                  "config": {"p50_at": large, "over_p50_at": small}})
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON lines only (figure, value, unit, config)")
    p.add_argument("--quick", action="store_true", help="fewer calls per figure (about a minute)")
    p.add_argument("--sizes", default="10,1000,10000", help="registry sizes, comma-separated (default 10,1000,10000)")
    p.add_argument("--dir", default=None, help="where to build the registries (default: a temp dir, removed after)")
    p.add_argument("--serve-sizes", default="10,1000", help="registry sizes the Serve figures compare (default 10,1000)")
    p.add_argument("--no-serve", action="store_true", help="registry figures only (no Ray, no Serve)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    serve_sizes = [int(s) for s in args.serve_sizes.split(",")]
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
        serve_lines = [] if args.no_serve else measure_serve(base, serve_sizes, 60 if args.quick else 300)
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
    for line in lines + serve_lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
