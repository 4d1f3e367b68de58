"""GET /v1/avatars/{id}/bundle (and {id}@{version}): the avatar's web bundle, and the viewer's npm files.

The bundle (``perse_ray.avatar.bundle``) is built from the version's files the first time it is
asked for, in a thread, and kept in a small LRU keyed by ``subject@version`` (a version never
changes once registered). Its ETag is the SHA-256 of its bytes: ``If-None-Match`` answers 304.
``{id}@{version}`` is immutable and cached for a year; ``{id}`` (the newest version) must be
revalidated, since a new version may replace it. A bundle over ``MAX_BUNDLE_BYTES`` is refused
(500 naming the size: that avatar is for server rendering only).

``vendor_app()`` serves exactly the renderer's files from node_modules (``npm ci``) at /vendor/,
outside the API: they are public library code, like the viewer page itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.applications import Starlette
from starlette.routing import Route

from perse_ray.avatar.bundle import MAX_BUNDLE_BYTES, BundleError
from perse_ray.registry import RegistryError, validate_version
from serve.api import ApiError

REPO = Path(__file__).resolve().parent.parent
NODE_MODULES = REPO / "node_modules"
# URL path under /vendor/ -> file in node_modules: the ES modules the viewer imports, nothing else.
VENDOR_FILES = {
    "three/three.module.js": "three/build/three.module.js",
    "three/three.core.js": "three/build/three.core.js",
    "three/addons/postprocessing/Pass.js": "three/examples/jsm/postprocessing/Pass.js",
    "spark/spark.module.js": "@sparkjsdev/spark/dist/spark.module.js",
}
BUNDLE_CACHE = 8  # bundles kept in memory per ingress replica
BUNDLE_CACHE_BYTES = 128 * 1024 * 1024  # and at most this many bytes of them
BUNDLE_RESPONSES = {200: {"content": {"application/octet-stream": {}},
                          "description": "the web bundle (perse_ray/avatar/bundle.py)"},
                    304: {"description": "not modified (If-None-Match)"}}


class BundleCache:
    """An avatar version (subject, version, creation time, training hash) -> (bundle bytes, ETag), least
    recently used out first; builds off the loop."""

    def __init__(self, size: int = BUNDLE_CACHE, max_bytes: int = MAX_BUNDLE_BYTES):
        self.size, self.max_bytes = size, max_bytes
        self._items: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def _build(self, entry) -> tuple[bytes, str]:
        from perse_ray.avatar import load_avatar
        from perse_ray.avatar.bundle import encode_bundle

        avatar = load_avatar(entry.path)
        data = encode_bundle(avatar.model, avatar.meta["camera"], avatar_id=entry.subject_id,
                             version=entry.version, max_bytes=self.max_bytes)
        return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'

    async def get(self, entry) -> tuple[bytes, str]:
        # The creation time too: a subject deleted and built again starts over at v0001, and the
        # cache must not answer for the new avatar with the deleted one's bundle.
        key = f"{entry.subject_id}@{entry.version}@{entry.created_at.isoformat()}@{entry.config_hash}"
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        item = await asyncio.to_thread(self._build, entry)
        with self._lock:
            self.builds += 1
            self._items[key] = item
            while len(self._items) > self.size or (
                    len(self._items) > 1 and sum(len(d) for d, _ in self._items.values()) > BUNDLE_CACHE_BYTES):
                self._items.popitem(last=False)
        return item


def _entry(catalog, avatar_id: str):
    """(registry entry, pinned): the newest version for ``id``, the named one for ``id@version``."""
    subject, sep, version = avatar_id.partition("@")
    entry, _, _ = catalog.resolve(subject)  # 400 / 404 / 500 as for every other route
    if not sep:
        return entry, False
    try:
        validate_version(version)
        return catalog.index.get(subject, version), True
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    except RegistryError as e:
        raise ApiError(404, str(e)) from None


def bundle_router(catalog, cache: BundleCache | None = None, audit=None) -> APIRouter:
    """``audit(action, key_id, outcome, subject, version)`` hears every bundle sent: a bundle is the
    whole avatar, an export."""
    cache = cache or BundleCache()
    router = APIRouter()

    @router.get("/v1/avatars/{avatar_id:avatar_id}/bundle", response_class=Response, responses=BUNDLE_RESPONSES)
    async def bundle(avatar_id: str, request: Request) -> Response:
        """The avatar's web bundle for client-side rendering: canonical Gaussians, decoder weights per
        latent branch, code tables, latent layout and camera defaults (``{id}@{version}`` pins a version)."""
        entry, pinned = _entry(catalog, avatar_id)
        try:
            data, etag = await cache.get(entry)
        except BundleError as e:
            raise ApiError(500, f"avatar {entry.subject_id}@{entry.version}: no web bundle: {e}") from None
        except Exception as e:  # noqa: BLE001 (unreadable files: this avatar only)
            raise ApiError(500, f"avatar {entry.subject_id}@{entry.version}: {type(e).__name__}: {e}") from None
        headers = {"ETag": etag, "X-Avatar-Version": entry.version,
                   # private: the route may sit behind credentials
                   "Cache-Control": "private, max-age=31536000, immutable" if pinned else "private, no-cache"}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        if audit is not None:
            principal = getattr(request.state, "principal", None)
            audit("export", principal.key_id if principal else "-", "ok bundle", entry.subject_id, entry.version)
        return Response(data, media_type="application/octet-stream", headers=headers)

    router.bundle_cache = cache  # for tests and stats
    return router


def vendor_app() -> Starlette:
    """/vendor/<name> for exactly ``VENDOR_FILES`` (404 for anything else); revalidated by ETag."""
    def serve_file(path: Path):
        async def endpoint(request):
            if not path.is_file():
                return Response(f"{path.name}: missing; run `npm ci` (make does)", status_code=503,
                                media_type="text/plain")
            return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "no-cache"})
        return endpoint

    return Starlette(routes=[Route(f"/{url}", serve_file(NODE_MODULES / rel)) for url, rel in VENDOR_FILES.items()])


def add_bundle_routes(app, catalog, audit=None) -> None:
    """Hook for ``make_http_app``: the bundle route and the /vendor mount."""
    app.include_router(bundle_router(catalog, audit=audit))
    app.mount("/vendor", vendor_app(), name="vendor")
