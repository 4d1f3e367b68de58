"""The render API on Ray Serve: HTTP + gRPC, validation, batching, multiplexing (LRU eviction), client, CLI.

One Serve application for the module (multiplex bound 2, three avatars), on the session's local Ray.
Run inside a network namespace (``make test`` does): Ray and the gRPC proxy bind beyond loopback.
"""

from __future__ import annotations

import importlib.util
import io
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from perse_ray.avatar import Avatar, AvatarModel, LatentLayout
from perse_ray.config import load_config
from perse_ray.registry import Registry

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # serve/ is not an installed package
    sys.path.insert(0, str(REPO))
SIZE = 48
SUBJECTS = ("ada", "bob", "cy")
SERVICER = "serve.grpc_servicer.add_RendererServicer_to_server"


def make_avatar(seed: int) -> Avatar:
    """A small untrained avatar whose decoder is randomised, so every slider visibly moves pixels.
    (Part of the decoder draws from torch's global generator: keep the instance as the reference.)"""
    cfg = load_config("cpu-smoke", ["avatar.num_gaussians=300"])
    model = AvatarModel(LatentLayout.from_config(cfg.synth, 4), cfg.avatar, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.color_logits.copy_(2 * torch.randn(model.color_logits.shape, generator=g))
        model.decoder.w_out.copy_(0.05 * torch.randn(model.decoder.w_out.shape, generator=g))
        model.opacity_logits.fill_(3.0)
    model.eval()
    return Avatar(model, {"camera": {"fov_deg": 30.0, "distance": 0.65}, "config": {"secret": "internal"},
                          "config_hash": "abc", "metrics": {"heldout_psnr": 30.0}})


def reference(avatar: Avatar, attributes=None, expression=None, latent=None, yaw=0.0, pitch=0.0,
              size=SIZE) -> np.ndarray:
    """What the server must return, rendered in this process (inputs exactly representable in float32)."""
    z = torch.tensor(latent) if latent is not None else avatar.latent(attributes or {}, expression or {})
    rgb = avatar.render(z, [(yaw, pitch)], size, size)[0, 0]
    return (rgb * 255).round().to(torch.uint8).numpy()


def pixels(png: bytes | Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(png if isinstance(png, Path) else io.BytesIO(png)).convert("RGB"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- without Ray


def test_stubs_match_proto(tmp_path):
    """The committed stubs are what ``python -m serve.gen_stubs`` makes from render.proto."""
    from serve.gen_stubs import generate

    generate(tmp_path)
    for name in ("render_pb2.py", "render_pb2.pyi", "render_pb2_grpc.py"):
        assert (tmp_path / "serve" / name).read_text() == (REPO / "serve" / name).read_text(), name


def test_render_spec_names_the_field_and_rounds_to_float32():
    from serve.api import ApiError, ServeConfig, render_spec

    layout = make_avatar(0).layout
    cfg = ServeConfig()
    ok = dict(attributes={"hair": 0.1}, expression={}, latent=None, yaw=20.0, pitch=-5.0, width=32, height=32)
    spec = render_spec(layout, cfg, **ok)
    assert spec.attributes["hair"] == float(np.float32(0.1)) and spec.yaw == 20.0
    for change, message in [({"yaw": 90.5}, "camera.yaw: 90.5 outside [-90, 90]"),
                            ({"pitch": -61.0}, "camera.pitch: -61 outside [-60, 60]"),
                            ({"width": 15}, "width: 15 outside [16, 1024]"),
                            ({"height": 1025}, "height: 1025 outside [16, 1024]"),
                            ({"yaw": float("nan")}, "camera.yaw: nan is not a finite"),
                            ({"attributes": {"hair": 1e300}}, "attributes.hair: 1e+300 is not a finite"),
                            ({"attributes": {"hair": 1.5}}, "attributes.hair: slider 1.5 outside [0, 1]"),
                            ({"expression": {"wink": 1.0}}, "expression.wink: unknown expression"),
                            ({"latent": [0.0] * 3, "attributes": {}},
                             f"latent: length 3, this avatar's latent has {layout.dim}"),
                            ({"latent": [0.0] * layout.dim}, "latent: give either latent or attributes"),
                            ({"latent": [float("inf")] + [0.0] * (layout.dim - 1), "attributes": {}},
                             "latent[0]: inf is not a finite")]:
        with pytest.raises(ApiError) as err:
            render_spec(layout, cfg, **{**ok, **change})
        assert err.value.status == 422 and err.value.message.startswith(message), (change, err.value.message)


class FileSystemCalls:
    """Records every file-system call a block makes (stat, open, listing) while it is active."""

    def __init__(self, monkeypatch):
        import builtins
        import os

        self.calls: list[tuple[str, str]] = []
        for module, names in ((os, ("stat", "lstat", "open", "scandir", "listdir", "access")),
                              (builtins, ("open",)), (io, ("open",))):
            for name in names:
                monkeypatch.setattr(module, name, self._recording(name, getattr(module, name)))

    def _recording(self, name, real):
        def call(*args, **kwargs):
            self.calls.append((name, str(args[0]) if args else ""))
            return real(*args, **kwargs)
        return call


def _catalog(root: Path, **cfg):
    from serve.api import Catalog, ServeConfig

    return Catalog.open(root, ServeConfig(**cfg))


def test_catalog_answers_every_request_from_memory(tmp_path, monkeypatch):
    """After the first refresh, resolving, validating, listing and manifests touch no file; a refresh
    with nothing new costs one stat of the index."""
    from serve.api import ApiError

    registry = Registry(tmp_path / "avatars")
    for i, subject in enumerate(SUBJECTS):
        registry.put(subject, make_avatar(i))
    catalog = _catalog(tmp_path / "avatars")
    fs = FileSystemCalls(monkeypatch)
    job = catalog.job("ada", attributes={"hair": 1.0}, expression={"smile": 0.5}, latent=None, yaw=10.0,
                      pitch=0.0, width=SIZE, height=SIZE)
    assert job.model_id == "ada@v0001" and job.spec.attributes == {"hair": 1.0}
    assert [s["id"] for s in catalog.summaries()] == list(SUBJECTS)
    assert catalog.snapshot.listing_json.startswith(b'[{"id": "ada", "version": "v0001"')
    manifest = catalog.manifest("bob")
    assert manifest["version"] == "v0001" and manifest["camera"]["fov_deg"] == 30.0
    assert not {"config", "config_hash", "subject_id"} & set(manifest)
    for avatar_id, status in (("nobody", 404), ("../x", 400)):
        with pytest.raises(ApiError) as err:
            catalog.resolve(avatar_id)
        assert err.value.status == status
    assert fs.calls == []
    assert catalog.refresh() is False
    assert [name for name, _ in fs.calls] == ["stat"], fs.calls  # the guard sees file-system work


def test_catalog_takes_in_a_new_version_on_refresh_only(tmp_path):
    registry = Registry(tmp_path / "avatars")
    registry.put("ada", make_avatar(0))
    registry.put("bob", make_avatar(1))
    catalog = _catalog(tmp_path / "avatars")
    before = catalog.snapshot
    registry.put("ada", make_avatar(2))
    assert catalog.manifest("ada")["version"] == "v0001"  # memory until the next refresh
    assert catalog.refresh() is True
    assert catalog.manifest("ada")["version"] == "v0002"
    after = catalog.snapshot
    assert after.generation == before.generation + 1
    assert after.avatars["bob"] is before.avatars["bob"]  # unchanged entries are not prepared again
    assert [(s["id"], s["version"]) for s in catalog.summaries()] == [("ada", "v0002"), ("bob", "v0001")]


def _append_index_line(root: Path, text: str) -> None:
    with open(root / "index.jsonl", "a") as fh:
        fh.write(text + "\n")


def _corrupt_index(registry: Registry, good: str, bad: str) -> None:
    """A garbled index line, and an entry for ``bad`` whose layout the registry accepts but no avatar
    can have (copied from ``good``'s line)."""
    import json

    _append_index_line(registry.root, '{"subject_id": "zz-garbled", "version": "v00')
    line = json.loads([t for t in (registry.root / "index.jsonl").read_text().splitlines()
                       if f'"subject_id": "{good}"' in t][-1])
    impossible = {"expressions": 3, "attributes": "hair"}
    line["subject_id"], line["latent_layout"], line["manifest"]["layout"] = bad, json.dumps(impossible), impossible
    _append_index_line(registry.root, json.dumps(line))


def test_catalog_leaves_out_a_corrupt_entry_and_fails_only_its_requests(tmp_path):
    from serve.api import ApiError

    registry = Registry(tmp_path / "avatars")
    registry.put("ada", make_avatar(0))
    registry.put("bob", make_avatar(1))
    _corrupt_index(registry, "bob", "bob-broken")
    catalog = _catalog(tmp_path / "avatars")
    assert [s["id"] for s in catalog.summaries()] == ["ada", "bob"]
    assert catalog.job("bob", attributes={}, expression={}, latent=None, yaw=0.0, pitch=0.0, width=SIZE,
                       height=SIZE).model_id == "bob@v0001"
    with pytest.raises(ApiError) as err:
        catalog.job("bob-broken", attributes={}, expression={}, latent=None, yaw=0.0, pitch=0.0, width=SIZE,
                    height=SIZE)
    assert err.value.status == 500 and err.value.message.startswith("avatar bob-broken@v0001: unusable manifest")
    problems = dict(catalog.stats()["problems"])
    assert "bob-broken@v0001" in problems and any("index.jsonl" in where for where in problems)
    assert catalog.stats()["problem_count"] == 2


def test_build_app_checks_its_arguments(tmp_path, monkeypatch):
    from perse_ray.config import ConfigError
    from serve.app import build_app

    monkeypatch.delenv("PERSE_REGISTRY", raising=False)
    with pytest.raises(ValueError, match="no registry"):
        build_app({})
    with pytest.raises(ValueError, match="is not a directory"):
        build_app({"registry": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="unknown key serve.max_batchsize"):
        build_app({"registry": str(tmp_path), "auth": "none", "max_batchsize": 4})
    with pytest.raises(ValueError, match="invalid serve config"):
        build_app({"registry": str(tmp_path), "auth": "none", "max_batch_size": 0})
    with pytest.raises(ValueError, match="invalid serve config"):
        build_app({"registry": str(tmp_path), "auth": "none", "index_refresh_s": 0})
    monkeypatch.setenv("PERSE_REGISTRY", str(tmp_path))  # replaces the config's registry
    assert build_app({"registry": str(tmp_path / "missing"), "auth": "none"}) is not None


# --------------------------------------------------------------------------- the Serve application


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    tmp = tmp_path_factory.mktemp("serve")
    registry = Registry(tmp / "avatars")
    avatars = {s: make_avatar(i) for i, s in enumerate(SUBJECTS)}
    for subject, avatar in avatars.items():
        registry.put(subject, avatar)
    # A valid avatar just outside the root: "../x" must never reach it.
    Registry(tmp).put("x", make_avatar(9))
    http_port, grpc_port = _free_port(), _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER]})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PERSE_REGISTRY", raising=False)
        app = build_app({"registry": str(tmp / "avatars"), "auth": "none", "max_avatars_per_replica": 2, "max_batch_size": 8,
                         "batch_wait_timeout_s": 0.05})
    serve.run(app, name="perse-test", route_prefix="/")
    import grpc
    import httpx

    from serve import render_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=60)
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:
        yield {"http": http, "url": f"http://127.0.0.1:{http_port}", "grpc": render_pb2_grpc.RendererStub(channel),
               "channel": channel, "avatars": avatars, "registry": registry}
    channel.close()
    serve.shutdown()


