#!/usr/bin/env python
"""Where one training step's time goes: decoder, rasterizer and loss, forward and backward, and Adam.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_profile.py [--json] [--quick] [--preset cpu]
        [--size 64 --size 128] [--gaussians 4000 --gaussians 12000] [--repeats 30] [--set KEY=VALUE]
        [--compare-torch-ops]

The frames are the procedural head's (perse_ray.bench), the model is the preset's. Each part is
timed alone on the same batch, with its inputs made leaves so the backward of one part does not
include another's: decoder (latents → Gaussians), rasterize (Gaussians → image), loss
(L1 + SSIM), then one whole step exactly as ``train_avatar`` takes it (including Adam). With
``avatar.branch_regions`` the attribute branches run on the Gaussians inside their edit masks, set
from the head's frames as training sets them (``region_fraction`` in the config). The
parts' sum is close to the step, not equal: the step shares work between them. Every figure is
the median of --repeats timings after two warm-up steps, on one thread unless OMP_NUM_THREADS
says otherwise. ``--quick``: the cpu-smoke preset at its own sizes, 5 repeats (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from perse_ray.avatar.model import AvatarModel  # noqa: E402
from perse_ray.bench.ground_truth import frames_from_head  # noqa: E402
from perse_ray.bench.procedural import ProceduralHead  # noqa: E402
from perse_ray.config import load_config  # noqa: E402
from perse_ray.render import rasterize  # noqa: E402
from perse_ray.train.loop import (_param_groups, attribute_prior, frameset_from_rows,  # noqa: E402
                                  photometric_loss, render_frames, training_layout)


def _timed(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def profile(cfg, rows, repeats: int, config_note: dict) -> dict[str, float]:
    """Milliseconds per part for one batch of ``train.batch_size`` frames (``config_note`` gets the
    share of Gaussians each attribute branch runs on, with branch regions)."""
    layout = training_layout(cfg)
    frames = frameset_from_rows(rows, layout, cfg.render.width, cfg.render.height)
    gen = torch.Generator().manual_seed(0)
    batch = frames.subset(torch.randint(len(frames), (cfg.train.batch_size,), generator=gen))
    model = AvatarModel(layout, cfg.avatar, seed=0)
    for p in model.decoder.parameters():  # trained-like, not the zero-initialised output layer
        torch.nn.init.normal_(p, std=0.05)
    if getattr(cfg.avatar, "branch_regions", False):  # as training sets them from the edit masks
        from perse_ray.train.loop import branch_region_mask, edit_regions

        model.set_branch_regions(branch_region_mask(model.means, edit_regions(frames, len(layout.attributes))))
        config_note["region_fraction"] = round(float(model.branch_regions.float().mean()), 3)
    optimizer = torch.optim.Adam(_param_groups(model, cfg.train), eps=1e-15)
    backend, tcfg = cfg.machine.render_backend, cfg.train
    w, h = cfg.render.width, cfg.render.height
    out = {}
    # as train_avatar: distinct rows found on the host once per batch, the attribute prior if on
    groups = model.latent_groups(batch.expression, batch.selections)
    prior = tcfg.lambda_attr_delta > 0

    def decoder_forward():
        with torch.no_grad():
            model.gaussians(model.compose(batch.expression, batch.selections), groups, prior)

    def decoder_both():
        g = model.gaussians(model.compose(batch.expression, batch.selections), groups, prior)
        sum((v * 1e-3).sum() for v in g.values()).backward()

    with torch.no_grad():
        g0 = model.gaussians(model.compose(batch.expression, batch.selections))
    leaves = {k: v.detach().requires_grad_() for k, v in g0.items()}

    def raster(backward: bool):
        rgb, _, _ = rasterize(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"],
                              leaves["colors"], batch.viewmats[:, None], batch.Ks[:, None], w, h, backend=backend)
        if backward:
            rgb.sum().backward()

    rgb0 = rasterize(*(g0[k] for k in ("means", "quats", "scales", "opacities", "colors")),
                                  batch.viewmats[:, None], batch.Ks[:, None], w, h, backend=backend)[0][:, 0]
    rgb_leaf = rgb0.detach().requires_grad_()

    def loss(backward: bool):
        value = photometric_loss(rgb_leaf, batch.images, batch.weights, tcfg.lambda_ssim).sum()
        if backward:
            value.backward()

    def step():
        rgb, g = render_frames(model, batch, backend, groups, prior)
        value = photometric_loss(rgb, batch.images, batch.weights, tcfg.lambda_ssim).sum() + attribute_prior(g, tcfg)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    out["decoder_forward"] = _timed(decoder_forward, repeats)
    out["decoder_backward"] = _timed(decoder_both, repeats) - out["decoder_forward"]
    out["rasterize_forward"] = _timed(lambda: raster(False), repeats)
    out["rasterize_backward"] = _timed(lambda: raster(True), repeats) - out["rasterize_forward"]
    out["loss_forward"] = _timed(lambda: loss(False), repeats)
    out["loss_backward"] = _timed(lambda: loss(True), repeats) - out["loss_forward"]
    out["step"] = _timed(step, repeats)
    out["optimizer_and_rest"] = out["step"] - sum(v for k, v in out.items() if k != "step")
    return out


@contextlib.contextmanager
def _decoder_ops(ops: str):
    """The decoder on the fused CPU kernels where they run ("fused", as training takes it) or on
    torch's ops ("torch", what runs without them)."""
    from perse_ray.avatar import model as model_module

    saved = model_module._fused_here, model_module._fused_compose_here
    if ops == "torch":
        model_module._fused_here = lambda t: False
        model_module._fused_compose_here = lambda t, dominance: False
    try:
        yield
    finally:
        model_module._fused_here, model_module._fused_compose_here = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="JSON lines (figure, value, unit, config)")
    p.add_argument("--quick", action="store_true", help="cpu-smoke at its own sizes, 5 repeats")
    p.add_argument("--preset", default=None, help="config preset (default cpu; cpu-smoke with --quick)")
    p.add_argument("--size", type=int, action="append", help="render side in px (repeatable; default the preset's)")
    p.add_argument("--gaussians", type=int, action="append", help="Gaussian count (repeatable; default the preset's)")
    p.add_argument("--repeats", type=int, default=None, help="timings per figure (median; default 30)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--compare-torch-ops", action="store_true",
                   help="also time every part with the decoder on torch's ops instead of the fused CPU kernels "
                        "(perse_ray/avatar/fused_*.py), one after the other in the same run")
    args = p.parse_args(argv)
    preset = args.preset or ("cpu-smoke" if args.quick else "cpu")
    repeats = args.repeats or (5 if args.quick else 30)
    base = load_config(preset, args.overrides)
    sizes = args.size or [base.render.width]
    counts = args.gaussians or [base.avatar.num_gaussians]
    head = ProceduralHead(seed=0)
    rows = frames_from_head(head, base)
    for size in sizes:
        for n in counts:
            cfg = load_config(preset, args.overrides + [f"render.width={size}", f"render.height={size}",
                                                        f"avatar.num_gaussians={n}"])
            for ops in ("fused", "torch") if args.compare_torch_ops else ("fused",):
                config = {"preset": preset, "size": size, "num_gaussians": n, "batch_size": cfg.train.batch_size,
                          "threads": torch.get_num_threads(), "repeats": repeats, "overrides": args.overrides,
                          "decoder_ops": ops}
                with _decoder_ops(ops):
                    parts = profile(cfg, rows, repeats, config)
                for part, ms in parts.items():
                    if args.json:
                        print(json.dumps({"figure": f"step_ms_{part}", "value": round(ms, 3), "unit": "ms",
                                          "config": config}), flush=True)
                    else:
                        print(f"{size:4d}px {n:6d} gaussians {ops:5s} {part:20s} {ms:9.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
