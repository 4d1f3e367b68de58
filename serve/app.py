"""The render API on Ray Serve: HTTP (FastAPI) and gRPC in front of a batched, multiplexed renderer.

    Ingress   validates every request (id, names, ranges, sizes) against the avatar's manifest, then
              calls the Renderer with ``multiplexed_model_id = "<subject>@<version>"`` so Serve routes
              requests for one avatar to a replica that already holds it.
    Renderer  keeps at most ``max_avatars_per_replica`` avatars loaded (``@serve.multiplexed``, LRU) and
              renders with ``@serve.batch``: the latents of one batch that share an avatar and an image
              size go through one decoder + rasterize call (B latents x 1 camera each).

Run it with ``serve run serve/config.yaml`` (or ``serve.run(build_app({"registry": path}))``).
The request limits (``LIMITS``) are also on the OpenAPI page (/docs) and in render.proto.

Serve pickles the deployment classes when they are decorated, so everything they use is defined above
them, and the FastAPI app is built per replica (``__serve_build_asgi_app__``) from the replica's config.
"""

import asyncio
import copy
import dataclasses
import functools
import io
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

import grpc
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from google.protobuf.message import DecodeError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from starlette.convertors import PathConvertor, register_url_convertor
from ray import serve
from ray.serve.handle import DeploymentHandle

from perse_ray.avatar import Avatar, AvatarFormatError, LatentLayout, export_ply
from perse_ray.avatar.io import META_FILE
from perse_ray.config import ServeConfig, from_dict
from perse_ray.registry import Registry, RegistryError, validate_subject_id
from serve import render_pb2

DEFAULT_SIDE = 256
MAX_YAW, MAX_PITCH = 90.0, 60.0
LIMITS = ("Limits: |yaw| <= 90 and |pitch| <= 60 degrees; width and height in [min_side, max_side] "
          "(16..1024 by default); sliders in [0, number of edits - 1]; expression values in [-1, 2]; "
          "a latent has the avatar's exact length; every number finite; bodies up to max_body_bytes. "
          "Floats are rounded to float32 (gRPC's float), so one request renders the same pixels over "
          "HTTP and gRPC.")
WEB = Path(__file__).resolve().parent / "web"  # the browser viewer, served at /viewer/ when present
# avatar.json fields a client may see (the rest, e.g. the training config, stays internal).
PUBLIC_MANIFEST = ("created_at", "preset", "metrics", "camera", "layout", "format", "format_version")


class ApiError(Exception):
    """A request the API refuses: HTTP status + message naming the field; mapped to a gRPC code."""

    GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                  413: grpc.StatusCode.RESOURCE_EXHAUSTED, 422: grpc.StatusCode.INVALID_ARGUMENT}

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message[:1000]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.GRPC_CODES.get(self.status, grpc.StatusCode.INTERNAL)


# --------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class RenderSpec:
    """A validated render request (every float already rounded to float32)."""

    attributes: dict[str, float]
    expression: dict[str, float]
    latent: tuple[float, ...] | None
    yaw: float
    pitch: float
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class RenderJob:
    model_id: str  # "<subject>@<version>": a new version is a new model for the multiplexer
    spec: RenderSpec


def _f32(field: str, value: float) -> float:
    with np.errstate(over="ignore"):  # beyond float32: inf, refused below
        rounded = float(np.float32(value))
    if not math.isfinite(rounded):
        raise ApiError(422, f"{field}: {value!r} is not a finite float32 number")
    return rounded


def render_spec(layout: LatentLayout, cfg: ServeConfig, *, attributes: dict[str, float],
                expression: dict[str, float], latent: list[float] | None, yaw: float, pitch: float,
                width: int, height: int, camera: str = "camera.") -> RenderSpec:
    """Check a request against the avatar's layout and the server limits; ``ApiError(422)`` names the
    field. ``camera`` prefixes yaw/pitch in messages (``camera.yaw`` over HTTP, ``yaw`` over gRPC)."""
    for field, side in (("width", width), ("height", height)):
        if not cfg.min_side <= side <= cfg.max_side:
            raise ApiError(422, f"{field}: {side} outside [{cfg.min_side}, {cfg.max_side}]")
    yaw, pitch = _f32(f"{camera}yaw", yaw), _f32(f"{camera}pitch", pitch)
    if abs(yaw) > MAX_YAW:
        raise ApiError(422, f"{camera}yaw: {yaw:g} outside [-{MAX_YAW:g}, {MAX_YAW:g}] degrees")
    if abs(pitch) > MAX_PITCH:
        raise ApiError(422, f"{camera}pitch: {pitch:g} outside [-{MAX_PITCH:g}, {MAX_PITCH:g}] degrees")
    z = None
    if latent is not None:
        if attributes or expression:
            raise ApiError(422, "latent: give either latent or attributes/expression, not both")
        if len(latent) != layout.dim:
            raise ApiError(422, f"latent: length {len(latent)}, this avatar's latent has {layout.dim}")
        z = tuple(_f32(f"latent[{i}]", v) for i, v in enumerate(latent))
    attributes = {k: _f32(f"attributes.{k}", v) for k, v in attributes.items()}
    expression = {k: _f32(f"expression.{k}", v) for k, v in expression.items()}
    try:
        layout.check_values(attributes, expression)
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    return RenderSpec(attributes, expression, z, yaw, pitch, int(width), int(height))


