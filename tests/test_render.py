"""perse_ray.render: exactness against an independent per-pixel loop, gradients, errors.

The first test that touches backend="cpu" compiles the extension (~40 s once per
machine; cached afterwards).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perse_ray.render import rasterize

# ---------------------------------------------------------------------------
# Independent reference: plain float64 numpy, one Gaussian and one pixel at a
# time, written from the gsplat 1.5.3 rules.
# ---------------------------------------------------------------------------


def _rotmat(q):
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _project_one(p, q, s, o, view, K, width, height, near, far, eps2d):
    """-> (mean2d, conic, depth, (rx, ry)) or None when culled."""
    mc = view[:3, :3] @ p + view[:3, 3]
    x, y, z = mc
    if z < near or z > far:
        return None
    R = _rotmat(q)
    cov3 = R @ np.diag(s**2) @ R.T
    cov_c = view[:3, :3] @ cov3 @ view[:3, :3].T
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx = z * min((width - cx) / fx + 0.3 * tan_x, max(-(cx / fx + 0.3 * tan_x), x / z))
    ty = z * min((height - cy) / fy + 0.3 * tan_y, max(-(cy / fy + 0.3 * tan_y), y / z))
    J = np.array([[fx / z, 0, -fx * tx / z**2], [0, fy / z, -fy * ty / z**2]])
    cov2 = J @ cov_c @ J.T + eps2d * np.eye(2)
    if np.linalg.det(cov2) <= 0 or o < 1 / 255:
        return None
    mean2d = np.array([fx * x / z + cx, fy * y / z + cy])
    extend = min(3.33, math.sqrt(2 * math.log(o * 255)))
    rx = math.ceil(extend * math.sqrt(cov2[0, 0]))
    ry = math.ceil(extend * math.sqrt(cov2[1, 1]))
    if mean2d[0] + rx <= 0 or mean2d[0] - rx >= width or mean2d[1] + ry <= 0 or mean2d[1] - ry >= height:
        return None
    inv = np.linalg.inv(cov2)
    return mean2d, np.array([inv[0, 0], inv[0, 1], inv[1, 1]]), z, (rx, ry)


def reference_render(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                     backgrounds=None, near=0.01, far=1e10, eps2d=0.3):
    """One batch element: means [N, 3], colors [N, D] or [C, N, D], viewmats [C, 4, 4].

    Returns colors [C, H, W, D], alphas [C, H, W, 1], radii [C, N, 2] and the
    number of pixels that stopped early at the transmittance threshold.
    """
    a = lambda t: None if t is None else t.detach().cpu().double().numpy()  # noqa: E731
    means, quats, scales, opacities, colors, viewmats, Ks, backgrounds = map(
        a, (means, quats, scales, opacities, colors, viewmats, Ks, backgrounds))
    C, N, D = viewmats.shape[0], means.shape[0], colors.shape[-1]
    out = np.zeros((C, height, width, D))
    out_alpha = np.zeros((C, height, width, 1))
    radii = np.zeros((C, N, 2), dtype=np.int64)
    stopped = 0
    for c in range(C):
        cols = colors[c] if colors.ndim == 3 else colors
        proj = {}
        for n in range(N):
            r = _project_one(means[n], quats[n], scales[n], opacities[n], viewmats[c], Ks[c],
                             width, height, near, far, eps2d)
            if r is not None:
                proj[n] = r
                radii[c, n] = r[3]
        order = sorted(proj, key=lambda n: (proj[n][2], n))
        # tiles [x0, x1) x [y0, y1) touched by the radius box; pixels only see
        # Gaussians listed for their 16x16 tile
        tiles = {}
        for n in order:
            (mx, my), _, _, (rx, ry) = proj[n]
            tiles[n] = (
                min(max(0, math.floor((mx - rx) / 16)), math.ceil(width / 16)),
                min(max(0, math.ceil((mx + rx) / 16)), math.ceil(width / 16)),
                min(max(0, math.floor((my - ry) / 16)), math.ceil(height / 16)),
                min(max(0, math.ceil((my + ry) / 16)), math.ceil(height / 16)),
            )
        for i in range(height):
            for j in range(width):
                T, acc = 1.0, np.zeros(D)
                for n in order:
                    x0, x1, y0, y1 = tiles[n]
                    if not (x0 <= j // 16 < x1 and y0 <= i // 16 < y1):
                        continue
                    (mx, my), (ca, cb, cc), _, _ = proj[n]
                    dx, dy = mx - (j + 0.5), my - (i + 0.5)
                    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                    alpha = min(0.999, opacities[n] * math.exp(-sigma))
                    if sigma < 0 or alpha < 1 / 255:
                        continue
                    if T * (1 - alpha) <= 1e-4:
                        stopped += 1
                        break
                    acc += alpha * T * cols[n]
                    T *= 1 - alpha
                out[c, i, j] = acc + (T * backgrounds[c] if backgrounds is not None else 0)
                out_alpha[c, i, j, 0] = 1 - T
    return out, out_alpha, radii, stopped


# ---------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------


def look_at(eye, target=(0.0, 0.0, 2.0)) -> torch.Tensor:
    """World-to-camera matrix (OpenCV axes: x right, y down, z forward)."""
    eye, target = torch.tensor(eye, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    fwd = target - eye
    fwd = fwd / fwd.norm()
    right = torch.linalg.cross(fwd, torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    down = torch.linalg.cross(fwd, right)
    R = torch.stack([right, down, fwd])
    view = torch.eye(4, dtype=torch.float64)
    view[:3, :3] = R
    view[:3, 3] = -R @ eye
    return view


def intrinsics(width, height, fov_deg=40.0, shift=(0.0, 0.0)) -> torch.Tensor:
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0, width / 2 + shift[0]], [0, f * 1.05, height / 2 + shift[1]], [0, 0, 1]],
                        dtype=torch.float64)


def make_scene(seed, n, width, height, n_cams=2, batch=None, channels=3, per_camera_colors=False,
               background=True, spread=1.0):
    """Random Gaussians around (0, 0, 2) with the awkward cases mixed in."""
    g = torch.Generator().manual_seed(seed)
    bdims = () if batch is None else (batch,)
    f64 = dict(dtype=torch.float64)
    means = torch.randn(*bdims, n, 3, generator=g, **f64) * torch.tensor([0.5, 0.35, 0.4], **f64) * spread
    means[..., 2] += 2.0
    quats = torch.randn(*bdims, n, 4, generator=g, **f64) * 2
    scales = torch.exp(torch.randn(*bdims, n, 3, generator=g, **f64) * 0.5 - 3.5)
    opacities = torch.rand(*bdims, n, generator=g, **f64)
    # behind the camera, beyond the view cone, tiny, huge, nearly opaque, invisible
    means[..., 0, :] = torch.tensor([0.1, 0.0, -1.0], **f64)
    means[..., 1, :] = torch.tensor([3.0, 0.2, 2.0], **f64)
    means[..., 2, :] = torch.tensor([1.5, -0.1, 2.0], **f64)  # x/z clamped, still overlaps
    scales[..., 2, :] = torch.tensor([0.6, 0.3, 0.2], **f64)
    opacities[..., 2] = 0.8
    scales[..., 3, :] = 1e-5
    scales[..., 4, :] = torch.tensor([1.5, 0.8, 0.4], **f64)
    opacities[..., 4] = 0.3
    opacities[..., 5:9] = torch.tensor([1.0, 0.9995, 0.999, 0.003], **f64)
    # a stack of opaque Gaussians so some pixels reach T <= 1e-4
    means[..., 9:14, :] = torch.tensor([0.0, 0.0, 1.9], **f64) + 0.01 * torch.arange(5, **f64)[:, None]
    scales[..., 9:14, :] = 0.08
    opacities[..., 9:14] = 0.98
    cshape = (*bdims, n_cams, n, channels) if per_camera_colors else (*bdims, n, channels)
    colors = torch.rand(*cshape, generator=g, **f64)
    eyes = [(0.0, 0.0, 0.0), (0.6, -0.3, 0.2), (-0.5, 0.2, -0.1)]
    shifts = [(0.0, 0.0), (3.0, -2.0), (-4.0, 1.5)]
    viewmats = torch.stack([look_at(eyes[c]) for c in range(n_cams)])
    Ks = torch.stack([intrinsics(width, height, 40 + 5 * c, shifts[c]) for c in range(n_cams)])
    viewmats = viewmats.expand(*bdims, n_cams, 4, 4).clone()
    Ks = Ks.expand(*bdims, n_cams, 3, 3).clone()
    bg = torch.rand(*bdims, n_cams, channels, generator=g, **f64) if background else None
    return dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                viewmats=viewmats, Ks=Ks, width=width, height=height, backgrounds=bg)


def cast(scene, dtype):
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in scene.items()}


def render(scene, backend, **kw):
    s = dict(scene)
    pos = [s.pop(k) for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks",
                              "width", "height")]
    return rasterize(*pos, backend=backend, **s, **kw)


SCENES = {
    "odd_size_2cams": dict(seed=0, n=60, width=37, height=23),
    "multi_tile_3cams": dict(seed=1, n=120, width=50, height=41, n_cams=3),
    "batch_per_camera_colors_d5": dict(seed=2, n=40, width=29, height=34, batch=2, channels=5,
                                       per_camera_colors=True),
    "single_channel_no_background": dict(seed=3, n=80, width=33, height=18, channels=1,
                                         background=False),
    "dense_one_cam": dict(seed=4, n=400, width=48, height=40, n_cams=1, spread=0.3),
}


@pytest.fixture(scope="module", params=list(SCENES))
def scene_and_reference(request):
    scene = make_scene(**SCENES[request.param])
    batch = scene["means"].shape[:-2]
    refs = []
    for idx in np.ndindex(*batch):
        el = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in scene.items()}
        refs.append(reference_render(**el))
    colors = np.stack([r[0] for r in refs]).reshape(*batch, *refs[0][0].shape)
    alphas = np.stack([r[1] for r in refs]).reshape(*batch, *refs[0][1].shape)
    radii = np.stack([r[2] for r in refs]).reshape(*batch, *refs[0][2].shape)
    return scene, (colors, alphas, radii, sum(r[3] for r in refs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_matches_per_pixel_reference(scene_and_reference, backend, dtype):
    scene, (ref_colors, ref_alphas, ref_radii, _) = scene_and_reference
    colors, alphas, meta = render(cast(scene, dtype), backend)
    assert colors.dtype == dtype and alphas.dtype == dtype
    assert colors.shape == ref_colors.shape and alphas.shape == ref_alphas.shape
    np.testing.assert_allclose(colors.double().numpy(), ref_colors, rtol=0, atol=1e-4)
    np.testing.assert_allclose(alphas.double().numpy(), ref_alphas, rtol=0, atol=1e-4)
    if dtype == torch.float64:
        # a radius is a ceil(), so only float64 is expected to agree exactly
        np.testing.assert_array_equal(meta["radii"].numpy(), ref_radii)
    assert meta["backend"] == backend


def test_scene_covers_the_special_cases(scene_and_reference):
    """Guards the scenes above against silently losing what they are meant to test."""
    _, (_, _, ref_radii, n_stopped) = scene_and_reference
    assert (ref_radii[..., 0, :] == 0).all()  # behind the camera
    assert (ref_radii[..., 8, :] == 0).all()  # opacity below 1/255
    assert (ref_radii[..., 0, 2, :] > 0).all()  # clamped Jacobian in camera 0, still visible
    assert n_stopped > 0  # some pixels hit the transmittance threshold


def test_meta_and_backends_agree():
    scene = make_scene(seed=5, n=50, width=40, height=30)
    c1, a1, m1 = render(scene, "cpu")
    c2, a2, m2 = render(scene, "torch")
    for key in ("radii", "means2d", "depths", "conics", "opacities"):
        assert m1[key].shape == m2[key].shape
        torch.testing.assert_close(m1[key], m2[key], rtol=1e-10, atol=1e-10)
    assert m1["radii"].dtype == torch.int32 and m1["radii"].shape == (2, 50, 2)
    assert (m1["width"], m1["height"]) == (40, 30)
    _, _, m_auto = render(scene, "auto")
    assert m_auto["backend"] == "cpu"


def test_batch_equals_separate_renders():
    scene = make_scene(seed=6, n=40, width=24, height=20, batch=3, per_camera_colors=True)
    colors, alphas, _ = render(scene, "cpu")
    for b in range(3):
        el = {k: (v[b] if isinstance(v, torch.Tensor) else v) for k, v in scene.items()}
        cb, ab, _ = render(el, "cpu")
        torch.testing.assert_close(colors[b], cb, rtol=0, atol=1e-12)
        torch.testing.assert_close(alphas[b], ab, rtol=0, atol=1e-12)


def test_shared_colors_equal_per_camera_colors():
    scene = make_scene(seed=7, n=40, width=24, height=20, n_cams=3)
    per_cam = dict(scene, colors=scene["colors"].expand(3, -1, -1).clone())
    torch.testing.assert_close(render(scene, "cpu")[0], render(per_cam, "cpu")[0], rtol=0, atol=0)


def test_thread_count_does_not_change_results():
    # large enough for the kernel to split projection and tiles across threads
    scene = cast(make_scene(seed=8, n=12000, width=128, height=96, spread=0.5), torch.float32)
    params = {k: v.requires_grad_(True) for k, v in scene.items() if k in ("means", "opacities")}
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            colors, alphas, _ = render(scene, "cpu")
            grads = torch.autograd.grad(colors.square().sum() + alphas.sum(), list(params.values()))
            results.append((colors, alphas, *grads))
    finally:
        torch.set_num_threads(previous)
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------

DIFF_ARGS = ("means", "quats", "scales", "opacities", "colors", "viewmats", "backgrounds")


def test_gradcheck_cpu_backend():
    scene = make_scene(seed=11, n=16, width=9, height=7)
    # keep the opaque stack out: gradcheck needs the function smooth around
    # the point, and the nearly-opaque ones sit on the 0.999 clamp
    keep = [n for n in range(16) if not 5 <= n < 14]
    for k in ("means", "quats", "scales", "opacities", "colors"):
        scene[k] = scene[k][keep].contiguous()
    names = list(DIFF_ARGS)
    fixed = {k: v for k, v in scene.items() if k not in names}

    def fn(*tensors):
        colors, alphas, _ = render(dict(fixed, **dict(zip(names, tensors))), "cpu")
        return colors, alphas

    inputs = [scene[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def _grads(scene, backend, seed=0):
    scene = dict(scene)
    leaves = {k: scene[k].clone().requires_grad_(True) for k in DIFF_ARGS}
    scene.update(leaves)
    colors, alphas, _ = render(scene, backend)
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(colors.shape, generator=g, dtype=torch.float64).to(colors.dtype)
    loss = (colors * weights).sum() + alphas.square().sum()
    return dict(zip(DIFF_ARGS, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_gradients_match_torch_autograd(dtype):
    scene = cast(make_scene(seed=12, n=300, width=48, height=40, n_cams=2, batch=2), dtype)
    g_cpu, g_ref = _grads(scene, "cpu"), _grads(scene, "torch")
    # float64: both are exact, they differ only in summation order and in
    # recovering T by division (cpu, as gsplat) versus cumprod (autograd).
    # float32: the same differences at single precision; T is recovered through
    # up to hundreds of divisions, so errors are relative to each tensor's scale.
    rel = 1e-9 if dtype == torch.float64 else 2e-3
    for name in DIFF_ARGS:
        a, b = g_cpu[name], g_ref[name]
        assert a.shape == b.shape
        scale = b.abs().max().item()
        assert scale > 0, name
        err = (a - b).abs().max().item()
        assert err <= rel * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def test_alpha_only_loss_backward():
    scene = make_scene(seed=13, n=50, width=30, height=20)
    means = scene["means"].clone().requires_grad_(True)
    _, alphas, _ = render(dict(scene, means=means), "cpu")
    (g_cpu,) = torch.autograd.grad(alphas.sum(), means)
    means_ref = scene["means"].clone().requires_grad_(True)
    _, alphas_ref, _ = render(dict(scene, means=means_ref), "torch")
    (g_ref,) = torch.autograd.grad(alphas_ref.sum(), means_ref)
    torch.testing.assert_close(g_cpu, g_ref, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.fixture
def small_scene():
    return make_scene(seed=20, n=16, width=16, height=16)


def test_unknown_backend_names_choices(small_scene):
    with pytest.raises(ValueError, match="cpu.*torch.*gsplat"):
        render(small_scene, "opengl")


def test_gsplat_backend_rejects_cpu_tensors(small_scene):
    with pytest.raises(ValueError, match="CUDA"):
        render(small_scene, "gsplat")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("means", torch.zeros(16, 2, dtype=torch.float64), "means"),
        ("quats", torch.zeros(16, 3, dtype=torch.float64), "quats"),
        ("scales", torch.zeros(15, 3, dtype=torch.float64), "scales"),
        ("opacities", torch.zeros(16, 1, dtype=torch.float64), "opacities"),
        ("colors", torch.zeros(17, 3, dtype=torch.float64), "colors"),
        ("viewmats", torch.zeros(2, 3, 4, dtype=torch.float64), "viewmats"),
        ("Ks", torch.zeros(3, 3, 3, dtype=torch.float64), "Ks"),
        ("backgrounds", torch.zeros(2, 4, dtype=torch.float64), "backgrounds"),
        ("width", 0, "width"),
        ("height", 12.5, "height"),
    ],
)
def test_bad_shapes_raise(small_scene, key, value, match):
    with pytest.raises(ValueError, match=match):
        render(dict(small_scene, **{key: value}), "cpu")


def test_bad_dtypes_raise(small_scene):
    with pytest.raises(TypeError, match="float32 or float64"):
        render(dict(small_scene, opacities=small_scene["opacities"].half()), "cpu")
    with pytest.raises(TypeError, match="dtype"):
        render(dict(small_scene, colors=small_scene["colors"].float()), "cpu")


def test_missing_avx2_fails_loudly(monkeypatch):
    from perse_ray.render import _ext

    monkeypatch.setattr(_ext, "cpu_supports_avx2", lambda: False)
    with pytest.raises(RuntimeError, match="AVX2"):
        _ext.load.__wrapped__()


def test_build_failure_reports_compiler_output(monkeypatch, tmp_path):
    from perse_ray.render import _ext

    broken = tmp_path / "broken.cpp"
    broken.write_text("#error the compiler says no\n")
    monkeypatch.setattr(_ext, "SOURCE", broken)
    monkeypatch.setenv("PERSE_RAY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="the compiler says no"):
        _ext.load.__wrapped__()
    assert (tmp_path / "cache" / "torch_extensions").is_dir()


# ---------------------------------------------------------------------------
# The GPU parity scenes (tests/test_render_gpu.py) hit the special cases
# ---------------------------------------------------------------------------


def _walk_pixel(meta, colors, background, x, y):
    """One pixel composited in float64 from the CPU backend's projection of one image (meta
    entries [N, ...]), by gsplat's rules. -> (colour [D], alpha, indices clamped to 0.999, stopped)."""
    from perse_ray.render import _reference as ref

    m2, conics, radii = meta["means2d"].double(), meta["conics"].double(), meta["radii"]
    opac, depths = meta["opacities"].double(), meta["depths"]
    visible = (radii > 0).all(-1).nonzero()[:, 0]
    visible = visible[torch.sort(depths[visible], stable=True).indices]
    width, height = meta["width"], meta["height"]
    ranges = ref.tile_ranges(m2[visible], radii[visible], math.ceil(width / 16), math.ceil(height / 16))
    tx, ty = x // 16, y // 16
    hit = (ranges[:, 0] <= tx) & (tx < ranges[:, 2]) & (ranges[:, 1] <= ty) & (ty < ranges[:, 3])
    T, acc, clamped, stopped = 1.0, np.zeros(colors.shape[-1]), [], False
    for n in visible[hit].tolist():
        dx, dy = m2[n, 0].item() - (x + 0.5), m2[n, 1].item() - (y + 0.5)
        a, b, c = conics[n].tolist()
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        raw = opac[n].item() * math.exp(-sigma)
        alpha = min(ref.ALPHA_MAX, raw)
        if sigma < 0 or alpha < ref.ALPHA_MIN:
            continue
        if T * (1 - alpha) <= ref.TRANSMITTANCE_MIN:
            stopped = True
            break
        if raw >= ref.ALPHA_MAX:
            clamped.append(n)
        acc += alpha * T * colors[n].double().numpy()
        T *= 1 - alpha
    if background is not None:
        acc = acc + T * background.double().numpy()
    return acc, 1 - T, clamped, stopped


