"""perse_ray.avatar.fused_compose: the compiled union/owned composition against model.py's torch ops
(forward and all four gradients), gradcheck, exactness where an attribute is at its source, and the
avatar decoder on it.

The first test compiles the extension (~20-60 s once per machine; cached afterwards).
"""

from __future__ import annotations

import pytest
import torch

from perse_ray import cpp_ext
from perse_ray.avatar.fused_compose import compose_parts
from perse_ray.avatar.model import DELTA_UNITS, _owned_shares, _union_opacity, _union_terms, dominant_change

# Only the CPU may skip these: a kernel that fails to build must fail them, not skip them.
pytestmark = pytest.mark.skipif(not cpp_ext.cpu_supports_avx2(), reason="needs a CPU with AVX2 and FMA")

UNITS = (DELTA_UNITS["opacity"], DELTA_UNITS["color"])
NAMES = ("d_mean", "d_quat", "d_scale", "opacity", "colour",
         "grad_opacity_logits", "grad_color_logits", "grad_expression", "grad_attributes")
NO_MATERIAL = 2  # the Gaussian _inputs leaves without any material: its shares fall back to 1


def _reference(opacity_logits, color_logits, expression, attributes, owned):
    """``AvatarModel.gaussians``'s torch composition (colour dominance 0), with the same calls. With no
    attribute, which the model never has, there are no shares and no colour change."""
    attributes = list(attributes.unbind(0))
    logits = opacity_logits + DELTA_UNITS["opacity"] * expression[..., 10]
    keep, clears = _union_terms(logits, [DELTA_UNITS["opacity"] * part[..., 10] for part in attributes])
    opacities = _union_opacity(logits, keep, clears)
    if owned and attributes:
        shares = _owned_shares(logits, keep, clears)
        attributes = [share[..., None] * part for share, part in zip(shares, attributes)]
    deltas = sum(attributes, expression)
    change = (dominant_change(torch.stack([DELTA_UNITS["color"] * part[..., 11:14] for part in attributes]), 0.0)
              if attributes else torch.zeros_like(expression[..., 11:14]))
    colors = torch.sigmoid(color_logits + DELTA_UNITS["color"] * expression[..., 11:14] + change)
    return deltas[..., 0:3], deltas[..., 3:7], deltas[..., 7:10], opacities, colors


def _kernel(opacity_logits, color_logits, expression, attributes, owned):
    return compose_parts(opacity_logits, color_logits, expression, attributes, owned, *UNITS)


def _inputs(A, B=3, N=203, dtype=torch.float32, seed=0):
    """Decoder-like parts ~ N(0, 0.5) with what a trained decoder also gives: opacity deltas of exactly 0
    (a zero-initialised output layer), of ±8 logits, an attribute exactly zero in frame 0 (at its
    source), and Gaussian NO_MATERIAL with none at all (logit -800: total 0 whatever the deltas).
    N = 203: a partial tile of Gaussians at the end. Also the outputs' gradients, ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    opacity_logits = 1.5 * torch.randn(N, generator=gen, dtype=dtype)
    color_logits = torch.randn(N, 3, generator=gen, dtype=dtype)
    expression = 0.5 * torch.randn(B, N, 14, generator=gen, dtype=dtype)
    attributes = 0.5 * torch.randn(A, B, N, 14, generator=gen, dtype=dtype)
    attributes[:, :, ::7, 10] = 0
    attributes[:, :, 3::11, 10] = 8 / DELTA_UNITS["opacity"]
    attributes[:, :, 5::11, 10] = -8 / DELTA_UNITS["opacity"]
    if A >= 2:
        attributes[1, 0] = 0
    opacity_logits[NO_MATERIAL], expression[:, NO_MATERIAL, 10] = -800, 0
    attributes[:, :, NO_MATERIAL, 10] = -attributes[:, :, NO_MATERIAL, 10].abs()
    if A:
        attributes[0, :, NO_MATERIAL, 10] = 1.0  # a raise by 2 logits: from -800, it adds nothing either
    grads = [torch.randn(B, N, *shape, generator=gen, dtype=dtype) for shape in ((3,), (4,), (3,), (), (3,))]
    return (opacity_logits, color_logits, expression, attributes), grads


def _run(fn, inputs, grads, owned, needs=(True, True, True, True)):
    """-> the five outputs and the four inputs' gradients (None where not needed)."""
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, needs)]
    outputs = fn(*leaves, owned)
    torch.autograd.backward(outputs, grads)
    return (*(o.detach() for o in outputs), *(t.grad for t in leaves))


