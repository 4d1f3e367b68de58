"""Avatar core: latent layout, decoder structure, relocation, training, checkpoints, file format, .ply."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from perse_ray.avatar import AvatarFormatError, AvatarModel, LatentLayout, export_ply, load_avatar, save_avatar
from perse_ray.avatar.losses import psnr, ssim
from perse_ray.avatar.model import BranchDecoder, dominant_change, owned_weights, union_opacity
from perse_ray.avatar.relocate import relocate_dead, split_opacity_and_scale
from perse_ray.bench.ground_truth import Scorer, frames_from_head, score_views
from perse_ray.bench.procedural import ProceduralHead
from perse_ray.config import ConfigError, load_config
from perse_ray.train.loop import latest_checkpoint, train_avatar

SHRUNK = ["synth.resolution=32", "render.width=24", "render.height=24", "synth.motion.num_frames=5",
          "synth.morph_alphas=[0.5]", "avatar.num_gaussians=400", "avatar.hidden_dim=16", "avatar.feature_dim=8",
          "train.batch_size=4", "machine.log_every=10", "train.holdout_fraction=0.25", "train.relocate_every=20"]


@pytest.fixture(scope="module")
def head():
    return ProceduralHead(seed=0)


@pytest.fixture(scope="module")
def shrunk_rows(head):
    cfg = load_config("cpu-smoke", SHRUNK)
    return frames_from_head(head, cfg)


def test_layout_slices_sliders_and_json():
    layout = LatentLayout.from_config(load_config("cpu").synth, code_dim=4)
    assert layout.exp_dim == 3 and layout.dim == 3 + 4 * len(layout.attributes)
    s = layout.slices()
    assert s["expression"] == slice(0, 3) and s[layout.attributes[0].name] == slice(3, 7)
    assert LatentLayout.from_json(layout.to_json()) == layout
    with pytest.raises(ValueError, match="attributes.hair: slider 2.5 outside"):
        layout.check_values({"hair": 2.5}, {})
    with pytest.raises(ValueError, match="attributes.moustache: unknown attribute"):
        layout.check_values({"moustache": 1}, {})
    with pytest.raises(ValueError, match="expression.wink: unknown expression"):
        layout.check_values({}, {"wink": 1})


def test_slider_is_the_lerp_of_adjacent_edit_codes():
    cfg = load_config("cpu")
    model = AvatarModel(LatentLayout.from_config(cfg.synth, 4), cfg.avatar)
    sel = model.slider_selection({"hair": 1.25})
    z = model.compose(torch.zeros(1, 3), sel[None])[0]
    table = model.code_table("hair")
    expected = 0.75 * table[1] + 0.25 * table[2]
    assert torch.allclose(z[model.layout.slices()["hair"]], expected)
    # every other attribute stays at the source code (zero)
    assert torch.all(z[model.layout.slices()["beard"]] == 0)
    end = model.compose(torch.zeros(1, 3), model.slider_selection({"hair": 2.0})[None])[0]
    assert torch.allclose(end[model.layout.slices()["hair"]], table[2])


def test_branch_decoder_dedupe_matches_naive_and_is_additive():
    torch.manual_seed(0)
    dec = BranchDecoder(gauss_dim=5, branch_dims=[3, 2, 2], hidden=8, layers=2)
    torch.nn.init.normal_(dec.w_out)
    g = torch.randn(7, 5)
    z = [torch.randn(4, 3), torch.tensor([[1.0, 2], [1, 2], [0, 0], [1, 2]]), torch.zeros(4, 2)]
    out = dec(g, z)
    naive = torch.cat([dec(g, [zb[i:i + 1] for zb in z]) for i in range(4)])
    assert torch.allclose(out, naive, atol=1e-6)
    # additivity: the change caused by attribute 1 does not depend on attribute 2 or expression
    z2 = [torch.randn(4, 3), z[1], torch.randn(4, 2)]
    moved = [z[0], z[1] + 0.5, z[2]]
    moved2 = [z2[0], z2[1] + 0.5, z2[2]]
    assert torch.allclose(dec(g, moved) - out, dec(g, moved2) - dec(g, z2), atol=1e-5)


def test_union_opacity_is_exact_alone_and_keeps_what_one_edit_turns_on():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=gen)
    alone = torch.zeros(3, 2, 50)
    alone[1] = 3 * torch.randn(2, 50, generator=gen)
    assert torch.allclose(union_opacity(logits, alone), torch.sigmoid(logits + alone[1]), atol=1e-6)
    assert torch.allclose(union_opacity(logits, torch.zeros(3, 2, 50)), torch.sigmoid(logits), atol=1e-6)
    # two edits that both fade a Gaussian multiply its opacity; two that raise it cover what is left
    o, down, up = torch.sigmoid(logits), torch.full((2, 2, 50), -1.5), torch.full((2, 2, 50), 1.5)
    assert torch.allclose(union_opacity(logits, down), o * (torch.sigmoid(logits - 1.5) / o) ** 2, atol=1e-6)
    assert torch.allclose(1 - union_opacity(logits, up), (1 - o) * ((1 - torch.sigmoid(logits + 1.5)) / (1 - o)) ** 2,
                          atol=1e-6)
    # glasses turn a faint Gaussian on (0.2 -> 0.68) where hair fades it (-> 0.02): it stays on
    faint = torch.logit(torch.tensor([[0.2]]))
    glasses, hair = torch.logit(torch.tensor(0.68)) - faint, torch.logit(torch.tensor(0.02)) - faint
    both = union_opacity(faint, torch.stack([glasses, hair]))
    assert 0.6 < float(both) < 0.68 and float(torch.sigmoid(faint + glasses + hair)) < 0.2
    # at zero deltas (the decoder's zero-initialised output layer) each delta's gradient is sigmoid's,
    # as with the sum: an edit can start to change opacity at all
    at_zero = torch.autograd.functional.jacobian(lambda d: union_opacity(faint, d).sum(), torch.zeros(2, 1, 1))
    assert torch.allclose(at_zero, torch.full((2, 1, 1), 0.2 * 0.8), atol=1e-6)


def test_dominant_colour_change_is_exact_alone_and_lets_the_larger_of_two_win():
    gen = torch.Generator().manual_seed(0)
    alone = torch.zeros(3, 2, 40, 3)
    alone[2] = 2 * torch.randn(2, 40, 3, generator=gen)
    assert torch.equal(dominant_change(alone, 2.0), alone[2])
    # dark lenses (-3 logits) over a brow the hair edit lightens (+1): the lens keeps its colour
    lens, lighter = torch.full((1, 1, 3), -3.0), torch.full((1, 1, 3), 1.0)
    both = dominant_change(torch.stack([lighter, lens]), 2.0)
    assert torch.allclose(both, lens + lighter * math.exp(-2.0 * (3 - 1) * math.sqrt(3)), atol=1e-5)
    assert float(both.mean()) < -2.99
    # two equal changes add, and at dominance 0 any two do, as the sum would
    assert torch.allclose(dominant_change(torch.stack([lighter, lighter]), 2.0), 2 * lighter)
    assert torch.allclose(dominant_change(torch.stack([lighter, lens]), 0.0), lighter + lens)


def test_owned_colour_shares_are_exact_alone_and_keep_added_lenses_from_another_edits_paint():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=gen)
    alone = torch.zeros(3, 2, 50)
    alone[1] = 3 * torch.randn(2, 50, generator=gen)
    assert torch.equal(owned_weights(logits, alone)[1], torch.ones(2, 50))  # alone: the whole change, exactly
    # glasses add a lens (0.1 -> 0.9 opacity) in front of a faint Gaussian the hair edit also recolours;
    # an opaque skin Gaussian (0.99) both recolour in full
    opacity = torch.tensor([[0.1, 0.99]])
    base = torch.logit(opacity)
    glasses = torch.logit(torch.tensor(0.9)) - base
    hair = torch.zeros(1, 2)
    w = owned_weights(base, torch.stack([hair, glasses]))
    lens_add = 1 - (1 - 0.9) / (1 - 0.1)
    assert float(w[0, 0, 0]) == pytest.approx(0.1 / (0.1 + lens_add), rel=1e-5)  # hair: the source's share only
    assert float(w[1, 0, 0]) == 1.0
    assert torch.allclose(w[:, 0, 1], torch.ones(2), atol=1e-2)
    # a Gaussian with no material at all keeps share 1 (no 0/0), and the shares have finite gradients
    empty = torch.tensor([[-200.0]], requires_grad=True)
    deltas = torch.zeros(2, 1, 1, requires_grad=True)
    w = owned_weights(empty, deltas)
    assert torch.equal(w.detach(), torch.ones(2, 1, 1))
    w.sum().backward()
    assert torch.isfinite(deltas.grad).all() and torch.isfinite(empty.grad).all()


def test_owned_composition_anchors_the_attributes_and_keeps_an_added_lens_dark():
    cfg = load_config("cpu-smoke", [*SHRUNK, "avatar.attribute_composition=owned"])
    layout = LatentLayout.from_config(cfg.synth, 4, anchored=True)
    model = AvatarModel(layout, cfg.avatar)
    torch.nn.init.normal_(model.decoder.w_out, generator=torch.Generator().manual_seed(1))
    torch.nn.init.normal_(model.decoder.b_out, generator=torch.Generator().manual_seed(2))
    for code in model.codes.values():
        torch.nn.init.normal_(code, generator=torch.Generator().manual_seed(3))
    names = [a.name for a in layout.attributes]
    z = lambda **levels: model.compose(torch.zeros(1, 3), model.slider_selection(levels)[None])  # noqa: E731
    with torch.no_grad():
        source = model.gaussians(z())
        # anchored: at the source every attribute part is exactly zero, so the source is the canonical
        # Gaussians with the expression branch alone
        model.decoder.w_out[1:] += 5.0
        assert all(torch.equal(source[k], model.gaussians(z())[k]) for k in source)
        single = model.gaussians(z(**{names[0]: 1}))
        both = model.gaussians(z(**{names[0]: 1, names[1]: 1}))
        union = load_config("cpu-smoke", [*SHRUNK, "avatar.attribute_composition=union"]).avatar
        model.cfg = union
        single_u, both_u = model.gaussians(z(**{names[0]: 1})), model.gaussians(z(**{names[0]: 1, names[1]: 1}))
    # one attribute alone: owned is the union exactly; two: the opacities agree, the colours differ
    assert torch.equal(single["colors"], single_u["colors"]) and torch.equal(single["opacities"], single_u["opacities"])
    assert torch.equal(both["opacities"], both_u["opacities"])
    assert not torch.allclose(both["colors"], both_u["colors"], atol=1e-3)


def test_union_composition_matches_the_sum_for_one_attribute_and_differs_for_several():
    layout = LatentLayout.from_config(load_config("cpu-smoke", SHRUNK).synth, 4)
    models = {mode: AvatarModel(layout, load_config("cpu-smoke", [*SHRUNK, f"avatar.attribute_composition={mode}",
                                                                  "avatar.color_dominance=2"]).avatar)
              for mode in ("sum", "union")}
    torch.nn.init.normal_(models["sum"].decoder.w_out, generator=torch.Generator().manual_seed(1))
    models["union"].load_state_dict(models["sum"].state_dict())  # the same weights, composed two ways
    # zero codes make every attribute branch output its f(0); only hair's code moves below
    one = models["sum"].compose(torch.zeros(1, 3), models["sum"].slider_selection({"hair": 1})[None])
    several = models["sum"].compose(torch.zeros(1, 3), models["sum"].slider_selection({"hair": 1, "glasses": 1})[None])
    model_u = models["union"]
    with torch.no_grad():
        # with every other attribute branch silenced, union and sum agree exactly
        for m in models.values():
            m.decoder.w_out[2:] = 0
            m.decoder.b_out[2:] = 0
        g_sum, g_union = models["sum"].gaussians(one), model_u.gaussians(one)
        assert torch.allclose(g_sum["opacities"], g_union["opacities"], atol=1e-6)
        assert torch.equal(g_sum["colors"], g_union["colors"]) and torch.equal(g_sum["means"], g_union["means"])
        for m in models.values():
            m.decoder.w_out[2:] = torch.randn(m.decoder.w_out[2:].shape, generator=torch.Generator().manual_seed(2))
        assert not torch.allclose(models["sum"].gaussians(several)["opacities"],
                                  model_u.gaussians(several)["opacities"], atol=1e-3)
    # and it trains from the start: in a fresh model (zero output layer, every delta exactly 0) the
    # opacity gradient reaches every attribute branch's output layer
    fresh = AvatarModel(layout, model_u.cfg)
    fresh.gaussians(several)["opacities"].sum().backward()
    assert (fresh.decoder.w_out.grad[1:, :, 10].abs().sum(1) > 0).all()


def test_opacity_split_preserves_single_gaussian_and_shrinks_copies():
    o = torch.tensor([0.3, 0.9, 0.9])
    s = torch.ones(3, 3)
    new_o, new_s = split_opacity_and_scale(o, torch.tensor([1.0, 1.0, 3.0]), s)
    assert torch.allclose(new_o[:2], o[:2], atol=1e-4) and torch.allclose(new_s[:2], s[:2], atol=1e-4)
    assert new_o[2] < 0.9 and 1 - (1 - new_o[2]) ** 3 == pytest.approx(0.9, abs=1e-4)


def test_relocation_moves_dead_gaussians_and_keeps_the_image(head):
    cfg = load_config("cpu-smoke", SHRUNK)
    model = AvatarModel(LatentLayout.from_config(cfg.synth, 4), cfg.avatar, seed=1)
    with torch.no_grad():
        model.opacity_logits[:100] = -9.0  # dead
        model.opacity_logits[100:] = 2.0
    opt = torch.optim.Adam(model.parameters())
    views = torch.eye(4)[None, None].clone()
    views[..., 2, 3] = 0.65
    Ks = torch.tensor([[[[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]]])
    z = torch.zeros(1, model.layout.dim)
    before, _, _ = model.render(z, views, Ks, 32, 32, background=torch.ones(3))
    peak = torch.sigmoid(model.opacity_logits.detach())
    moved = relocate_dead(model, opt, peak, 0.005, torch.Generator().manual_seed(0))
    after, _, _ = model.render(z, views, Ks, 32, 32, background=torch.ones(3))
    assert moved == 100
    assert torch.sigmoid(model.opacity_logits[:100]).min() > 0.05  # revived
    assert float(psnr(after.detach(), before.detach())) > 30  # image (nearly) preserved


def test_ssim_matches_scikit_image_and_psnr():
    from skimage.metrics import structural_similarity

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 24, 31, 3, generator=gen, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(a, b, reduce=False)
    for i in range(2):
        ref = structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=2, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)
    assert float(ssim(a, a)) == pytest.approx(1.0, abs=1e-6)
    assert float(psnr(a, a * 0 + a + 0.1)) == pytest.approx(20.0, abs=1e-3)


def _train(rows, steps, ckpt=None, resume=True, device="auto", overrides=(), **kw):
    cfg = load_config("cpu-smoke", SHRUNK + [f"train.steps={steps}", "machine.checkpoint_every=10",
                                             f"machine.device={device}", *overrides])
    return cfg, train_avatar(rows, cfg, checkpoint_dir=ckpt, resume=resume, progress=False, **kw)


class Killed(Exception):
    pass


def test_shrunk_training_learns_the_procedural_head(head, shrunk_rows):
    cfg, untrained = _train(shrunk_rows, 0)
    scorer = Scorer(head, cfg, "auto")
    base = score_views(untrained.avatar.model, scorer)
    cfg, trained = _train(shrunk_rows, 150)
    learned = score_views(trained.avatar.model, scorer)
    assert learned > base + 4.0, (base, learned)
    assert trained.metrics["heldout_psnr"] > untrained.metrics["heldout_psnr"] + 4.0
    assert trained.history[-1]["loss"] < trained.history[0]["loss"]


def test_checkpoint_resume_continues_and_matches_an_uninterrupted_run(tmp_path, shrunk_rows):
    _, full = _train(shrunk_rows, 20)

    def kill_at_10(path, step):
        if step == 10:
            raise Killed

    with pytest.raises(Killed):
        _train(shrunk_rows, 20, ckpt=tmp_path, on_checkpoint=kill_at_10)
    assert latest_checkpoint(tmp_path).name == "ckpt-00000010"
    _, resumed = _train(shrunk_rows, 20, ckpt=tmp_path)
    assert [h["step"] for h in resumed.history] == [10, 20]
    for name, value in full.avatar.model.state_dict().items():
        assert torch.allclose(value, resumed.avatar.model.state_dict()[name], atol=1e-5), name


def test_save_load_renders_identically_and_ply_round_trips(tmp_path, shrunk_rows):
    from plyfile import PlyData

    _, result = _train(shrunk_rows, 10)
    avatar = result.avatar
    path = save_avatar(avatar, tmp_path / "av")
    loaded = load_avatar(path)
    z = avatar.latent({"hair": 0.5}, {"smile": 0.3})
    assert torch.equal(loaded.latent({"hair": 0.5}, {"smile": 0.3}), z)
    a = avatar.render(z, [(10.0, -5.0)], 24, 24)
    b = loaded.render(z, [(10.0, -5.0)], 24, 24)
    assert torch.equal(a, b)

    ply = PlyData.read(str(export_ply(loaded, z, tmp_path / "av.ply")))
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    assert names[:3] == ["x", "y", "z"] and {"f_dc_0", "opacity", "scale_2", "rot_3"} <= set(names)
    g = loaded.model.gaussians(z[None])
    assert np.allclose(np.stack([v["x"], v["y"], v["z"]], 1), g["means"][0].detach().numpy(), atol=1e-6)
    assert np.allclose(1 / (1 + np.exp(-v["opacity"])), g["opacities"][0].detach().numpy(), atol=1e-5)
    q = np.stack([v[f"rot_{i}"] for i in range(4)], 1)
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)


def test_an_owned_composition_avatar_trains_with_anchored_attributes_and_round_trips(tmp_path, shrunk_rows):
    _, result = _train(shrunk_rows, 10, overrides=["avatar.attribute_composition=owned"])
    model = result.avatar.model
    assert all(a.anchored for a in model.layout.attributes)
    loaded = load_avatar(save_avatar(result.avatar, tmp_path / "av"))
    assert loaded.model.cfg.attribute_composition == "owned" and loaded.model.layout == model.layout
    source, edited = result.avatar.latent({}, {}), result.avatar.latent({"hair": 1.0, "glasses": 1.0}, {})
    for z in (source, edited):
        assert torch.equal(result.avatar.render(z, [(10.0, -5.0)], 24, 24), loaded.render(z, [(10.0, -5.0)], 24, 24))
    # at the source the attribute branches add exactly nothing, whatever their weights
    before = model.gaussians(source[None])
    with torch.no_grad():
        model.decoder.b_out[1:] += 1.0
    assert all(torch.equal(before[k], model.gaussians(source[None])[k]) for k in before)


def test_corrupt_or_mismatched_avatar_files_fail_clearly(tmp_path, shrunk_rows):
    from safetensors.torch import load_file, save_file

    _, result = _train(shrunk_rows, 0)
    good = save_avatar(result.avatar, tmp_path / "good")

    def broken(name, mutate):
        import shutil

        p = tmp_path / name
        shutil.copytree(good, p)
        mutate(p)
        return p

    def meta_edit(**kw):
        def f(p):
            m = json.loads((p / "avatar.json").read_text())
            m.update(kw)
            (p / "avatar.json").write_text(json.dumps(m))
        return f

    def tensors_edit(fn):
        def f(p):
            t = load_file(str(p / "model.safetensors"))
            fn(t)
            save_file(t, str(p / "model.safetensors"))
        return f

    cases = {
        "missing": (lambda p: (p / "model.safetensors").unlink(), "not an avatar directory"),
        "truncated": (lambda p: (p / "model.safetensors").write_bytes(b"\x10\x00"), "unreadable safetensors"),
        "json": (lambda p: (p / "avatar.json").write_text("{nope"), "not valid JSON"),
        "version": (meta_edit(format_version=99), "format_version 99 is not supported"),
        "format": (meta_edit(format="other"), "format is not"),
        "layout": (meta_edit(layout={"expressions": []}), "bad layout"),
        "shape": (tensors_edit(lambda t: t.__setitem__("means", torch.zeros(3, 3))), r"means is torch.float32\[3, 3\]"),
        "extra": (tensors_edit(lambda t: t.__setitem__("evil", torch.zeros(1))), r"unexpected \['evil'\]"),
        "nan": (tensors_edit(lambda t: t["means"].__setitem__(0, float("nan"))), "NaN or inf"),
    }
    for name, (mutate, message) in cases.items():
        with pytest.raises(AvatarFormatError, match=message):
            load_avatar(broken(name, mutate))


def test_training_device_is_checked_and_not_part_of_the_config_hash(shrunk_rows):
    cuda, cpu = load_config("cpu", ["machine.device=cuda"]), load_config("cpu")
    assert cuda.training_hash() == cpu.training_hash() and cuda.synthesis_hash() == cpu.synthesis_hash()
    with pytest.raises(ConfigError, match="machine.device: 'tpu' is not a choice; choices: auto, cpu, cuda"):
        _train(shrunk_rows, 1, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
            _train(shrunk_rows, 1, device="cuda")
