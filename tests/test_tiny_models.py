"""The tiny random-weight models: written through the real save formats, loaded through the real
loaders (the same code paths the gpu preset uses with hub ids), one forward pass each."""

from __future__ import annotations

import os

import numpy as np
import pytest

from perse_ray.config import FacesConfig, load_config
from perse_ray.models import ModelNotFoundError, resolve_model_ref
from perse_ray.models.tiny import ENTRIES, MANIFEST, is_complete, write_tiny_models
from perse_ray.synth.motion import MotionFrame


@pytest.fixture(scope="module")
def tiny_cfg(tiny_models):
    from perse_ray.pipeline import resolve_models

    return resolve_models(load_config("tiny"))


def _image(seed=0, size=64):
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def _landmarks(size=64):
    # A plausible frontal layout: ring for the jaw, points inside for brows, eyes, nose, mouth.
    t = np.linspace(-0.9 * np.pi, -0.1 * np.pi, 17)
    jaw = np.stack([0.5 + 0.3 * np.cos(t + np.pi), 0.45 - 0.35 * np.sin(t + np.pi)], 1)
    rest = np.random.default_rng(3).uniform(0.35, 0.65, (51, 2))
    return (np.concatenate([jaw, rest]) * size).astype(np.float32)


def test_write_is_complete_idempotent_and_seeded(tiny_models, tmp_path):
    assert is_complete(tiny_models) and all((tiny_models / e).exists() for e in ENTRIES)
    stamp = (tiny_models / MANIFEST).stat().st_mtime_ns
    write_tiny_models(tiny_models)
    assert (tiny_models / MANIFEST).stat().st_mtime_ns == stamp  # complete: left alone
    assert not [p for p in tiny_models.iterdir() if p.name.startswith(".tmp-")]
    other = write_tiny_models(tmp_path / "again")
    for weights in ("instruct-pix2pix/unet/diffusion_pytorch_model.safetensors", "arcface.onnx"):
        assert (other / weights).read_bytes() == (tiny_models / weights).read_bytes()
    # A missing manifest (an interrupted write) means incomplete: the set is rewritten.
    (other / MANIFEST).unlink()
    assert not is_complete(other)
    write_tiny_models(other)
    assert is_complete(other) and not is_complete(other, seed=1)


def test_model_refs_expand_and_missing_models_are_named(tiny_models, monkeypatch):
    assert resolve_model_ref("${PERSE_RAY_TINY_MODELS}/sd") == str(tiny_models / "sd")
    assert resolve_model_ref("org/model-id") == "org/model-id"  # a hub id is passed through
    with pytest.raises(ModelNotFoundError, match="/nowhere/model"):
        resolve_model_ref("/nowhere/model")
    monkeypatch.delenv("PERSE_RAY_TINY_MODELS")
    with pytest.raises(ModelNotFoundError, match="PERSE_RAY_TINY_MODELS is not set"):
        resolve_model_ref("${PERSE_RAY_TINY_MODELS}/sd")


def test_instruct_pix2pix_editor(tiny_cfg):
    from perse_ray.synth.diffusion import InstructPix2PixEditor

    editor = InstructPix2PixEditor(tiny_cfg)
    assert editor.pipe.unet.config.in_channels == 8
    image, spec = _image(), tiny_cfg.synth.attributes[0].edits[0]
    edited, mask = editor.edit(image, _landmarks(), "hair", spec, seed=3)
    assert edited.shape == image.shape and edited.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == np.float32 and 0 <= mask.min() <= mask.max() <= 1
    again, _ = editor.edit(image, _landmarks(), "hair", spec, seed=3)
    assert np.array_equal(edited, again)  # seeded
    # Outside the mask the source is kept exactly.
    outside = mask == 0
    assert np.array_equal(edited[outside], image[outside])
    same, zero = editor.edit(image, _landmarks(), "hair", None, seed=3)
    assert same is image and not zero.any()


def test_controlnet_animator(tiny_cfg):
    from perse_ray.synth.diffusion import ControlNetAnimator

    animator = ControlNetAnimator(tiny_cfg)
    mask = np.zeros((64, 64), np.float32)
    mask[20:40, 20:40] = 1
    frame = MotionFrame(1, 15.0, -5.0, {"jaw_open": 0.8, "smile": 0.0, "brow_raise": 0.0})
    image, moved, valid, warped = animator.animate(_image(), _landmarks(), frame, seed=1, mask=mask)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert moved.shape == (68, 2) and not np.allclose(moved, _landmarks())
    assert valid.all() and warped.shape == (64, 64) and 0 < warped.sum()


