"""perse_ray.render: gsplat (CUDA) against the CPU kernel on the same scenes.

Needs CUDA; skipped otherwise. gsplat may compile its CUDA kernels on first use.
"""

from __future__ import annotations

import math

import pytest
import torch

from perse_ray.render import rasterize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ARGS = ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")
DIFF_ARGS = ("means", "quats", "scales", "opacities", "colors", "viewmats", "backgrounds")


def make_scene(seed, n, width, height, n_cams=2, batch=None, channels=3, background=True):
    """float32 Gaussians around (0, 0, 2) seen by cameras on a small arc."""
    g = torch.Generator().manual_seed(seed)
    bd = () if batch is None else (batch,)
    means = torch.randn(*bd, n, 3, generator=g) * torch.tensor([0.4, 0.3, 0.3])
    means[..., 2] += 2.0
    means[..., 0, :] = torch.tensor([0.1, 0.0, -1.0])  # behind the camera
    scene = dict(
        means=means,
        quats=torch.randn(*bd, n, 4, generator=g),
        scales=torch.exp(torch.randn(*bd, n, 3, generator=g) * 0.5 - 3.5),
        opacities=torch.rand(*bd, n, generator=g) * 0.95,
        colors=torch.rand(*bd, n, channels, generator=g),
        width=width,
        height=height,
    )
    views, Ks = [], []
    for c in range(n_cams):
        angle = 0.25 * c
        R = torch.tensor([[math.cos(angle), 0.0, -math.sin(angle)], [0.0, 1.0, 0.0],
                          [math.sin(angle), 0.0, math.cos(angle)]])
        view = torch.eye(4)
        view[:3, :3] = R
        view[:3, 3] = torch.tensor([0.0, 0.0, 2.0]) - R @ torch.tensor([0.0, 0.0, 2.0])
        views.append(view)
        f = 0.5 * width / math.tan(math.radians(40 + 5 * c) / 2)
        Ks.append(torch.tensor([[f, 0, width / 2 + c], [0, f, height / 2 - c], [0, 0, 1]]))
    scene["viewmats"] = torch.stack(views).expand(*bd, n_cams, 4, 4).contiguous()
    scene["Ks"] = torch.stack(Ks).expand(*bd, n_cams, 3, 3).contiguous()
    scene["backgrounds"] = torch.rand(*bd, n_cams, channels, generator=g) if background else None
    return scene


def to(scene, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in scene.items()}


def render(scene, backend):
    return rasterize(*(scene[k] for k in ARGS), scene["width"], scene["height"],
                     backgrounds=scene["backgrounds"], backend=backend)


SCENES = {
    "odd_size": dict(seed=0, n=200, width=37, height=23),
    "multi_tile": dict(seed=1, n=2000, width=128, height=96, n_cams=3),
    "batch_d5": dict(seed=2, n=300, width=64, height=48, batch=2, channels=5),
    "no_background_d1": dict(seed=3, n=500, width=50, height=70, channels=1, background=False),
}


def _assert_images_close(a, b, name):
    # Both sides are float32 with different exp implementations, so a pixel
    # sitting exactly on the 1/255 alpha cut may switch sides; allow a few.
    diff = (a.cpu() - b.cpu()).abs()
    assert (diff > 1e-3).float().mean().item() <= 1e-3, f"{name}: max diff {diff.max().item():.3g}"
    assert diff.max().item() <= 1e-2, f"{name}: max diff {diff.max().item():.3g}"


@pytest.mark.parametrize("name", list(SCENES))
def test_gsplat_matches_cpu_backend(name):
    scene = make_scene(**SCENES[name])
    colors_cpu, alphas_cpu, meta_cpu = render(scene, "cpu")
    colors_gpu, alphas_gpu, meta_gpu = render(to(scene, "cuda"), "gsplat")
    assert meta_gpu["backend"] == "gsplat"
    assert colors_gpu.shape == colors_cpu.shape and alphas_gpu.shape == alphas_cpu.shape
    _assert_images_close(colors_gpu, colors_cpu, "colors")
    _assert_images_close(alphas_gpu, alphas_cpu, "alphas")
    visible_cpu = (meta_cpu["radii"] > 0).all(-1)
    visible_gpu = (meta_gpu["radii"].cpu() > 0).all(-1)
    assert (visible_cpu != visible_gpu).float().mean().item() <= 1e-3


@pytest.mark.parametrize("name", ["odd_size", "batch_d5"])
def test_gsplat_gradients_close_to_cpu_backend(name):
    scene = make_scene(**SCENES[name])
    grads = {}
    for backend, device in (("cpu", "cpu"), ("gsplat", "cuda")):
        s = to(scene, device)
        leaves = {k: s[k].clone().requires_grad_(True) for k in DIFF_ARGS}
        s.update(leaves)
        colors, alphas, _ = render(s, backend)
        weights = torch.rand(colors.shape, generator=torch.Generator().manual_seed(1)).to(device)
        loss = (colors * weights).sum() + alphas.square().sum()
        grads[backend] = dict(zip(DIFF_ARGS, torch.autograd.grad(loss, list(leaves.values()))))
    for k in DIFF_ARGS:
        a, b = grads["cpu"][k], grads["gsplat"][k].cpu()
        rel = ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
        assert rel <= 1e-2, f"{k}: relative error {rel:.3g}"


def test_auto_uses_gsplat_on_cuda():
    _, _, meta = render(to(make_scene(**SCENES["odd_size"]), "cuda"), "auto")
    assert meta["backend"] == "gsplat"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_backends_reject_cuda_tensors(backend):
    with pytest.raises(ValueError, match="CPU"):
        render(to(make_scene(**SCENES["odd_size"]), "cuda"), backend)
