"""The render API without Ray or FastAPI: server settings, request validation, errors, and the
in-memory catalog of the registry that the Ingress answers from.

    ServeConfig   the server's settings (``build_app`` args, checked by ``serve_config``)
    render_spec   checks one request against an avatar's latent layout and the limits
    ApiError      a refused request: HTTP status, message naming the field, gRPC code
    Catalog       the newest version of every avatar, in memory, rebuilt from a
                  ``RegistryIndex`` only when the index changed; a request reads no file

Everything here runs in a plain process (the unit tests construct it without Ray); the Serve
deployments in ``serve.app`` and ``serve.renderer`` and the front-ends in ``serve.http`` and
``serve.grpc_api`` build on it.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from perse_ray.avatar.layout import LatentLayout
from perse_ray.config import from_dict
from perse_ray.registry import AvatarEntry, RegistryIndex, validate_subject_id

DEFAULT_SIDE = 256
MAX_YAW, MAX_PITCH = 90.0, 60.0
LIMITS = ("Limits: |yaw| <= 90 and |pitch| <= 60 degrees; width and height in [min_side, max_side] "
          "(16..1024 by default); sliders in [0, number of edits - 1]; expression values in [-1, 2]; "
          "a latent has the avatar's exact length; every number finite; bodies up to max_body_bytes. "
          "Floats are rounded to float32 (gRPC's float), so one request renders the same pixels over "
          "HTTP and gRPC. A newly registered avatar or version is served within index_refresh_s "
          "(1 s by default) of its registration, and a deleted one stops being served within the same delay.")
# Manifest fields a client may see (the rest, e.g. the training config, stays internal).
PUBLIC_MANIFEST = ("created_at", "preset", "metrics", "camera", "layout", "format", "format_version")


@dataclasses.dataclass
class ServeConfig:
    """The render server's settings: ``build_app`` args (serve/config.yaml), checked by ``serve_config``."""

    max_batch_size: int = 8  # latents per decoder + rasterize call
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    max_avatars_per_replica: int = 4  # multiplexed LRU bound per Renderer replica
    max_side: int = 1024
    min_side: int = 16
    max_body_bytes: int = 65_536  # larger bodies: 413 / RESOURCE_EXHAUSTED
    num_gpus: float = 0.0  # per Renderer replica; > 0 renders with gsplat on CUDA
    index_refresh_s: float = 1.0  # how often the Ingress re-reads the registry index (the visibility delay)
    # Authentication (serve.auth): "none" (local use) or "keys". build_app requires it to be stated.
    auth: str = "none"
    keys_file: str = ""  # auth: keys: the JSON file of key hashes; missing or unreadable: start-up error
    link_secret_file: str = ""  # signs viewer links (>= 32 bytes); empty: links are off
    audit_log: str = ""  # JSON lines of renders, exports, links and deletes; empty: the replica's stderr log
    output: str = ""  # the build output the admin delete cleans (empty: the registry's parent folder)
    max_page_size: int = 1000  # largest page of GET /v1/avatars and ListAvatars


def serve_config(values: dict[str, Any]) -> ServeConfig:
    """``ServeConfig`` from plain values; unknown keys, wrong types and unusable values raise
    (``ConfigError`` names the key, ``ValueError`` the config)."""
    cfg = from_dict(ServeConfig, values, "serve")
    if (cfg.max_batch_size < 1 or cfg.max_avatars_per_replica < 1 or not 1 <= cfg.min_side <= cfg.max_side
            or cfg.max_body_bytes < 1 or cfg.batch_wait_timeout_s < 0 or cfg.num_gpus < 0
            or not 0 < cfg.index_refresh_s <= 3600 or cfg.max_page_size < 1):
        raise ValueError(f"invalid serve config {cfg}")
    return cfg


class ApiError(Exception):
    """A request the API refuses: HTTP status + message naming the field; mapped to a gRPC code."""

    GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                  403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
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


# --------------------------------------------------------------------------- the catalog


@dataclasses.dataclass(frozen=True)
class _Avatar:
    """One subject's newest version as the API shows it; ``error`` set when its entry is unusable."""

    entry: AvatarEntry
    layout: LatentLayout | None
    summary: dict[str, Any] | None  # the /v1/avatars item
    manifest: dict[str, Any] | None  # the /v1/avatars/{id} body
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """An immutable view of the registry: what every request of one moment reads."""

    generation: int  # +1 whenever the index changed
    avatars: dict[str, _Avatar]  # subject id -> its newest version
    listing: tuple[dict[str, Any], ...]  # summaries of the usable avatars, by subject id
    listing_json: bytes  # ``listing`` encoded once (the /v1/avatars body)
    problems: tuple[tuple[str, str], ...]  # (where, reason): skipped by the index or unusable here
    ids: tuple[str, ...] = ()  # the ids of ``listing``, sorted: pages are found by bisection


def _prepare(entry: AvatarEntry) -> _Avatar:
    """The API's view of one entry, or the reason it cannot be served (never raises)."""
    try:
        layout = _layout(entry.latent_layout)
        summary = {"id": entry.subject_id, "version": entry.version, "expressions": list(layout.expressions),
                   "attributes": {a.name: list(a.edit_labels) for a in layout.attributes}}
        manifest = {"id": entry.subject_id, "version": entry.version,
                    **{k: entry.manifest[k] for k in PUBLIC_MANIFEST if k in entry.manifest}}
        json.dumps(manifest)  # it is sent as JSON: find out now, not per request
    except Exception as e:  # a corrupt entry fails only its own requests
        return _Avatar(entry, None, None, None, f"unusable manifest: {type(e).__name__}: {e}")
    return _Avatar(entry, layout, summary, manifest)


