"""The web bundle: one avatar version as a compact binary file a browser decodes and splats itself.

Layout (all little-endian)::

    0   4 bytes   magic b"PRWB"
    4   uint32    format version (``BUNDLE_VERSION``)
    8   uint32    header length H in bytes
    12  H bytes   header: UTF-8 JSON (layout, camera defaults, decoder shape, the section table)
    D   sections  float32 arrays, D = 12 + H rounded up to 4; each section's ``offset`` is from D

The sections are the canonical Gaussians (means, quats, log_scales, opacity_logits, color_logits,
features), every attribute's code table (row 0 = the source, zeros) and the decoder's weights per
branch (``w_gauss`` ... ``b_out``, branch-major as in ``BranchDecoder``), ``branch_regions`` [branches, N]
(1 where a branch acts on a Gaussian, 0 where it adds nothing); the learned backdrop when
the avatar has one. The branches are the layout's (``LatentLayout.branches``: the expression, each
attribute, then each attribute's residual branches); an anchored one (added after training, and
every attribute's under the "owned" composition) outputs f(z) − f(0), and exactly zero where its slice of z is all zeros. The header's
``decoder.attribute_composition`` says how the attributes' opacity and colour changes combine ("sum",
"union" or "owned", with ``color_dominance``; see ``perse_ray.avatar.model``). The decoder is stored as
weights rather than precomputed tables: a branch's output depends non-linearly on its code, so a
table would only be exact at the edit codes.

``decode_bundle`` validates everything a reader relies on (magic, version, header length, JSON,
section table, dtype, shapes against the header's counts, exact total length, finite values, the
size cap) and raises ``BundleError`` naming the problem. ``decode_gaussians`` is a NumPy decode of a
parsed bundle with the model's arithmetic: the reference the browser's decoder is tested against.
No pickle and no code: JSON + raw float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

import numpy as np

MAGIC = b"PRWB"
BUNDLE_FORMAT = "perse-ray-web-bundle"
BUNDLE_VERSION = 4  # 2: branch_regions; 3: anchored and residual branches; 4: attribute_composition
MAX_BUNDLE_BYTES = 64 * 1024 * 1024  # a 50k-Gaussian gpu-preset avatar is ~10 MB
MAX_HEADER_BYTES = 1024 * 1024
_PREFIX = struct.Struct("<4sII")


class BundleError(ValueError):
    """A web bundle that is truncated, of another version, too large, or inconsistent."""


@dataclasses.dataclass
class WebBundle:
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]  # float32, shaped as the header's section table says

    @property
    def num_gaussians(self) -> int:
        return int(self.header["num_gaussians"])


def _sections(model) -> dict[str, np.ndarray]:
    """The model's public state as float32 arrays, named as in the bundle."""
    import torch

    def f32(t):
        return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)

    dec = model.decoder
    out = {"means": f32(model.means), "quats": f32(model.quats), "log_scales": f32(model.log_scales),
           "opacity_logits": f32(model.opacity_logits), "color_logits": f32(model.color_logits),
           "features": f32(model.features)}
    for a in model.layout.attributes:
        out[f"codes.{a.name}"] = f32(model.code_table(a.name))
    out.update(w_gauss=f32(dec.w_gauss), w_z=f32(dec.w_z), b_in=f32(dec.b_in))
    for i, (w, b) in enumerate(zip(dec.w_hidden, dec.b_hidden)):
        out[f"w_hidden.{i}"], out[f"b_hidden.{i}"] = f32(w), f32(b)
    out.update(w_out=f32(dec.w_out), b_out=f32(dec.b_out))
    # 1 where a branch acts on a Gaussian, 0 where it adds nothing (the expression branch: all;
    # an attribute's residual branches: the attribute's region).
    regions = torch.ones(len(dec.branch_dims), model.means.shape[0])
    if getattr(model, "branch_regions", None) is not None:
        rows = {a.name: m for a, m in zip(model.layout.attributes, model.branch_regions.float())}
        for i, b in enumerate(model.layout.branches()):
            if b.input != "expression":
                regions[i] = rows[b.input]
    out["branch_regions"] = f32(regions)
    if model.backdrop is not None:
        out["backdrop"] = f32(model.backdrop)
    return out


