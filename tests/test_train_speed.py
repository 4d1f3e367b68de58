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

    def spy(model, frames, *args):
        if torch.is_grad_enabled():
            sizes.append(tuple(frames.images.shape[1:3]))
        return real(model, frames, *args)

    monkeypatch.setattr(loop, "render_frames", spy)
    loop.train_avatar(rows, cfg, progress=False)
    assert sizes == [(12, 12)] * 3 + [(24, 24)] * 9
    with pytest.raises(ValueError, match="coarse_fraction"):
        loop.train_avatar(rows, load_config("cpu-smoke", SHRUNK + ["train.coarse_fraction=1.5"]), progress=False)


def test_branch_regions_skip_gaussians_outside_and_equal_the_masked_dense_decode():
    model, expression, selections = _model_and_batch(2)
    n = model.means.shape[0]
    z = model.compose(expression, selections)
    dense = model.gaussians(z)  # regions all true: every branch on every Gaussian
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(3, n, generator=gen) < torch.tensor([[0.3], [0.0], [1.0]])  # partial, empty, full
    model.set_branch_regions(mask)
    assert [None if r is None else len(r) for r in model.region_indices()] == [None, int(mask[0].sum()), 0, None]
    sparse = model.gaussians(z)
    # Reference: the dense decoder's per-branch outputs, each zeroed outside its region, summed.
    gauss_in, branches = _decoder_inputs(model, z)
    with torch.no_grad():
        weights = torch.stack([torch.ones(n)] + [m.float() for m in mask])  # [4, N]
        reference = sum(_single_branch(model.decoder, gauss_in, branches, b) * weights[b][None, :, None]
                        for b in range(4))
        again = model.decoder(gauss_in, branches, regions=model.region_indices())
    torch.testing.assert_close(again, reference, rtol=1e-5, atol=1e-6)
    assert not torch.equal(sparse["colors"], dense["colors"])
    # Moving an attribute's slider changes no Gaussian outside its region.
    other = selections.clone()
    other[:, 0] = torch.tensor([1, 1, 0.0])
    moved = model.gaussians(model.compose(expression, other))
    changed = (moved["means"] - sparse["means"]).abs().sum(-1).amax(0) > 0
    assert changed.any() and not changed[~mask[0]].any()


def test_attribute_l1_is_the_attribute_branches_mean_abs_output_and_changes_no_gaussian():
    model, expression, selections = _model_and_batch(2)
    n = model.means.shape[0]
    model.set_branch_regions(torch.rand(3, n, generator=torch.Generator().manual_seed(1)) < 0.5)
    z = model.compose(expression, selections)
    plain, with_l1 = model.gaussians(z), model.gaussians(z, attribute_l1=True)
    assert plain.keys() | {"attribute_l1"} == with_l1.keys()
    for k in plain:
        assert torch.equal(plain[k], with_l1[k]), k
    gauss_in, branches = _decoder_inputs(model, z)
    with torch.no_grad():
        reference = 0.0
        for b in (1, 2, 3):  # the expression branch (0) is not an edit: it is free to move everything
            _, first = model.latent_groups(expression, selections)[b]
            out = _single_branch(model.decoder, gauss_in, [x[first] for x in branches], b)
            out = out * model.branch_regions[b - 1].float()[None, :, None]
            reference += float(out.abs().sum()) / out.numel()
    assert float(with_l1["attribute_l1"].detach()) == pytest.approx(reference, rel=1e-5)


def test_attribute_delta_prior_shrinks_what_the_edits_change():
    rows = frames_from_head(ProceduralHead(seed=0), load_config("cpu-smoke", SHRUNK))
    sizes = {}
    for lam in (0.0, 1.0):
        model = loop.train_avatar(rows, load_config("cpu-smoke", SHRUNK + ["train.steps=30",
                                                                           f"train.lambda_attr_delta={lam}"]),
                                  progress=False).avatar.model
        layout = model.layout
        top = {a.name: a.num_edits - 1 for a in layout.attributes}  # every attribute at its top level
        with torch.no_grad():
            z = model.compose(torch.zeros(1, layout.exp_dim), model.slider_selection(top)[None])
            sizes[lam] = float(model.gaussians(z, attribute_l1=True)["attribute_l1"])
    assert 0 < sizes[1.0] < 0.5 * sizes[0.0]


