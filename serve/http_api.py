"""The HTTP front-end: the FastAPI app of one Ingress replica (routes, bodies, errors, viewer).

``make_http_app(ingress)`` builds it; the routes call the Ingress (``ingress.catalog`` answers
listings, manifests and validation from memory; ``ingress.call`` reaches the Renderer).
Bodies are strict: only JSON numbers for numbers, no unknown keys, no NaN/Infinity, and
``BodyLimit`` answers 413 before anything parses a body over ``max_body_bytes``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from starlette.convertors import PathConvertor, register_url_convertor

from serve.api import DEFAULT_SIDE, LIMITS, MAX_PITCH, MAX_YAW, ApiError, rss_bytes

WEB = Path(__file__).resolve().parent / "web"  # the browser viewer, served at /viewer/ when present


def _number(value: Any) -> Any:
    """Only JSON numbers (pydantic's lax float would take "1.5" and true)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    return value


Number = Annotated[float, BeforeValidator(_number)]
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class CameraBody(BaseModel):
    model_config = _STRICT
    yaw: Number = Field(0.0, description=f"degrees, |yaw| <= {MAX_YAW:g}; + shows the subject's left cheek")
    pitch: Number = Field(0.0, description=f"degrees, |pitch| <= {MAX_PITCH:g}; + looks from above")


class RenderBody(BaseModel):
    model_config = _STRICT
    attributes: dict[str, Number] = Field(default_factory=dict,
                                          description="slider per attribute, in [0, number of edits - 1]")
    expression: dict[str, Number] = Field(default_factory=dict, description="value per expression, in [-1, 2]")
    latent: list[Number] | None = Field(None, description="a raw z of the avatar's exact length, "
                                                          "instead of attributes and expression")
    camera: CameraBody = Field(default_factory=CameraBody)
    width: StrictInt = Field(DEFAULT_SIDE, description="pixels, in [min_side, max_side] (16..1024 by default)")
    height: StrictInt = Field(DEFAULT_SIDE, description="pixels, in [min_side, max_side] (16..1024 by default)")

    def spec_fields(self) -> dict[str, Any]:
        return {"attributes": self.attributes, "expression": self.expression, "latent": self.latent,
                "yaw": self.camera.yaw, "pitch": self.camera.pitch, "width": self.width, "height": self.height}


class AvatarSummary(BaseModel):
    """One item of GET /v1/avatars (documentation: the body is encoded once per registry change)."""

    id: str
    version: str
    attributes: dict[str, list[str]] = Field(description="attribute name -> edit labels (0 = source)")
    expressions: list[str]


class _AnyId(PathConvertor):
    """Any text, "/" and newlines included, so every malformed id reaches validation (400) instead of
    missing every route (404). Starlette's ``path`` convertor stops at a newline."""

    regex = "(?s:.+)"


register_url_convertor("avatar_id", _AnyId())

PNG = {200: {"content": {"image/png": {}}, "description": "the rendered image"}}
PLY = {200: {"content": {"application/octet-stream": {}}, "description": "binary little-endian 3DGS .ply"}}
ERRORS = {400: {"description": "malformed avatar id"}, 404: {"description": "no such avatar"},
          413: {"description": "body too large"}, 422: {"description": "invalid field (named in detail)"},
          500: {"description": "the avatar's files or manifest are unusable (named in detail)"}}


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        messages, size = [], 0
        while True:  # a chunked body has no length up front: stop reading at the cap
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _too_large(self, scope, receive, send):
        return JSONResponse({"detail": f"body: larger than {self.max_bytes} bytes"}, 413)(scope, receive, send)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """One readable line per problem, each naming the field (``camera.yaw: ...``, ``latent[3]: ...``)."""
    lines = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        if len(loc) > 1 and loc[0] == "body" and isinstance(loc[1], str):
            loc = loc[1:]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        lines.append(f"{field or 'body'}: {err.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(lines)[:1000]}, status_code=422)


def make_http_app(ingress) -> FastAPI:
    """The FastAPI app of one Ingress replica (routes call into ``ingress``; limits from its config).
    Every route but render/ply answers from memory, on the event loop, without a thread."""
    app = FastAPI(title="perse-ray render API", version="1",
                  description="Render and export personalized 3D Gaussian avatars. " + LIMITS)
    app.add_middleware(BodyLimit, max_bytes=ingress.cfg.max_body_bytes)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    catalog = ingress.catalog

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/avatars", response_model=list[AvatarSummary])
    async def list_avatars() -> Response:
        """The newest version of every avatar, sorted by id (an avatar whose entry is unusable is left out)."""
        return Response(catalog.snapshot.listing_json, media_type="application/json")

    @app.get("/v1/avatars/{avatar_id:avatar_id}", responses=ERRORS)
    async def manifest(avatar_id: str) -> dict[str, Any]:
        """The avatar's manifest: avatar.json without internal fields such as the training config."""
        return catalog.manifest(avatar_id)

    @app.post("/v1/avatars/{avatar_id:avatar_id}/render", response_class=Response, responses={**PNG, **ERRORS})
    async def render(avatar_id: str, body: RenderBody) -> Response:
        job = catalog.job(avatar_id, **body.spec_fields())
        return Response(await ingress.call("render", job), media_type="image/png")

    @app.post("/v1/avatars/{avatar_id:avatar_id}/ply", response_class=Response, responses={**PLY, **ERRORS})
    async def ply(avatar_id: str, body: RenderBody) -> Response:
        """The Gaussians of the request's latent as a standard 3DGS .ply (camera and size are checked, unused)."""
        job = catalog.job(avatar_id, **body.spec_fields())
        return Response(await ingress.call("ply", job), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{avatar_id}.ply"'})

    if (WEB / "index.html").is_file():
        @app.get("/", include_in_schema=False)
        def home() -> RedirectResponse:
            return RedirectResponse("/viewer/")

        app.mount("/viewer", StaticFiles(directory=WEB, html=True), name="viewer")

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """Debugging: this ingress process (registry index included) and the renderer replica that answers."""
        return {"ingress": {"pid": os.getpid(), "rss_bytes": rss_bytes(), "index": catalog.stats()},
                "renderer": await ingress.renderer.stats.remote()}

    return app
