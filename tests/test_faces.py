"""dlib faces on real public-domain portraits: detection, landmarks, identity, alignment, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from perse_ray.config import FacesConfig
from perse_ray.faces import ALIGN_TEMPLATE, Face, align, embed_frame, load_face_model, template_points
from perse_ray.faces.dlib_backend import MODEL_FILES, DlibFaces, default_models_dir, id_score_from_distance
from perse_ray.models import ModelNotFoundError


def grace_hopper() -> np.ndarray:
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def faces():
    return load_face_model(FacesConfig())


@pytest.fixture(scope="module")
def portraits(faces):
    out = {}
    for name, image in (("grace", grace_hopper()), ("astronaut", astronaut())):
        found = faces.detect(image)
        out[name] = (image, found)
    return out


def test_detects_one_face_with_landmarks_in_its_box(portraits):
    for name, (image, found) in portraits.items():
        assert len(found) == 1, name
        face = found[0]
        assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
        x0, y0, x1, y1 = face.box
        pad = 0.15 * (x1 - x0)  # dlib's boxes are tight: the chin may sit a little below
        lm = face.landmarks
        assert np.all((lm[:, 0] >= x0 - pad) & (lm[:, 0] <= x1 + pad)), name
        assert np.all((lm[:, 1] >= y0 - pad) & (lm[:, 1] <= y1 + pad)), name
        # iBUG order: eyes above the nose tip above the mouth above the chin.
        assert lm[36:48, 1].mean() < lm[30, 1] < lm[48:68, 1].mean() < lm[8, 1]


def test_weak_detections_are_dropped_and_faces_sorted_by_area():
    every = load_face_model(FacesConfig(min_score=0.0)).detect(astronaut())
    assert len(every) == 2  # HOG also fires weakly on the spacesuit
    assert every[0].area >= every[1].area
    assert min(f.score for f in every) < 0.25
    kept = load_face_model(FacesConfig()).detect(astronaut())
    assert len(kept) == 1 and kept[0].box[1] < 200  # the face, in the upper part of the image


def test_identity_same_person_passes_and_other_person_fails(faces, portraits):
    threshold = FacesConfig().id_threshold
    grace, (g_face,) = portraits["grace"]
    astro, (a_face,) = portraits["astronaut"]
    e_grace, e_astro = faces.embed(grace, g_face), faces.embed(astro, a_face)
    assert e_grace.shape == (128,) and e_grace.dtype == np.float32
    assert faces.id_score(e_grace, e_grace) == pytest.approx(1.0)
    assert faces.id_score(e_grace, e_astro) < threshold
    # The same person after alignment to 128 px still passes.
    aligned, lm, _ = align(astro, a_face, 128)
    emb, source = embed_frame(faces, aligned, lm)
    assert source == "detector"
    assert faces.id_score(e_astro, emb) >= threshold
    assert faces.id_score(e_grace, emb) < threshold


def test_embed_from_landmarks_matches_embed_and_is_the_fallback(faces, portraits):
    image, (face,) = portraits["grace"]
    assert np.allclose(faces.embed_from_landmarks(image, face.landmarks), faces.embed(image, face), atol=1e-5)
    blank = np.full((128, 128, 3), 127, np.uint8)
    assert embed_frame(faces, blank) == (None, "none")
    aligned, lm, _ = align(image, face, 128)
    # Turned a quarter: the frontal detector misses it, the known landmarks still give the identity.
    turned = np.ascontiguousarray(np.rot90(aligned))
    turned_lm = np.stack([lm[:, 1], 127 - lm[:, 0]], axis=1)
    assert faces.detect(turned) == []
    emb, source = embed_frame(faces, turned, turned_lm)
    assert source == "landmarks" and emb.shape == (128,)
    assert faces.id_score(faces.embed(image, face), emb) >= FacesConfig().id_threshold


def test_id_score_scale():
    assert id_score_from_distance(0.0) == 1.0
    assert id_score_from_distance(0.6) == pytest.approx(0.5)  # dlib's same-person threshold
    assert id_score_from_distance(2.0) == 0.0
    assert id_score_from_distance(0.2) > id_score_from_distance(0.8)


def test_align_puts_eyes_and_mouth_on_the_template(portraits):
    for size in (64, 128):
        for name, (image, (face,)) in portraits.items():
            aligned, lm, m = align(image, face, size)
            assert aligned.shape == (size, size, 3) and aligned.dtype == np.uint8
            assert lm.shape == (68, 2)
            assert np.abs(template_points(lm) / size - ALIGN_TEMPLATE).max() < 0.015, name
            mapped = face.landmarks @ m[:, :2].T + m[:, 2]
            assert np.allclose(mapped, lm, atol=1e-3)
            # The whole face lies inside the frame, with room for hair above it.
            assert lm.min() > 0 and lm.max() < size
            assert lm[19, 1] > 0.3 * size


def test_a_tight_crop_is_aligned_onto_a_smooth_plain_backdrop(portraits):
    """Grace Hopper cut to her face box: the aligned frame reaches far beyond the picture. The picture
    keeps its pixels; beyond it the frame fades to one plain colour, with no streaks of a repeated edge."""
    import cv2

    from perse_ray.faces import FILL_FADE

    image, (face,) = portraits["grace"]
    x0, y0, x1, y1 = (int(round(v)) for v in face.box)
    shift = np.array([x0, y0], np.float32)
    tight = Face((0.0, 0.0, float(x1 - x0), float(y1 - y0)), face.score, face.landmarks - shift)
    size = 128
    full, _, _ = align(image, face, size)
    cropped, _, m = align(image[y0:y1, x0:x1], tight, size)
    coverage = cv2.warpAffine(np.ones((y1 - y0, x1 - x0), np.float32), m.astype(np.float64), (size, size),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    inside = cv2.erode((coverage >= 1).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    outside = cv2.distanceTransform((coverage < 1).astype(np.uint8), cv2.DIST_L2, 5)
    far = outside > 4 * FILL_FADE * size
    assert inside.mean() > 0.1 and far.mean() > 0.1
    # the picture itself: as aligned from the whole portrait (the pre-downscale grids differ a little)
    assert np.abs(full.astype(int) - cropped)[inside].mean() < 4
    # far from it one colour (a repeated edge: a spread of about 90 levels), and smooth everywhere
    # beyond it (a repeated edge: 13 levels between neighbours on average, the picture 40)
    assert cropped[far].astype(float).std(0).max() < 2
    steps = np.abs(np.diff(cropped.astype(float), axis=1)).sum(-1)
    beyond = outside >= 2
    assert steps[beyond[:, 1:] & beyond[:, :-1]].mean() < 3


def test_missing_model_files_raise_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match=MODEL_FILES["landmarks"]):
        DlibFaces(FacesConfig(), models_dir=tmp_path)
    real = default_models_dir()
    for key in ("landmarks", "descriptor"):
        os.symlink(real / MODEL_FILES[key], tmp_path / MODEL_FILES[key])
    with pytest.raises(ModelNotFoundError, match=MODEL_FILES["cnn"]):
        DlibFaces(FacesConfig(detector="cnn"), models_dir=tmp_path)
    assert DlibFaces(FacesConfig(), models_dir=tmp_path).name == "dlib-hog"


def test_unknown_backend_and_detector_name_the_choices():
    with pytest.raises(ValueError, match="dlib"):
        load_face_model(FacesConfig(backend="nope"))
    with pytest.raises(ValueError, match="cnn, hog"):
        load_face_model(FacesConfig(detector="nope"))


def test_face_area():
    assert Face((0.0, 0.0, 4.0, 3.0), 1.0, np.zeros((68, 2), np.float32)).area == 12.0


def test_identity_model_puts_arcface_on_the_dlib_detector(tmp_path, portraits):
    pytest.importorskip("insightface")
    from perse_ray.models.tiny import _export_arcface

    path = tmp_path / "arcface.onnx"
    _export_arcface(path)
    model = load_face_model(FacesConfig(identity_model=str(path)))
    assert model.name.startswith("dlib-hog+arcface")
    image, (face,) = portraits["grace"]
    (found,) = model.detect(image)
    assert np.allclose(found.landmarks, face.landmarks)
    emb = model.embed(image, found)
    assert emb.shape == (512,) and abs(float(np.linalg.norm(emb)) - 1.0) < 1e-4
    assert model.id_score(emb, emb) == pytest.approx(1.0)
