"""The web viewer in a real headless Chromium (Debian's package) against a Serve app with an avatar.

Needs /usr/bin/chromium (``.ci/run`` installs it); elsewhere the test is skipped, except in CI
where a missing browser is a failure. A screenshot is kept in ``test-artifacts/``.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import sys
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

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _browser_or_skip():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run must install Debian's chromium package")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
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
def viewer_url(ray_cluster, tmp_path_factory):
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
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _image(page) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator("#view").screenshot())).convert("RGB"), dtype=np.int16)


def _wait_for_new_image(page, previous_seq: str | None) -> str:
    page.wait_for_function(
        "prev => { const v = document.getElementById('view');"
        " return v.dataset.seq && v.dataset.seq !== prev && v.complete && v.naturalWidth > 0; }",
        arg=previous_seq, timeout=60_000)
    return page.locator("#view").get_attribute("data-seq")


def _set_slider(page, container: str, name: str, value: float) -> None:
    page.eval_on_selector(f"#{container} input[data-name='{name}']",
                          "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def test_viewer_lists_renders_persists_state_and_shows_errors(viewer_url):
    sync_api = _browser_or_skip()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(viewer_url + "/")
        # the page lists the avatar and renders it
        page.wait_for_selector("#avatar option[value='ada-viewer']", state="attached", timeout=60_000)
        seq = _wait_for_new_image(page, None)
        before = _image(page)

        # moving a slider changes the image and the URL
        _set_slider(page, "attributes", "hair", 1.0)
        seq = _wait_for_new_image(page, seq)
        after = _image(page)
        assert np.abs(after - before).mean() > 2.0
        page.screenshot(path=str(ARTIFACTS / "viewer.png"), full_page=True)
        assert "a.hair=1" in page.url and "avatar=ada-viewer" in page.url
        latency_ms = float(page.locator("#view").get_attribute("data-latency-ms"))

        # reloading that URL restores the same image
        shared = page.url
        page.goto(shared)
        _wait_for_new_image(page, None)
        assert np.abs(_image(page) - after).max() <= 2

        # an out-of-range value in the URL shows the server's error; the page stays usable
        page.goto(shared.replace("a.hair=1", "a.hair=99"))
        page.wait_for_function("() => !document.getElementById('banner').hidden", timeout=60_000)
        banner = page.locator("#banner").inner_text()
        assert "hair" in banner and "99" in banner, banner
        _set_slider(page, "attributes", "hair", 0.5)
        _wait_for_new_image(page, None)
        page.wait_for_function("() => document.getElementById('banner').hidden", timeout=60_000)
        browser.close()
    print(f"viewer slider→image latency: {latency_ms:.0f} ms")
    (ARTIFACTS / "viewer_latency_ms.txt").write_text(f"{latency_ms:.1f}\n")