def encode_bundle(model, camera: dict[str, Any], *, avatar_id: str | None = None, version: str | None = None,
                  max_bytes: int = MAX_BUNDLE_BYTES) -> bytes:
    """The bundle of an ``AvatarModel`` (its parameters and layout) and its camera conventions."""
    from perse_ray.avatar.model import DELTA_CHANNELS, DELTA_UNITS, POSITION_SCALE

    cfg, layout, dec = model.cfg, model.layout, model.decoder
    arrays = _sections(model)
    table, offset = [], 0
    for name, arr in arrays.items():
        if not np.isfinite(arr).all():
            raise BundleError(f"section {name} holds NaN or inf")
        table.append({"name": name, "dtype": "float32", "shape": list(arr.shape), "offset": offset,
                      "nbytes": arr.nbytes})
        offset += arr.nbytes
    header = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION,
        "avatar": {"id": avatar_id, "version": version},
        "num_gaussians": int(cfg.num_gaussians),
        "layout": json.loads(layout.to_json()),
        "camera": {"fov_deg": float(camera["fov_deg"]), "distance": float(camera["distance"]),
                   "yaw": 0.0, "pitch": 0.0},
        "background": [float(c) for c in cfg.background],
        "decoder": {"activation": "silu", "feature_dim": int(cfg.feature_dim), "pos_freqs": int(cfg.pos_freqs),
                    "position_scale": POSITION_SCALE, "hidden_dim": int(cfg.hidden_dim),
                    "hidden_layers": int(cfg.hidden_layers), "branch_dims": list(dec.branch_dims),
                    "branches": [b.input for b in layout.branches()],
                    "attribute_composition": cfg.attribute_composition, "color_dominance": float(cfg.color_dominance),
                    "outputs": [[k, int(DELTA_CHANNELS[k]), float(DELTA_UNITS[k])] for k in DELTA_CHANNELS]},
        "sections": table,
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    data_at = _align4(_PREFIX.size + len(head))
    total = data_at + offset
    if total > max_bytes:
        raise BundleError(f"bundle of {total} bytes exceeds the cap of {max_bytes} bytes")
    buf = bytearray(total)
    _PREFIX.pack_into(buf, 0, MAGIC, BUNDLE_VERSION, len(head))
    buf[_PREFIX.size:_PREFIX.size + len(head)] = head
    for entry, arr in zip(table, arrays.values()):
        start = data_at + entry["offset"]
        buf[start:start + arr.nbytes] = arr.astype("<f4").tobytes()
    return bytes(buf)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _expected_shapes(h: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every section's shape from the header's counts (what a reader indexes by)."""
    n, d = h["num_gaussians"], h["decoder"]
    nb, zmax, hid = len(d["branch_dims"]), max(d["branch_dims"]), d["hidden_dim"]
    g_dim = d["feature_dim"] + 3 + 6 * d["pos_freqs"]
    out_dim = sum(c for _, c, _ in d["outputs"])
    shapes = {"means": (n, 3), "quats": (n, 4), "log_scales": (n, 3), "opacity_logits": (n,),
              "color_logits": (n, 3), "features": (n, d["feature_dim"])}
    for a in h["layout"]["attributes"]:
        shapes[f"codes.{a['name']}"] = (len(a["edit_labels"]), a["code_dim"])
    shapes.update(w_gauss=(nb, g_dim, hid), w_z=(nb, zmax, hid), b_in=(nb, hid))
    for i in range(d["hidden_layers"] - 1):
        shapes[f"w_hidden.{i}"], shapes[f"b_hidden.{i}"] = (nb, hid, hid), (nb, hid)
    shapes.update(w_out=(nb, hid, out_dim), b_out=(nb, out_dim), branch_regions=(nb, n))
    return shapes


def _check_header(h: Any) -> None:
    from perse_ray.avatar.layout import LatentLayout

    if not isinstance(h, dict) or h.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"header: format is not {BUNDLE_FORMAT!r}")
    if h.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"header: format_version {h.get('format_version')!r} is not supported "
                          f"(expected {BUNDLE_VERSION})")
    try:
        layout = LatentLayout.from_dict(h["layout"])
        d, cam = h["decoder"], h["camera"]
        ints = [h["num_gaussians"], d["feature_dim"], d["pos_freqs"], d["hidden_dim"], d["hidden_layers"],
                *d["branch_dims"]]
        if any(type(v) is not int or v < 0 for v in ints) or d["hidden_layers"] < 1 or h["num_gaussians"] < 1:
            raise BundleError("header: counts must be positive integers")
        if [o[0] for o in d["outputs"]] != ["mean", "quat", "scale", "opacity", "color"] or \
                [o[1] for o in d["outputs"]] != [3, 4, 3, 1, 3]:
            raise BundleError(f"header: decoder outputs {d['outputs']} are not mean/quat/scale/opacity/color")
        if d["activation"] != "silu":
            raise BundleError(f"header: unknown activation {d['activation']!r}")
        if d["attribute_composition"] not in ("sum", "union", "owned"):
            raise BundleError(f"header: unknown attribute_composition {d['attribute_composition']!r}")
        want_dims = layout.branch_dims()
        if list(d["branch_dims"]) != want_dims or list(d["branches"]) != [b.input for b in layout.branches()]:
            raise BundleError(f"header: branch_dims {d['branch_dims']} do not match the layout ({want_dims})")
        for v in (cam["fov_deg"], cam["distance"], d["position_scale"], d["color_dominance"],
                  *(u for _, _, u in d["outputs"])):
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BundleError("header: camera and decoder constants must be finite numbers")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"header: bad layout, camera or decoder: {type(e).__name__}: {e}") from None


def decode_bundle(data: bytes, *, max_bytes: int = MAX_BUNDLE_BYTES) -> WebBundle:
    """Parse and validate a bundle; ``BundleError`` names the first problem found."""
    size = len(data)
    if size > max_bytes:
        raise BundleError(f"bundle of {size} bytes exceeds the cap of {max_bytes} bytes")
    if size < _PREFIX.size:
        raise BundleError(f"truncated: {size} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, head_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise BundleError(f"not a web bundle (magic {magic!r}, expected {MAGIC!r})")
    if version != BUNDLE_VERSION:
        raise BundleError(f"format version {version} is not supported (expected {BUNDLE_VERSION})")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > size:
        raise BundleError(f"truncated or corrupt: header length {head_len}, file of {size} bytes")
    try:
        header = json.loads(bytes(data[_PREFIX.size:_PREFIX.size + head_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"header: not valid JSON: {e}") from None
    _check_header(header)
    if header["format_version"] != version:
        raise BundleError("header: format_version differs from the prefix")
    expected = _expected_shapes(header)
    expected["backdrop"] = None  # optional, any [3, R, R]
    table = header.get("sections")
    if not isinstance(table, list):
        raise BundleError("header: no section table")
    data_at, end, arrays = _align4(_PREFIX.size + head_len), 0, {}
    declared = data_at + sum(s.get("nbytes", 0) for s in table if isinstance(s, dict) and isinstance(s.get("nbytes"), int))
    if declared > max_bytes:
        raise BundleError(f"bundle declares {declared} bytes, over the cap of {max_bytes} bytes")
    for s in table:
        try:
            name, dtype, shape, off, nbytes = s["name"], s["dtype"], [int(x) for x in s["shape"]], s["offset"], s["nbytes"]
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"header: malformed section entry {s!r}"[:300]) from None
        if name not in expected or name in arrays:
            raise BundleError(f"section {name!r}: unknown or repeated")
        if dtype != "float32":
            raise BundleError(f"section {name}: dtype {dtype!r}, expected float32")
        want = expected[name]
        if want is None:
            ok = len(shape) == 3 and shape[0] == 3 and shape[1] == shape[2] and 1 <= shape[1] <= 1024
        else:
            ok = tuple(shape) == want
        if not ok:
            raise BundleError(f"section {name}: shape {shape}, expected {list(want) if want else '[3, R, R]'}")
        if off != end or nbytes != 4 * math.prod(shape):
            raise BundleError(f"section {name}: offset {off} / nbytes {nbytes} do not follow the table")
        end += nbytes
        if data_at + end > size:
            raise BundleError(f"truncated: section {name} ends at byte {data_at + end}, file has {size}")
        arr = np.frombuffer(data, dtype="<f4", count=nbytes // 4, offset=data_at + off).reshape(shape)
        if not np.isfinite(arr).all():
            raise BundleError(f"section {name} holds NaN or inf")
        arrays[name] = arr.astype(np.float32, copy=False)
    missing = [k for k, v in expected.items() if v is not None and k not in arrays]
    if missing:
        raise BundleError(f"sections missing: {missing}")
    if data_at + end != size:
        raise BundleError(f"{size - data_at - end} bytes after the last section (file of {size}, "
                          f"expected {data_at + end})")
    return WebBundle(header, arrays)


# --------------------------------------------------------------------------- reference decode


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def positional_encoding(x: np.ndarray, num_freqs: int) -> np.ndarray:
    freqs = (2.0 ** np.arange(num_freqs, dtype=np.float32)) * np.float32(math.pi)
    angles = x[..., None] * freqs
    return np.concatenate([x, np.sin(angles).reshape(*x.shape[:-1], -1),
                           np.cos(angles).reshape(*x.shape[:-1], -1)], axis=-1).astype(np.float32)


def latent(bundle: WebBundle, attributes: dict[str, float] | None = None,
           expression: dict[str, float] | None = None) -> np.ndarray:
    """z [dim] for slider values and expression values (``Avatar.latent``'s rule)."""
    attributes, expression = attributes or {}, expression or {}
    lay = bundle.header["layout"]
    parts = [np.array([float(expression.get(n, 0.0)) for n in lay["expressions"]], dtype=np.float32)]
    for a in lay["attributes"]:
        table, k = bundle.arrays[f"codes.{a['name']}"], len(a["edit_labels"])
        s = float(attributes.get(a["name"], 0.0))
        lo = min(int(math.floor(s)), k - 1)
        hi = min(lo + 1, k - 1)
        alpha = np.float32(s - lo)
        parts.append(table[lo] * (np.float32(1) - alpha) + table[hi] * alpha)
    return np.concatenate(parts).astype(np.float32)


def branch_inputs(bundle: WebBundle, z: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    """(the slice of z, anchored) of each decoder branch (a layout without expressions feeds a zero)."""
    from perse_ray.avatar.layout import LatentLayout

    layout = LatentLayout.from_dict(bundle.header["layout"])
    slices = layout.slices()
    return [(z[slices[b.input]] if b.input != "expression" or layout.exp_dim else np.zeros(1, np.float32), b.anchored)
            for b in layout.branches()]


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0, -x)


def _union_terms(logits: np.ndarray, attribute_deltas: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """``perse_ray.avatar.model._union_terms`` in NumPy: the summed log keep and each log clear."""
    keep = sum(_log_sigmoid(logits + np.minimum(d, 0)) - _log_sigmoid(logits) for d in attribute_deltas)
    return keep, [_log_sigmoid(-logits - np.maximum(d, 0)) - _log_sigmoid(-logits) for d in attribute_deltas]


def _union_opacity(logits: np.ndarray, keep: np.ndarray, clears: list[np.ndarray]) -> np.ndarray:
    """``perse_ray.avatar.model.union_opacity`` in NumPy, from ``_union_terms``."""
    return (1 - (1 - np.exp(_log_sigmoid(logits)) * np.exp(keep)) * np.exp(sum(clears))).astype(np.float32)


def _owned_weights(logits: np.ndarray, keep: np.ndarray, clears: list[np.ndarray]) -> list[np.ndarray]:
    """``perse_ray.avatar.model.owned_weights`` in NumPy, from ``_union_terms``."""
    source = np.exp(_log_sigmoid(logits)) * np.exp(keep)
    adds = [-np.expm1(clear) for clear in clears]
    total = source + sum(adds)
    tiny = np.finfo(np.float32).tiny
    return [np.where(total > tiny, (source + add) / np.maximum(total, tiny), 1).astype(np.float32) for add in adds]


def _dominant_change(changes: list[np.ndarray], dominance: float) -> np.ndarray:
    """``perse_ray.avatar.model.dominant_change`` in NumPy."""
    sizes = [np.sqrt(np.square(c).sum(-1, keepdims=True) + np.float32(1e-12)) for c in changes]
    largest = np.max(sizes, axis=0)
    return sum(np.exp(np.float32(dominance) * (size - largest)) * c for size, c in zip(sizes, changes))


def decode_gaussians(bundle: WebBundle, z: np.ndarray) -> dict[str, np.ndarray]:
    """Activated Gaussians of latent z [dim]: means, quats, scales, opacities, colors ([N, ...])."""
    h, a = bundle.header["decoder"], bundle.arrays
    pos = positional_encoding(a["means"] / np.float32(h["position_scale"]), h["pos_freqs"])
    gauss_in = np.concatenate([a["features"], pos], axis=-1)
    def branch(b: int, zb: np.ndarray) -> np.ndarray:
        x = _silu(gauss_in @ a["w_gauss"][b] + (zb @ a["w_z"][b, :len(zb)] + a["b_in"][b]))
        for i in range(h["hidden_layers"] - 1):
            x = _silu(x @ a[f"w_hidden.{i}"][b] + a[f"b_hidden.{i}"][b])
        return x @ a["w_out"][b] + a["b_out"][b]

    # one sum per part of z (the expression, each attribute with its residual branches)
    parts: dict[str, np.ndarray] = {}
    for b, ((zb, anchored), part) in enumerate(zip(branch_inputs(bundle, np.asarray(z, np.float32)), h["branches"])):
        if not anchored:
            out = branch(b, zb)
        elif (zb == 0).all():
            out = np.zeros((len(gauss_in), a["w_out"].shape[-1]), np.float32)
        else:
            out = branch(b, zb) - branch(b, np.zeros_like(zb))
        out = out * a["branch_regions"][b][:, None]
        parts[part] = out if part not in parts else parts[part] + out
    units = {name: np.float32(unit) for name, _, unit in h["outputs"]}
    union = h["attribute_composition"] in ("union", "owned")
    if union:
        expression, attributes = parts.pop("expression"), list(parts.values())
        logits = a["opacity_logits"] + units["opacity"] * expression[:, 10]
        deltas = [units["opacity"] * p[:, 10] for p in attributes]
        terms = _union_terms(logits, deltas)  # once, for the opacity and the owned shares
        opacities = _union_opacity(logits, *terms)
        if h["attribute_composition"] == "owned":  # each attribute changes only the material it owns
            attributes = [w[:, None] * p for w, p in zip(_owned_weights(logits, *terms), attributes)]
        parts = {"expression": expression, **dict(enumerate(attributes))}
    total = sum(parts.values())
    d, at = {}, 0
    for name, c, unit in h["outputs"]:
        d[name] = (np.float32(unit) * total[:, at:at + c]).astype(np.float32)
        at += c
    if union:
        color_logits = a["color_logits"] + units["color"] * expression[:, 11:14] + _dominant_change(
            [units["color"] * p[:, 11:14] for p in attributes], h["color_dominance"])
    else:
        opacities = 1 / (1 + np.exp(-(a["opacity_logits"] + d["opacity"][:, 0])))
        color_logits = a["color_logits"] + d["color"]
    return {"means": a["means"] + d["mean"], "quats": a["quats"] + d["quat"],
            "scales": np.exp(a["log_scales"] + d["scale"]),
            "opacities": opacities,
            "colors": 1 / (1 + np.exp(-color_logits))}