def _grid_inputs(limit):
    """Two attributes' opacity deltas over a grid from -24 to 24 logits at canonical logits from -limit
    to limit (saturated sigmoids, exp near its float32 limits); everything else as in _inputs."""
    (_, color_logits, expression, attributes), grads = _inputs(2, B=1, N=41 * 13 * 13, seed=2)
    logit = torch.linspace(-limit, limit, 41)
    step = torch.linspace(-24, 24, 13) / DELTA_UNITS["opacity"]
    grid = torch.cartesian_prod(logit, step, step)  # [N, 3]
    expression[..., 10] = 0
    attributes[:, 0, :, 10] = grid[:, 1:].T
    return (grid[:, 0].contiguous(), color_logits, expression, attributes), grads


def _compare(inputs, grads, owned):
    """Outputs and gradients against model.py's ops in float64: the kernel's float32 error within a
    few times torch's own float32 error on the same inputs (plus 1e-6 of each result's largest entry),
    and within 2e-5 of that entry (where torch's float32 loses more, the shares' gradients)."""
    got = _run(_kernel, inputs, grads, owned)
    want = _run(_reference, [t.double() for t in inputs], [g.double() for g in grads], owned)
    torch32 = _run(_reference, inputs, grads, owned)
    for name, k, r, t in zip(NAMES, got, want, torch32):
        if k.numel() == 0:  # no attribute: torch's unbind of none gives no gradient
            assert k.shape == inputs[3].shape, name
            continue
        assert k.dtype == torch.float32 and k.shape == r.shape, name
        err, own, scale = (k.double() - r).abs().max(), (t.double() - r).abs().max(), r.abs().max()
        assert err <= 4 * own + 1e-6 * scale and err <= 2e-5 * scale, \
            f"{name}: max error {err:.3g}, torch's float32 {own:.3g}, largest entry {scale:.3g}"
    return got


@pytest.mark.parametrize("owned", [True, False])
@pytest.mark.parametrize("A", [0, 1, 3])
def test_kernel_matches_torch(owned, A):
    inputs, grads = _inputs(A)
    got = _compare(inputs, grads, owned)
    if owned and A:  # no material: every share is 1, the parts' deltas are added whole
        d_mean = got[0][:, NO_MATERIAL]
        torch.testing.assert_close(d_mean, sum(inputs[3][:, :, NO_MATERIAL, :3], inputs[2][:, NO_MATERIAL, :3]))
        assert bool(torch.isfinite(torch.cat([g.flatten() for g in got[5:]])).all())


@pytest.mark.parametrize("owned, limit", [(False, 100), (True, 30)])
def test_kernel_matches_torch_over_the_whole_range(owned, limit):
    """Owned: where the material nears FLT_MIN, whether a share falls back to 1 is decided by
    float32's rounding, and float64 is no reference: material stays above 1e-34 there."""
    _compare(*_grid_inputs(limit), owned)


@pytest.mark.parametrize("owned", [True, False])
def test_kernel_gradcheck_float64(owned):
    inputs, _ = _inputs(2, B=2, N=6, dtype=torch.float64, seed=1)
    opacity_logits, color_logits, expression, attributes = inputs
    # finite differences need a smooth neighbourhood: no delta at exactly 0 (the kink)
    attributes[..., 10] = torch.where(attributes[..., 10] == 0, 0.2, attributes[..., 10])
    leaves = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *x: _kernel(*x, owned), leaves)


@pytest.mark.parametrize("owned", [True, False])
def test_an_attribute_at_its_source_changes_no_bit(owned):
    """Parts exactly zero (an attribute added later, at its source) appended or inserted: the same
    bits in every output and in every gradient of the other inputs, as in torch's order of sums."""
    inputs, grads = _inputs(3, N=1003)
    *rest, attributes = inputs
    base = _run(_kernel, inputs, grads, owned)
    zero = torch.zeros_like(attributes[:1])
    for at in (3, 1, 0):
        grown = torch.cat([attributes[:at], zero, attributes[at:]])
        got = _run(_kernel, (*rest, grown), grads, owned)
        for name, a, b in zip(NAMES[:-1], base, got):
            assert torch.equal(a, b), (at, name)
        assert torch.equal(torch.cat([got[-1][:at], got[-1][at + 1:]]), base[-1]), at


def test_owned_alone_is_the_union_exactly():
    """With every other attribute at exactly zero, an attribute's share is exactly 1: owned and union
    give the same bits."""
    inputs, grads = _inputs(3)
    attributes = inputs[3].clone()
    attributes[[0, 2]] = 0
    alone = (*inputs[:3], attributes)
    for a, b in zip(_run(_kernel, alone, grads, True)[:5], _run(_kernel, alone, grads, False)[:5]):
        assert torch.equal(a, b)