def _gpu_scene_names():
    import test_render_gpu

    return list(test_render_gpu.SCENES)


@pytest.mark.parametrize("name", _gpu_scene_names())
def test_gpu_parity_scenes_hit_the_special_cases(name):
    """gsplat cannot run here; its parity scenes can. Each must still contain what it is meant to
    test: culled Gaussians, a clamped Jacobian, alphas on the 0.999 clamp, a transmittance stop."""
    import test_render_gpu as gpu

    scene = gpu.make_scene(**gpu.SCENES[name])
    colors, alphas, meta = gpu.render(scene, "cpu")
    width, height = scene["width"], scene["height"]
    nb, C = scene["means"].dim() - 2, scene["viewmats"].shape[-3]  # batch dims, cameras

    def images(t):  # [*batch, C, ...] -> [images, C, ...]
        return t.reshape(-1, C, *t.shape[nb + 1:])

    m = {k: images(meta[k]) for k in ("means2d", "conics", "radii", "opacities", "depths")}
    assert (m["radii"][:, :, list(gpu.CULLED)] == 0).all()
    K = images(scene["Ks"])[:, 0]
    fx, cx = K[:, 0, 0], K[:, 0, 2]
    x_over_z = (m["means2d"][:, 0, gpu.CLAMPED_JACOBIAN, 0] - cx) / fx
    limit = (width - cx) / fx + 0.3 * 0.5 * width / fx  # gsplat's lim_x_pos
    assert (x_over_z > limit).all() and (m["radii"][:, 0, gpu.CLAMPED_JACOBIAN] > 0).all()

    n_images = m["depths"].shape[0]
    cols = scene["colors"].reshape(-1, *scene["colors"].shape[-2:]).expand(n_images, -1, -1)
    bgs = None if scene["backgrounds"] is None else images(scene["backgrounds"])
    image_colors, image_alphas = images(colors), images(alphas)
    for i in range(n_images):
        for c in range(C):
            one = {k: v[i, c] for k, v in m.items()} | {"width": width, "height": height}

            def walk(index):
                x, y = (int(v) for v in gpu.centre_pixel(one, index).tolist())
                assert 0 <= x < width and 0 <= y < height, f"Gaussian {index} is off camera {c}"
                out = _walk_pixel(one, cols[i], None if bgs is None else bgs[i, c], x, y)
                # The walk must be the kernel's arithmetic: check it against the rendered pixel.
                np.testing.assert_allclose(out[0], image_colors[i, c, y, x].double().numpy(), atol=1e-5)
                assert out[1] == pytest.approx(image_alphas[i, c, y, x, 0].item(), abs=1e-5)
                return out

            assert walk(gpu.STACK[0])[3], f"camera {c}: the stack's pixel does not reach T <= 1e-4"
            if c == 0:
                for index, opacity in zip(gpu.OPAQUE[:2], (1.0, 0.9995)):
                    assert index in walk(index)[2], f"opacity {opacity} is not clamped to 0.999"
