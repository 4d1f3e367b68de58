"""The web bundle: format, validation, and the browser's decoder (run under Node) against the model.

The JavaScript decoder (serve/web/bundle.js) is a second implementation of ``AvatarModel.gaussians``
written against the model's public state; these tests fail as soon as the two disagree, e.g. after
a change to the model's decoder that the bundle does not carry. Third-party readers (plyfile and
@playcanvas/splat-transform from npm) check the .ply exports.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from perse_ray.avatar import Avatar, AvatarModel, LatentLayout, export_ply
from perse_ray.avatar.bundle import (BUNDLE_VERSION, BundleError, decode_bundle, decode_gaussians, encode_bundle,
                                     latent)
from perse_ray.avatar.extend import random_latents
from perse_ray.avatar.layout import AttributeLayout
from perse_ray.config import load_config

REPO = Path(__file__).resolve().parent.parent
BUNDLE_JS = REPO / "serve" / "web" / "bundle.js"
NODE = shutil.which("node")
SPLAT_TRANSFORM = REPO / "node_modules" / ".bin" / "splat-transform"
CAMERA = {"fov_deg": 30.0, "distance": 0.65}
EXPRESSION_RANGE = (-1.0, 2.0)  # beyond the trained range too: the decoders must agree on any latent
KEYS = ("means", "quats", "scales", "opacities", "colors")


def _need(path_or_none, what: str):
    if path_or_none is None or not Path(path_or_none).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing in CI (.ci/run installs nodejs; make runs npm ci)")
        pytest.skip(f"needs {what}")


def _model(num_gaussians=300, hidden_layers=2, expressions=True, seed=0, anchored=False,
           composition="sum", dominance=0.0) -> AvatarModel:
    """A model with random (not zero) decoder outputs, so every branch moves every parameter in its region;
    ``anchored``: with a level and an attribute added after training (``grow_level``, ``grow_attribute``):
    a residual branch and an anchored one. ``composition``, ``dominance``: avatar.attribute_composition and
    avatar.color_dominance."""
    from perse_ray.avatar.extend import grow_attribute, grow_level

    cfg = load_config("cpu-smoke", [f"avatar.num_gaussians={num_gaussians}",
                                    f"avatar.hidden_layers={hidden_layers}", "avatar.code_dim=4",
                                    f"avatar.attribute_composition={composition}",
                                    f"avatar.color_dominance={dominance}"])
    layout = LatentLayout.from_config(cfg.synth, 4)
    if not expressions:
        layout = LatentLayout([], layout.attributes)
    model = AvatarModel(layout, cfg.avatar, seed=seed)
    if anchored:
        model, _ = grow_level(model, model.layout.attributes[0].name, "teal", seed=seed)
        model, _ = grow_attribute(model, "skin", ["tan", "pale"], seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for code in model.codes.values():
            code.copy_(torch.randn(code.shape, generator=g))
        model.color_logits.copy_(torch.randn(model.color_logits.shape, generator=g))
        # Attribute branches restricted to random regions, as training restricts them to edit masks.
        model.set_branch_regions(torch.rand(model.branch_regions.shape, generator=g) < 0.6)
    return model.eval()


def _reference(model: AvatarModel, attrs: dict, expr: dict) -> dict[str, np.ndarray]:
    z = Avatar(model, {"camera": CAMERA}).latent(attrs, expr)
    with torch.no_grad():
        g = model.gaussians(z[None])
    return {k: v[0].numpy() for k, v in g.items()}


def _max_errors(got: dict, ref: dict) -> dict[str, float]:
    return {k: float(np.abs(np.asarray(got[k], np.float64).reshape(ref[k].shape) - ref[k]).max()) for k in KEYS}


def _with_source_slider(model: AvatarModel, cases: list) -> list:
    """``cases`` plus, for an anchored attribute, the same latents with its slider at the source."""
    anchored = [a.name for a in model.layout.attributes if a.anchored]
    return cases + [({**attrs, name: 0.0}, expr) for attrs, expr in cases[:5] for name in anchored]


# (hidden layers, expressions, anchored branches, attribute composition, colour dominance)
DECODE_CASES = [(1, True, False, "sum", 0.0), (2, False, False, "sum", 0.0), (1, True, True, "sum", 0.0),
                (1, True, True, "union", 0.0), (2, False, False, "union", 2.0), (1, True, True, "owned", 0.0),
                (2, False, False, "owned", 2.0)]


@pytest.mark.parametrize("hidden_layers,expressions,anchored,composition,dominance", DECODE_CASES)
def test_numpy_decode_of_the_bundle_matches_the_model(hidden_layers, expressions, anchored, composition, dominance):
    model = _model(hidden_layers=hidden_layers, expressions=expressions, anchored=anchored, composition=composition,
                   dominance=dominance)
    bundle = decode_bundle(encode_bundle(model, CAMERA, avatar_id="ada", version="v0001"))
    assert bundle.header["avatar"] == {"id": "ada", "version": "v0001"}
    assert bundle.header["camera"]["fov_deg"] == 30.0 and bundle.num_gaussians == 300
    cases = random_latents(model.layout, {}, 20, hidden_layers, expression_range=EXPRESSION_RANGE)
    for attrs, expr in _with_source_slider(model, cases):
        ref = _reference(model, attrs, expr)
        z = latent(bundle, attrs, expr)
        np.testing.assert_allclose(z, Avatar(model, {"camera": CAMERA}).latent(attrs, expr).numpy(), atol=1e-6)
        errors = _max_errors(decode_gaussians(bundle, z), ref)
        assert max(errors.values()) <= 1e-5, errors


def _node(script: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([NODE, "--input-type=module", "-e", script, *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


_JS_DECODE = """
import { readFileSync, writeFileSync } from "node:fs";
const { parseBundle, Decoder, composeLatent } = await import(process.argv[1]);
const buf = readFileSync(process.argv[2]);
const bundle = parseBundle(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
const cases = JSON.parse(readFileSync(process.argv[3], "utf8"));
const dec = new Decoder(bundle);
const out = [];
for (const [attrs, expr] of cases) {
  const before = dec.decodes;
  const ran = dec.setLatent(composeLatent(bundle, attrs, expr));
  const g = dec.compose();
  out.push({ ran, decodes: dec.decodes - before, ...Object.fromEntries(Object.entries(g).map(([k, v]) => [k, Array.from(v)])) });
}
writeFileSync(process.argv[4], JSON.stringify(out));
"""


@pytest.mark.parametrize("hidden_layers,expressions,anchored,composition,dominance", DECODE_CASES)
def test_browser_decoder_matches_the_model_and_redecodes_only_the_moved_branch(tmp_path, hidden_layers, expressions,
                                                                               anchored, composition, dominance):
    _need(NODE, "node")
    model = _model(hidden_layers=hidden_layers, expressions=expressions, anchored=anchored, composition=composition,
                   dominance=dominance)
    (tmp_path / "b.bin").write_bytes(encode_bundle(model, CAMERA))
    cases = random_latents(model.layout, {}, 20, 10 + hidden_layers, expression_range=EXPRESSION_RANGE)
    # then: one attribute moved (one branch re-runs), nothing moved (none), an expression moved
    attrs, expr = dict(cases[-1][0]), dict(cases[-1][1])
    first = model.layout.attributes[0]
    cases.append(({**attrs, first.name: 0.5 * attrs[first.name]}, expr))
    cases.append(cases[-1])
    if expressions:
        cases.append((cases[-1][0], {**expr, model.layout.expressions[0]: 0.25}))
    moved = len(cases) - 20
    cases += _with_source_slider(model, cases[:20])[20:]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    _node(_JS_DECODE, BUNDLE_JS.as_uri(), str(tmp_path / "b.bin"), str(tmp_path / "cases.json"), str(tmp_path / "out.json"))
    results = json.loads((tmp_path / "out.json").read_text())
    worst = {k: 0.0 for k in KEYS}
    for (a, e), got in zip(cases, results):
        for k, v in _max_errors(got, _reference(model, a, e)).items():
            worst[k] = max(worst[k], v)
    assert max(worst.values()) <= 1e-5, worst
    branches = model.layout.branches()
    assert results[0]["decodes"] == len(branches)
    on_first = sum(b.input == first.name for b in branches)  # the attribute's own branch and its residuals
    assert [r["decodes"] for r in results[20:20 + moved]] == [on_first, 0] + ([1] if expressions else [])


def _corrupt_cases(good: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a phrase the error must contain)."""
    magic, version, head_len = struct.unpack_from("<4sII", good)
    header = json.loads(good[12:12 + head_len])

    def with_header(h):
        head = json.dumps(h, separators=(",", ":")).encode()
        body_at = (12 + head_len + 3) & ~3
        pad = (-(12 + len(head))) % 4
        return struct.pack("<4sII", magic, version, len(head)) + head + b"\0" * pad + good[body_at:]

    nan = bytearray(good)
    means_at = ((12 + head_len + 3) & ~3) + next(s["offset"] for s in header["sections"] if s["name"] == "means")
    nan[means_at:means_at + 4] = struct.pack("<f", math.nan)
    wrong_shape = json.loads(json.dumps(header))
    next(s for s in wrong_shape["sections"] if s["name"] == "w_out")["shape"][2] = 13
    wrong_count = json.loads(json.dumps(header))
    wrong_count["num_gaussians"] += 1
    huge = json.loads(json.dumps(header))
    huge["sections"][-1]["nbytes"] = 1 << 40
    f16 = json.loads(json.dumps(header))
    f16["sections"][0]["dtype"] = "float16"
    composition = json.loads(json.dumps(header))
    composition["decoder"]["attribute_composition"] = "max"
    return {
        "truncated": (good[:-100], "truncated"),
        "header cut": (good[:40], "truncated"),
        "empty": (b"", "truncated"),
        "magic": (b"XXXX" + good[4:], "not a web bundle"),
        "version": (good[:4] + struct.pack("<I", BUNDLE_VERSION + 1) + good[8:], "version"),
        "trailing": (good + b"\0\0\0\0", "after the last section"),
        "nan": (bytes(nan), "NaN"),
        "shape": (with_header(wrong_shape), "shape"),
        "count": (with_header(wrong_count), "shape"),
        "dtype": (with_header(f16), "dtype"),
        "composition": (with_header(composition), "attribute_composition"),
        "declared too large": (with_header(huge), "over the cap"),
        "json": (good[:12] + b"{" * head_len + good[12 + head_len:], "JSON"),
    }


_JS_PARSE = """
import { readFileSync } from "node:fs";
const { parseBundle } = await import(process.argv[1]);
const out = {};
for (const [name, path, cap] of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const buf = readFileSync(path);
  try {
    parseBundle(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength), cap ? { maxBytes: cap } : {});
    out[name] = "ok";
  } catch (e) {
    out[name] = `${e.name}: ${e.message}`;
  }
}
console.log(JSON.stringify(out));
"""


def test_bad_bundles_are_refused_by_both_readers_naming_the_problem(tmp_path):
    model = _model(num_gaussians=64, hidden_layers=1)
    good = encode_bundle(model, CAMERA)
    cases = _corrupt_cases(good)
    for name, (data, phrase) in cases.items():
        with pytest.raises(BundleError, match=phrase):
            decode_bundle(data)
    with pytest.raises(BundleError, match="exceeds the cap"):
        decode_bundle(good, max_bytes=len(good) - 1)
    with pytest.raises(BundleError, match="exceeds the cap"):
        encode_bundle(model, CAMERA, max_bytes=1000)
    bad_model = _model(num_gaussians=64, hidden_layers=1)
    with torch.no_grad():
        bad_model.means[3, 1] = float("inf")
    with pytest.raises(BundleError, match="NaN or inf"):
        encode_bundle(bad_model, CAMERA)

    _need(NODE, "node")
    table = [["good", str(tmp_path / "good.bin"), 0], ["cap", str(tmp_path / "good.bin"), len(good) - 1]]
    (tmp_path / "good.bin").write_bytes(good)
    for i, (name, (data, _)) in enumerate(cases.items()):
        (tmp_path / f"{i}.bin").write_bytes(data)
        table.append([name, str(tmp_path / f"{i}.bin"), 0])
    (tmp_path / "table.json").write_text(json.dumps(table))
    got = json.loads(_node(_JS_PARSE, BUNDLE_JS.as_uri(), str(tmp_path / "table.json")))
    assert got.pop("good") == "ok"
    cap = got.pop("cap")
    assert cap.startswith("BundleError: ") and "exceeds the cap" in cap, cap
    for name, (_, phrase) in cases.items():
        assert got[name].startswith("BundleError: ") and phrase.lower() in got[name].lower(), (name, got[name])


def test_avatar_web_bundle_records_the_version_and_stays_compact_for_the_cpu_preset():
    cfg = load_config("cpu", [])
    model = AvatarModel(LatentLayout.from_config(cfg.synth, cfg.avatar.code_dim), cfg.avatar)
    data = Avatar(model, {"camera": CAMERA}).web_bundle(avatar_id="ada", version="v0003")
    bundle = decode_bundle(data)
    assert bundle.header["avatar"] == {"id": "ada", "version": "v0003"}
    assert bundle.num_gaussians == cfg.avatar.num_gaussians
    # float32 canonical Gaussians + features + regions (~200 bytes each) and the small MLPs
    assert len(data) < 220 * cfg.avatar.num_gaussians + 200_000, len(data)


def test_layout_mismatch_in_the_header_is_refused():
    model = _model(num_gaussians=32, hidden_layers=1)
    good = encode_bundle(model, CAMERA)
    _, version, head_len = struct.unpack_from("<4sII", good)
    header = json.loads(good[12:12 + head_len])
    header["layout"]["attributes"].append(json.loads(json.dumps(AttributeLayout("extra", ["source", "x"], 4).__dict__)))
    head = json.dumps(header).encode()
    data = struct.pack("<4sII", b"PRWB", version, len(head)) + head + b"\0" * ((-(12 + len(head))) % 4) \
        + good[(12 + head_len + 3) & ~3:]
    with pytest.raises(BundleError, match="branch_dims"):
        decode_bundle(data)


# --------------------------------------------------------------------------- .ply readers


def _activated_from_raw(x, f_dc, opacity, log_scales, rot) -> dict[str, np.ndarray]:
    sh_c0 = 0.28209479177387814
    return {"means": x, "colors": 0.5 + sh_c0 * f_dc, "opacities": 1 / (1 + np.exp(-opacity)),
            "scales": np.exp(log_scales), "quats": rot}


def _check_against_model(read: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    quats = ref["quats"] / np.linalg.norm(ref["quats"], axis=-1, keepdims=True)
    np.testing.assert_allclose(read["means"], ref["means"], atol=1e-6)
    np.testing.assert_allclose(read["scales"], ref["scales"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(read["opacities"], np.clip(ref["opacities"], 1e-6, 1 - 1e-6), atol=1e-6)
    np.testing.assert_allclose(read["colors"], ref["colors"], atol=1e-6)
    np.testing.assert_allclose(read["quats"], quats, atol=1e-6)


def _ply_size(n: int) -> int:
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"] + \
        [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    header = ("ply\nformat binary_little_endian 1.0\n" + f"element vertex {n}\n"
              + "".join(f"property float {p}\n" for p in names) + "end_header\n")
    return len(header.encode()) + n * len(names) * 4


def test_exported_ply_read_by_plyfile_and_splat_transform(tmp_path):
    from plyfile import PlyData

    model = _model(num_gaussians=500, hidden_layers=1, seed=4)
    attrs, expr = random_latents(model.layout, {}, 1, 7, expression_range=EXPRESSION_RANGE)[0]
    avatar = Avatar(model, {"camera": CAMERA})
    ref = _reference(model, attrs, expr)
    path = export_ply(avatar, avatar.latent(attrs, expr), tmp_path / "a.ply")
    # splat-transform accepts a truncated file without a word: the size is checked here
    assert path.stat().st_size == _ply_size(500)

    v = PlyData.read(str(path))["vertex"]
    assert v.count == 500
    col = lambda *names: np.stack([np.asarray(v[n], np.float64) for n in names], -1)  # noqa: E731
    read = _activated_from_raw(col("x", "y", "z"), col("f_dc_0", "f_dc_1", "f_dc_2"), np.asarray(v["opacity"], np.float64),
                               col("scale_0", "scale_1", "scale_2"), col("rot_0", "rot_1", "rot_2", "rot_3"))
    _check_against_model(read, ref)

    _need(SPLAT_TRANSFORM, "@playcanvas/splat-transform (npm ci)")
    out = tmp_path / "a.csv"
    proc = subprocess.run([str(SPLAT_TRANSFORM), str(path), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 500
    c = lambda *names: np.array([[float(r[n]) for n in names] for r in rows])  # noqa: E731
    read = _activated_from_raw(c("x", "y", "z"), c("f_dc_0", "f_dc_1", "f_dc_2"), c("opacity")[:, 0],
                               c("scale_0", "scale_1", "scale_2"), c("rot_0", "rot_1", "rot_2", "rot_3"))
    _check_against_model(read, ref)


_JS_PLY = """
import { readFileSync, writeFileSync } from "node:fs";
const { parseBundle, Decoder, composeLatent, plyBytes } = await import(process.argv[1]);
const buf = readFileSync(process.argv[2]);
const bundle = parseBundle(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
const [attrs, expr] = JSON.parse(process.argv[3]);
const dec = new Decoder(bundle);
dec.setLatent(composeLatent(bundle, attrs, expr));
writeFileSync(process.argv[4], plyBytes(dec.compose()));
"""


def test_the_pages_ply_equals_the_servers_export(tmp_path):
    """The viewer's 'Download .ply' in browser mode writes what it decoded: the server's .ply to float32."""
    _need(NODE, "node")
    from plyfile import PlyData

    model = _model(num_gaussians=200, hidden_layers=1, seed=5)
    attrs, expr = random_latents(model.layout, {}, 1, 9, expression_range=EXPRESSION_RANGE)[0]
    avatar = Avatar(model, {"camera": CAMERA})
    (tmp_path / "b.bin").write_bytes(encode_bundle(model, CAMERA))
    _node(_JS_PLY, BUNDLE_JS.as_uri(), str(tmp_path / "b.bin"), json.dumps([attrs, expr]), str(tmp_path / "page.ply"))
    server = export_ply(avatar, avatar.latent(attrs, expr), tmp_path / "server.ply")
    page = tmp_path / "page.ply"
    assert page.stat().st_size == server.stat().st_size == _ply_size(200)
    a, b = PlyData.read(str(page))["vertex"], PlyData.read(str(server))["vertex"]
    assert [p.name for p in a.properties] == [p.name for p in b.properties]
    for p in a.properties:
        np.testing.assert_allclose(a[p.name], b[p.name], atol=2e-5, rtol=1e-5, err_msg=p.name)


def test_bundle_cache_never_answers_for_a_rebuilt_version_with_the_deleted_ones_bytes(tmp_path):
    """After a delete and a rebuild the subject starts over at v0001: same id and version, new avatar."""
    import asyncio
    import dataclasses
    import datetime as dt

    from perse_ray.avatar.io import save_avatar
    from perse_ray.registry import Registry
    from serve.bundle_api import BundleCache

    registry = Registry(tmp_path / "avatars")
    first = registry.put("ada-00000001", Avatar(_model(seed=1), {"camera": CAMERA}))
    cache = BundleCache()
    old_bytes, _ = asyncio.run(cache.get(first))
    # the same path rewritten with another avatar, as a rebuild after a delete leaves it
    save_avatar(Avatar(_model(seed=2), {"camera": CAMERA}), first.path)
    rebuilt = dataclasses.replace(first, created_at=first.created_at + dt.timedelta(minutes=5))
    new_bytes, _ = asyncio.run(cache.get(rebuilt))
    assert new_bytes != old_bytes and cache.builds == 2
    assert asyncio.run(cache.get(rebuilt))[0] == new_bytes and cache.builds == 2  # and it is cached
