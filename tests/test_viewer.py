"""The web viewer in a real headless Chromium (Debian's package) against a Serve app with an avatar.

Both modes: ``render=server`` (every change is a PNG from the server) and ``render=client`` (the
page decodes the web bundle and splats it with Spark on WebGL2; ANGLE on SwiftShader here, so
frame rates say nothing about a real GPU). Needs /usr/bin/chromium (``.ci/run`` installs it) and
node_modules (``npm ci``; make does it); elsewhere the test is skipped, except in CI where a missing
browser is a failure. Screenshots are kept in ``test-artifacts/``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from perse_ray.avatar import Avatar, AvatarModel, LatentLayout
from perse_ray.config import load_config
from perse_ray.registry import Registry

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("PERSE_TEST_ARTIFACTS", REPO / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SIDE = 384
# WebGL2 in headless Chromium without a GPU: ANGLE on SwiftShader (--use-gl=swiftshader gives no WebGL2).
BROWSER_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _browser_or_skip():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run must install Debian's chromium package")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    if not (REPO / "node_modules" / "@sparkjsdev" / "spark" / "dist" / "spark.module.js").is_file():
        if os.environ.get("CI"):
            pytest.fail("node_modules is missing in CI: make test runs npm ci first")
        pytest.skip("needs node_modules (npm ci)")
    return pytest.importorskip("playwright.sync_api")


def _avatar() -> Avatar:
    """A small avatar whose attribute branches visibly change the image."""
    cfg = load_config("cpu-smoke", ["avatar.num_gaussians=400"])
    model = AvatarModel(LatentLayout.from_config(cfg.synth, 4), cfg.avatar, seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.color_logits.copy_(2 * torch.randn(model.color_logits.shape, generator=g))
        model.decoder.w_out.copy_(0.2 * torch.randn(model.decoder.w_out.shape, generator=g))
        model.opacity_logits.fill_(3.0)
        for code in model.codes.values():
            code.copy_(3 * torch.randn(code.shape, generator=g))
    return Avatar(model.eval(), {"camera": {"fov_deg": 30.0, "distance": 0.65}, "config_hash": "viewer"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def viewer(ray_cluster, tmp_path_factory):
    """(base URL, registry root) of a Serve app with one avatar."""
    from ray import serve

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from serve.app import build_app

    root = tmp_path_factory.mktemp("viewer") / "avatars"
    Registry(root).put("ada-viewer", _avatar())
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PERSE_REGISTRY", raising=False)
        serve.run(build_app({"registry": str(root), "auth": "none"}), name="viewer-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}", root
    serve.shutdown()


def _launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _client_shot(page) -> np.ndarray:
    """The browser-mode picture: backdrop + splat canvases as composited, SIDE x SIDE pixels."""
    box = page.locator("#client-stage").bounding_box()
    return _png(page.screenshot(clip={"x": round(box["x"]), "y": round(box["y"]), "width": SIDE, "height": SIDE}))


def _image(page, mode: str) -> np.ndarray:
    return _png(page.locator("#view").screenshot()) if mode == "server" else _client_shot(page)


def _wait_for_new_image(page, previous_seq: str | None) -> str:
    page.wait_for_function(
        "prev => { const v = document.getElementById('view');"
        " return v.dataset.seq && v.dataset.seq !== prev && v.complete && v.naturalWidth > 0; }",
        arg=previous_seq, timeout=60_000)
    return page.locator("#view").get_attribute("data-seq")


def _wait_settled(page) -> None:
    page.wait_for_function("() => window.perseViewer && perseViewer.settled", timeout=60_000)


def _wait(page, mode: str, previous: str | None = None) -> str | None:
    if mode == "server":
        return _wait_for_new_image(page, previous)
    page.wait_for_timeout(50)  # let the slider's frame be requested
    _wait_settled(page)
    return None


def _set_slider(page, container: str, name: str, value: float) -> None:
    page.eval_on_selector(f"#{container} input[data-name='{name}']",
                          "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def _post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


@pytest.mark.parametrize("mode", ["server", "client"])
def test_viewer_lists_renders_persists_state_and_shows_errors(viewer, mode):
    sync_api = _browser_or_skip()
    url, _ = viewer
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{url}/viewer/?render={mode}")
        # the page lists the avatar and renders it
        page.wait_for_selector("#avatar option[value='ada-viewer']", state="attached", timeout=60_000)
        seq = _wait(page, mode)
        assert page.evaluate("() => perseViewer.mode") == mode
        before = _image(page, mode)

        # moving a slider changes the image and the URL
        _set_slider(page, "attributes", "hair", 1.0)
        seq = _wait(page, mode, seq)
        after = _image(page, mode)
        assert np.abs(after - before).mean() > 2.0
        page.screenshot(path=str(ARTIFACTS / f"viewer_{mode}.png"), full_page=True)
        assert "a.hair=1" in page.url and "avatar=ada-viewer" in page.url and f"render={mode}" in page.url

        # reloading that URL restores the same image
        shared = page.url
        page.goto(shared)
        _wait(page, mode)
        assert np.abs(_image(page, mode) - after).mean() <= 1.0

        # an out-of-range value in the URL shows the error; the page stays usable
        page.goto(shared.replace("a.hair=1", "a.hair=99"))
        page.wait_for_function("() => !document.getElementById('banner').hidden", timeout=60_000)
        banner = page.locator("#banner").inner_text()
        assert "hair" in banner and "99" in banner, banner
        _set_slider(page, "attributes", "hair", 0.5)
        _wait(page, mode)
        page.wait_for_function("() => document.getElementById('banner').hidden", timeout=60_000)
        if mode == "server":
            latency_ms = float(page.locator("#view").get_attribute("data-latency-ms"))
        browser.close()
    if mode == "server":
        print(f"viewer slider→image latency: {latency_ms:.0f} ms")
        (ARTIFACTS / "viewer_latency_ms.txt").write_text(f"{latency_ms:.1f}\n")


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2)[mask].mean())
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def test_client_decode_is_exact_matches_the_server_picture_and_sends_no_render_requests(viewer):
    sync_api = _browser_or_skip()
    url, root = viewer
    avatar = Registry(root).load("ada-viewer")
    rng = np.random.default_rng(0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(f"{url}/viewer/?render=client")
        _wait_settled(page)
        assert sum(r.endswith("/bundle") for r in requests) == 1, requests

        # exact decode: 20 random latents set through the sliders, read back from the page
        worst = {}
        for _ in range(20):
            for a in avatar.layout.attributes:
                _set_slider(page, "attributes", a.name, round(float(rng.uniform(0, a.num_edits - 1)), 2))
            for e in avatar.layout.expressions:
                _set_slider(page, "expressions", e, round(float(rng.uniform(0, 1)), 2))
            page.wait_for_timeout(30)
            page.wait_for_function("() => { const s = perseViewer.shown(); const st = perseViewer.state;"
                                   " return s && JSON.stringify(s.attributes) === JSON.stringify(st.attributes)"
                                   " && JSON.stringify(s.expression) === JSON.stringify(st.expression); }",
                                   timeout=60_000)
            shown = page.evaluate("() => perseViewer.shown()")
            z = avatar.latent(shown["attributes"], shown["expression"])
            with torch.no_grad():
                ref = avatar.model.gaussians(z[None])
            for k, v in ref.items():
                err = float(np.abs(np.asarray(shown[k], np.float64) - v[0].numpy().reshape(-1)).max())
                worst[k] = max(worst.get(k, 0.0), err)
        print(f"client decode, max abs error over 20 latents (float32 bundle): {worst}")
        assert max(worst.values()) <= 1e-5, worst

        # same picture: the page's canvas and the server's PNG for one latent and camera
        _wait_settled(page)
        state = page.evaluate("() => ({attributes: perseViewer.state.attributes, expression: perseViewer.state.expression})")
        client_img = _client_shot(page)
        server_png = _post(f"{url}/v1/avatars/ada-viewer/render", {**state, "width": SIDE, "height": SIDE})
        server_img = _png(server_png)
        z = avatar.latent(state["attributes"], state["expression"])
        views, Ks = avatar.cameras([(0.0, 0.0)], SIDE, SIDE)
        with torch.no_grad():
            _, alpha, _ = avatar.model.render(z[None], views[None], Ks[None], SIDE, SIDE)
        mask = alpha[0, 0, ..., 0].numpy() > 0.5
        assert client_img.shape == server_img.shape == (SIDE, SIDE, 3)
        psnr = _psnr(client_img, server_img, mask)
        from PIL import Image

        pair = np.concatenate([client_img, server_img], axis=1).astype(np.uint8)
        Image.fromarray(pair).save(ARTIFACTS / "viewer_client_vs_server.png")
        print(f"client vs server PSNR on the avatar's pixels ({int(mask.sum())} px): {psnr:.2f} dB")
        (ARTIFACTS / "viewer_client_psnr_db.txt").write_text(f"{psnr:.2f}\n")
        assert psnr >= 30.0, psnr

        # no round trips: every slider and 5 s of orbiting and zooming send nothing to the server
        requests.clear()
        decodes = page.evaluate("() => perseViewer.branchDecodes")
        for a in avatar.layout.attributes:
            for v in np.linspace(0, a.num_edits - 1, 6):
                _set_slider(page, "attributes", a.name, float(v))
                page.wait_for_timeout(20)
        for e in avatar.layout.expressions:
            for v in np.linspace(0, 1, 4):
                _set_slider(page, "expressions", e, float(v))
                page.wait_for_timeout(20)
        box = page.locator("#frame").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx, cy)
        page.mouse.down()
        t0, frames0 = time.time(), page.evaluate("() => perseViewer.frames")
        decodes_before_orbit = page.evaluate("() => perseViewer.branchDecodes")
        i = 0
        while time.time() - t0 < 5.0:
            page.mouse.move(cx + 120 * np.sin(i / 8), cy + 40 * np.cos(i / 11))
            if i % 10 == 0:
                page.mouse.wheel(0, 60 if i % 20 else -60)
            page.wait_for_timeout(16)
            i += 1
        page.mouse.up()
        fps = (page.evaluate("() => perseViewer.frames") - frames0) / (time.time() - t0)
        assert page.evaluate("() => perseViewer.branchDecodes") == decodes_before_orbit  # orbit decodes nothing
        assert page.evaluate("() => perseViewer.branchDecodes") > decodes
        assert requests == [], requests
        print(f"orbit: {fps:.1f} frames/s (software GL: SwiftShader, says nothing about a GPU)")

        # the bundle is cached: a reload fetches it from the browser's cache, not the server
        page.reload()
        _wait_settled(page)
        entries = page.evaluate("() => performance.getEntriesByType('resource')"
                                ".filter(e => e.name.endsWith('/bundle')).map(e => [e.transferSize, e.decodedBodySize])")
        assert len(entries) == 1 and entries[0][0] == 0 and entries[0][1] > 0, entries
        assert not any("/render" in r for r in requests), requests

        # switching to server rendering works and renders through /render again
        page.click("#client-mode")
        _wait_for_new_image(page, None)
        assert page.evaluate("() => perseViewer.mode") == "server" and "render=server" in page.url
        browser.close()


def test_bad_bundles_and_unknown_avatars_show_a_message_and_fall_back_to_the_server(viewer):
    sync_api = _browser_or_skip()
    url, _ = viewer
    with urllib.request.urlopen(f"{url}/v1/avatars/ada-viewer@v0001/bundle", timeout=120) as r:
        good = r.read()
    version = struct.pack("<I", 99)
    head_len = struct.unpack_from("<I", good, 8)[0]
    header = json.loads(good[12:12 + head_len])
    header["sections"][-1]["nbytes"] = 1 << 30
    head = json.dumps(header).encode()
    huge = struct.pack("<4sII", b"PRWB", struct.unpack_from("<I", good, 4)[0], len(head)) + head + b"\0" * ((-(12 + len(head))) % 4) \
        + good[(12 + head_len + 3) & ~3:]
    cases = {"truncated": (good[:-1000], "truncated"), "wrong version": (good[:4] + version + good[8:], "version 99"),
             "too large": (huge, "over the cap")}
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        for name, (data, phrase) in cases.items():
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            def serve_bad(route, request, body=data):
                route.fulfill(status=200, body=body, headers={"Content-Type": "application/octet-stream"})

            page.route("**/bundle", serve_bad)
            page.goto(f"{url}/viewer/?render=client")
            _wait_for_new_image(page, None)  # the server renders instead
            banner = page.locator("#banner").inner_text()
            assert "Browser rendering unavailable" in banner and phrase in banner, (name, banner)
            assert page.evaluate("() => perseViewer.mode") == "server"
            _set_slider(page, "attributes", "hair", 1.0)  # and stays usable
            _wait_for_new_image(page, page.locator("#view").get_attribute("data-seq"))
            page.close()
        page = browser.new_page()
        page.goto(f"{url}/viewer/?avatar=nobody&render=client")
        page.wait_for_function("() => !document.getElementById('banner').hidden", timeout=60_000)
        assert "nobody" in page.locator("#banner").inner_text()
        _wait_settled(page)  # the known avatar is shown instead
        browser.close()


def test_bundle_route_versions_etag_and_errors(viewer):
    url, _ = viewer

    def get(path, headers=None):
        req = urllib.request.Request(url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    status, headers, latest = get("/v1/avatars/ada-viewer/bundle")
    assert status == 200 and headers["Cache-Control"] == "private, no-cache" and headers["X-Avatar-Version"] == "v0001"
    status, pinned_headers, pinned = get("/v1/avatars/ada-viewer@v0001/bundle")
    assert status == 200 and pinned == latest and "immutable" in pinned_headers["Cache-Control"]
    assert pinned_headers["ETag"] == headers["ETag"]
    status, _, body = get("/v1/avatars/ada-viewer@v0001/bundle", {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b""
    for path, code in [("/v1/avatars/ada-viewer@v0002/bundle", 404), ("/v1/avatars/nobody/bundle", 404),
                       ("/v1/avatars/ada-viewer@2/bundle", 400), ("/v1/avatars/Bad%20Id/bundle", 400)]:
        status, _, body = get(path)
        assert status == code, (path, status, body)
        assert json.loads(body)["detail"], body
    # exactly the renderer's files are served from node_modules
    assert get("/vendor/spark/spark.module.js")[0] == 200
    assert get("/vendor/three/package.json")[0] == 404


def test_splat_renderers_own_ply_loader_reads_our_export(viewer):
    """Spark's PLY loader (not ours) reads the server's .ply: count and parameters, to its packing."""
    sync_api = _browser_or_skip()
    url, root = viewer
    avatar = Registry(root).load("ada-viewer")
    sliders = {"attributes": {"hair": 0.7}, "expression": {avatar.layout.expressions[0]: 0.4}}
    ply = _post(f"{url}/v1/avatars/ada-viewer/ply", sliders)
    z = avatar.latent(sliders["attributes"], sliders["expression"])
    with torch.no_grad():
        ref = {k: v[0].numpy() for k, v in avatar.model.gaussians(z[None]).items()}
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page()
        page.goto(f"{url}/viewer/?render=server")
        got = page.evaluate("""async (bytes) => {
          const { PackedSplats } = await import("@sparkjsdev/spark");
          const packed = new PackedSplats({ fileBytes: new Uint8Array(bytes), fileType: "ply" });
          await packed.initialized;
          const out = { n: packed.numSplats, centers: [], scales: [], opacities: [], colors: [] };
          packed.forEachSplat((i, c, s, q, o, col) => {
            out.centers.push([c.x, c.y, c.z]); out.scales.push([s.x, s.y, s.z]);
            out.opacities.push(o); out.colors.push([col.r, col.g, col.b]);
          });
          return out;
        }""", list(ply))
        browser.close()
    assert got["n"] == 400
    # Spark packs a splat into 16 bytes: float16 centres, 8-bit colour, opacity and log-scale codes
    np.testing.assert_allclose(np.array(got["centers"]), ref["means"], atol=2e-4)
    np.testing.assert_allclose(np.array(got["opacities"]), ref["opacities"], atol=1 / 255 + 1e-6)
    np.testing.assert_allclose(np.array(got["colors"]), ref["colors"], atol=1 / 255 + 1e-6)
    np.testing.assert_allclose(np.array(got["scales"]), ref["scales"], rtol=0.05)