def test_only_needed_grads():
    """Frozen inputs get no gradient; the others are the same bits as with all inputs trained."""
    inputs, grads = _inputs(3)
    full = _run(_kernel, inputs, grads, True)
    for needs in ((True, False, False, False), (False, True, False, True), (False, False, True, False)):
        got = _run(_kernel, inputs, grads, True, needs)
        for need, a, b in zip(needs, got[5:], full[5:]):
            assert (a is None) if not need else torch.equal(a, b)


def test_deterministic_across_calls_and_threads():
    inputs, grads = _inputs(3, B=4, N=10007)
    first = _run(_kernel, inputs, grads, True)
    again = _run(_kernel, inputs, grads, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other = _run(_kernel, inputs, grads, True)
    finally:
        torch.set_num_threads(threads)
    for name, a, b, c in zip(NAMES, first, again, other):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_bad_inputs_raise():
    (ol, cl, e, p), _ = _inputs(2, N=9)
    with pytest.raises(TypeError, match="float32 or float64"):
        compose_parts(ol, cl, e, p.double(), True, *UNITS)
    with pytest.raises(RuntimeError, match="attributes must be"):
        compose_parts(ol, cl, e, p[:, :, :5], True, *UNITS)
    with pytest.raises(RuntimeError, match="expression must be"):
        compose_parts(ol, cl, e[..., :13], p, True, *UNITS)


@pytest.mark.parametrize("kernel,composition", [("compose", "owned"), ("compose", "union"), ("mlp", "owned")])
def test_the_decoder_on_the_kernels_decodes_as_on_torchs_ops(monkeypatch, kernel, composition):
    """AvatarModel.gaussians takes the kernels on the CPU (the branch MLP's, fused_mlp, and the union/owned
    composition's, fused_compose): Gaussians and every parameter's gradient as torch's ops give them,
    with branch regions and anchored attributes."""
    from perse_ray.avatar import fused_compose, fused_mlp
    from perse_ray.avatar import model as model_module
    from perse_ray.avatar.model import AvatarModel
    from perse_ray.config import load_config
    from perse_ray.train.loop import training_layout

    cfg = load_config("cpu", ["avatar.num_gaussians=300", f"avatar.attribute_composition={composition}"])
    layout = training_layout(cfg)
    model = AvatarModel(layout, cfg.avatar, seed=0)
    gen = torch.Generator().manual_seed(1)
    for p in model.decoder.parameters():  # a trained-like decoder, not the zero output layer
        p.data.normal_(0, 0.1, generator=gen)
    with torch.no_grad():
        model.opacity_logits.normal_(0, 1.5, generator=gen)
        model.color_logits.normal_(0, 1, generator=gen)
    model.branch_regions[0, ::3] = False  # the first attribute acts on two thirds of the Gaussians
    num_attributes = len(layout.attributes)
    selections = torch.tensor([[[k % 2, k % 2, 0.0]] * num_attributes for k in range(3)])
    selections[2, 0] = torch.tensor([0.0, 1.0, 0.4])  # a slider between two edits
    expression = torch.rand(3, layout.exp_dim, generator=gen)
    calls = []
    module, function, switch = {"compose": (fused_compose, "compose_parts", "_fused_compose_here"),
                                "mlp": (fused_mlp, "silu_mlp", "_fused_here")}[kernel]
    original = getattr(module, function)
    monkeypatch.setattr(module, function, lambda *args: calls.append(1) or original(*args))

    def decode():
        model.zero_grad(set_to_none=True)
        g = model.gaussians(model.compose(expression, selections), attribute_l1=True)
        sum((v * torch.linspace(0.5, 1.5, v.numel()).reshape(v.shape)).sum() for v in g.values()).backward()
        return g, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    fused_g, fused_grads = decode()
    assert calls
    made = len(calls)
    monkeypatch.setattr(model_module, switch, lambda *args: False)
    torch_g, torch_grads = decode()
    assert len(calls) == made
    assert fused_grads.keys() == torch_grads.keys() and {"opacity_logits", "decoder.w_out"} <= fused_grads.keys()
    for k in torch_g:
        torch.testing.assert_close(fused_g[k], torch_g[k], rtol=1e-5, atol=1e-6)
    for k in torch_grads:  # sums over many Gaussians: float32 rounding relative to the largest entry
        scale = float(torch_grads[k].abs().max())
        torch.testing.assert_close(fused_grads[k], torch_grads[k], rtol=1e-4, atol=1e-5 * scale)
