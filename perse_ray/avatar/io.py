"""The avatar on disk: ``model.safetensors`` + ``avatar.json``, and standard 3DGS ``.ply`` export.

No pickle anywhere: tensors go through safetensors, everything else through JSON, and loading
checks the format version, the latent layout, every tensor's name, shape and dtype, and fails
with ``AvatarFormatError`` naming what is wrong.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perse_ray.avatar.layout import LatentLayout
from perse_ray.avatar.model import AvatarModel
from perse_ray.camera import intrinsics, orbit_viewmat
from perse_ray.config import AvatarConfig, ConfigError, from_dict

FORMAT = "perse-ray-avatar"
FORMAT_VERSION = 1
MODEL_FILE, META_FILE = "model.safetensors", "avatar.json"
SH_C0 = 0.28209479177387814  # degree-0 spherical-harmonic constant used by 3DGS .ply files


class AvatarFormatError(ValueError):
    """An avatar directory that is missing, corrupt, or does not match its own manifest."""


@dataclasses.dataclass
class Avatar:
    """A trained avatar: the model plus what is needed to drive it (layout, camera conventions)."""

    model: AvatarModel
    meta: dict[str, Any]  # camera conventions, config, metrics, labels, created_at

    @property
    def layout(self) -> LatentLayout:
        return self.model.layout

    def latent(self, attributes: dict[str, float] | None = None,
               expression: dict[str, float] | None = None) -> torch.Tensor:
        """z [dim] for slider values (edit index space, 0 = source) and expression values by name."""
        attributes, expression = dict(attributes or {}), dict(expression or {})
        self.layout.check_values(attributes, expression)
        exp = torch.tensor([[float(expression.get(n, 0.0)) for n in self.layout.expressions]])
        with torch.no_grad():
            return self.model.compose(exp, self.model.slider_selection(attributes)[None])[0]

    def cameras(self, poses: list[tuple[float, float]], width: int, height: int):
        """(viewmats [C, 4, 4], Ks [C, 3, 3]) for (yaw, pitch) pairs in the avatar's conventions."""
        cam = self.meta["camera"]
        views = torch.from_numpy(np.stack([orbit_viewmat(y, p, cam["distance"]) for y, p in poses]))
        K = torch.from_numpy(intrinsics(width, height, cam["fov_deg"]))
        return views, K.expand(len(poses), 3, 3)

    def web_bundle(self, *, avatar_id: str | None = None, version: str | None = None) -> bytes:
        """The avatar as a web bundle (``perse_ray.avatar.bundle``): what a browser needs to decode any
        latent and splat it. ``avatar_id``/``version`` are recorded in its header."""
        from perse_ray.avatar.bundle import encode_bundle

        return encode_bundle(self.model, self.meta["camera"], avatar_id=avatar_id, version=version)

    @torch.no_grad()
    def render(self, z: torch.Tensor, poses: list[tuple[float, float]], width: int, height: int, *,
               background: list[float] | None = None, backend: str = "auto") -> torch.Tensor:
        """z [B, dim] (or [dim]) seen from every (yaw, pitch) → images [B, C, H, W, 3] in [0, 1]."""
        z = z[None] if z.dim() == 1 else z
        views, Ks = self.cameras(poses, width, height)
        b = z.shape[0]
        bg = torch.tensor(background, dtype=torch.float32) if background is not None else None
        rgb, _, _ = self.model.render(z, views.expand(b, -1, -1, -1), Ks.expand(b, -1, -1, -1), width, height,
                                      background=bg, backend=backend)
        return rgb.clamp(0, 1)


def save_avatar(avatar: Avatar, path: str | os.PathLike) -> Path:
    """Write the avatar directory atomically (temp dir + rename); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in avatar.model.state_dict().items()}
        save_file(tensors, str(tmp / MODEL_FILE))
        meta = dict(avatar.meta, format=FORMAT, format_version=FORMAT_VERSION,
                    layout=json.loads(avatar.layout.to_json()),
                    avatar_config=dataclasses.asdict(avatar.model.cfg))
        meta.setdefault("created_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        for f in (MODEL_FILE, META_FILE):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():  # replace: move the old one aside first so a reader never sees a mix
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.rename(path, old / "x")
            os.rename(tmp, path)
            _rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        _rmtree(tmp)
        raise
    return path


def load_avatar(path: str | os.PathLike) -> Avatar:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_path, model_path = path / META_FILE, path / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise AvatarFormatError(f"{path}: not an avatar directory (needs {META_FILE} and {MODEL_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AvatarFormatError(f"{meta_path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AvatarFormatError(f"{meta_path}: format is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AvatarFormatError(f"{meta_path}: format_version {meta.get('format_version')!r} "
                                f"is not supported (expected {FORMAT_VERSION})")
    try:
        layout = LatentLayout.from_dict(meta["layout"])
        # Avatars from before branch regions: every branch moves every Gaussian.
        cfg = from_dict(AvatarConfig, {"branch_regions": False, **meta["avatar_config"]}, "avatar_config")
        camera = meta["camera"]
        float(camera["fov_deg"]), float(camera["distance"])
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise AvatarFormatError(f"{meta_path}: bad layout, avatar_config or camera: {e}") from e
    try:
        tensors = load_file(str(model_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AvatarFormatError(f"{model_path}: unreadable safetensors file: {e}") from e
    model = AvatarModel(layout, cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AvatarFormatError(f"{model_path}: tensors do not match the manifest: missing {missing}, "
                                f"unexpected {extra}")
    for name, ref in expected.items():
        t = tensors[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise AvatarFormatError(f"{model_path}: {name} is {t.dtype}{list(t.shape)}, "
                                    f"expected {ref.dtype}{list(ref.shape)}")
        if not torch.isfinite(t).all():
            raise AvatarFormatError(f"{model_path}: {name} holds NaN or inf")
    model.load_state_dict(tensors)
    model.eval()
    return Avatar(model, meta)


def export_ply(avatar: Avatar, z: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write the Gaussians of latent ``z`` [dim] as a standard 3DGS .ply (binary little-endian):
    x y z nx ny nz f_dc_0..2 opacity scale_0..2 rot_0..3 — the fields common 3DGS viewers read
    (colour as the SH DC term, opacity as a logit, scales as logs, rotation as a unit wxyz quaternion).
    """
    from plyfile import PlyData, PlyElement

    with torch.no_grad():
        g = avatar.model.gaussians(z.reshape(1, -1))
    means = g["means"][0].numpy()
    quats = torch.nn.functional.normalize(g["quats"][0], dim=-1).numpy()
    log_scales = torch.log(g["scales"][0]).numpy()
    opacity = torch.logit(g["opacities"][0].clamp(1e-6, 1 - 1e-6)).numpy()
    f_dc = ((g["colors"][0] - 0.5) / SH_C0).numpy()
    names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
             + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])
    columns = [means, np.zeros_like(means), f_dc, opacity[:, None], log_scales, quats]
    data = np.concatenate(columns, axis=1).astype(np.float32)
    vertex = np.empty(len(data), dtype=[(n, "<f4") for n in names])
    for i, n in enumerate(names):
        vertex[n] = data[:, i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<").write(str(tmp))
    os.replace(tmp, path)
    return path


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)
