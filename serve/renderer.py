"""The Renderer deployment: a multiplexed LRU of loaded avatars and batched rendering.

It keeps at most ``max_avatars_per_replica`` avatars loaded (``@serve.multiplexed``: the Ingress
sends ``multiplexed_model_id = "<subject>@<version>"`` so Serve routes requests for one avatar to
a replica that already holds it) and renders with ``@serve.batch``: the latents of one batch that
share an avatar and an image size go through one decoder + rasterize call (B latents x 1 camera
each). Loading an avatar reads its files (in a thread); rendering a loaded one reads none.
"""

from __future__ import annotations

import asyncio
import copy
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve

from perse_ray.avatar import Avatar, export_ply
from perse_ray.registry import Registry
from serve.api import RenderJob, RenderSpec, rss_bytes, serve_config


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
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)  # level 1: fast, slightly larger
    return buf.getvalue()


def _ply_bytes(avatar: Avatar, z: torch.Tensor) -> bytes:
    with tempfile.TemporaryDirectory(prefix="perse-ply-") as tmp:
        return export_ply(avatar, z, Path(tmp) / "avatar.ply").read_bytes()


def _warm_up(device: torch.device) -> None:
    """Build/load the rasterizer at start-up (the CPU kernel compiles once per machine, ~40 s)."""
    from perse_ray.render import rasterize

    d = device
    rasterize(torch.zeros(1, 3, device=d), torch.tensor([[1.0, 0, 0, 0]], device=d),
              torch.full((1, 3), 0.01, device=d), torch.ones(1, device=d), torch.ones(1, 3, device=d),
              torch.eye(4, device=d)[None], torch.eye(3, device=d)[None], 16, 16)


@serve.deployment(name="Renderer")
class Renderer:
    def __init__(self, registry_root: str, serve_cfg: dict[str, Any]):
        self.cfg = serve_config(serve_cfg)
        self.registry = Registry(registry_root)
        self.device = torch.device("cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self._lock = threading.RLock()  # Serve runs __del__ (eviction) in an executor thread
        self._resident: dict[str, _Resident] = {}
        self._counts = {"loads": 0, "batches": 0, "requests": 0, "largest_batch": 0, "dropped_deleted": 0}

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
        threading.Thread(target=self._drop_deleted_forever, name="drop deleted avatars", daemon=True).start()

    def _drop_deleted_forever(self) -> None:
        """Every ``index_refresh_s``: a loaded avatar whose version folder is gone (its subject was
        deleted) is dropped from memory (one stat per loaded avatar)."""
        while True:
            time.sleep(self.cfg.index_refresh_s)
            with self._lock:
                residents = list(self._resident.values())
            for resident in residents:
                subject, version = resident.model_id.split("@")
                if not (self.registry.root / subject / version).is_dir():
                    with self._lock:
                        resident.avatar = resident.model = None
                        self._resident.pop(resident.model_id, None)
                        self._counts["dropped_deleted"] += 1

    async def _loaded(self, model_id: str) -> _Resident:
        """The multiplexed avatar; one dropped after a delete is read again if it was rebuilt since."""
        resident = await self._avatar(model_id)
        if resident.avatar is None:
            avatar, model = await asyncio.to_thread(self._read, model_id)
            with self._lock:
                resident.avatar, resident.model = avatar, model
                self._resident[model_id] = resident
        return resident

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
                resident = await self._loaded(model_id)
                pngs = await asyncio.to_thread(render_pngs, resident, [jobs[i].spec for i in members], self.device)
            except Exception as e:  # fails this group's requests only
                pngs = [e] * len(members)
            for i, png in zip(members, pngs):
                results[i] = png
        return results

    async def ply(self, job: RenderJob) -> bytes:
        resident = await self._loaded(job.model_id)
        return await asyncio.to_thread(_ply_bytes, resident.avatar, _latent(resident.avatar, job.spec))

    def stats(self) -> dict[str, Any]:
        """This replica's process, resident avatars and batching counters (debugging, tests, benchmarks)."""
        with self._lock:
            return {"pid": os.getpid(), "rss_bytes": rss_bytes(), "resident": sorted(self._resident),
                    "max_avatars": self.cfg.max_avatars_per_replica, "max_batch_size": self.cfg.max_batch_size,
                    **self._counts}