@functools.lru_cache(maxsize=256)
def _layout(layout_json: str) -> LatentLayout:
    return LatentLayout.from_json(layout_json)


# --------------------------------------------------------------------------- rendering helpers


class _Resident:
    """An avatar loaded on a replica. Serve's multiplexer calls ``__del__`` when it evicts the entry."""

    def __init__(self, model_id: str, avatar: Avatar, model: torch.nn.Module, on_evict):
        self.model_id, self.avatar, self.model, self._on_evict = model_id, avatar, model, on_evict

    def __del__(self):
        self._on_evict(self)


def _latent(avatar: Avatar, spec: RenderSpec) -> torch.Tensor:
    if spec.latent is not None:
        return torch.tensor(spec.latent, dtype=torch.float32)
    return avatar.latent(spec.attributes, spec.expression)


@torch.no_grad()
def render_pngs(resident: _Resident, specs: list[RenderSpec], device: torch.device) -> list[bytes]:
    """One decoder + rasterize call for B latents of one avatar and size, each with its own camera."""
    avatar, width, height = resident.avatar, specs[0].width, specs[0].height
    z = torch.stack([_latent(avatar, s) for s in specs]).to(device)
    views, Ks = avatar.cameras([(s.yaw, s.pitch) for s in specs], width, height)
    rgb, _, _ = resident.model.render(z, views[:, None].to(device), Ks[:, None].to(device), width, height)
    pixels = (rgb[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [encode_png(p) for p in pixels]


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)  # level 1: fast, slightly larger
    return buf.getvalue()


def _ply_bytes(avatar: Avatar, z: torch.Tensor) -> bytes:
    with tempfile.TemporaryDirectory(prefix="perse-ply-") as tmp:
        return export_ply(avatar, z, Path(tmp) / "avatar.ply").read_bytes()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _warm_up(device: torch.device) -> None:
    """Build/load the rasterizer at start-up (the CPU kernel compiles once per machine, ~40 s)."""
    from perse_ray.render import rasterize

    d = device
    rasterize(torch.zeros(1, 3, device=d), torch.tensor([[1.0, 0, 0, 0]], device=d),
              torch.full((1, 3), 0.01, device=d), torch.ones(1, device=d), torch.ones(1, 3, device=d),
              torch.eye(4, device=d)[None], torch.eye(3, device=d)[None], 16, 16)


# --------------------------------------------------------------------------- HTTP


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
          413: {"description": "body too large"}, 422: {"description": "invalid field (named in detail)"}}


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