def _decoder_inputs(model, z):
    """(gauss_in [N, G], per-branch slices of z) as ``AvatarModel.gaussians`` hands them to the decoder."""
    from perse_ray.avatar.model import POSITION_SCALE, positional_encoding

    slices = model.layout.slices()
    branches = [z[:, slices["expression"]]] + [z[:, slices[a.name]] for a in model.layout.attributes]
    pos = positional_encoding(model.means / POSITION_SCALE, model.cfg.pos_freqs)
    return torch.cat([model.features, pos], -1), branches


def _single_branch(decoder, gauss_in, branches, b):
    """Branch b's output alone, [B, N, out], computed from its weights directly."""
    z = branches[b]
    h = torch.nn.functional.silu(gauss_in @ decoder.w_gauss[b] + (z @ decoder.w_z[b, : z.shape[1]] + decoder.b_in[b])[:, None])
    for w, bias in zip(decoder.w_hidden, decoder.b_hidden):
        h = torch.nn.functional.silu(h @ w[b] + bias[b])
    return h @ decoder.w_out[b] + decoder.b_out[b]


def test_region_mask_follows_the_projected_edit_masks():
    from perse_ray.train.loop import FrameSet, branch_region_mask, edit_regions
    from perse_ray.camera import camera_record

    cam = camera_record(0.0, 0.0, 16, 16, 30.0, 0.65)
    weights = torch.zeros(2, 16, 16)
    weights[0, :, :4] = 1.0  # attribute 0's morph frame: the image's left quarter
    selections = torch.zeros(2, 3, 3)
    selections[0, 0] = torch.tensor([0, 1, 0.5])
    selections[1, 1] = torch.tensor([0, 1, 0.5])  # attribute 1's frame has an empty mask
    frames = FrameSet(torch.zeros(2, 16, 16, 3), weights, torch.tensor(cam["viewmat"]).view(1, 4, 4).repeat(2, 1, 1),
                      torch.tensor(cam["K"]).view(1, 3, 3).repeat(2, 1, 1), torch.zeros(2, 0), selections,
                      torch.tensor([True, True]), torch.tensor([1, 1]))
    means = torch.tensor([[-0.12, 0.0, 0.0], [0.12, 0.0, 0.0], [0.0, 0.0, 0.0]])  # image left, right, centre
    mask = branch_region_mask(means, edit_regions(frames, 3, dilate=0))
    assert mask[0].tolist() == [True, False, False]
    assert mask[1].tolist() == [False, False, False]
    assert mask[2].tolist() == [True, True, True]  # no masked frames: no restriction
    assert branch_region_mask(means, edit_regions(frames, 3, dilate=6))[0].tolist() == [True, False, True]
    # a weak edit (a morph partway to a light recolour) still has its region; its faint tail does not
    frames.weights[0] *= 0.3
    frames.weights[0, :, 4:] = 0.05
    assert branch_region_mask(means, edit_regions(frames, 3, dilate=0))[0].tolist() == [True, False, False]


def test_trained_branch_regions_are_saved_and_old_avatars_load_without_them(tmp_path):
    import json

    from perse_ray.avatar.io import load_avatar, save_avatar

    cfg = load_config("cpu-smoke", SHRUNK)
    result = loop.train_avatar(frames_from_head(ProceduralHead(seed=0), cfg), cfg, progress=False)
    regions = result.avatar.model.branch_regions
    assert 0 < int(regions.sum()) < regions.numel()  # the masks restrict every attribute somewhere
    back = load_avatar(save_avatar(result.avatar, tmp_path / "a"))
    assert torch.equal(back.model.branch_regions, regions)
    z = result.avatar.latent({"hair": 1.0}, {})[None]
    assert torch.equal(back.model.gaussians(z)["colors"], result.avatar.model.gaussians(z)["colors"])
    # An avatar written before branch regions existed: no such key, no such tensor.
    meta = json.loads((tmp_path / "a/avatar.json").read_text())
    del meta["avatar_config"]["branch_regions"]
    (tmp_path / "a/avatar.json").write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "a/model.safetensors"))
    del tensors["branch_regions"]
    save_file(tensors, str(tmp_path / "a/model.safetensors"))
    old = load_avatar(tmp_path / "a")
    assert old.model.region_indices() is None
