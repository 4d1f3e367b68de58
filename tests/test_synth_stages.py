"""Each synthesis stage's pure function on small images, with real backends (dlib faces, tiny
diffusion models: fast, random weights, so only contracts are checked, never quality)."""

from __future__ import annotations

import numpy as np
import pytest

from perse_ray.config import load_config
from perse_ray.faces import Face
from perse_ray.portraits import decode_png, discover_subjects
from perse_ray.synth.ingest import choose_face, ingest_subject, stage_seed
from perse_ray.synth.motion import motion_script

from test_portraits import build_hostile_folder


def _face(x0, y0, side):
    return Face((x0, y0, x0 + side, y0 + side), 1.0, np.zeros((68, 2), np.float32))


def test_choose_face_rules():
    cfg = load_config("cpu").faces  # dominance 1.6, min fraction 0.08
    assert choose_face([], (200, 200, 3), cfg) == (None, "no face found")
    face, reason = choose_face([_face(0, 0, 50), _face(100, 100, 45)], (200, 200, 3), cfg)
    assert face is None and reason.startswith("2 faces without a dominant one")
    face, reason = choose_face([_face(0, 0, 10)], (400, 400, 3), cfg)
    assert face is None and reason.startswith("face too small")
    big = _face(0, 0, 80)
    face, reason = choose_face([_face(100, 100, 30), big], (200, 200, 3), cfg)
    assert face is big and "1 smaller face(s) ignored" in reason


def test_stage_seed_is_stable_and_distinct():
    assert stage_seed(0, "a-1", "edit", 1) == stage_seed(0, "a-1", "edit", 1)
    assert len({stage_seed(0, "a-1", "edit", k) for k in range(50)}) == 50
    assert 0 <= stage_seed(5, "x", 1) < 2**31


@pytest.fixture(scope="module")
def dlib_faces():
    from perse_ray.faces import load_face_model

    return load_face_model(load_config("cpu").faces)


@pytest.mark.timeout(180)
def test_ingest_on_hostile_folder(tmp_path_factory, dlib_faces):
    cfg = load_config("cpu", ["synth.resolution=64"])
    found = discover_subjects(build_hostile_folder(tmp_path_factory.mktemp("hostile") / "in"))
    rows = {c.source_path.rsplit("/", 1)[1]: ingest_subject(c, dlib_faces, cfg) for c in found.candidates}
    reasons = {name: r["reason"] for name, r in rows.items() if r["status"] == "quarantined"}
    expected = {
        "two-faces.png": "2 faces without a dominant one", "truncated.jpg": "truncated or corrupt image",
        "empty.jpg": "empty file", "text.jpg": "not a decodable image", "one-pixel.png": "image too small",
        "noise.png": "no face found", "gray16.png": "no face found", "alpha.png": "no face found",
        "huge.png": "no face found", "..jpg": "no face found", "été 肖像.png": "no face found",
    }
    assert set(reasons) == set(expected)
    for name, start in expected.items():
        assert reasons[name].startswith(start), (name, reasons[name])
    ok = {name: r for name, r in rows.items() if r["status"] == "ok"}
    assert set(ok) == {"copy of grace.jpg", "cmyk.jpg", "multi-shot", "astronaut.png"}
    for r in ok.values():
        portrait = decode_png(r["portrait_png"])
        assert portrait.shape == (64, 64, 3)
        lm = np.asarray(r["landmarks"])
        assert lm.shape == (68, 2) and (lm > 0).all() and (lm < 64).all()
        assert len(r["identity"]) == 128 and len(r["face_box"]) == 4
    assert ok["multi-shot"]["reason"].startswith("chose c_large.jpg (largest dominant face")
    assert "a_noise.png: no face found" in ok["multi-shot"]["reason"]
    assert "readme.md: not an image file" in ok["multi-shot"]["reason"]
    # The same person, decoded from CMYK: identity close to the RGB original's.
    same = dlib_faces.id_score(ok["cmyk.jpg"]["identity"], ok["copy of grace.jpg"]["identity"])
    assert same > 0.5


@pytest.fixture(scope="module")
def tiny_cfg(tiny_models):
    from perse_ray.pipeline import resolve_models

    return resolve_models(load_config("tiny"))


@pytest.fixture(scope="module")
def grace_subject(tiny_cfg, tmp_path_factory):
    import shutil

    from perse_ray.faces import load_face_model
    from test_portraits import GRACE

    root = tmp_path_factory.mktemp("grace") / "in"
    root.mkdir()
    shutil.copy(GRACE, root / "grace.jpg")
    faces = load_face_model(tiny_cfg.faces)
    row = ingest_subject(discover_subjects(root).candidates[0], faces, tiny_cfg)
    assert row["status"] == "ok" and len(row["identity"]) == 512  # tiny ArcFace on dlib landmarks
    return row, faces


