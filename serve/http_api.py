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

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from starlette.convertors import PathConvertor, register_url_convertor

from perse_ray.schema import validate_subject_id
from serve.api import DEFAULT_SIDE, LIMITS, MAX_PITCH, MAX_YAW, ApiError, rss_bytes
from serve.bundle_api import add_bundle_routes
from serve.auth import MAX_LINK_TTL_S, AuthError, Principal

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
ERRORS = {400: {"description": "malformed avatar id"},
          401: {"description": "auth: keys: no, unusable, revoked or expired credentials"},
          403: {"description": "the key lacks the route's scope for an avatar it may see"},
          404: {"description": "no such avatar, or one the key may not see (answered alike)"},
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


# The scope each route needs (serve.auth.Auth.require). Every route of the app goes through
# ``guard``: a route missing here needs ``admin``, so a route added later is closed until it is
# given a scope. Only OPEN_PATHS (and the static viewer files under /viewer) take no credentials.
ROUTE_SCOPES = {
    ("GET", "/v1/avatars"): "list",
    ("GET", "/v1/avatars/{avatar_id}"): "view",  # the manifest: any scope that sees the avatar
    ("POST", "/v1/avatars/{avatar_id}/render"): "render",
    ("POST", "/v1/avatars/{avatar_id}/ply"): "export",
    ("GET", "/v1/avatars/{avatar_id}/bundle"): "bundle",  # export, or a viewer link for that avatar
    ("POST", "/v1/avatars/{avatar_id}/links"): "render",
    ("DELETE", "/v1/avatars/{avatar_id}"): "admin",
    ("GET", "/v1/stats"): "admin",
}
OPEN_PATHS = frozenset({"/healthz", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# Static files: the viewer page (it sends a key or link token itself) and its public npm modules.
OPEN_MOUNTS = frozenset({"/viewer", "/vendor"})
AUDITED = {"render": "render", "export": "export", "bundle": "export", "admin": "admin"}


def route_scope(method: str, path_format: str) -> str | None:
    """The scope a route needs; None for an open path."""
    if path_format in OPEN_PATHS:
        return None
    return ROUTE_SCOPES.get((method, path_format), "admin")


def make_guard(ingress):
    """The app-wide dependency: authenticate, then check the route's scope for its avatar."""
    auth, catalog = ingress.auth, ingress.catalog

    async def guard(request: Request) -> None:
        route = request.scope.get("route")
        scope = route_scope(request.method, getattr(route, "path_format", request.url.path))
        if scope is None:
            return
        subject = request.path_params.get("avatar_id")
        pinned = None
        if subject is not None:
            if scope == "bundle":  # "<id>@<version>" pins a version of the bundle
                subject, _, pinned = subject.partition("@")
            try:
                validate_subject_id(subject)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
        principal: Principal | None = None
        try:
            principal = auth.authenticate(request.headers.get("authorization"))
            avatar = catalog.snapshot.avatars.get(subject) if subject else None
            auth.require(principal, scope, subject, pinned or (avatar.entry.version if avatar else None))
        except AuthError as e:
            if scope in AUDITED:
                ingress.audit(AUDITED[scope], principal.key_id if principal else "-", f"denied {e.status}", subject)
            raise
        request.state.principal = principal

    return guard


async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)


class LinkBody(BaseModel):
    model_config = _STRICT
    scopes: list[str] = Field(default_factory=lambda: ["render"], description="render and/or export")
    ttl_s: StrictInt = Field(3600, description=f"seconds the link stays valid, at most {MAX_LINK_TTL_S}")


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


AUTH_DOC = ("Authentication (auth: keys): send Authorization: Bearer <API key or viewer link token>. "
            "401: no, unusable, revoked or expired credentials. 403: a valid key without the route's scope "
            "(list, render, export, admin) for an avatar it may see. An avatar the key may not see at all "
            "is answered 404, exactly like one that does not exist, so a key cannot find out who else has "
            "an avatar. /healthz, /docs, /openapi.json and the viewer's static files are open.")


def make_http_app(ingress) -> FastAPI:
    """The FastAPI app of one Ingress replica (routes call into ``ingress``; limits from its config).
    Every route but render/ply answers from memory, on the event loop, without a thread."""
    app = FastAPI(title="perse-ray render API", version="1", dependencies=[Depends(make_guard(ingress))],
                  description="Render and export personalized 3D Gaussian avatars. " + LIMITS + " " + AUTH_DOC)
    app.add_middleware(BodyLimit, max_bytes=ingress.cfg.max_body_bytes)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(AuthError, _auth_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    catalog = ingress.catalog
    add_bundle_routes(app, catalog, ingress.audit)  # before the manifest route, whose id convertor would take ".../bundle"

    async def audited(action: str, request: Request, job, call):
        principal = request.state.principal
        version = job.model_id.split("@", 1)[1]
        try:
            result = await call
        except ApiError as e:
            ingress.audit(action, principal.key_id, f"error {e.status}", job.model_id.split("@")[0], version)
            raise
        ingress.audit(action, principal.key_id, "ok", job.model_id.split("@")[0], version)
        return result

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/avatars", response_model=list[AvatarSummary], responses=ERRORS)
    async def list_avatars(request: Request, after: str = Query("", description="the last id of the previous page"),
                           limit: int | None = Query(None, description="page size, at most max_page_size (1000)"),
                           ) -> Response:
        """The newest version of every avatar the caller may see, sorted by id (an avatar whose entry
        is unusable is left out). Paged with ``limit`` (and ``after``): the ``X-Next-After`` header
        (and a ``Link: rel="next"``) names the next page; none on the last. Without ``limit`` and
        ``after``, a caller who may see every avatar gets the whole listing in one body, and a key
        limited to some subjects gets its first ``max_page_size``."""
        subjects = request.state.principal.subjects
        if subjects is None and limit is None and not after:
            return Response(catalog.snapshot.listing_json, media_type="application/json")
        items, next_after = catalog.page(after, limit, subjects)
        headers = {}
        if next_after:
            size = f"&limit={limit}" if limit else ""
            headers = {"X-Next-After": next_after, "Link": f'</v1/avatars?after={next_after}{size}>; rel="next"'}
        return JSONResponse(items, headers=headers)

    @app.get("/v1/avatars/{avatar_id:avatar_id}", responses=ERRORS)
    async def manifest(avatar_id: str) -> dict[str, Any]:
        """The avatar's manifest: avatar.json without internal fields such as the training config."""
        return catalog.manifest(avatar_id)

    @app.post("/v1/avatars/{avatar_id:avatar_id}/render", response_class=Response, responses={**PNG, **ERRORS})
    async def render(avatar_id: str, body: RenderBody, request: Request) -> Response:
        job = catalog.job(avatar_id, **body.spec_fields())
        png = await audited("render", request, job, ingress.call("render", job))
        return Response(png, media_type="image/png")

    @app.post("/v1/avatars/{avatar_id:avatar_id}/ply", response_class=Response, responses={**PLY, **ERRORS})
    async def ply(avatar_id: str, body: RenderBody, request: Request) -> Response:
        """The Gaussians of the request's latent as a standard 3DGS .ply (camera and size are checked, unused)."""
        job = catalog.job(avatar_id, **body.spec_fields())
        data = await audited("export", request, job, ingress.call("ply", job))
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{avatar_id}.ply"'})

    if (WEB / "index.html").is_file():
        @app.get("/", include_in_schema=False)
        def home() -> RedirectResponse:
            return RedirectResponse("/viewer/")

        app.mount("/viewer", StaticFiles(directory=WEB, html=True), name="viewer")

    @app.post("/v1/avatars/{avatar_id:avatar_id}/links", responses=ERRORS)
    async def create_link(avatar_id: str, body: LinkBody, request: Request) -> dict[str, Any]:
        """A signed, expiring viewer link for this avatar's current version (needs ``render`` on it;
        ``export`` in ``scopes`` needs ``export`` too). ``token`` goes in ``Authorization: Bearer``;
        ``viewer`` is the page's address with the token in its fragment (never sent to a server)."""
        principal = request.state.principal
        entry, _, _ = catalog.resolve(avatar_id)
        try:
            token, expires = ingress.auth.create_link(principal, avatar_id, entry.version, body.scopes, body.ttl_s)
        except AuthError as e:
            ingress.audit("link", principal.key_id, f"denied {e.status}", avatar_id, entry.version)
            raise
        ingress.audit("link", principal.key_id, "ok", avatar_id, entry.version, expires_at=expires,
                      scopes=sorted(body.scopes))
        return {"token": token, "expires_at": expires, "subject": avatar_id, "version": entry.version,
                "viewer": f"/viewer/?avatar={avatar_id}#token={token}"}

    @app.delete("/v1/avatars/{avatar_id:avatar_id}", responses=ERRORS)
    async def delete_subject(avatar_id: str, request: Request) -> dict[str, Any]:
        """Admin: delete everything the build output holds of this subject (perse_ray.deletion):
        frames, rejected records, report pages, checkpoints, every registry version, evaluation
        caches. Idempotent. Every Ingress stops serving it within index_refresh_s, and each
        Renderer drops its loaded copy within the same delay."""
        return await ingress.delete_subject(avatar_id, request.state.principal.key_id)

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """Debugging: this ingress process (registry index included) and the renderer replica that answers."""
        return {"ingress": {"pid": os.getpid(), "rss_bytes": rss_bytes(), "index": catalog.stats()},
                "renderer": await ingress.renderer.stats.remote()}

    return app
