#!/usr/bin/env python
"""Load benchmark of the render API (serve/app.py): batching speed-up, latency, errors, replica memory.

    scripts/isolated .venv/bin/python benchmarks/serve_load.py [--json] [--quick] [--clients 32]
                                                              [--batch 8] [--max-ongoing 16]

Starts its own Ray + Serve on loopback (run it inside a network namespace) with a temporary registry of
three small avatars and two copies of the application that differ only in max_batch_size: "batched"
(--batch) and "unbatched" (1). Both have the same Renderer concurrency cap (max_ongoing_requests
--max-ongoing, by default the one build_app gives the batched app: 2 x --batch), the same batch
wait, the same multiplex bound of 2 and the same CPUs, so the speed-up is batching alone and not a
concurrency cap (build_app derives the cap from max_batch_size, which would give the unbatched app
2). --clients concurrent HTTP clients send render requests (one avatar, random yaw, hair slider and
smile: a slider UI's traffic). The two applications take the load in alternating slices of --slice-s
seconds until each had --phase-s, so load from other processes hits both alike; per application:
requests/s, latency percentiles (p50, p90, p99), errors and the mean batch; then the batched over
unbatched ratios of requests/s (over the whole phase, and the median over adjacent slice pairs) and
of latency percentiles. Then a soak of --soak-s seconds on "batched" spreads requests over all
three avatars (the bound of 2 forces loads and evictions) while the RSS of its Ingress and Renderer
processes is sampled every second (after a warm-up): start, end, least-squares slope over the
whole soak and over its second half (a warming process flattens, a leak keeps its slope).
--quick (6 s per application, a 5 s soak after a 2 s warm-up) checks that it runs; its figures are
rough.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from perse_ray.avatar import Avatar, AvatarModel  # noqa: E402
from perse_ray.config import load_config  # noqa: E402
from perse_ray.registry import Registry  # noqa: E402
from perse_ray.train.loop import training_layout  # noqa: E402

SUBJECTS = ("load-a", "load-b", "load-c")
APPS = ("batched", "unbatched")
PERCENTILES = (0.5, 0.9, 0.99)


def build_load_app(registry: Path, max_batch_size: int, max_ongoing_requests: int):
    """serve.app's deployments, wired as ``build_app`` wires them (same settings check, same actor
    options) but with the Renderer's ``max_ongoing_requests`` given, so two apps can differ in
    ``max_batch_size`` alone."""
    from serve.api import serve_config
    from serve.app import Ingress
    from serve.renderer import Renderer

    cfg = dataclasses.asdict(serve_config({"max_batch_size": max_batch_size, "max_avatars_per_replica": 2,
                                           "batch_wait_timeout_s": 0.01}))
    renderer = Renderer.options(max_ongoing_requests=max_ongoing_requests,
                                ray_actor_options={"num_cpus": 1, "num_gpus": cfg["num_gpus"]})
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0.25})
    return ingress.bind(renderer.bind(str(registry), cfg), str(registry), cfg)


def make_registry(root: Path, gaussians: int) -> Registry:
    """Three small untrained avatars whose decoders are randomised (every slider moves pixels)."""
    cfg = load_config("cpu-smoke", [f"avatar.num_gaussians={gaussians}"])
    registry = Registry(root)
    for seed, subject in enumerate(SUBJECTS):
        torch.manual_seed(seed)
        model = AvatarModel(training_layout(cfg), cfg.avatar, seed=seed)
        with torch.no_grad():
            model.color_logits.normal_(0, 2)
            model.decoder.w_out.normal_(0, 0.05)
        registry.put(subject, Avatar(model, {"camera": {"fov_deg": 30.0, "distance": 0.65}}))
    return registry


def request_body(rng: random.Random, size: int) -> dict:
    return {"attributes": {"hair": rng.uniform(0, 1)}, "expression": {"smile": rng.uniform(0, 1)},
            "camera": {"yaw": rng.uniform(-30, 30), "pitch": 0.0}, "width": size, "height": size}


async def drive(client, prefix: str, subjects: tuple[str, ...], seconds: float, clients: int, size: int,
                seed: int) -> dict:
    """``clients`` closed-loop workers for ``seconds``: latencies of the requests completed in time, errors."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(k: int):
        rng = random.Random(seed * 1000 + k)
        while time.perf_counter() < deadline:
            subject = rng.choice(subjects)
            start = time.perf_counter()
            try:
                r = await client.post(f"{prefix}/v1/avatars/{subject}/render", json=request_body(rng, size))
                ok = r.status_code == 200 and r.content[:4] == b"\x89PNG"
                error = None if ok else f"{r.status_code}: {r.text[:200]}"
            except Exception as e:  # counted, never hidden
                error = f"{type(e).__name__}: {e}"
            end = time.perf_counter()
            if error is not None:
                errors.append(error)
            elif end <= deadline:
                latencies.append(end - start)

    await asyncio.gather(*(worker(k) for k in range(clients)))
    return {"latencies": latencies, "errors": errors, "seconds": seconds}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    t = [s[0] for s in samples]
    v = [s[1] for s in samples]
    mt, mv = statistics.fmean(t), statistics.fmean(v)
    den = sum((x - mt) ** 2 for x in t)
    return 60 * sum((x - mt) * (y - mv) for x, y in zip(t, v)) / den if den else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def emit(figure: str, value, unit: str, config: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"figure": figure, "value": value, "unit": unit, "config": config}), flush=True)
    else:
        shown = f"{value:.3g}" if isinstance(value, float) else value
        print(f"{figure:<34} {shown:>10} {unit:<6} {json.dumps(config)}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON lines (figure, value, unit, config)")
    p.add_argument("--quick", action="store_true",
                   help="short phases (6 s each in 3 s slices, a 5 s soak; about a minute)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="image side")
    p.add_argument("--gaussians", type=int, default=1000, help="Gaussians per avatar")
    p.add_argument("--batch", type=int, default=8, help="max_batch_size of the batched application")
    p.add_argument("--max-ongoing", type=int, default=None,
                   help="max_ongoing_requests of both Renderers (default 2 x --batch)")
    p.add_argument("--phase-s", type=float, default=None, help="seconds of load per application (<= 60)")
    p.add_argument("--slice-s", type=float, default=None, help="length of one alternating slice (default 5, 3 quick)")
    p.add_argument("--soak-s", type=float, default=None, help="seconds of the soak (<= 60)")
    args = p.parse_args(argv)
    args.phase_s = min(60.0, args.phase_s or (6.0 if args.quick else 40.0))
    args.slice_s = args.slice_s or (3.0 if args.quick else 5.0)
    args.soak_s = min(60.0, args.soak_s or (5.0 if args.quick else 60.0))
    args.soak_warm_s = 2.0 if args.quick else 5.0
    args.max_ongoing = args.max_ongoing or 2 * args.batch
    if args.max_ongoing < args.batch:
        p.error(f"--max-ongoing {args.max_ongoing} < --batch {args.batch}: the cap would bound the batch")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import httpx
    import ray
    from ray import serve

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    make_registry(tmp / "avatars", args.gaussians)
    if "RAY_AUTH_TOKEN_PATH" not in os.environ:  # this run's own token, not ~/.ray's
        (tmp / "token").write_text(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(tmp / "token")
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    os.environ.pop("PERSE_REGISTRY", None)
    batch_sizes = {"batched": args.batch, "unbatched": 1}
    for name, batch in batch_sizes.items():
        serve.run(build_load_app(tmp / "avatars", batch, args.max_ongoing), name=name, route_prefix=f"/{name}")
    base = {"clients": args.clients, "size": args.size, "gaussians": args.gaussians, "omp_threads": int(threads),
            "cpus": os.cpu_count(), "max_ongoing_requests": args.max_ongoing, "batch_wait_timeout_s": 0.01,
            "max_avatars_per_replica": 2, "quick": args.quick, "machine": "shared CPU machine, timings noisy"}
    compare = {**base, "max_batch_size": {"batched": args.batch, "unbatched": 1},
               "differs_in": "max_batch_size only", "baseline": "unbatched",
               "seconds_each": args.phase_s, "slice_s": args.slice_s}

    async def run() -> None:
        limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as client:
            for name in APPS:  # warm-up: the first load and the first batches
                await drive(client, f"/{name}", SUBJECTS[:1], 2.0, args.clients, args.size, seed=99)

            async def stats(name: str) -> dict:
                return (await client.get(f"/{name}/v1/stats")).json()

            before = {name: (await stats(name))["renderer"] for name in APPS}
            results = {name: {"latencies": [], "errors": [], "seconds": 0.0} for name in APPS}
            slices = max(2, round(args.phase_s / args.slice_s))  # at least one slice pair
            slice_rates: dict[str, list[float]] = {name: [] for name in APPS}
            for i in range(slices):
                for name in (APPS if i % 2 == 0 else APPS[::-1]):
                    r = await drive(client, f"/{name}", SUBJECTS[:1], args.phase_s / slices, args.clients,
                                    args.size, seed=i)
                    for key in ("latencies", "errors"):
                        results[name][key] += r[key]
                    results[name]["seconds"] += r["seconds"]
                    slice_rates[name].append(len(r["latencies"]) / r["seconds"])
            after = {name: (await stats(name))["renderer"] for name in APPS}

            rates, lat = {}, {}
            for name in APPS:
                res, config = results[name], {**base, "app": name, "max_batch_size": batch_sizes[name],
                                              "seconds": round(results[name]["seconds"], 1)}
                rates[name] = len(res["latencies"]) / res["seconds"]
                lat[name] = {q: percentile(res["latencies"], q) for q in PERCENTILES}
                batches = after[name]["batches"] - before[name]["batches"]
                emit(f"throughput_{name}", round(rates[name], 2), "req/s", config, args.json)
                for q, value in lat[name].items():
                    emit(f"latency_p{round(100 * q)}_{name}", round(1e3 * value, 1), "ms", config, args.json)
                emit(f"latency_p99_over_p50_{name}", round(lat[name][0.99] / lat[name][0.5], 2), "x", config,
                     args.json)
                emit(f"errors_{name}", len(res["errors"]), "requests", config, args.json)
                emit(f"mean_batch_size_{name}", round((after[name]["requests"] - before[name]["requests"])
                                                      / max(batches, 1), 2), "requests", config, args.json)
                for e in sorted(set(res["errors"]))[:5]:
                    print(f"# {name} error: {e}", file=sys.stderr)
            emit("batching_speedup", round(rates["batched"] / rates["unbatched"], 2), "x",
                 {**compare, "ratio": "batched req/s / unbatched req/s over the whole phase", "target": ">= 3"},
                 args.json)
            pairs = [b / u for b, u in zip(slice_rates["batched"], slice_rates["unbatched"]) if u > 0]
            emit("batching_speedup_median_of_slices", round(statistics.median(pairs), 2) if pairs else None, "x",
                 {**compare, "ratio": "median over slice pairs of batched req/s / unbatched req/s",
                  "slice_pairs": len(pairs)}, args.json)
            for q in PERCENTILES:
                emit(f"batching_latency_p{round(100 * q)}_ratio", round(lat["batched"][q] / lat["unbatched"][q], 2),
                     "x", {**compare, "ratio": f"batched p{round(100 * q)} / unbatched p{round(100 * q)} "
                           "(below 1: batching is faster)"}, args.json)

            # Soak: three avatars through a bound of two on the batched application.
            pids = (await stats("batched"))
            procs = {"renderer": pids["renderer"]["pid"], "ingress": pids["ingress"]["pid"]}
            samples: dict[str, list[tuple[float, float]]] = {p: [] for p in procs}
            t0 = time.perf_counter()

            async def sample():
                while True:
                    for proc, pid in procs.items():
                        samples[proc].append((time.perf_counter() - t0, rss_mb(pid)))
                    await asyncio.sleep(1.0)

            await drive(client, "/batched", SUBJECTS, args.soak_warm_s, args.clients, args.size,
                        seed=98)  # warm the soak path
            sampler = asyncio.create_task(sample())
            load_before = (await stats("batched"))["renderer"]
            soak = await drive(client, "/batched", SUBJECTS, args.soak_s, args.clients, args.size, seed=7)
            sampler.cancel()
            for proc, pid in procs.items():
                samples[proc].append((time.perf_counter() - t0, rss_mb(pid)))
            load_after = (await stats("batched"))["renderer"]
            config = {**base, "app": "batched", "max_batch_size": args.batch, "avatars": len(SUBJECTS),
                      "max_avatars_per_replica": 2, "seconds": args.soak_s}
            emit("soak_throughput", round(len(soak["latencies"]) / args.soak_s, 2), "req/s", config, args.json)
            emit("soak_errors", len(soak["errors"]), "requests", config, args.json)
            emit("soak_avatar_loads", load_after["loads"] - load_before["loads"], "loads", config, args.json)
            for proc in procs:
                series = samples[proc]
                emit(f"soak_rss_start_{proc}", round(series[0][1], 1), "MiB", config, args.json)
                emit(f"soak_rss_end_{proc}", round(series[-1][1], 1), "MiB", config, args.json)
                emit(f"soak_rss_slope_{proc}", round(slope_per_min(series), 2), "MiB/min",
                     {**config, "samples": len(series)}, args.json)
                late = series[len(series) // 2:]  # a warming process flattens, a leak keeps its slope
                emit(f"soak_rss_slope_second_half_{proc}", round(slope_per_min(late), 2), "MiB/min",
                     {**config, "samples": len(late)}, args.json)

    try:
        asyncio.run(run())
    finally:
        with contextlib.redirect_stdout(sys.stderr):  # Ray prints shutdown notices on stdout: keep it JSON
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
