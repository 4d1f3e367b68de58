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
from serve.auth import Audit, Auth
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
        self.registry_root = registry_root
        # A keys file that is missing or invalid stops the replica here (never an open server).
        self.auth = Auth(self.cfg.auth, self.cfg.keys_file, self.cfg.link_secret_file)
        self.audit = Audit(self.cfg.audit_log)
        log.info("perse-ray render API: %s", self.auth.describe())
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
                await asyncio.to_thread(self.auth.refresh)  # issued and revoked keys, same delay
                reported = None
            except Exception as e:  # noqa: BLE001 (the loop must outlive any one bad read)
                if str(e) != reported:
                    log.error("registry index refresh failed (serving the last good catalog): %s: %s",
                              type(e).__name__, e)
                    reported = str(e)

    async def delete_subject(self, subject_id: str, key_id: str) -> dict[str, Any]:
        """Admin: ``perse_ray.deletion.delete_subject`` on the build output, then a catalog refresh
        (this replica stops serving it at once, the others within index_refresh_s)."""
        from perse_ray.deletion import delete_subject

        output = self.cfg.output or str(Path(self.registry_root).parent)
        try:
            report = await asyncio.to_thread(delete_subject, output, subject_id, f"key:{key_id}",
                                             log=lambda line: log.info("delete: %s", line))
        except Exception as e:
            self.audit("delete", key_id, f"failed: {type(e).__name__}", subject_id)
            raise ApiError(500, f"delete {subject_id}: {type(e).__name__}: {e}") from None
        await asyncio.to_thread(self.catalog.refresh)
        self.audit("delete", key_id, report.audit["outcome"], subject_id, audit_id=report.audit["id"],
                   registry_versions=report.registry_versions)
        return {"subject": subject_id, "outcome": report.audit["outcome"], "audit_id": report.audit["id"],
                "registry_versions": report.registry_versions, "paths_removed": len(report.removed),
                "files_rewritten": report.rewritten, "served_until_s": self.cfg.index_refresh_s}

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

    ``args``: ``registry`` (the registry root), ``auth`` (required: ``none`` or ``keys``) and any
    other ``ServeConfig`` field (max_batch_size, batch_wait_timeout_s, max_avatars_per_replica,
    max_side, min_side, max_body_bytes, num_gpus, index_refresh_s, keys_file, link_secret_file,
    audit_log, output, max_page_size). ``PERSE_KEYS_FILE`` replaces ``keys_file`` under auth: keys. The environment variable ``PERSE_REGISTRY``, when set, replaces ``registry``
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
    if "auth" not in args:
        raise ValueError("build_app: set auth: keys (with keys_file) or auth: none (no credentials checked)")
    if args.get("auth") == "keys" and os.environ.get("PERSE_KEYS_FILE"):
        args["keys_file"] = os.environ["PERSE_KEYS_FILE"]
    for name in ("keys_file", "link_secret_file", "audit_log", "output"):  # resolved where the app is built
        if args.get(name):
            args[name] = str(Path(args[name]).expanduser().resolve())
    try:
        cfg = serve_config(args)
        Auth(cfg.auth, cfg.keys_file, cfg.link_secret_file)  # a missing keys file fails here, at start-up
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
