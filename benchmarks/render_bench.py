#!/usr/bin/env python
"""Renderer benchmark: perse_ray.render backends against each other and a pure-PyTorch pair list.

    python benchmarks/render_bench.py [--json] [--quick] [--sizes 128:10000,256:20000]
                                      [--methods cpu,torch,pairlist,gsplat] [--threads 2] [--reps 7]
                                      [--budget 30]

Scene: N Gaussians inside a head-sized ellipsoid (semi-axes 0.15/0.2/0.15 m)
centred 1.25 m in front of a 35 degree pinhole camera, scales 3-8 mm, mixed
opacities, RGB colors. For each size, "fwd" renders without autograd and
"fwd_bwd" renders, takes loss = sum(w * colors) + sum(alphas) and backpropagates
to means, quats, scales, opacities and colors.

Methods: cpu (the compiled kernel), torch (the library's pure-PyTorch tile
reference backend), pairlist (defined here: every Gaussian expanded to the
pixels of its radius box, pairs sorted by pixel then depth, transmittance from
a segmented cumsum of log(1 - alpha), index_add into the image) and gsplat
(CUDA only: the same scene, generated on the CPU and moved to the GPU; without
CUDA or without the gsplat package its figures are JSON lines with value null
and the reason in config.skipped). Methods are timed interleaved (one call of
each per round, after a warm-up call) so load from other processes hits them
alike; the median over rounds is reported. Ratios are medians measured in the
same rounds on the same scene, and each names its baseline:

    render_speedup_vs_pairlist  pairlist ms / method ms   (method: cpu, gsplat)
    render_speedup_vs_torch     torch ms / method ms      (method: cpu, gsplat)
    render_speedup_vs_cpu       cpu ms / gsplat ms        (GPU against the CPU kernel)

Methods whose warm-up call exceeds --budget seconds get fewer rounds; torch and
pairlist are skipped above 256x256/20k Gaussians unless --all is given. Peak
memory for one fwd_bwd step at 256x256/20k is measured in a child process per
method (growth of the peak RSS; for gsplat, of the peak CUDA allocation).
--quick: 64x64/1k and 128x128/10k, 5 rounds, a 5 s budget per slow method, no
memory probe (well under a minute).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from perse_ray.render import rasterize  # noqa: E402
from perse_ray.render._reference import ALPHA_MAX, ALPHA_MIN, TRANSMITTANCE_MIN, project  # noqa: E402

SIZES = [(64, 1_000), (128, 10_000), (256, 20_000), (512, 50_000)]
QUICK_SIZES = [(64, 1_000), (128, 10_000)]
MEMORY_SIZE = (256, 20_000)
METHODS = ("cpu", "torch", "pairlist", "gsplat")
SLOW_METHODS = ("torch", "pairlist")
BASELINES = {"pairlist": ("cpu", "gsplat"), "torch": ("cpu", "gsplat"), "cpu": ("gsplat",)}
SLOW_LIMIT = 256 * 256 * 20_000  # pixels x Gaussians above which slow methods are skipped
PARAMS = ("means", "quats", "scales", "opacities", "colors")


def head_scene(n: int, size: int, seed: int = 0, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    radius = torch.rand(n, 1, generator=g) ** (1 / 3)
    means = direction * radius * torch.tensor([0.15, 0.2, 0.15]) + torch.tensor([0.0, 0.0, 1.25])
    f = 0.5 * size / math.tan(math.radians(35) / 2)
    scene = dict(
        means=means,
        quats=torch.randn(n, 4, generator=g),
        scales=torch.empty(n, 3).uniform_(0.003, 0.008, generator=g),
        opacities=torch.sigmoid(torch.randn(n, generator=g) * 2 + 1),
        colors=torch.rand(n, 3, generator=g),
        viewmats=torch.eye(4)[None],
        Ks=torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])[None],
    )
    return {k: v.to(device) for k, v in scene.items()}


def pairlist_rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height):
    """One camera, the obvious vectorised way: [1, H, W, D] colors and [1, H, W, 1] alphas."""
    radii, means2d, depths, conics = project(
        means[None], quats[None], scales[None], opacities[None], viewmats[None], Ks[None],
        width, height, 0.01, 1e10, 0.3,
    )
    radii, means2d, depths, conics = radii[0, 0], means2d[0, 0], depths[0, 0], conics[0, 0]
    vis = (radii > 0).all(dim=-1).nonzero()[:, 0]
    rank = torch.empty_like(vis)
    rank[torch.sort(depths[vis], stable=True).indices] = torch.arange(len(vis))

    # pixels whose centre lies inside the radius box
    with torch.no_grad():
        m, r = means2d[vis], radii[vis].to(means2d.dtype)
        lo = torch.ceil(m - r - 0.5).clamp(min=0)
        hi = torch.floor(m + r - 0.5)
        hi = torch.minimum(hi, torch.tensor([width - 1.0, height - 1.0]))
        extent = (hi - lo + 1).clamp(min=0).long()
        counts = extent[:, 0] * extent[:, 1]
        gid = torch.repeat_interleave(torch.arange(len(vis)), counts)
        local = torch.arange(len(gid)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        px = lo[gid, 0].long() + local % extent[gid, 0]
        py = lo[gid, 1].long() + local // extent[gid, 0]
        pix = py * width + px
        order = torch.argsort(pix * len(vis) + rank[gid])
        gid, pix, px, py = gid[order], pix[order], px[order], py[order]
        seg_start = torch.ones_like(pix, dtype=torch.bool)
        seg_start[1:] = pix[1:] != pix[:-1]
        seg_id = torch.cumsum(seg_start.long(), 0) - 1
        first = seg_start.nonzero()[:, 0]

    g = vis[gid]
    dx = means2d[g, 0] - (px + 0.5)
    dy = means2d[g, 1] - (py + 0.5)
    a, b, c = conics[g].unbind(-1)
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = torch.clamp(opacities[g] * torch.exp(-sigma), max=ALPHA_MAX)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, 0.0)

    def log_trans_after(alpha):
        # segmented inclusive cumsum of log(1 - alpha); float64 keeps the
        # running sum over all pairs from cancelling
        cs = torch.cumsum(torch.log1p(-alpha).double(), 0)
        before = (cs[first] - torch.log1p(-alpha[first]).double())[seg_id]
        return (cs - before).to(alpha.dtype)

    with torch.no_grad():
        kept = torch.exp(log_trans_after(alpha)) > TRANSMITTANCE_MIN
    alpha = torch.where(kept, alpha, 0.0)
    log_after = log_trans_after(alpha)
    weight = alpha * torch.exp(log_after - torch.log1p(-alpha))
    image = torch.zeros(height * width, colors.shape[-1], dtype=colors.dtype)
    image = image.index_add(0, pix, weight[:, None] * colors[g])
    log_final = torch.zeros(height * width, dtype=alpha.dtype).index_add(0, pix, torch.log1p(-alpha))
    alphas = 1 - torch.exp(log_final)
    return image.reshape(1, height, width, -1), alphas.reshape(1, height, width, 1)


def run_method(method: str, scene: dict, size: int):
    args = [scene[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")]
    if method == "pairlist":
        return pairlist_rasterize(*args, size, size)
    colors, alphas, _ = rasterize(*args, size, size, backend=method)
    return colors, alphas


def make_step(method: str, scene: dict, size: int, mode: str):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                run_method(method, scene, size)
    else:
        leaves = {k: scene[k].clone().requires_grad_(True) for k in PARAMS}
        s = dict(scene, **leaves)
        weights = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(1)).to(scene["means"].device)

        def step():
            colors, alphas = run_method(method, s, size)
            ((colors.reshape(weights.shape) * weights).sum() + alphas.sum()).backward()
            for leaf in leaves.values():
                leaf.grad = None
    if scene["means"].is_cuda:
        def timed():
            torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            return time.perf_counter() - t
    else:
        def timed():
            t = time.perf_counter()
            step()
            return time.perf_counter() - t
    return timed


def time_interleaved(steps: dict, reps: int, budget: float) -> dict:
    """Warm up each method once, then run rounds of one call per method."""
    warm = {m: f() for m, f in steps.items()}
    rounds = {m: max(1, min(reps, int(budget / max(w, 1e-9)))) for m, w in warm.items()}
    times = {m: [] for m in steps}
    for i in range(max(rounds.values())):
        for m, f in steps.items():
            if i < rounds[m]:
                times[m].append(f())
    return times


def gsplat_problem() -> str | None:
    """Why gsplat cannot run here, or None."""
    if not torch.cuda.is_available():
        return "needs CUDA (torch.cuda.is_available() is False)"
    try:
        import gsplat  # noqa: F401
    except ImportError as e:
        return f"needs the gsplat package ({e})"
    return None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_probe(method: str, size: int, n: int, threads: int) -> dict:
    """Runs in a child process: peak memory growth over one fwd_bwd step.

    CPU methods: peak RSS. Importing torch already sets a high-water mark of ~1.5 GB, so the
    kernel's peak counter is reset first (Linux: writing 5 to /proc/self/clear_refs).
    gsplat: the peak CUDA allocation (torch.cuda.max_memory_allocated) over the step.
    """
    torch.set_num_threads(threads)
    device = "cuda" if method == "gsplat" else "cpu"
    make_step(method, head_scene(200, 32, device=device), 32, "fwd_bwd")()  # code paths, the extension
    scene = head_scene(n, size, device=device)
    step = make_step(method, scene, size, "fwd_bwd")
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_growth_mb": (peak - before) / 2**20, "peak_mb": peak / 2**20, "measure": "cuda allocation"}
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    peak = _status_kb("VmHWM")
    return {"peak_growth_mb": (peak - before) / 1024, "peak_mb": peak / 1024, "measure": "process RSS"}


def emit(figure: str, value, unit: str, config: dict, as_json: bool, rows: list) -> None:
    record = {"figure": figure, "value": None if value is None else float(f"{value:.4g}"),
              "unit": unit, "config": config}
    rows.append(record)
    if as_json:
        print(json.dumps(record), flush=True)


def print_table(rows: list) -> None:
    print(f"{'size':>9} {'N':>7} {'mode':>8} {'method':>9} {'median':>10} {'min':>10} {'reps':>5}  note")
    for r in rows:
        c = r["config"]
        size = f"{c.get('width', '')}x{c.get('height', '')}"
        if r["figure"].startswith("render_ms"):
            value = "skipped" if r["value"] is None else f"{r['value']:.2f} ms"
            low = f"{c['min_ms']:.2f} ms" if "min_ms" in c else ""
            print(f"{size:>9} {c['n_gaussians']:>7} {c['mode']:>8} {c['method']:>9} {value:>10} {low:>10} "
                  f"{c.get('reps', ''):>5}  {c.get('skipped', '')}")
        elif r["figure"].startswith("render_speedup_vs_"):
            print(f"{size:>9} {c['n_gaussians']:>7} {c['mode']:>8} {c['method']:>9} {r['value']:>8.1f} x  "
                  f"{'':>17}{c['baseline']} / {c['method']} (medians)")
        elif r["figure"] == "render_max_abs_diff_vs_cpu":
            print(f"{size:>9} {c['n_gaussians']:>7} {'image':>8} {c['method']:>9} {r['value']:>10.2e}  "
                  f"{'':>15}max |colors - cpu colors|")
        elif r["figure"] == "render_peak_memory_mb":
            value = "skipped" if r["value"] is None else f"{r['value']:7.1f} MB"
            print(f"{size:>9} {c['n_gaussians']:>7} {'fwd_bwd':>8} {c['method']:>9} {value:>10}  "
                  f"{'':>15}peak {c.get('measure', '')} growth {c.get('skipped', '')}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON lines (figure, value, unit, config)")
    p.add_argument("--quick", action="store_true", help="64x64/1k and 128x128/10k, fewer rounds, no memory")
    p.add_argument("--sizes", help="comma-separated SIZE:N pairs, e.g. 128:10000,256:20000")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=None, help="timed rounds per method (default 7, 5 with --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed rounds per slow method (default 30, 5 with --quick)")
    p.add_argument("--all", action="store_true", help="do not skip slow methods at large sizes")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-probe", nargs=3, metavar=("METHOD", "SIZE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_probe:
        method, size, n = args.memory_probe
        print(json.dumps(memory_probe(method, int(size), int(n), args.threads)))
        return

    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(v) for v in item.split(":")) for item in args.sizes.split(",")]
    reps = args.reps or (5 if args.quick else 7)
    budget = args.budget or (5.0 if args.quick else 30.0)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choices: {', '.join(METHODS)}")
    no_gsplat = gsplat_problem() if "gsplat" in methods else None
    if no_gsplat:
        print(f"# render_bench: gsplat skipped: {no_gsplat}", file=sys.stderr, flush=True)
    rows: list = []

    def device_of(method: str) -> str:
        return "cuda" if method == "gsplat" else "cpu"

    for size, n in sizes:
        base = {"width": size, "height": size, "n_gaussians": n, "threads": args.threads, "scene_seed": 0}
        scenes = {"cpu": head_scene(n, size)}
        skipped = {}
        for m in methods:
            if m == "gsplat" and no_gsplat:
                skipped[m] = no_gsplat
            elif m in SLOW_METHODS and not args.all and size * size * n > SLOW_LIMIT:
                skipped[m] = "too slow at this size (use --all)"
        active = [m for m in methods if m not in skipped]
        if "gsplat" in active:
            scenes["cuda"] = head_scene(n, size, device="cuda")  # the same values, on the GPU
        for m, why in skipped.items():
            for mode in ("fwd", "fwd_bwd"):
                emit(f"render_ms_{mode}", None, "ms",
                     {**base, "mode": mode, "method": m, "device": device_of(m), "skipped": why}, args.json, rows)
        reference = run_method("cpu", scenes["cpu"], size)[0]
        for m in active:
            if m != "cpu":
                with torch.no_grad():
                    colors = run_method(m, scenes[device_of(m)], size)[0].cpu()
                diff = (colors - reference).abs().max().item()
                emit("render_max_abs_diff_vs_cpu", diff, "", {**base, "method": m, "device": device_of(m)},
                     args.json, rows)
        for mode in ("fwd", "fwd_bwd"):
            steps = {m: make_step(m, scenes[device_of(m)], size, mode) for m in active}
            times = time_interleaved(steps, reps, budget)
            medians = {m: statistics.median(ts) for m, ts in times.items()}
            for m, ts in times.items():
                emit(f"render_ms_{mode}", medians[m] * 1e3, "ms",
                     {**base, "mode": mode, "method": m, "reps": len(ts), "min_ms": round(min(ts) * 1e3, 3),
                      "device": device_of(m)}, args.json, rows)
            for baseline, against in BASELINES.items():
                for m in against:
                    if baseline in medians and m in medians:
                        emit(f"render_speedup_vs_{baseline}", medians[baseline] / medians[m], "x",
                             {**base, "mode": mode, "method": m, "baseline": baseline,
                              "ratio": f"median {baseline} ms / median {m} ms, same rounds, same scene",
                              "devices": f"{device_of(m)} vs {device_of(baseline)}"}, args.json, rows)

    if not (args.quick or args.no_memory):
        size, n = MEMORY_SIZE
        for m in methods:
            config = {"width": size, "height": size, "n_gaussians": n, "method": m, "mode": "fwd_bwd",
                      "threads": args.threads, "device": device_of(m)}
            if m == "gsplat" and no_gsplat:
                emit("render_peak_memory_mb", None, "MB", {**config, "skipped": no_gsplat}, args.json, rows)
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--memory-probe", m, str(size), str(n), "--threads", str(args.threads)],
                capture_output=True, text=True, check=True,
            )
            probe = json.loads(out.stdout.strip().splitlines()[-1])
            emit("render_peak_memory_mb", probe["peak_growth_mb"], "MB",
                 {**config, "measure": probe["measure"], "peak_mb": round(probe["peak_mb"], 1)}, args.json, rows)

    if not args.json:
        print_table(rows)


if __name__ == "__main__":
    main()