def test_diffusion_morpher(tiny_cfg):
    from perse_ray.synth.diffusion import DiffusionMorpher

    morpher = DiffusionMorpher(tiny_cfg)
    a, b = _image(1), _image(1).copy()
    b[10:30, 10:30] = 255 - b[10:30, 10:30]  # the endpoints differ only here
    spec = tiny_cfg.synth.attributes[0].edits[0]
    frame = MotionFrame(0, 0.0, 0.0, {})
    image, mask = morpher.morph(a, _landmarks(), "hair", None, spec, 0.5, frame, a, b, seed=0)
    assert image.shape == a.shape and image.dtype == np.uint8
    assert mask[20, 20] > 0.9 and mask[50, 50] == 0
    assert np.array_equal(image[mask == 0], a[mask == 0])
    assert len(morpher._cache) == 2  # both endpoints inverted once
    morpher.morph(a, _landmarks(), "hair", None, spec, 0.25, frame, a, b, seed=0)
    assert len(morpher._cache) == 2  # reused for another alpha


def test_arcface_onnx_through_insightface(tiny_models):
    from perse_ray.faces.arcface import ArcFaceEmbedder

    embedder = ArcFaceEmbedder(str(tiny_models / "arcface.onnx"))
    assert type(embedder.model).__name__ == "ArcFaceONNX" and embedder.model.input_size == (112, 112)
    emb = embedder.embed(_image(size=128), _landmarks(128))
    assert emb.shape == (512,) and emb.dtype == np.float32 and np.isclose(np.linalg.norm(emb), 1, atol=1e-5)
    assert embedder.id_score(emb, emb) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= embedder.id_score(emb, -emb) <= 1.0
    with pytest.raises(ModelNotFoundError, match="not a recognition model"):
        ArcFaceEmbedder(str(tiny_models / "insightface-pack" / "det.onnx"))


def test_insightface_pack_backend(tiny_models):
    from perse_ray.faces import load_face_model

    model = load_face_model(FacesConfig(backend="insightface", model=str(tiny_models / "insightface-pack")))
    faces = model.detect(_image(2, 96))
    assert faces, "the random tiny SCRFD fires somewhere at its 0.5 threshold"
    assert all(f.landmarks.shape == (68, 2) for f in faces)
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    emb = model.embed(_image(2, 96), faces[0])
    assert emb.shape == (512,)
    with pytest.raises(ModelNotFoundError, match="insightface model pack 'no-such-pack' not found"):
        load_face_model(FacesConfig(backend="insightface", model="no-such-pack"))


def test_loaders_name_missing_models(tiny_cfg, tmp_path):
    import dataclasses

    from perse_ray.synth.diffusion import InstructPix2PixEditor

    empty = tmp_path / "not-a-pipeline"
    empty.mkdir()
    cfg = dataclasses.replace(tiny_cfg, synth=dataclasses.replace(tiny_cfg.synth, edit_model=str(empty)))
    with pytest.raises(ModelNotFoundError, match="not-a-pipeline"):
        InstructPix2PixEditor(cfg)
    assert os.environ["PERSE_RAY_TINY_MODELS"]


@pytest.mark.gpu
def test_diffusion_backends_on_cuda_in_float16(tiny_cfg):
    """The CUDA path: every diffusion stage loads in float16 on the GPU and returns uint8 frames."""
    import torch

    from perse_ray.synth.diffusion import ControlNetAnimator, DiffusionMorpher, InstructPix2PixEditor

    editor, animator, morpher = (cls(tiny_cfg) for cls in (InstructPix2PixEditor, ControlNetAnimator,
                                                           DiffusionMorpher))
    assert editor.pipe.device.type == "cuda" and editor.pipe.unet.dtype == torch.float16
    spec = tiny_cfg.synth.attributes[0].edits[0]
    edited, mask = editor.edit(_image(), _landmarks(), "hair", spec, seed=0)
    frame = MotionFrame(1, 10.0, 0.0, {"smile": 0.5})
    image, _, _, warped = animator.animate(edited, _landmarks(), frame, seed=0, mask=mask)
    morph, _ = morpher.morph(_image(), _landmarks(), "hair", None, spec, 0.5, frame, _image(), image, seed=0)
    for out in (edited, image, morph):
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
