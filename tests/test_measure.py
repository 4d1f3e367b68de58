"""Attribute measures and reference -> source transfer params, on example portraits aligned by ingest."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from perse_ray.config import load_config
from perse_ray.faces import load_face_model
from perse_ray.portraits import decode_png, discover_subjects
from perse_ray.synth.classical.edits import edit_beard, edit_glasses, edit_hair, edit_skin
from perse_ray.synth.classical.measure import (
    beard_lab,
    beard_stats,
    hair_lab,
    lab_distance,
    mean_lab,
    skin_lab,
    transfer_params,
)
from perse_ray.synth.classical.regions import to_lab
from perse_ray.synth.ingest import ingest_subject

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "portraits"
EDITOR_KEYS = {"hair": {"hue", "amount", "lightness"}, "beard": {"density", "lightness", "grey"},
               "glasses": {"rim", "tint", "shape", "size", "frame_lightness"}, "skin": {"tone", "warmth"}}


@pytest.fixture(scope="module")
def portraits(tmp_path_factory):
    """{stem: (aligned portrait, landmarks)} for astronaut and grace_hopper, through ingest_subject
    with the cpu preset (dlib, 128 px), each aligned once for the module."""
    cfg = load_config("cpu")
    root = tmp_path_factory.mktemp("portraits")
    for name in ("astronaut.png", "grace_hopper.jpg"):
        shutil.copy(EXAMPLES / name, root)
    faces = load_face_model(cfg.faces)
    out = {}
    for candidate in discover_subjects(root).candidates:
        row = ingest_subject(candidate, faces, cfg)
        assert row["status"] == "ok", row["reason"]
        out[Path(candidate.source_path).stem] = (decode_png(row["portrait_png"]),
                                                 np.asarray(row["landmarks"], np.float64))
    assert set(out) == {"astronaut", "grace_hopper"}
    return out


def _transfer(attribute, source, reference):
    params = transfer_params(attribute, *source, *reference)
    assert set(params) == EDITOR_KEYS[attribute]
    assert all(type(v) is float and v == round(v, 4) for v in params.values()), params
    return params


def test_mean_lab_weighs_the_editors_lab_colours():
    image = np.zeros((4, 5, 3), np.uint8)
    image[:, :2] = (200, 40, 30)
    image[:, 2:] = (20, 90, 160)
    weight = np.zeros((4, 5))
    weight[:, 0], weight[:, 3] = 3.0, 1.0
    lab = to_lab(image)
    expected = (3.0 * lab[0, 0] + 1.0 * lab[0, 3]) / 4.0
    np.testing.assert_allclose(mean_lab(image, weight), expected, atol=1e-4)
    assert lab_distance(lab[0, 0], lab[0, 3]) == pytest.approx(float(np.linalg.norm(lab[0, 0] - lab[0, 3])))
    with pytest.raises(ValueError, match="zero"):
        mean_lab(image, np.zeros((4, 5)))


@pytest.mark.parametrize("source, reference", [("astronaut", "grace_hopper"), ("grace_hopper", "astronaut")])
def test_hair_transfer_brings_the_source_hair_colour_to_the_references(portraits, source, reference):
    (src, src_lm), ref = portraits[source], portraits[reference]
    target = hair_lab(*ref)
    params = _transfer("hair", portraits[source], ref)
    edited = edit_hair(src, src_lm, params, 0)[0]
    before = lab_distance(hair_lab(src, src_lm), target)
    after = lab_distance(hair_lab(edited, src_lm), target)
    print(f"hair {reference} -> {source}: CIE76 {before:.2f} before, {after:.2f} after, params {params}")
    assert after < 0.25 * before and before - after > 15.0, \
        f"hair {reference} -> {source}: CIE76 {before:.2f} before, {after:.2f} after ({params})"


@pytest.mark.parametrize("known", [{"hue": 0.6, "amount": 0.7, "lightness": -0.3},
                                   {"hue": 0.02, "amount": 0.8, "lightness": 0.1},
                                   # already golden hair: other params than these give the same colour
                                   {"hue": 0.13, "amount": 0.5, "lightness": 0.5}])
def test_recovered_hair_params_reproduce_a_known_recolour(portraits, known):
    """The recolour is reachable by construction, so only the solve's residual remains: bound 1.0
    CIE76, under half of a just noticeable difference (about 2.3)."""
    src, lm = portraits["astronaut"]
    reference = edit_hair(src, lm, known, 0)[0]
    params = _transfer("hair", (src, lm), (reference, lm))
    again = edit_hair(src, lm, params, 0)[0]
    distance = lab_distance(hair_lab(again, lm), hair_lab(reference, lm))
    assert distance <= 1.0, f"known {known} -> recovered {params}: CIE76 {distance:.3f}"
    assert lab_distance(hair_lab(src, lm), hair_lab(reference, lm)) > 5.0  # the recolour is a real change


def test_glasses_are_detected_and_measured_and_their_absence_refused(portraits):
    src, lm = portraits["astronaut"]
    reference = edit_glasses(src, lm, {"rim": 1.0, "tint": 0.5}, 0)[0]
    params = _transfer("glasses", (src, lm), (reference, lm))
    assert params["rim"] == pytest.approx(1.0, abs=0.15), params
    assert params["tint"] == pytest.approx(0.5, abs=0.1), params
    assert params["frame_lightness"] <= 0.15, params
    assert params["shape"] <= 0.25 and abs(params["size"]) <= 0.2, params  # the editor's default lenses
    # Onto another face: still present, a frame and tinted lenses.
    other = _transfer("glasses", portraits["grace_hopper"], (reference, lm))
    assert other["rim"] >= 0.5 and other["tint"] >= 0.2, other
    with pytest.raises(ValueError, match="shows no glasses"):
        transfer_params("glasses", src, lm, src, lm)


def test_skin_transfer_moves_the_skin_colour_towards_the_references(portraits):
    (src, lm), ref = portraits["astronaut"], portraits["grace_hopper"]
    params = _transfer("skin", (src, lm), ref)
    target, start = skin_lab(*ref), skin_lab(src, lm)
    got = skin_lab(edit_skin(src, lm, params, 0)[0], lm)
    before, after = lab_distance(start, target), lab_distance(got, target)
    assert after < before - 5.0, f"skin: CIE76 {before:.2f} before, {after:.2f} after ({params})"
    # Both of the editor's axes move the right way: lightness (tone) and the warm ab plane (warmth).
    assert abs(got[0] - target[0]) < 0.5 * abs(start[0] - target[0]), (start, got, target, params)
    assert lab_distance(got[1:], target[1:]) < lab_distance(start[1:], target[1:]) - 3.0, (start, got, target)


def test_beard_transfer_moves_the_lower_face_towards_the_references(portraits):
    (src, lm), (other, other_lm) = portraits["astronaut"], portraits["grace_hopper"]
    reference = edit_beard(other, other_lm, {"density": 0.9}, 3)[0]
    params = _transfer("beard", (src, lm), (reference, other_lm))
    edited = edit_beard(src, lm, params, 11)[0]  # another seed: the measures must not hang on the strands
    target = beard_lab(reference, other_lm)
    before, after = lab_distance(beard_lab(src, lm), target), lab_distance(beard_lab(edited, lm), target)
    coverage = [beard_stats(im, l)[0] for im, l in ((src, lm), (edited, lm), (reference, other_lm))]
    assert after < before - 8.0, f"beard: CIE76 {before:.2f} before, {after:.2f} after ({params})"
    assert abs(coverage[1] - coverage[2]) < 0.1 < coverage[2] - coverage[0], (coverage, params)


def test_unknown_attribute_is_refused_with_the_choices(portraits):
    src, lm = portraits["astronaut"]
    with pytest.raises(ValueError, match="moustache.*beard, glasses, hair, skin"):
        transfer_params("moustache", src, lm, src, lm)