def _stats(server) -> dict:
    return server["http"].get("/v1/stats").json()["renderer"]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_http_and_grpc_render_the_same_pixels(server):
    from serve import render_pb2

    ada = server["avatars"]["ada"]
    values = dict(attributes={"hair": 0.5, "glasses": 1.0}, expression={"smile": 0.75})
    http = server["http"].post("/v1/avatars/ada/render", json={**values, "camera": {"yaw": 20, "pitch": -5},
                                                              "width": SIZE, "height": SIZE})
    assert http.status_code == 200 and http.headers["content-type"] == "image/png"
    reply = server["grpc"].Render(render_pb2.RenderRequest(avatar_id="ada", yaw=20, pitch=-5, width=SIZE,
                                                           height=SIZE, **values))
    assert (reply.width, reply.height) == (SIZE, SIZE)
    image = pixels(http.content)
    assert image.shape == (SIZE, SIZE, 3)
    assert np.array_equal(image, pixels(reply.png))
    assert np.array_equal(image, reference(ada, yaw=20, pitch=-5, **values))
    # The same z given raw renders the same image; another slider value renders another one.
    z = ada.latent(values["attributes"], values["expression"]).tolist()
    raw = server["http"].post("/v1/avatars/ada/render", json={"latent": z, "camera": {"yaw": 20, "pitch": -5},
                                                             "width": SIZE, "height": SIZE})
    assert np.array_equal(pixels(raw.content), image)
    other = server["http"].post("/v1/avatars/ada/render", json={"attributes": {"hair": 0.0}, "width": SIZE,
                                                               "height": SIZE, "camera": {"yaw": 20, "pitch": -5}})
    assert not np.array_equal(pixels(other.content), image)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_listing_and_manifest(server):
    from serve import render_pb2

    listing = server["http"].get("/v1/avatars").json()[:len(SUBJECTS)]  # later tests register more
    assert [a["id"] for a in listing] == list(SUBJECTS)
    assert listing[0] == {"id": "ada", "version": "v0001", "expressions": ["jaw_open", "smile", "brow_raise"],
                          "attributes": {"hair": ["source", "auburn"], "glasses": ["source", "sunglasses"]}}
    grpc_listing = server["grpc"].ListAvatars(render_pb2.ListAvatarsRequest())
    assert [(a.id, a.version, {x.name: list(x.edit_labels) for x in a.attributes}, list(a.expressions))
            for a in grpc_listing.avatars[:len(SUBJECTS)]] == [
        (a["id"], a["version"], a["attributes"], a["expressions"]) for a in listing]
    manifest = server["http"].get("/v1/avatars/bob").json()
    assert manifest["id"] == "bob" and manifest["version"] == "v0001"
    assert manifest["metrics"] == {"heldout_psnr": 30.0} and manifest["camera"]["fov_deg"] == 30.0
    assert manifest["layout"]["expressions"] == ["jaw_open", "smile", "brow_raise"]
    assert not {"config", "config_hash", "avatar_config", "subject_id"} & set(manifest)
    if (REPO / "serve" / "web" / "index.html").is_file():  # the browser viewer, when it is there
        viewer = server["http"].get("/", follow_redirects=True)
        assert viewer.status_code == 200 and "text/html" in viewer.headers["content-type"]
        assert server["http"].get("/viewer/..%2F..%2Fapp.py").status_code == 404
    docs = server["http"].get("/openapi.json").json()
    assert "/v1/avatars/{avatar_id}/render" in docs["paths"] and "|yaw| <= 90" in docs["info"]["description"]
    assert server["http"].get("/docs").status_code == 200


