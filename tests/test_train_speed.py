"""The training step's shortcuts compute exactly what the plain path computes."""

from __future__ import annotations

import pytest
import torch

from perse_ray.avatar.layout import LatentLayout
from perse_ray.avatar.model import AvatarModel
from perse_ray.bench.ground_truth import frames_from_head
from perse_ray.bench.procedural import ProceduralHead
from perse_ray.config import load_config
from perse_ray.train import loop

SHRUNK = ["synth.resolution=32", "render.width=24", "render.height=24", "synth.motion.num_frames=5",
          "synth.morph_alphas=[0.5]", "avatar.num_gaussians=300", "avatar.hidden_dim=16", "avatar.feature_dim=8",
          "train.batch_size=4", "machine.log_every=10", "train.steps=12"]


def _model_and_batch(layers: int):
    cfg = load_config("cpu", [f"avatar.hidden_layers={layers}", "avatar.num_gaussians=200"])
    layout = LatentLayout.from_config(cfg.synth, cfg.avatar.code_dim)
    model = AvatarModel(layout, cfg.avatar, seed=3)
    for p in model.decoder.parameters():
        torch.nn.init.normal_(p, std=0.1)
    expression = torch.tensor([[0.5, 0, 0], [0.5, 0, 0], [0, 1.0, 0], [0.5, 0, 0]])
    selections = torch.zeros(4, 3, 3)
    selections[1, 0] = torch.tensor([1, 1, 0.0])
    selections[2, 2] = torch.tensor([1, 2, 0.25])
    return model, expression, selections


@pytest.mark.parametrize("layers", [1, 2])
def test_precomputed_row_groups_give_the_same_gaussians_and_gradients(layers):
    model, expression, selections = _model_and_batch(layers)
    results = []
    for groups in (None, model.latent_groups(expression, selections)):
        model.zero_grad(set_to_none=True)
        g = model.gaussians(model.compose(expression, selections), groups)
        sum((v * torch.linspace(0, 1, v.numel()).view_as(v)).sum() for v in g.values()).backward()
        results.append(({k: v.detach() for k, v in g.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (g0, grad0), (g1, grad1) = results
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    assert grad0.keys() == grad1.keys() and "decoder.w_out" in grad0
    for n in grad0:
        torch.testing.assert_close(grad0[n], grad1[n], rtol=1e-5, atol=1e-7, msg=n)
    # The groups really are the distinct rows: 3 expressions, source + one edit, source + one morph.
    groups = model.latent_groups(expression, selections)
    assert [len(first) for _, first in groups] == [2, 2, 1, 2]


def test_coarse_steps_train_at_half_size_then_full(monkeypatch):
    cfg = load_config("cpu-smoke", SHRUNK + ["train.coarse_fraction=0.25"])
    rows = frames_from_head(ProceduralHead(seed=0), cfg)
    sizes = []
    real = loop.render_frames

    def spy(model, frames, backend, groups=None):
        if torch.is_grad_enabled():
            sizes.append(tuple(frames.images.shape[1:3]))
        return real(model, frames, backend, groups)

    monkeypatch.setattr(loop, "render_frames", spy)
    loop.train_avatar(rows, cfg, progress=False)
    assert sizes == [(12, 12)] * 3 + [(24, 24)] * 9
    with pytest.raises(ValueError, match="coarse_fraction"):
        loop.train_avatar(rows, load_config("cpu-smoke", SHRUNK + ["train.coarse_fraction=1.5"]), progress=False)
