"""One dataclass tree for every stage, loaded from a YAML preset plus dotted overrides.

    cfg = load_config("cpu", overrides=["train.steps=200", "avatar.num_gaussians=5000"])

Presets live in ``configs/<name>.yaml`` and only hold the values that differ from the defaults
below. Unknown keys, wrong types, values outside a field's choices (``Literal`` fields) and
unknown presets raise ``ConfigError`` naming the key and the choices, so a typo never silently
trains with a default and never reaches a Ray actor.

*What* is computed and *where* it runs are kept apart. Every section but ``machine`` says what
is computed; ``machine`` says where and how (actors, CPUs, GPUs, device, kernel, logging and
checkpoint cadence) and is in no hash. Each stage's outputs are keyed by the hash of what
changes them:

    synthesis_hash()   faces + synth + the camera geometry (render.fov_deg, render.distance)
    training_hash()    synthesis_hash + avatar + train + render.width/height

so changing ``train.steps`` reuses every synthesized frame, and moving a job to GPUs reuses both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("cpu", "cpu-smoke", "gpu", "tiny", "scale")


class ConfigError(ValueError):
    """A preset, key or value that does not fit the config tree."""


# --------------------------------------------------------------------------- sections


@dataclass
class EditSpec:
    """One edit level of an attribute. Diffusion backends read ``prompt``; classical ones ``params``."""

    label: str
    prompt: str = ""
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class AttributeSpec:
    """An editable attribute; edit 0 is always the unedited source, so ``edits`` lists levels 1..K-1."""

    name: str
    edits: list[EditSpec] = field(default_factory=list)


def _default_attributes() -> list[AttributeSpec]:
    return [
        AttributeSpec("hair", [EditSpec("auburn", "make the hair auburn", {"hue": 0.05, "amount": 0.6}),
                               EditSpec("platinum", "make the hair platinum blonde",
                                        {"hue": 0.13, "amount": 0.9, "lightness": 0.35})]),
        AttributeSpec("beard", [EditSpec("stubble", "give him stubble", {"density": 0.35}),
                                EditSpec("full", "give him a full beard", {"density": 0.9})]),
        AttributeSpec("glasses", [EditSpec("thin", "add thin glasses", {"rim": 0.4, "tint": 0.0}),
                                  EditSpec("sunglasses", "add sunglasses", {"rim": 1.0, "tint": 0.85})]),
    ]


@dataclass
class FacesConfig:
    backend: Literal["dlib", "insightface"] = "dlib"
    detector: Literal["hog", "cnn"] = "hog"  # dlib's detector
    upsample: int = 1  # dlib detector upsampling passes
    min_score: float = 0.25  # dlib: weaker detections are dropped (the astronaut's false one scores 0.12)
    model: str = "buffalo_l"  # insightface model pack name or local directory
    identity_model: str = ""  # insightface ArcFace ONNX path (overrides the pack's)
    min_face_fraction: float = 0.08  # face box side / short image side below this: "face too small"
    dominance_ratio: float = 1.6  # largest face must be this many times the next one's area
    id_threshold: float = 0.5  # id_score below this drops a frame (id_score is in [0, 1])


@dataclass
class MotionConfig:
    num_frames: int = 24
    yaw_range: float = 45.0  # degrees, +- around the front view
    pitch_range: float = 20.0
    expressions: list[str] = field(default_factory=lambda: ["jaw_open", "smile", "brow_raise"])
    seed: int = 7


@dataclass
class SynthConfig:
    resolution: int = 128  # side of the aligned square portrait and of every frame
    attributes: list[AttributeSpec] = field(default_factory=_default_attributes)
    morph_alphas: list[float] = field(default_factory=lambda: [0.25, 0.75])
    # Motion-script frames (evenly spaced, never frame 0) that also get one frame with every
    # attribute edited at once, at seeded non-source levels: combinations no single edit shows.
    combined_frames: int = 0
    motion: MotionConfig = field(default_factory=MotionConfig)
    edit_backend: Literal["classical", "instruct_pix2pix"] = "classical"
    animate_backend: Literal["classical", "controlnet"] = "classical"
    morph_backend: Literal["exact", "diffusion"] = "exact"
    edit_model: str = "timbrooks/instruct-pix2pix"
    animate_model: str = "runwayml/stable-diffusion-v1-5"
    controlnet_model: str = "CrucibleAI/ControlNetMediaPipeFace"
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    seed: int = 0
    max_image_pixels: int = 40_000_000  # decompression-bomb cap
    max_input_side: int = 2048  # larger inputs are downscaled before detection


@dataclass
class AvatarConfig:
    num_gaussians: int = 4000
    feature_dim: int = 32  # per-Gaussian learned feature
    code_dim: int = 8  # latent code size per attribute
    hidden_dim: int = 64
    hidden_layers: int = 1  # per branch; the gpu preset uses 2
    pos_freqs: int = 4  # sin/cos frequencies of the canonical position encoding
    init_radius: float = 0.1  # metres; the ellipsoid the Gaussians start on
    init_scale: float = 0.008
    # Each attribute branch moves only the Gaussians that fall inside that attribute's edit masks:
    # cheaper (it skips the rest) and nothing outside an edit's region can follow its slider.
    branch_regions: bool = True
    backdrop: bool = True  # learn a camera-fixed 2D background (the 2D animator keeps it fixed)
    backdrop_res: int = 32
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # behind the Gaussians without a backdrop
    # How the attribute branches' changes combine when several sliders move: "sum" adds their
    # logits; "union" composes opacity as a union (what one edit turns on, glasses, survives another
    # that fades the same Gaussians, hair over the brows) and, with color_dominance > 0, lets the
    # largest colour change win (dark lenses over a lightened brow): model.union_opacity,
    # model.dominant_change. "owned" is the union, and each attribute moves and recolours only the
    # material it owns, the source's and what it adds itself (lenses keep their place and colour where
    # the hair or beard edit changes the face behind them: model.owned_weights); its attribute branches
    # are anchored, so every attribute's change is exactly zero at its source level.
    attribute_composition: Literal["sum", "union", "owned"] = "sum"
    color_dominance: float = 0.0  # union only: per logit, how much the largest colour change wins (0: they add)


@dataclass
class RenderConfig:
    width: int = 64  # the avatar's training resolution
    height: int = 64
    fov_deg: float = 30.0
    distance: float = 0.65  # camera distance from the head centre, metres (a head fills ~2/3 of the view)


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 4  # frames per step, split across the DDP ranks (the result does not depend on them)
    lr_means: float = 3e-4  # metres per step at the start
    lr_scales: float = 5e-3
    lr_quats: float = 2e-3
    lr_opacity: float = 3e-2
    lr_colors: float = 1e-2
    lr_features: float = 5e-3
    lr_decoder: float = 1e-3
    lr_codes: float = 1e-2
    lr_backdrop: float = 3e-2
    lr_final_ratio: float = 0.1  # every learning rate decays exponentially to this fraction
    coarse_fraction: float = 0.0  # the first share of the steps trains at half the render size
    lambda_ssim: float = 0.2
    lambda_lpips: float = 0.0  # > 0 needs real LPIPS backbone weights (gpu preset)
    lambda_latent: float = 1e-4
    lambda_interp: float = 1.0
    # L1 on the attribute branches' outputs: an edit changes only what its frames show changing.
    # Without it a branch may move Gaussians its frames never see (hidden at the source, e.g. where
    # another attribute's glasses appear), which only shows once edits are combined.
    lambda_attr_delta: float = 0.0
    relocate_every: int = 100
    dead_opacity: float = 0.005  # a Gaussian below this opacity for every recent latent is dead
    holdout_fraction: float = 0.1
    seed: int = 0


@dataclass
class MachineConfig:
    """Where and how the work runs. In no hash: the same config gives the same result anywhere."""

    synth_batch_size: int = 4  # rows per synthesis actor call (integer: GPU stages need one)
    actors_per_stage: int = 1
    cpus_per_actor: float = 0.5  # fractional: whole-CPU actors starve the readers on 2 cores
    gpus_per_actor: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # training; auto: cuda when the process sees a GPU
    render_backend: Literal["auto", "gsplat", "cpu", "torch"] = "auto"  # training's rasterizer (exact equals)
    log_every: int = 50
    checkpoint_every: int = 500
    stall_timeout_s: float = 300.0  # synthesis with no output this long on a cluster too small for it fails


@dataclass
class Config:
    preset: str = "cpu"
    faces: FacesConfig = field(default_factory=FacesConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    avatar: AvatarConfig = field(default_factory=AvatarConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    machine: MachineConfig = field(default_factory=MachineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def synthesis_hash(self) -> str:
        """What changes the synthesized frames: faces, synth and the camera geometry."""
        d = self.to_dict()
        return _digest({"scheme": 3, "faces": d["faces"], "synth": d["synth"],
                        "camera": {k: d["render"][k] for k in ("fov_deg", "distance")}})

    def training_hash(self) -> str:
        """What changes a trained avatar: its frames (the synthesis hash), avatar, train and the
        render size. The DDP worker count is not in it: ranks split one global batch."""
        d = _without_added_keys(self.to_dict(), _ADDED_SINCE_TRAINING_SCHEME_2)
        return _digest({"scheme": 2, "synthesis": self.synthesis_hash(), "avatar": d["avatar"],
                        "train": d["train"], "render": {k: d["render"][k] for k in ("width", "height")}})

    def legacy_hash(self) -> str:
        """The single hash perse-ray wrote before stage hashes (every section but the device, with
        the old section layout), so outputs made then are recognised and reused, not redone."""
        d = _without_added_keys(self.to_dict(), _ADDED_SINCE_LEGACY_HASH)
        m = d.pop("machine")
        d["synth"].update(batch_size=m["synth_batch_size"], actors_per_stage=m["actors_per_stage"],
                          cpus_per_actor=m["cpus_per_actor"], gpus_per_actor=m["gpus_per_actor"])
        d["render"] = {"backend": m["render_backend"], **d["render"], "background": d["avatar"].pop("background")}
        d["train"].update(lambda_identity=0.0, checkpoint_every=m["checkpoint_every"], log_every=m["log_every"])
        d["serve"] = dict(_LEGACY_SERVE, **_LEGACY_SERVE_BY_PRESET.get(self.preset, {}))
        return _digest(d)


# Keys added to the config after a hash was defined, with the value that behaves as before their
# time: at that value they are left out of that hash, so what was made then is recognised and reused.
_ADDED_SINCE_TRAINING_SCHEME_2 = (("train", "lambda_attr_delta", 0.0),
                                  ("avatar", "attribute_composition", "sum"), ("avatar", "color_dominance", 0.0))
_ADDED_SINCE_LEGACY_HASH = (("synth", "combined_frames", 0), ("train", "coarse_fraction", 0.0),
                            ("avatar", "branch_regions", False), *_ADDED_SINCE_TRAINING_SCHEME_2)


def _without_added_keys(d: dict, added: tuple[tuple[str, str, object], ...]) -> dict:
    for section, key, old in added:
        if d[section][key] == old:
            del d[section][key]
    return d


def _digest(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


# The serve section the old config tree carried (Serve never read it, but it was hashed).
_LEGACY_SERVE = {"max_batch_size": 8, "batch_wait_timeout_s": 0.01, "max_avatars_per_replica": 4, "max_side": 1024,
                 "min_side": 16, "max_body_bytes": 65_536, "num_gpus": 0.0}
_LEGACY_SERVE_BY_PRESET = {"gpu": {"num_gpus": 0.5, "max_batch_size": 16}}
# Keys that moved into ``machine``: an old override names its new place instead of failing bare.
MOVED = {"synth.batch_size": "machine.synth_batch_size", "synth.actors_per_stage": "machine.actors_per_stage",
         "synth.cpus_per_actor": "machine.cpus_per_actor", "synth.gpus_per_actor": "machine.gpus_per_actor",
         "train.device": "machine.device", "render.backend": "machine.render_backend",
         "train.log_every": "machine.log_every", "train.checkpoint_every": "machine.checkpoint_every",
         "render.background": "avatar.background"}


# --------------------------------------------------------------------------- loading


def default_preset() -> str:
    """``gpu`` when CUDA is usable, else ``cpu``. Imports torch lazily (config must stay cheap)."""
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    preset = preset or default_preset()
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choices: {', '.join(PRESETS)}")
    path = CONFIG_DIR / f"{preset}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data["preset"] = preset
    for item in overrides:
        _apply_override(data, item)
    return from_dict(Config, data)


def _apply_override(data: dict, item: str) -> None:
    """``a.b.c=value``; the value is parsed as YAML (numbers, lists, booleans)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking every key and type on the way."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = path or "config"
        moved = MOVED.get(f"{path}.{unknown[0]}")
        if moved:
            raise ConfigError(f"{where}.{unknown[0]} is now {moved}")
        raise ConfigError(f"unknown key {where}.{unknown[0]}; choices: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}" if path else name)
              for name, value in data.items()}
    return cls(**kwargs)


# YAML 1.1 reads a number in exponent form as a string unless it has both a dot and a signed
# exponent: 3e-3, 1e5 and 1.5e3 arrive as str. A float setting takes them as the numbers they are.
_EXPONENT_FORM = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(f"{path}: {value!r} is not a choice; choices: {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(key_tp, k, path): _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} fits none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_FORM.fullmatch(value):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