# Every refused HTTP request: (method, path, json body or raw bytes, status, text in the message).
ADA = "/v1/avatars/ada/render"
BAD_HTTP = [
    ("POST", "/v1/avatars/nobody/render", {}, 404, "no avatar 'nobody'"),
    ("GET", "/v1/avatars/nobody", None, 404, "no avatar 'nobody'"),
    ("POST", "/v1/avatars/..%2Fx/render", {}, 400, "invalid subject id '../x'"),
    ("GET", "/v1/avatars/..%2Fx", None, 400, "invalid subject id '../x'"),
    ("POST", "/v1/avatars/%2E%2E%2Fx/ply", {}, 400, "invalid subject id '../x'"),
    ("POST", "/v1/avatars/a%2Fb/render", {}, 400, "invalid subject id 'a/b'"),
    ("POST", "/v1/avatars/a%00b/render", {}, 400, "invalid subject id 'a\\x00b'"),
    ("POST", "/v1/avatars/a%0Ab/render", {}, 400, "invalid subject id 'a\\nb'"),
    ("POST", "/v1/avatars/Ada/render", {}, 400, "invalid subject id 'Ada'"),
    ("POST", f"/v1/avatars/{'a' * 64}/render", {}, 400, "invalid subject id"),
    ("POST", ADA, {"latent": [0.0] * 5}, 422, "latent: length 5, this avatar's latent has 11"),
    ("POST", ADA, b'{"latent": [NaN, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}', 422,
     "latent[0]: Input should be a finite number"),
    ("POST", ADA, b'{"camera": {"yaw": Infinity}}', 422, "camera.yaw: Input should be a finite"),
    ("POST", ADA, b'{"expression": {"smile": 1e999}}', 422, "expression.smile: Input should be"),
    ("POST", ADA, {"latent": [0.0] * 11, "attributes": {"hair": 1}}, 422,
     "latent: give either latent or attributes/expression"),
    ("POST", ADA, {"attributes": {"moustache": 1}}, 422, "attributes.moustache: unknown attribute"),
    ("POST", ADA, {"expression": {"wink": 1}}, 422, "expression.wink: unknown expression"),
    ("POST", ADA, {"attributes": {"hair": 1.5}}, 422, "attributes.hair: slider 1.5 outside [0, 1]"),
    ("POST", ADA, {"attributes": {"hair": -0.1}}, 422, "attributes.hair: slider -0.1"),
    ("POST", ADA, {"attributes": {"hair": "1"}}, 422, "attributes.hair: Value error, must be a number"),
    ("POST", ADA, {"camera": {"yaw": 91}}, 422, "camera.yaw: 91 outside [-90, 90] degrees"),
    ("POST", ADA, {"camera": {"pitch": -60.5}}, 422, "camera.pitch: -60.5 outside [-60, 60]"),
    ("POST", ADA, {"camera": {"roll": 1}}, 422, "camera.roll: Extra inputs are not permitted"),
    ("POST", ADA, {"width": 15}, 422, "width: 15 outside [16, 1024]"),
    ("POST", ADA, {"height": 1025}, 422, "height: 1025 outside [16, 1024]"),
    ("POST", ADA, {"width": 64.5}, 422, "width: Input should be a valid integer"),
    ("POST", "/v1/avatars/ada/ply", {"attributes": {"glasses": 2}}, 422, "attributes.glasses: slider 2.0 outside"),
    ("POST", ADA, b"{not json", 422, "JSON decode error"),
    ("POST", ADA, {"latent": [0.5] * 20_000}, 413, "body: larger than 65536 bytes"),
]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_invalid_http_requests_are_refused_naming_the_field(server):
    http = server["http"]
    for method, path, body, status, text in BAD_HTTP:
        kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body} if body is not None else {}
        response = http.request(method, path, **kwargs)
        assert response.status_code == status, (path, body, response.text)
        assert text in response.json()["detail"], (path, body, response.text)
    # A chunked body (no Content-Length) is cut off at the cap too.
    chunks = (b'{"latent": [' + b"0.5," * 4000 for _ in range(10))
    response = http.post("/v1/avatars/ada/render", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413
    # Still serving.
    assert http.get("/healthz").status_code == 200
    ok = http.post("/v1/avatars/ada/render", json={"width": SIZE, "height": SIZE})
    assert ok.status_code == 200
    assert np.array_equal(pixels(ok.content), reference(server["avatars"]["ada"]))


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_invalid_grpc_requests_are_refused(server):
    import grpc

    from serve import render_pb2

    stub = server["grpc"]
    R = render_pb2.RenderRequest
    cases = [(R(avatar_id="nobody"), grpc.StatusCode.NOT_FOUND, "no avatar 'nobody'"),
             (R(avatar_id="../x"), grpc.StatusCode.INVALID_ARGUMENT, "invalid subject id '../x'"),
             (R(avatar_id="a" * 64), grpc.StatusCode.INVALID_ARGUMENT, "invalid subject id"),
             (R(avatar_id="a\nb"), grpc.StatusCode.INVALID_ARGUMENT, "invalid subject id 'a\\nb'"),
             (R(avatar_id="ada", yaw=95), grpc.StatusCode.INVALID_ARGUMENT, "yaw: 95 outside [-90, 90]"),
             (R(avatar_id="ada", pitch=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "pitch: nan is not a finite"),
             (R(avatar_id="ada", width=0), grpc.StatusCode.INVALID_ARGUMENT, "width: 0 outside [16, 1024]"),
             (R(avatar_id="ada", height=5000), grpc.StatusCode.INVALID_ARGUMENT, "height: 5000 outside"),
             (R(avatar_id="ada", latent=[0.0] * 3), grpc.StatusCode.INVALID_ARGUMENT, "latent: length 3"),
             (R(avatar_id="ada", latent=[float("inf")] * 11), grpc.StatusCode.INVALID_ARGUMENT,
              "latent[0]: inf is not a finite"),
             (R(avatar_id="ada", attributes={"moustache": 1}), grpc.StatusCode.INVALID_ARGUMENT,
              "attributes.moustache: unknown attribute"),
             (R(avatar_id="ada", attributes={"hair": 3}), grpc.StatusCode.INVALID_ARGUMENT,
              "attributes.hair: slider 3.0 outside [0, 1]"),
             (R(avatar_id="ada", expression={"smile": 2.5}), grpc.StatusCode.INVALID_ARGUMENT,
              "expression.smile: value 2.5 outside [-1, 2]")]
    for request, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Render(request)
        assert err.value.code() == code and text in err.value.details(), (request, err.value.details())
    raw = server["channel"].unary_unary("/perse.v1.Renderer/Render")
    for payload, code, text in [(b"\x0a\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "malformed RenderRequest"),
                                (b"\x0a\x03ada\x22\x01", grpc.StatusCode.INVALID_ARGUMENT, "malformed RenderRequest"),
                                (R(avatar_id="ada", latent=[0.5] * 20_000).SerializeToString(),
                                 grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than 65536 bytes")]:
        with pytest.raises(grpc.RpcError) as err:
            raw(payload)
        assert err.value.code() == code and text in err.value.details(), err.value.details()
    # Still serving, with width/height defaulting to 256 when absent.
    reply = stub.Render(R(avatar_id="ada"))
    assert (reply.width, reply.height) == (256, 256) and pixels(reply.png).shape == (256, 256, 3)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_concurrent_requests_for_different_avatars_are_batched_and_correct(server):
    import httpx

    requests = [(s, {"attributes": {"hair": h}, "camera": {"yaw": y}})
                for s in SUBJECTS for h, y in ((0.0, -30.0), (0.5, 0.0), (1.0, 30.0), (0.25, 10.0))]
    before = _stats(server)

    def render(item):
        subject, body = item
        with httpx.Client(base_url=server["url"], timeout=60) as c:
            return c.post(f"/v1/avatars/{subject}/render", json={**body, "width": SIZE, "height": SIZE})

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(render, requests))
    after = _stats(server)
    for (subject, body), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        expected = reference(server["avatars"][subject], attributes=body["attributes"], yaw=body["camera"]["yaw"])
        # A batched decoder matmul may round differently in the last bit: at most one 8-bit level.
        diff = np.abs(pixels(response.content).astype(int) - expected.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01, (subject, body, diff.max())
    assert after["requests"] - before["requests"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests)  # some requests shared a batch
    assert after["largest_batch"] > 1 and len(after["resident"]) <= 2


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_multiplexing_evicts_the_least_recently_used_avatar(server):
    http, avatars = server["http"], server["avatars"]

    def render(subject):
        response = http.post(f"/v1/avatars/{subject}/render", json={"attributes": {"glasses": 1}, "width": SIZE,
                                                                    "height": SIZE})
        assert response.status_code == 200, response.text
        assert np.array_equal(pixels(response.content), reference(avatars[subject], attributes={"glasses": 1}))

    for subject in SUBJECTS:  # three avatars through a bound of two
        render(subject)
    stats = _stats(server)
    assert stats["max_avatars"] == 2 and stats["resident"] == ["bob@v0001", "cy@v0001"]
    render("ada")  # evicted: loaded again, and bob (least recently used) goes
    again = _stats(server)
    assert again["loads"] == stats["loads"] + 1 and again["resident"] == ["ada@v0001", "cy@v0001"]
    render("cy")  # resident: no load
    assert _stats(server)["loads"] == again["loads"]


def _visible(server, subject: str, version: str, timeout: float = 30.0) -> float:
    """Seconds until the server's manifest of ``subject`` names ``version`` (polled every 20 ms)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        response = server["http"].get(f"/v1/avatars/{subject}")
        if response.status_code == 200 and response.json()["version"] == version:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"{subject} {version} not served after {timeout} s")


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_new_version_is_served_within_the_refresh_delay(server):
    """index_refresh_s (1 s here, the default) plus one refresh; 1 s of slack for a loaded machine."""
    http, registry = server["http"], server["registry"]
    every = http.get("/v1/stats").json()["ingress"]["index"]["refresh_every_s"]
    assert every == 1.0
    body = {"attributes": {"hair": 1}, "width": SIZE, "height": SIZE}
    old, new = make_avatar(20), make_avatar(21)
    registry.put("eve", old)
    assert _visible(server, "eve", "v0001") <= every + 1.0
    first = http.post("/v1/avatars/eve/render", json=body)
    registry.put("eve", new)
    assert _visible(server, "eve", "v0002") <= every + 1.0
    assert [a["version"] for a in http.get("/v1/avatars").json() if a["id"] == "eve"] == ["v0002"]
    second = http.post("/v1/avatars/eve/render", json=body)
    assert np.array_equal(pixels(first.content), reference(old, attributes={"hair": 1}))
    assert np.array_equal(pixels(second.content), reference(new, attributes={"hair": 1}))


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_loaded_avatar_renders_without_its_files(server):
    """Once an avatar is loaded, neither the Ingress nor the Renderer reads its folder again: it still
    renders (the same pixels) and its manifest is still served after the files are gone."""
    http, avatar = server["http"], make_avatar(40)
    entry = server["registry"].put("fay", avatar)
    _visible(server, "fay", "v0001")
    body = {"attributes": {"glasses": 1}, "camera": {"yaw": 15}, "width": SIZE, "height": SIZE}
    first = http.post("/v1/avatars/fay/render", json=body)
    assert first.status_code == 200, first.text
    for name in ("model.safetensors", "avatar.json"):
        (entry.path / name).unlink()
    second = http.post("/v1/avatars/fay/render", json=body)
    assert second.status_code == 200, second.text
    assert np.array_equal(pixels(second.content), pixels(first.content))
    assert np.array_equal(pixels(second.content), reference(avatar, attributes={"glasses": 1}, yaw=15))
    assert http.get("/v1/avatars/fay").json()["camera"]["fov_deg"] == 30.0


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_corrupt_registry_entries_leave_the_good_avatars_served(server):
    """A garbled index line and an entry with an impossible layout: listed as problems, left out of
    both listings; the good avatars are listed and render; the bad one fails alone with a 500."""
    from serve import render_pb2

    http, registry = server["http"], server["registry"]
    _corrupt_index(registry, "bob", "zz-bad")
    after = make_avatar(50)
    registry.put("zz-after", after)  # an entry after the corrupt lines is still read
    _visible(server, "zz-after", "v0001")
    listed = [a["id"] for a in http.get("/v1/avatars").json()]
    assert listed[:3] == list(SUBJECTS) and "zz-after" in listed and "zz-bad" not in listed
    grpc_listed = [a.id for a in server["grpc"].ListAvatars(render_pb2.ListAvatarsRequest()).avatars]
    assert grpc_listed == listed
    bad = http.post("/v1/avatars/zz-bad/render", json={"width": SIZE, "height": SIZE})
    assert bad.status_code == 500 and "avatar zz-bad@v0001: unusable manifest" in bad.json()["detail"]
    assert http.get("/v1/avatars/zz-bad").status_code == 500
    index = http.get("/v1/stats").json()["ingress"]["index"]
    assert index["problem_count"] >= 2 and "zz-bad@v0001" in dict(index["problems"])
    for subject in ("bob", "zz-after"):
        ok = http.post(f"/v1/avatars/{subject}/render", json={"width": SIZE, "height": SIZE})
        assert ok.status_code == 200, ok.text
    assert np.array_equal(pixels(ok.content), reference(after))


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_corrupt_avatar_fails_alone(server):
    from serve import render_pb2

    entry = server["registry"].put("zed", make_avatar(30))
    (entry.path / "model.safetensors").write_bytes(b"not a safetensors file")
    _visible(server, "zed", "v0001")
    response = server["http"].post("/v1/avatars/zed/render", json={"width": SIZE, "height": SIZE})
    assert response.status_code == 500 and "unreadable safetensors file" in response.json()["detail"]
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        server["grpc"].Render(render_pb2.RenderRequest(avatar_id="zed"))
    assert err.value.code() == grpc.StatusCode.INTERNAL and "unreadable safetensors" in err.value.details()
    assert server["http"].post("/v1/avatars/ada/render", json={"width": SIZE, "height": SIZE}).status_code == 200


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_client_and_render_job(server, tmp_path):
    from plyfile import PlyData

    from perse_ray.client import AvatarNotFound, InvalidRequest, RenderClient

    ada = server["avatars"]["ada"]
    with RenderClient(server["url"]) as client:
        assert client.health() and [a["id"] for a in client.list()][:3] == list(SUBJECTS)
        image = client.render("ada", attributes={"hair": 0.5}, expression={"jaw_open": 0.5}, yaw=-20, pitch=10,
                              size=(SIZE, 32))
        assert image.size == (SIZE, 32)
        z = ada.latent({"hair": 0.5}, {"jaw_open": 0.5})
        expected = (ada.render(z, [(-20, 10)], SIZE, 32)[0, 0] * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(np.asarray(image), expected)
        ply = PlyData.read(io.BytesIO(client.ply("ada", attributes={"hair": 1}, path=tmp_path / "ada.ply")))
        assert ply["vertex"].count == ada.model.cfg.num_gaussians and (tmp_path / "ada.ply").stat().st_size > 0
        with pytest.raises(AvatarNotFound, match="no avatar 'nobody'"):
            client.render("nobody")
        with pytest.raises(InvalidRequest, match="camera.yaw: 100 outside") as err:
            client.render("ada", yaw=100)
        assert err.value.status == 422
        with pytest.raises(InvalidRequest, match="invalid subject id '../x'"):
            client.manifest("../x")

    spec = importlib.util.spec_from_file_location("render_job", REPO / "jobs" / "render.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    strip = tmp_path / "strip.png"
    assert job.main(["ada", "--url", server["url"], "--strip", "hair", "--steps", "3", "--size", "32",
                     "--expr", "smile=0.5", "--out", str(strip)]) == 0
    frames = pixels(strip)
    assert frames.shape == (32, 96, 3)
    for i, hair in enumerate((0.0, 0.5, 1.0)):
        expected = reference(ada, attributes={"hair": hair}, expression={"smile": 0.5}, size=32)
        assert np.abs(frames[:, 32 * i:32 * (i + 1)].astype(int) - expected).max() <= 1
    single = tmp_path / "one.png"
    assert job.main(["bob", "--url", server["url"], "--attr", "glasses=1", "--size", "32", "--out", str(single)]) == 0
    assert np.array_equal(pixels(single),
                          reference(server["avatars"]["bob"], attributes={"glasses": 1}, size=32))
    assert job.main(["nobody", "--url", server["url"], "--out", str(tmp_path / "x.png")]) == 2
    assert job.main(["ada", "--url", server["url"], "--strip", "nose", "--out", str(tmp_path / "x.png")]) == 2
