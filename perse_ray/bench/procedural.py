"""A procedural head made of Gaussians with known attributes and expression knobs: ground truth.

No model weights can say how good an avatar is; this head can. It has four continuous
attributes that change known regions — hair colour, beard density, glasses (rim opacity and lens
tint), skin tone (the one no preset trains, for edits after training) — and three expression knobs — jaw_open (the jaw, chin, lower lip and beard rotate about a
hinge; the mouth interior shows), smile (mouth corners move up and out), brow_raise (brows move
up). It contains a shaded skin ellipsoid, neck, ears, nose, eyes with pupils, brows, lips and a
hair cap, about 3,400 Gaussians. Rendered through the same cameras and motion script as the 2D
pipeline (by ``perse_ray.bench.ground_truth``), it yields ``frames``-schema rows, and exact renders at
any held-out camera, expression or attribute value. ``perse_ray.bench.mesh_head`` is the second
ground truth, made of textured triangles, with the same attributes, keys and expression knobs.

Attribute values use the avatar's slider space: value v ∈ [0, K−1] for K edits (0 = source);
each attribute's physical parameters are piecewise-linear in v through per-edit key values, so
the head at v = k + α is the exact reference for the avatar's slider at the same value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

EXPRESSIONS = ("jaw_open", "smile", "brow_raise")
# Per-edit key values of each attribute's parameters (edit 0 = the source head). Attributes with
# fewer edits in a config use the first K keys.
# The last key of each is a spare level no preset trains: edits after training add it
# (benchmarks/edit_bench.py), so its hair colour is one no trained level is near.
HAIR_COLORS = [(0.22, 0.13, 0.07), (0.62, 0.24, 0.10), (0.92, 0.86, 0.66), (0.10, 0.42, 0.46)]
BEARD_DENSITY = [0.0, 0.4, 0.95, 0.7]
GLASSES_KEYS = [(0.0, 0.0), (0.6, 0.0), (1.0, 0.85), (0.8, 0.4)]  # (rim opacity, lens tint)
# Skin tone (a colour multiplier on the face, neck and ears): an attribute no preset's layout has,
# for adding a whole attribute to a trained avatar (benchmarks/edit_bench.py).
SKIN_TONES = [(1.0, 1.0, 1.0), (0.74, 0.62, 0.52), (1.12, 1.12, 1.16)]
ATTRIBUTES = ("hair", "beard", "glasses", "skin")


def _piecewise(keys: list, v: float) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.float64)
    v = float(np.clip(v, 0, len(keys) - 1))
    lo = min(int(math.floor(v)), len(keys) - 2)
    a = v - lo
    return keys[lo] * (1 - a) + keys[lo + 1] * a


def _quat_from_z(normals: np.ndarray) -> np.ndarray:
    """Unit quaternions (wxyz) rotating +z onto each normal: flat splats lie on the surface."""
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(np.broadcast_to(z, normals.shape), normals)
    w = 1.0 + normals @ z
    q = np.concatenate([w[:, None], axis], axis=1)
    flip = w < 1e-6  # normal == -z: rotate 180° about x
    q[flip] = [0.0, 1.0, 0.0, 0.0]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _rasterize(g: dict[str, torch.Tensor], camera: dict, size: int, background=(1.0, 1.0, 1.0)):
    from perse_ray.render import rasterize

    view = torch.tensor(camera["viewmat"]).reshape(1, 4, 4)
    K = torch.tensor(camera["K"]).reshape(1, 3, 3)
    rgb, alpha, _ = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], view, K, size, size,
                              backgrounds=torch.tensor([background], dtype=torch.float32))
    return rgb[0].clamp(0, 1).numpy(), alpha[0, ..., 0].numpy()


@dataclass
class _Part:
    means: np.ndarray
    normals: np.ndarray
    scales: np.ndarray
    colors: np.ndarray
    opacity: np.ndarray


class ProceduralHead:
    """Build once (seeded), then ``gaussians(attributes, expression)`` or ``render(...)`` for any values."""

    name = "gaussian"
    attributes = ATTRIBUTES
    expressions = EXPRESSIONS
    keys = {"hair": HAIR_COLORS, "beard": BEARD_DENSITY, "glasses": GLASSES_KEYS, "skin": SKIN_TONES}

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.radii = np.array([0.075, 0.098, 0.085])  # half-width, half-height, half-depth (m)
        parts, tags = [], []

        def add(part: _Part, tag: str):
            parts.append(part)
            tags.extend([tag] * len(part.means))

        skin_pts, skin_n = self._ellipsoid(1600, self.radii, rng)
        light = np.array([-0.4, -0.5, -0.77])
        shade = 0.72 + 0.28 * np.clip(skin_n @ light, 0, 1)
        skin = np.array([0.86, 0.66, 0.55]) * shade[:, None]
        skin *= 1 + 0.04 * rng.standard_normal((len(skin), 1))  # skin texture
        add(_Part(skin_pts, skin_n, np.full(len(skin_pts), 0.0085), skin, np.full(len(skin_pts), 0.95)), "skin")

        neck_t = rng.uniform(0, 2 * math.pi, 260)
        neck_y = rng.uniform(0.07, 0.16, 260)
        neck_n = np.stack([np.cos(neck_t), np.zeros(260), np.sin(neck_t)], 1)
        neck = np.stack([0.045 * np.cos(neck_t), neck_y, 0.01 + 0.05 * np.sin(neck_t)], 1)
        add(_Part(neck, neck_n, np.full(260, 0.01), np.tile([0.78, 0.58, 0.48], (260, 1)), np.full(260, 0.95)), "skin")

        for side in (-1, 1):  # ears
            t = rng.uniform(0, 2 * math.pi, 40)
            ear = np.stack([side * 0.078 + 0.004 * np.cos(t), -0.005 + 0.022 * np.sin(t), 0.01 + 0.008 * np.cos(t)], 1)
            add(_Part(ear, np.tile([side, 0, 0], (40, 1)).astype(float), np.full(40, 0.006),
                      np.tile([0.8, 0.58, 0.5], (40, 1)), np.full(40, 0.95)), "skin")

        nose_t = np.linspace(0, 1, 30)
        nose = np.stack([0.004 * np.sin(nose_t * 40), -0.015 + 0.04 * nose_t, -0.088 - 0.014 * nose_t], 1)
        add(_Part(nose, np.tile([0, 0, -1.0], (30, 1)), np.full(30, 0.008), np.tile([0.82, 0.6, 0.5], (30, 1)),
                  np.full(30, 0.9)), "skin")

        for side in (-1, 1):  # eye whites, pupils
            t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
            eye = np.stack([side * 0.03 + 0.011 * np.cos(t), -0.02 + 0.005 * np.sin(t), np.full(24, -0.079)], 1)
            add(_Part(eye, np.tile([0, 0, -1.0], (24, 1)), np.full(24, 0.004), np.tile([0.95, 0.95, 0.93], (24, 1)),
                      np.full(24, 0.95)), "eye")
            pupil = np.array([[side * 0.03, -0.02, -0.081]])
            add(_Part(pupil, np.array([[0, 0, -1.0]]), np.array([0.0045]), np.array([[0.08, 0.05, 0.04]]),
                      np.array([0.98])), "eye")

        for side in (-1, 1):  # brows
            t = np.linspace(-1, 1, 16)
            brow = np.stack([side * 0.03 + 0.014 * t, -0.04 - 0.004 * (1 - t**2), np.full(16, -0.08)], 1)
            add(_Part(brow, np.tile([0, 0, -1.0], (16, 1)), np.full(16, 0.0035), np.tile([0.2, 0.12, 0.08], (16, 1)),
                      np.full(16, 0.95)), "brow")

        t = np.linspace(-1, 1, 28)  # lips: upper and lower
        for lip, dy in (("upper_lip", -0.004), ("lower_lip", 0.004)):
            m = np.stack([0.022 * t, 0.045 + dy + 0.003 * (t**2) * (1 if dy > 0 else -1),
                          -0.083 + 0.01 * t**2], 1)
            add(_Part(m, np.tile([0, 0, -1.0], (28, 1)), np.full(28, 0.0038), np.tile([0.72, 0.28, 0.3], (28, 1)),
                      np.full(28, 0.95)), lip)
        interior = np.stack([0.016 * np.linspace(-1, 1, 8), np.full(8, 0.047), np.full(8, -0.079)], 1)
        add(_Part(interior, np.tile([0, 0, -1.0], (8, 1)), np.full(8, 0.006), np.tile([0.25, 0.05, 0.06], (8, 1)),
                  np.zeros(8)), "mouth")

        hair_pts, hair_n = self._ellipsoid(1000, self.radii + 0.009, rng)
        on_head = (hair_pts[:, 1] < -0.045) | ((hair_pts[:, 2] > 0.015) & (hair_pts[:, 1] < 0.04)) | \
                  ((np.abs(hair_pts[:, 0]) > 0.066) & (hair_pts[:, 1] < -0.01) & (hair_pts[:, 2] > -0.03))
        hair_pts, hair_n = hair_pts[on_head], hair_n[on_head]
        hair_tex = 1 + 0.12 * rng.standard_normal((len(hair_pts), 1))
        self._hair_tex = np.clip(hair_tex, 0.7, 1.3)
        add(_Part(hair_pts, hair_n, np.full(len(hair_pts), 0.01), np.ones((len(hair_pts), 3)),
                  np.full(len(hair_pts), 0.97)), "hair")

        beard_pts, beard_n = self._ellipsoid(1400, self.radii + 0.005, rng)
        lower = (beard_pts[:, 1] > 0.028) & (beard_pts[:, 2] < 0.01) & ~(
            (np.abs(beard_pts[:, 0]) < 0.025) & (np.abs(beard_pts[:, 1] - 0.045) < 0.011))
        beard_pts, beard_n = beard_pts[lower], beard_n[lower]
        add(_Part(beard_pts, beard_n, np.full(len(beard_pts), 0.0055),
                  np.tile([0.16, 0.1, 0.06], (len(beard_pts), 1)) * (1 + 0.1 * rng.standard_normal((len(beard_pts), 1))),
                  np.ones(len(beard_pts))), "beard")

        rims, lenses = [], []
        for side in (-1, 1):
            t = np.linspace(0, 2 * math.pi, 36, endpoint=False)
            rims.append(np.stack([side * 0.031 + 0.019 * np.cos(t), -0.02 + 0.014 * np.sin(t), np.full(36, -0.098)], 1))
            gx, gy = np.meshgrid(np.linspace(-1, 1, 7), np.linspace(-1, 1, 5))
            inside = (gx**2 + gy**2) <= 1.0
            lenses.append(np.stack([side * 0.031 + 0.015 * gx[inside], -0.02 + 0.01 * gy[inside],
                                    np.full(inside.sum(), -0.097)], 1))
        bridge = np.stack([np.linspace(-0.012, 0.012, 6), np.full(6, -0.024), np.full(6, -0.1)], 1)
        rim = np.concatenate(rims + [bridge])
        add(_Part(rim, np.tile([0, 0, -1.0], (len(rim), 1)), np.full(len(rim), 0.0028),
                  np.tile([0.05, 0.05, 0.06], (len(rim), 1)), np.ones(len(rim))), "glasses_rim")
        lens = np.concatenate(lenses)
        add(_Part(lens, np.tile([0, 0, -1.0], (len(lens), 1)), np.full(len(lens), 0.0045),
                  np.tile([0.1, 0.12, 0.16], (len(lens), 1)), np.ones(len(lens))), "glasses_lens")

        self.tags = np.array(tags)
        self.means = np.concatenate([p.means for p in parts])
        normals = np.concatenate([p.normals for p in parts])
        self.normals = normals / np.linalg.norm(normals, axis=1, keepdims=True)
        self.base_scale = np.concatenate([p.scales for p in parts])
        self.colors = np.clip(np.concatenate([p.colors for p in parts]), 0, 1)
        self.opacity = np.concatenate([p.opacity for p in parts])
        self.quats = _quat_from_z(self.normals)
        # Jaw: points below the mouth line on the front, plus the lower lip and mouth interior.
        self.jaw = ((self.means[:, 1] > 0.05) & (self.means[:, 2] < 0.02) & np.isin(self.tags, ["skin", "beard"])) | \
            np.isin(self.tags, ["lower_lip"])

    @staticmethod
    def _ellipsoid(n: int, radii: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        i = np.arange(n) + 0.5
        phi = np.arccos(1 - 2 * i / n)
        theta = math.pi * (1 + 5**0.5) * i + rng.uniform(0, 0.3)
        unit = np.stack([np.sin(phi) * np.cos(theta), np.cos(phi), np.sin(phi) * np.sin(theta)], 1)
        pts = unit * radii
        normals = unit / radii
        return pts, normals / np.linalg.norm(normals, axis=1, keepdims=True)

    def region(self, attribute: str) -> np.ndarray:
        """Boolean [N]: the Gaussians an attribute changes."""
        tags = {"hair": ["hair"], "beard": ["beard"], "glasses": ["glasses_rim", "glasses_lens"], "skin": ["skin"]}
        if attribute not in tags:
            raise ValueError(f"the procedural head models attributes {list(tags)}; got {attribute!r}")
        return np.isin(self.tags, tags[attribute])

    def num_levels(self, attribute: str) -> int:
        """How many slider levels (key values) the head models for an attribute."""
        self.region(attribute)
        return len(self.keys[attribute])

    def render(self, values: dict[str, float] | None = None, expression: dict[str, float] | None = None,
               camera: dict | None = None, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """(rgb [H, W, 3] over a white background, alpha [H, W]) for a ``camera_record`` at ``size``."""
        if camera is None:
            raise ValueError("render needs a camera (perse_ray.camera.camera_record)")
        return _rasterize(self.gaussians(values, expression), camera, size)

    def region_mask(self, attribute: str, expression: dict[str, float] | None, camera: dict, size: int,
                    dilate: int = 2) -> np.ndarray:
        """[H, W] float mask of the pixels an attribute can cover (its Gaussians made opaque), dilated."""
        g = self.gaussians({}, expression)
        inside = torch.from_numpy(self.region(attribute))
        g["opacities"] = torch.where(inside, torch.tensor(0.95), torch.tensor(0.0))
        _, alpha = _rasterize(g, camera, size)
        mask = torch.from_numpy((alpha > 0.05).astype(np.float32))[None, None]
        if dilate:
            mask = torch.nn.functional.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)
        return mask[0, 0].numpy()

    def gaussians(self, attributes: dict[str, float] | None = None, expression: dict[str, float] | None = None,
                  ) -> dict[str, torch.Tensor]:
        attributes, expression = dict(attributes or {}), dict(expression or {})
        for name in attributes:
            self.region(name)
        unknown = set(expression) - set(EXPRESSIONS)
        if unknown:
            raise ValueError(f"the procedural head models expressions {list(EXPRESSIONS)}; got {sorted(unknown)}")
        means = self.means.copy()
        colors = self.colors.copy()
        opacity = self.opacity.copy()
        tags = self.tags

        colors[tags == "hair"] = np.clip(_piecewise(HAIR_COLORS, attributes.get("hair", 0)) * self._hair_tex, 0, 1)
        opacity[tags == "beard"] = 0.97 * _piecewise(BEARD_DENSITY, attributes.get("beard", 0))
        rim, tint = _piecewise(GLASSES_KEYS, attributes.get("glasses", 0))
        opacity[tags == "glasses_rim"] = 0.98 * rim
        opacity[tags == "glasses_lens"] = 0.9 * tint
        colors[tags == "skin"] = np.clip(colors[tags == "skin"] * _piecewise(SKIN_TONES, attributes.get("skin", 0)), 0, 1)

        brow = expression.get("brow_raise", 0.0)
        means[tags == "brow", 1] -= 0.012 * brow
        smile = expression.get("smile", 0.0)
        lips = np.isin(tags, ["upper_lip", "lower_lip"])
        w = (means[lips, 0] / 0.022) ** 2
        means[lips, 1] -= 0.008 * smile * w
        means[lips, 0] *= 1 + 0.15 * smile * np.abs(means[lips, 0]) / 0.022
        jaw = expression.get("jaw_open", 0.0)
        angle = math.radians(16.0) * jaw
        pivot = np.array([0.0, 0.0, 0.03])
        c, s = math.cos(angle), math.sin(angle)
        rel = means[self.jaw] - pivot
        means[self.jaw, 1] = pivot[1] + c * rel[:, 1] - s * rel[:, 2]  # rotate about x: chin goes down
        means[self.jaw, 2] = pivot[2] + s * rel[:, 1] + c * rel[:, 2]
        opacity[tags == "mouth"] = 0.95 * min(1.0, max(0.0, jaw) * 3)

        scales = np.stack([self.base_scale, self.base_scale, 0.35 * self.base_scale], 1)
        t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        return {"means": t(means), "quats": t(self.quats), "scales": t(scales),
                "opacities": t(np.clip(opacity, 0, 1)), "colors": t(colors)}
