"""A small HTTP client for the render API (serve/app.py).

    with RenderClient("http://127.0.0.1:8000") as client:
        print(client.list())
        image = client.render("ada-1234abcd", attributes={"hair": 1.5}, expression={"smile": 0.8},
                              yaw=20, pitch=-5, size=256)   # a PIL image
        client.ply("ada-1234abcd", attributes={"hair": 1.5}, path="ada.ply")

Errors carry the server's message: ``AvatarNotFound`` (404), ``InvalidRequest`` (400, 413, 422),
``RenderError`` for anything else (``.status`` is the HTTP status, 0 when the server was unreachable).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx


class RenderError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


class AvatarNotFound(RenderError):
    pass


class InvalidRequest(RenderError, ValueError):
    pass


class RenderClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0, token: str | None = None):
        """``token``: an API key or viewer-link token, sent as ``Authorization: Bearer``; default
        ``$PERSE_API_KEY`` (none where unset, as a server in ``auth: none`` mode expects)."""
        token = token if token is not None else os.environ.get("PERSE_API_KEY")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers)

    def __enter__(self) -> RenderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ API

    def health(self) -> bool:
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def list(self) -> list[dict[str, Any]]:
        """Every avatar's newest version: id, version, attributes (name -> edit labels), expressions."""
        return self._request("GET", "/v1/avatars").json()

    def manifest(self, avatar_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/avatars/{_segment(avatar_id)}").json()

    def render_png(self, avatar_id: str, **request) -> bytes:
        """PNG bytes; takes the keyword arguments of ``render``."""
        return self._request("POST", f"/v1/avatars/{_segment(avatar_id)}/render", json=_body(**request)).content

    def render(self, avatar_id: str, *, attributes: dict[str, float] | None = None,
               expression: dict[str, float] | None = None, latent: list[float] | None = None,
               yaw: float = 0.0, pitch: float = 0.0, size: int | tuple[int, int] = 256):
        """A PIL RGB image. ``size`` is a side or (width, height); ``latent`` replaces attributes/expression."""
        from PIL import Image

        png = self.render_png(avatar_id, attributes=attributes, expression=expression, latent=latent,
                              yaw=yaw, pitch=pitch, size=size)
        image = Image.open(io.BytesIO(png))
        image.load()
        return image

    def ply(self, avatar_id: str, *, attributes: dict[str, float] | None = None,
            expression: dict[str, float] | None = None, latent: list[float] | None = None,
            path: str | os.PathLike | None = None) -> bytes:
        """The avatar's Gaussians at that latent as a 3DGS .ply (also written to ``path`` if given)."""
        data = self._request("POST", f"/v1/avatars/{_segment(avatar_id)}/ply",
                             json=_body(attributes=attributes, expression=expression, latent=latent)).content
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def bundle(self, avatar_id: str) -> bytes:
        """The web bundle (perse_ray.avatar.bundle) of ``id`` or ``id@version``."""
        return self._request("GET", f"/v1/avatars/{quote(avatar_id, safe='@')}/bundle").content

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise RenderError(0, f"{self._http.base_url}: {e}") from e
        if response.status_code >= 400:
            try:
                message = str(response.json().get("detail", response.text))
            except ValueError:
                message = response.text
            kind = (AvatarNotFound if response.status_code == 404
                    else InvalidRequest if response.status_code in (400, 413, 422) else RenderError)
            raise kind(response.status_code, message)
        return response


def _segment(avatar_id: str) -> str:
    return quote(avatar_id, safe="")  # an id is one path segment, whatever it holds


def _body(*, attributes=None, expression=None, latent=None, yaw=0.0, pitch=0.0, size=256) -> dict[str, Any]:
    width, height = (size, size) if isinstance(size, int) else size
    body: dict[str, Any] = {"camera": {"yaw": yaw, "pitch": pitch}, "width": width, "height": height}
    if latent is not None:
        body["latent"] = [float(v) for v in latent]
    if attributes:
        body["attributes"] = dict(attributes)
    if expression:
        body["expression"] = dict(expression)
    return body
