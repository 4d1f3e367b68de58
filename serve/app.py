"""The render API on Ray Serve: HTTP (FastAPI) and gRPC in front of a batched, multiplexed renderer.

    Ingress   keeps an in-memory catalog of the registry (``serve.api.Catalog``), refreshed in a
              thread every ``index_refresh_s`` (1 s by default; one ``stat`` of the registry index
              when nothing changed), so a new avatar or version is served within that delay and no
              request reads a file. It validates every request (id, names, ranges, sizes) against
              the avatar's manifest, then calls the Renderer with
              ``multiplexed_model_id = "<subject>@<version>"``.
    Renderer  ``serve.renderer``: the multiplexed LRU of loaded avatars and batched rendering.

The modules: ``serve.api`` (settings, validation, errors, the catalog; no Ray), ``serve.http_api``
(the FastAPI app), ``serve.grpc_api`` (the gRPC methods), ``serve.renderer`` and this one (the
Ingress and ``build_app``). Run it with ``serve run serve/config.yaml`` (or
``serve.run(build_app({"registry": path}))``). The request limits (``LIMITS``) are also on the
OpenAPI page (/docs) and in render.proto.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from perse_ray.avatar import AvatarFormatError
from perse_ray.registry import RegistryError
from serve.api import ApiError, Catalog, RenderJob, serve_config
from serve.grpc_api import GrpcApi
from serve.http_api import make_http_app
from serve.renderer import Renderer

log = logging.getLogger("ray.serve")


@serve.deployment(name="Ingress", max_ongoing_requests=256)
@serve.ingress()
class Ingress(GrpcApi):
    async def __init__(self, renderer: DeploymentHandle, registry_root: str, serve_cfg: dict[str, Any]):
        self.renderer = renderer
        self.cfg = serve_config(serve_cfg)
        # The first read of the registry happens before the replica takes requests.
        self.catalog = await asyncio.to_thread(Catalog.open, registry_root, self.cfg)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_http_app(self)

    def __del__(self):
        refresher = getattr(self, "_refresher", None)
        if refresher is not None:
            refresher.cancel()

    async def _refresh_forever(self) -> None:
        """Re-read the registry index every ``index_refresh_s``, off the event loop. A failed refresh
        is logged (once per distinct error) and retried; requests keep the last good catalog."""
        reported = None
        while True:
            await asyncio.sleep(self.cfg.index_refresh_s)
            try:
                await asyncio.to_thread(self.catalog.refresh)
                reported = None
            except Exception as e:  # noqa: BLE001 (the loop must outlive any one bad read)
                if str(e) != reported:
                    log.error("registry index refresh failed (serving the last good catalog): %s: %s",
                              type(e).__name__, e)
                    reported = str(e)

    async def call(self, method: str, job: RenderJob) -> bytes:
        """``Renderer.<method>(job)`` on a replica that holds (or loads) the job's avatar."""
        handle = self.renderer.options(multiplexed_model_id=job.model_id)
        try:
            return await getattr(handle, method).remote(job)
        except (RegistryError, AvatarFormatError, RayTaskError) as e:
            # Removed or corrupt since it was listed, or a failure rendering it: this request only.
            cause = getattr(e, "cause", None) or e  # the replica's exception, without Ray's traceback
            status = 404 if isinstance(e, RegistryError) else 500
            raise ApiError(status, f"avatar {job.model_id}: {cause}") from None


def build_app(args: dict[str, Any] | None = None):
    """Application builder (``import_path: serve.app:build_app``).

    ``args``: ``registry`` (the registry root) and any ``ServeConfig`` field (max_batch_size,
    batch_wait_timeout_s, max_avatars_per_replica, max_side, min_side, max_body_bytes, num_gpus,
    index_refresh_s). The environment variable ``PERSE_REGISTRY``, when set, replaces ``registry``
    (one config file, any registry). A relative path is resolved where the application is built.
    """
    args = dict(args or {})
    registry = os.environ.get("PERSE_REGISTRY") or args.get("registry")
    args.pop("registry", None)
    if not registry:
        raise ValueError("build_app: no registry: pass args.registry or set PERSE_REGISTRY")
    root = Path(registry).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"build_app: registry {root} is not a directory")
    try:
        cfg = serve_config(args)
    except ValueError as e:
        if type(e) is not ValueError:  # ConfigError: it names the key already
            raise
        raise ValueError(f"build_app: {e}") from None
    cfg_dict = dataclasses.asdict(cfg)
    # max_ongoing_requests caps the batch size (Serve's default is 5): room for one batch rendering
    # while the next one fills.
    renderer = Renderer.options(max_ongoing_requests=2 * cfg.max_batch_size,
                                ray_actor_options={"num_cpus": 1, "num_gpus": cfg.num_gpus})
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0.25})
    return ingress.bind(renderer.bind(str(root), cfg_dict), str(root), cfg_dict)