def make_http_app(ingress: "Ingress") -> FastAPI:
    """The FastAPI app of one Ingress replica (routes call into ``ingress``; limits from its config)."""
    app = FastAPI(title="perse-ray render API", version="1",
                  description="Render and export personalized 3D Gaussian avatars. " + LIMITS)
    app.add_middleware(BodyLimit, max_bytes=ingress.cfg.max_body_bytes)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/avatars", response_model=list[AvatarSummary])
    def list_avatars() -> list[AvatarSummary]:
        return ingress.summaries()

    @app.get("/v1/avatars/{avatar_id:avatar_id}", responses=ERRORS)
    def manifest(avatar_id: str) -> dict[str, Any]:
        """The avatar's manifest: avatar.json without internal fields such as the training config."""
        return ingress.manifest(avatar_id)

    @app.post("/v1/avatars/{avatar_id:avatar_id}/render", response_class=Response, responses={**PNG, **ERRORS})
    async def render(avatar_id: str, body: RenderBody) -> Response:
        job = ingress.job(avatar_id, **body.spec_fields())
        return Response(await ingress.call("render", job), media_type="image/png")

    @app.post("/v1/avatars/{avatar_id:avatar_id}/ply", response_class=Response, responses={**PLY, **ERRORS})
    async def ply(avatar_id: str, body: RenderBody) -> Response:
        """The Gaussians of the request's latent as a standard 3DGS .ply (camera and size are checked, unused)."""
        job = ingress.job(avatar_id, **body.spec_fields())
        return Response(await ingress.call("ply", job), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{avatar_id}.ply"'})

    if (WEB / "index.html").is_file():
        @app.get("/", include_in_schema=False)
        def home() -> RedirectResponse:
            return RedirectResponse("/viewer/")

        app.mount("/viewer", StaticFiles(directory=WEB, html=True), name="viewer")

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """Debugging: this ingress process and the renderer replica that answers (resident avatars, batches)."""
        return {"ingress": {"pid": os.getpid(), "rss_bytes": _rss_bytes()},
                "renderer": await ingress.renderer.stats.remote()}

    return app


def _set_status(grpc_context, error: ApiError) -> None:
    grpc_context.set_code(error.grpc_code)
    grpc_context.set_details(error.message)


# --------------------------------------------------------------------------- deployments


@serve.deployment(name="Renderer")
class Renderer:
    def __init__(self, registry_root: str, serve_cfg: dict[str, Any]):
        self.cfg = from_dict(ServeConfig, serve_cfg, "serve")
        self.registry = Registry(registry_root)
        self.device = torch.device("cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self._lock = threading.RLock()  # Serve runs __del__ (eviction) in an executor thread
        self._resident: dict[str, _Resident] = {}
        self._counts = {"loads": 0, "batches": 0, "requests": 0, "largest_batch": 0}

        async def load(model_id: str) -> _Resident:
            avatar, model = await asyncio.to_thread(self._read, model_id)
            resident = _Resident(model_id, avatar, model, self._forget)
            with self._lock:
                self._resident[model_id] = resident
                self._counts["loads"] += 1
            return resident

        # Decorated here, not on the class, so that the bound comes from the config.
        self._avatar = serve.multiplexed(max_num_models_per_replica=self.cfg.max_avatars_per_replica)(load)
        self._render_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._render_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        _warm_up(self.device)

    def _read(self, model_id: str) -> tuple[Avatar, torch.nn.Module]:
        subject, version = model_id.split("@")
        avatar = self.registry.load(subject, version)
        # The CPU copy composes latents and exports .ply; only rendering runs on the device.
        model = avatar.model if self.device.type == "cpu" else copy.deepcopy(avatar.model).to(self.device)
        return avatar, model

    def _forget(self, resident: _Resident) -> None:
        with self._lock:
            if self._resident.get(resident.model_id) is resident:
                del self._resident[resident.model_id]

    async def render(self, job: RenderJob) -> bytes:
        result = await self._render_batch(job)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _render_batch(self, jobs: list[RenderJob]) -> list[bytes | Exception]:
        # Serve already splits a batch by multiplexed model id; sizes differ per request: group by both.
        groups: dict[tuple[str, int, int], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.model_id, job.spec.width, job.spec.height), []).append(i)
        with self._lock:
            self._counts["batches"] += 1
            self._counts["largest_batch"] = max(self._counts["largest_batch"], len(jobs))
            self._counts["requests"] += len(jobs)
        results: list[bytes | Exception] = [b""] * len(jobs)
        for (model_id, _, _), members in groups.items():
            try:
                resident = await self._avatar(model_id)
                pngs = await asyncio.to_thread(render_pngs, resident, [jobs[i].spec for i in members], self.device)
            except Exception as e:  # fails this group's requests only
                pngs = [e] * len(members)
            for i, png in zip(members, pngs):
                results[i] = png
        return results

    async def ply(self, job: RenderJob) -> bytes:
        resident = await self._avatar(job.model_id)
        return await asyncio.to_thread(_ply_bytes, resident.avatar, _latent(resident.avatar, job.spec))

    def stats(self) -> dict[str, Any]:
        """This replica's process, resident avatars and batching counters (debugging, tests, benchmarks)."""
        with self._lock:
            return {"pid": os.getpid(), "rss_bytes": _rss_bytes(), "resident": sorted(self._resident),
                    "max_avatars": self.cfg.max_avatars_per_replica, "max_batch_size": self.cfg.max_batch_size,
                    **self._counts}


@serve.deployment(name="Ingress", max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    def __init__(self, renderer: DeploymentHandle, registry_root: str, serve_cfg: dict[str, Any]):
        self.renderer = renderer
        self.registry = Registry(registry_root)
        self.cfg = from_dict(ServeConfig, serve_cfg, "serve")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_http_app(self)

    # ------------------------------------------------------------- shared by HTTP and gRPC

    def resolve(self, avatar_id: str):
        """(registry entry, latent layout) of the avatar's newest version; 400 / 404."""
        try:
            validate_subject_id(avatar_id)  # before any filesystem access
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        try:
            entry = self.registry.get(avatar_id)
        except RegistryError as e:
            raise ApiError(404, str(e)) from None
        return entry, _layout(entry.latent_layout)

    def job(self, avatar_id: str, **fields) -> RenderJob:
        entry, layout = self.resolve(avatar_id)
        return RenderJob(f"{entry.subject_id}@{entry.version}", render_spec(layout, self.cfg, **fields))

    async def call(self, method: str, job: RenderJob) -> bytes:
        handle = self.renderer.options(multiplexed_model_id=job.model_id)
        try:
            return await getattr(handle, method).remote(job)
        except (RegistryError, AvatarFormatError) as e:  # removed or corrupted since it was resolved
            cause = getattr(e, "cause", None) or e  # the replica's exception, without Ray's traceback
            raise ApiError(404 if isinstance(e, RegistryError) else 500, f"avatar {job.model_id}: {cause}") from None

    def summaries(self) -> list[AvatarSummary]:
        out = []
        for e in self.registry.latest():
            layout = _layout(e.latent_layout)
            out.append(AvatarSummary(id=e.subject_id, version=e.version, expressions=list(layout.expressions),
                                     attributes={a.name: list(a.edit_labels) for a in layout.attributes}))
        return out

    def manifest(self, avatar_id: str) -> dict[str, Any]:
        entry, _ = self.resolve(avatar_id)
        meta = json.loads((entry.path / META_FILE).read_text())
        return {"id": entry.subject_id, "version": entry.version,
                **{k: meta[k] for k in PUBLIC_MANIFEST if k in meta}}

    # ------------------------------------------------------------- gRPC (perse.v1.Renderer)

    async def Render(self, request: bytes, grpc_context) -> render_pb2.RenderReply:  # noqa: N802
        try:
            msg = self._parse(request, render_pb2.RenderRequest)
            job = self.job(msg.avatar_id, attributes=dict(msg.attributes), expression=dict(msg.expression),
                           latent=list(msg.latent) or None, yaw=msg.yaw, pitch=msg.pitch,
                           width=msg.width if msg.HasField("width") else DEFAULT_SIDE,
                           height=msg.height if msg.HasField("height") else DEFAULT_SIDE, camera="")
            png = await self.call("render", job)
            return render_pb2.RenderReply(png=png, width=job.spec.width, height=job.spec.height)
        except ApiError as e:
            _set_status(grpc_context, e)
            return render_pb2.RenderReply()

    async def ListAvatars(self, request: bytes, grpc_context) -> render_pb2.ListAvatarsReply:  # noqa: N802
        try:
            self._parse(request, render_pb2.ListAvatarsRequest)
        except ApiError as e:
            _set_status(grpc_context, e)
            return render_pb2.ListAvatarsReply()
        return render_pb2.ListAvatarsReply(avatars=[
            render_pb2.AvatarInfo(id=s.id, version=s.version, expressions=s.expressions,
                                  attributes=[render_pb2.Attribute(name=n, edit_labels=labels)
                                              for n, labels in s.attributes.items()])
            for s in await asyncio.to_thread(self.summaries)])

    def _parse(self, raw: bytes, message_type):
        if len(raw) > self.cfg.max_body_bytes:
            raise ApiError(413, f"request: larger than {self.cfg.max_body_bytes} bytes")
        try:
            return message_type.FromString(raw)
        except DecodeError as e:
            raise ApiError(400, f"request: malformed {message_type.__name__}: {e}") from None


# --------------------------------------------------------------------------- application


def build_app(args: dict[str, Any] | None = None):
    """Application builder (``import_path: serve.app:build_app``).

    ``args``: ``registry`` (the registry root) and any ``ServeConfig`` field (max_batch_size,
    batch_wait_timeout_s, max_avatars_per_replica, max_side, min_side, max_body_bytes, num_gpus). The
    environment variable ``PERSE_REGISTRY``, when set, replaces ``registry`` (one config file, any
    registry). A relative path is resolved where the application is built.
    """
    args = dict(args or {})
    registry = os.environ.get("PERSE_REGISTRY") or args.get("registry")
    args.pop("registry", None)
    if not registry:
        raise ValueError("build_app: no registry: pass args.registry or set PERSE_REGISTRY")
    root = Path(registry).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"build_app: registry {root} is not a directory")
    cfg = from_dict(ServeConfig, args, "serve")
    if cfg.max_batch_size < 1 or cfg.max_avatars_per_replica < 1 or not 1 <= cfg.min_side <= cfg.max_side:
        raise ValueError(f"build_app: invalid serve config {cfg}")
    cfg_dict = dataclasses.asdict(cfg)
    # max_ongoing_requests caps the batch size (Serve's default is 5): room for one batch rendering
    # while the next one fills.
    renderer = Renderer.options(max_ongoing_requests=2 * cfg.max_batch_size,
                                ray_actor_options={"num_cpus": 1, "num_gpus": cfg.num_gpus})
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0.25})
    return ingress.bind(renderer.bind(str(root), cfg_dict), str(root), cfg_dict)