def test_edit_animate_morph_id_filter(tiny_cfg, grace_subject):
    from perse_ray.synth.animate import animate_frame, frame_camera
    from perse_ray.synth.backends import load_animator, load_editor, load_morpher
    from perse_ray.synth.edit import edit_levels, edit_subject
    from perse_ray.synth.id_filter import identity_verdict
    from perse_ray.synth.morph import morph_frame, morph_pairs

    row, faces = grace_subject
    portrait, lm = decode_png(row["portrait_png"]), np.asarray(row["landmarks"], np.float32)
    edits = edit_subject(row["subject_id"], portrait, lm, load_editor(tiny_cfg), tiny_cfg)
    assert [(e.attribute, e.edit_index) for e in edits] == [(a, k) for a, k, _ in edit_levels(tiny_cfg)] \
        == [("", 0), ("hair", 1), ("glasses", 1)]
    assert edits[0].image is portrait and edits[0].mask is None
    assert all(e.mask.shape == (64, 64) for e in edits[1:])

    script = motion_script(tiny_cfg.synth.motion)
    frame = script[1]
    animated = animate_frame(row["subject_id"], edits, lm, frame, load_animator(tiny_cfg), tiny_cfg)
    assert [(f.attribute, f.edit_index) for f in animated] == [(e.attribute, e.edit_index) for e in edits]
    assert animated[0].mask is None and all(f.mask is not None for f in animated[1:])
    assert all(f.landmarks.shape == (68, 2) for f in animated)

    morphs = morph_frame(row["subject_id"], portrait, lm, animated, frame, load_morpher(tiny_cfg), tiny_cfg)
    assert morph_pairs(tiny_cfg) == [("hair", 0, 1, None, tiny_cfg.synth.attributes[0].edits[0]),
                                     ("glasses", 0, 1, None, tiny_cfg.synth.attributes[1].edits[0])]
    assert [(m.attribute, m.interpolation) for m in morphs] == [("hair", (0, 1, 0.5)), ("glasses", (0, 1, 0.5))]

    identity = np.asarray(row["identity"], np.float32)
    v = identity_verdict(faces, animated[0].image, animated[0].landmarks, identity, -1.0)
    assert v.kept and v.id_score is not None and 0 <= v.id_score <= 1 and v.source in ("detector", "landmarks")
    strict = identity_verdict(faces, animated[0].image, animated[0].landmarks, identity, 1.01)
    assert not strict.kept and strict.drop_reason.startswith(f"identity {strict.id_score:.3f} below 1.01")
    cam = frame_camera(frame, tiny_cfg)
    assert cam["yaw"] == frame.yaw and len(cam["K"]) == 9 and len(cam["viewmat"]) == 16


def test_id_filter_on_real_frames(dlib_faces):
    """dlib identity: the source scores high against itself, a stranger (noise) has no face."""
    import matplotlib
    from PIL import Image

    from perse_ray.faces import align
    from perse_ray.synth.id_filter import identity_verdict

    grace = np.asarray(Image.open(f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg").convert("RGB"))
    face = dlib_faces.detect(grace)[0]
    portrait, lm, _ = align(grace, face, 256)
    identity = dlib_faces.embed(grace, face)
    v = identity_verdict(dlib_faces, portrait, lm, identity, 0.5)
    assert v.kept and v.source == "detector" and v.id_score > 0.6
    flipped = identity_verdict(dlib_faces, portrait[::-1].copy(), lm, identity, 0.5)
    assert flipped.source == "landmarks"  # upside down: no detection, the known landmarks are used


def test_diffusion_helpers():
    import torch

    from perse_ray.synth.diffusion import draw_landmarks, edit_mask, slerp

    a = np.zeros((64, 64, 3), np.uint8)
    b = a.copy()
    b[10:30, 10:30] = 200
    m = edit_mask(a, b)
    assert m[20, 20] == pytest.approx(1.0, abs=1e-3) and m[50, 50] == 0 and m.dtype == np.float32
    assert not edit_mask(a, a).any()
    x, y = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    assert torch.allclose(slerp(x, y, 0.0), x, atol=1e-5) and torch.allclose(slerp(x, y, 1.0), y, atol=1e-5)
    mid = slerp(x, y, 0.5)
    assert mid.norm() > (0.5 * (x + y)).norm()  # spherical: keeps the norm that lerp loses
    lm = np.stack([np.linspace(10, 50, 68), np.linspace(12, 52, 68)], 1).astype(np.float32)
    control = draw_landmarks(lm, 64)
    assert control.shape == (64, 64, 3) and control.any() and not control[0:5, 55:].any()


def test_a_tight_face_crop_is_kept_with_a_note_saying_what_it_costs(tmp_path, dlib_faces):
    """The LFW example is a 25-px face crop: about two thirds of its aligned frame lies outside the
    image. It is ingested, and the reason says so; a portrait with the whole head gets no note."""
    import shutil
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples" / "portraits"
    for name in ("lfw_face_000.png", "astronaut.png"):
        shutil.copy(examples / name, tmp_path / name)
    cfg = load_config("cpu", ["synth.resolution=64"])
    rows = {c.source_path.rsplit("/", 1)[1]: ingest_subject(c, dlib_faces, cfg)
            for c in discover_subjects(tmp_path).candidates}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    tight = rows["lfw_face_000.png"]["reason"]
    assert "tight crop: " in tight, tight
    share = int(tight.split("tight crop: ")[1].split("%")[0])
    assert 55 <= share <= 80, tight
    assert "tight crop" not in rows["astronaut.png"]["reason"]
