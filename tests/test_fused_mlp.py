"""perse_ray.avatar.fused_mlp: the compiled silu(g + zp) @ w + b against torch, its gradients,
determinism and row independence.

The first test compiles the extension (~20-60 s once per machine; cached afterwards).
"""

from __future__ import annotations

import pytest
import torch

from perse_ray import cpp_ext
from perse_ray.avatar.fused_mlp import silu_mlp

# Only the CPU may skip these: a kernel that fails to build must fail them, not skip them.
pytestmark = pytest.mark.skipif(not cpp_ext.cpu_supports_avx2(), reason="needs a CPU with AVX2 and FMA")


def _inputs(n, U, H, C, dtype=torch.float32, seed=0):
    """Realistic magnitudes: g, zp ~ N(0, 1) (pre-activations), w, b ~ N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, H, generator=gen, dtype=dtype)
    zp = torch.randn(U, H, generator=gen, dtype=dtype)
    w = torch.randn(H, C, generator=gen, dtype=dtype) * 0.1
    b = torch.randn(C, generator=gen, dtype=dtype) * 0.1
    grad_out = torch.randn(U, n, C, generator=gen, dtype=dtype)
    return g, zp, w, b, grad_out


def _reference(g, zp, w, b):
    return torch.nn.functional.silu(g[None] + zp[:, None]) @ w + b


def _run(fn, g, zp, w, b, grad_out):
    """-> (out, grad_g, grad_zp, grad_w, grad_b) of fn with every input requiring grad."""
    leaves = [t.detach().clone().requires_grad_() for t in (g, zp, w, b)]
    out = fn(*leaves)
    out.backward(grad_out)
    return (out.detach(), *(t.grad for t in leaves))


def _magnitudes(g, zp, w, b, grad_out):
    """Each result's sum of absolute terms (float64): what a float32 sum's rounding scales with."""
    w, b, go = (t.double().abs() for t in (w, b, grad_out))
    pre = g.double()[None] + zp.double()[:, None]
    s = torch.sigmoid(pre)
    h = (pre * s).abs()
    dpre = (go @ w.T) * (s + h * (1 - s))  # silu' = s + h (1 - s), its terms' magnitudes
    return (h @ w + b, dpre.sum(0), dpre.sum(1),
            h.flatten(0, 1).T @ go.flatten(0, 1), go.sum((0, 1)))


NAMES = ("out", "grad_g", "grad_zp", "grad_w", "grad_b")


# n around the 8-lane, 6-row and 32-row tails and the 256-Gaussian blocks; (64, 20): two channel
# chunks, the second partial; (12, 14): H not a multiple of 8, the kernel's scalar float path.
# The large n only at the decoder's shape.
SHAPES = [(n, U, H, C) for n in (1, 7, 8, 9, 1000, 10007) for U in (1, 3, 5)
          for H, C in ((64, 14), (32, 3), (64, 20), (12, 14)) if n < 10007 or (H, C) == (64, 14)]


@pytest.mark.parametrize("n, U, H, C", SHAPES)
def test_fused_matches_torch(n, U, H, C):
    """Forward and all four gradients against torch's autograd in float64, to 1e-5 relative plus
    1e-6 of each entry's sum of absolute terms (torch's own float32 stays within a fifth of it)."""
    inputs = _inputs(n, U, H, C)
    got = _run(silu_mlp, *inputs)
    want = _run(_reference, *(t.double() for t in inputs))
    for name, a, r, m in zip(NAMES, got, want, _magnitudes(*inputs)):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        err = (a.double() - r).abs()
        bound = 1e-5 * r.abs() + 1e-6 * m
        assert bool((err <= bound).all()), \
            f"{name}: max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


@pytest.mark.parametrize("H", [64, 12])
def test_fused_silu_accurate_to_a_few_ulp(H):
    """With w = I the output is silu itself and grad_g is silu': both within a few float32 ulp of
    float64 over [-20, 20] (the kernel's own exp must be ~1e-7 accurate; sums above would hide it)."""
    x = torch.linspace(-20, 20, 4001)
    g = torch.cat([x, x.new_zeros(-len(x) % H)]).view(-1, H)
    zp, w, b = torch.zeros(1, H), torch.eye(H), torch.zeros(H)
    g_ = g.clone().requires_grad_()
    out = silu_mlp(g_, zp, w, b)
    out.backward(torch.ones_like(out))
    x64 = g.double()
    s = torch.sigmoid(x64)
    h, ds = x64 * s, s + x64 * s * (1 - s)
    assert bool(((out[0].double() - h).abs() <= 4e-7 * h.abs() + 1e-30).all())
    # silu' = s + h (1 - s): relative to its terms (it cancels near x = -1.28), plus s's own
    # rounding near 1, which 1 - s turns into ~1e-7 x absolute
    bound = 6e-7 * (s + h.abs() * (1 - s)) + 1.2e-7 * x64.abs() * s
    assert bool(((g_.grad.double() - ds).abs() <= bound).all())


def test_fused_gradcheck_float64():
    g, zp, w, b, _ = _inputs(11, 3, 5, 4, dtype=torch.float64, seed=1)
    leaves = [t.requires_grad_() for t in (g, zp, w, b)]
    assert torch.autograd.gradcheck(silu_mlp, leaves)


def test_fused_only_needed_grads():
    """Frozen inputs get no gradient; the others are unchanged by what is frozen."""
    g, zp, w, b, go = _inputs(300, 2, 64, 14)
    full = _run(silu_mlp, g, zp, w, b, go)
    zp_, w_ = zp.clone().requires_grad_(), w.clone().requires_grad_()
    silu_mlp(g, zp_, w_, b).backward(go)
    assert torch.equal(zp_.grad, full[2]) and torch.equal(w_.grad, full[3])
    g_ = g.clone().requires_grad_()
    silu_mlp(g_, zp, w, b).backward(go)
    assert torch.equal(g_.grad, full[1])


def test_fused_non_contiguous_and_empty_inputs():
    g, zp, w, b, go = _inputs(50, 2, 64, 14)
    wide = torch.cat([g, g], 1)[:, :64]  # a strided view
    assert not wide.is_contiguous()
    assert torch.equal(silu_mlp(wide, zp, w, b), silu_mlp(g, zp, w, b))
    for n, U in ((0, 2), (5, 0)):
        got = _run(silu_mlp, g[:n], zp[:U], w, b, go[:U, :n])
        want = _run(_reference, g[:n], zp[:U], w, b, go[:U, :n])
        for name, a, r in zip(NAMES, got, want):
            torch.testing.assert_close(a, r, msg=name)


def test_fused_bad_inputs_raise():
    g, zp, w, b, _ = _inputs(5, 2, 8, 3)
    with pytest.raises(TypeError, match="float32 or float64"):
        silu_mlp(g, zp.double(), w, b)
    with pytest.raises(TypeError, match="float32 or float64"):
        silu_mlp(g.half(), zp.half(), w.half(), b.half())
    with pytest.raises(RuntimeError, match="disagree on H"):
        silu_mlp(g, zp[:, :4], w, b)
    with pytest.raises(RuntimeError, match="b must have 3"):
        silu_mlp(g, zp, w, b[:2])


@pytest.mark.parametrize("H", [64, 12])
def test_fused_deterministic_across_calls_and_threads(H):
    """The same bits on every call, and for 1 or 2 threads (reductions go by fixed blocks)."""
    inputs = _inputs(10007, 3, H, 14)
    first = _run(silu_mlp, *inputs)
    again = _run(silu_mlp, *inputs)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other = _run(silu_mlp, *inputs)
    finally:
        torch.set_num_threads(threads)
    for name, a, b, c in zip(NAMES, first, again, other):
        assert torch.equal(a, b), name
        assert torch.equal(a, c), name


@pytest.mark.parametrize("n, H", [(10007, 64), (9, 64), (300, 12)])
def test_fused_row_independent_of_other_rows(n, H):
    """Row u's output is the same bits computed alone (U = 1) or among U = 4 rows."""
    g, zp, w, b, _ = _inputs(n, 4, H, 14)
    together = silu_mlp(g, zp, w, b)
    for u in range(4):
        assert torch.equal(silu_mlp(g, zp[u:u + 1], w, b)[0], together[u]), u

