"""Evaluation figures point the right way; the report names what it should."""

from __future__ import annotations

import numpy as np
import pytest

from perse_ray.evaluate import evaluate_avatar, leakage, slider_smoothness


def test_smooth_slider_scores_smoother_than_a_jumpy_one():
    ramp = [np.full((8, 8, 3), v, np.float32) for v in np.linspace(0, 1, 16)]
    jumpy = [np.full((8, 8, 3), 0.0 if v < 0.5 else 1.0, np.float32) for v in np.linspace(0, 1, 16)]
    assert slider_smoothness(ramp) == pytest.approx(1.0, abs=1e-5)
    assert slider_smoothness(jumpy) > 10 * slider_smoothness(ramp)


def test_leakage_is_zero_inside_only_and_grows_with_outside_change():
    before = np.zeros((10, 10, 3), np.float32)
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    inside_only = before.copy()
    inside_only[mask] = 1.0
    everywhere = np.ones_like(before)
    assert leakage(before, inside_only, mask) == 0.0
    assert leakage(before, everywhere, mask) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from perse_ray.bench.ground_truth import frames_from_head
    from perse_ray.bench.procedural import ProceduralHead
    from perse_ray.config import load_config
    from perse_ray.train.loop import train_avatar

    cfg = load_config("cpu-smoke", ["synth.resolution=32", "render.width=24", "render.height=24",
                                     "synth.motion.num_frames=4", "avatar.num_gaussians=300", "train.steps=60"])
    rows = frames_from_head(ProceduralHead(), cfg)
    return train_avatar(rows, cfg, progress=False).avatar, rows


def test_evaluate_avatar_reports_smoothness_and_leakage(trained):
    from perse_ray.evaluate import attribute_masks

    avatar, rows = trained
    masks = attribute_masks(rows, 32)
    assert set(masks) == {a.name for a in avatar.layout.attributes}
    figures = evaluate_avatar(avatar, masks=masks, size=32)
    for a in avatar.layout.attributes:
        assert figures[f"smoothness_{a.name}"] >= 1.0
        assert 0.0 <= figures[f"leakage_{a.name}"] < 5.0
    assert "identity_mean" not in figures  # no face model given: not faked


class _NoDetectionFaces:
    """A face model whose detector never finds a face; records the face boxes it embeds."""

    def __init__(self):
        self.boxes = []

    def detect(self, image):
        return []

    def embed(self, image, face):
        self.boxes.append(face.box)
        return np.ones(4, np.float32)

    def id_score(self, a, b):
        return 0.75


def test_identity_falls_back_to_the_moved_source_landmarks(trained):
    from skimage import data

    from perse_ray.config import FacesConfig
    from perse_ray.faces import align, load_face_model

    avatar, _ = trained
    image = data.astronaut()
    _, landmarks, _ = align(image, load_face_model(FacesConfig()).detect(image)[0], 32)
    faces = _NoDetectionFaces()
    figures = evaluate_avatar(avatar, face_model=faces, source_embedding=np.ones(4), source_landmarks=landmarks,
                              size=32)
    assert figures["identity_detected"] == 0.0
    assert figures["identity_mean"] == figures["identity_min"] == 0.75  # every view scored, via landmarks
    left, front, right = (np.asarray(faces.boxes[i]) for i in (0, 2, 4))  # yaw -30, 0, +30
    assert np.allclose(front, [*landmarks.min(0), *landmarks.max(0)], atol=0.5)  # yaw 0: the portrait's face
    assert abs(left[0] - right[0]) > 1.0  # turned views cut the face where it moved
    without = evaluate_avatar(avatar, face_model=_NoDetectionFaces(), source_embedding=np.ones(4), size=32)
    assert without["identity_mean"] == 0.0  # no face found and no landmarks: the view scores 0


def test_report_names_quarantined_inputs_and_writes_strips(tmp_path, trained):
    from perse_ray.report import SubjectReport, write_report

    avatar, rows = trained
    index = write_report(tmp_path / "report", [
        SubjectReport("head-1", "done", source_path="in/head.png", frames=rows, avatar=avatar, version="v0001",
                      figures={"heldout_psnr": 30.0}),
        SubjectReport("cat-2", "quarantined", "no face found", "in/cat.jpg")])
    text = index.read_text()
    assert "in/cat.jpg" in text and "no face found" in text
    for name in ("frames.png", "turntable.png", "expressions.png"):
        assert (tmp_path / "report" / "head-1" / name).is_file()
    assert "http" not in text.replace("http-equiv", "")  # opens from disk: nothing remote