class Catalog:
    """The newest version of every avatar, in memory, for a server that must not read files per request.

    ``refresh()`` is the only method that touches the file system (through ``RegistryIndex.refresh``:
    one ``stat`` when nothing changed); call it from a thread. It builds a new ``Snapshot`` only
    when the index changed, reusing what it prepared for unchanged entries, and swaps it in whole,
    so readers on other threads (the event loop) see the old view or the new one, never a mix.
    Every other method reads the current snapshot only.

    A corrupt entry never breaks the rest: what the index skipped and entries whose manifest cannot
    be used here are listed by ``problems``; an unusable avatar is left out of the listing and its
    own requests fail with 500 naming the reason.
    """

    def __init__(self, index: RegistryIndex, cfg: ServeConfig):
        self.index, self.cfg = index, cfg
        self._lock = threading.Lock()  # one refresh at a time
        self._snapshot = Snapshot(0, {}, (), b"[]", ())
        self._refreshes = 0
        self._refreshed_at: float | None = None  # time.time() of the last successful refresh
        self._last_error: str | None = None

    @classmethod
    def open(cls, root: str | os.PathLike, cfg: ServeConfig) -> "Catalog":
        """A catalog of the registry at ``root``, read once (blocking: call before serving)."""
        catalog = cls(RegistryIndex(Path(root)), cfg)
        catalog.refresh()
        return catalog

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def refresh(self) -> bool:
        """Bring the snapshot up to date with the registry (blocking, cheap); True if it changed.
        An error is recorded (``stats``) and raised; the previous snapshot stays in use."""
        with self._lock:
            try:
                changed = self.index.refresh() or self._refreshes == 0
                if changed:
                    self._snapshot = self._build(self._snapshot)
            except Exception as e:
                self._last_error = f"{type(e).__name__}: {e}"[:1000]
                raise
            self._refreshes += 1
            self._refreshed_at, self._last_error = time.time(), None
            return changed

    def _build(self, previous: Snapshot) -> Snapshot:
        avatars: dict[str, _Avatar] = {}
        for entry in self.index.latest():
            old = previous.avatars.get(entry.subject_id)
            same = old is not None and old.entry == entry and old.entry.manifest == entry.manifest
            avatars[entry.subject_id] = old if same else _prepare(entry)
        listing = tuple(a.summary for _, a in sorted(avatars.items()) if a.error is None)
        problems = tuple(self.index.problems()) + tuple(
            (f"{a.entry.subject_id}@{a.entry.version}", a.error) for a in avatars.values() if a.error)
        return Snapshot(previous.generation + 1, avatars, listing, json.dumps(listing).encode(), problems,
                        tuple(a["id"] for a in listing))

    # ------------------------------------------------------------------ memory only

    def resolve(self, avatar_id: str) -> tuple[AvatarEntry, LatentLayout, dict[str, Any]]:
        """(entry, latent layout, public manifest) of the avatar's newest version: 400 for a malformed
        id, 404 for an unknown one, 500 for an entry that cannot be used."""
        try:
            validate_subject_id(avatar_id)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        avatar = self._snapshot.avatars.get(avatar_id)
        if avatar is None:
            raise ApiError(404, f"no avatar {avatar_id!r}")
        if avatar.error is not None:
            raise ApiError(500, f"avatar {avatar_id}@{avatar.entry.version}: {avatar.error}")
        return avatar.entry, avatar.layout, avatar.manifest

    def job(self, avatar_id: str, **fields) -> RenderJob:
        """A validated render job for the avatar's newest version (``render_spec``'s fields)."""
        entry, layout, _ = self.resolve(avatar_id)
        return RenderJob(f"{entry.subject_id}@{entry.version}", render_spec(layout, self.cfg, **fields))

    def manifest(self, avatar_id: str) -> dict[str, Any]:
        return self.resolve(avatar_id)[2]

    def summaries(self) -> tuple[dict[str, Any], ...]:
        """Every usable avatar's newest version: id, version, attributes (name -> edit labels), expressions."""
        return self._snapshot.listing

    def page(self, after: str = "", limit: int | None = None,
             subjects: frozenset[str] | None = None) -> tuple[list[dict[str, Any]], str]:
        """One page of the listing, sorted by id, starting after the id ``after``: (summaries, the
        ``after`` of the next page or "" at the end). ``subjects`` (a key's subject list) restricts
        it; the cost is O(log n + limit), or O(len(subjects)) for a restricted key, at any n."""
        limit = self.cfg.max_page_size if limit is None else limit
        if not 1 <= limit <= self.cfg.max_page_size:
            raise ApiError(422, f"limit: {limit} outside [1, {self.cfg.max_page_size}]")
        if after:
            try:
                validate_subject_id(after)
            except ValueError as e:
                raise ApiError(422, f"after: {e}") from None
        snap = self._snapshot
        if subjects is None:
            start = bisect.bisect_right(snap.ids, after) if after else 0
            items = list(snap.listing[start:start + limit + 1])
        else:
            ids = sorted(s for s in subjects if s > after)
            items = []
            for sid in ids:
                avatar = snap.avatars.get(sid)
                if avatar is not None and avatar.error is None:
                    items.append(avatar.summary)
                    if len(items) > limit:
                        break
        more = len(items) > limit
        items = items[:limit]
        return items, (items[-1]["id"] if more else "")

    def stats(self) -> dict[str, Any]:
        snap = self._snapshot
        return {"generation": snap.generation, "avatars": len(snap.listing), "refreshes": self._refreshes,
                "refreshed_at": self._refreshed_at, "refresh_every_s": self.cfg.index_refresh_s,
                "last_error": self._last_error, "problems": [list(p) for p in snap.problems[:50]],
                "problem_count": len(snap.problems)}


def rss_bytes() -> int | None:
    """This process's resident memory (Linux), for the stats endpoints."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
