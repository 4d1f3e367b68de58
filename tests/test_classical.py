"""Classical editor, animator and exact morpher on real aligned portraits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from perse_ray.config import EditSpec, FacesConfig, load_config
from perse_ray.faces import align, load_face_model
from perse_ray.synth.classical import ClassicalAnimator, ClassicalEditor, ExactMorpher
from perse_ray.geometry import move_landmarks
from perse_ray.synth.classical import animator as animator_module
from perse_ray.synth.classical.animator import animate, apply_warp, build_mesh, frame_warp
from perse_ray.synth.classical.edits import EDITS, lerp_params
from perse_ray.synth.classical.regions import FaceFrame
from perse_ray.synth.motion import MotionFrame

SIZE = 128
EDIT_PARAMS = {
    "glasses": {"rim": 1.0, "tint": 0.85},
    "beard": {"density": 0.9},
    "hair": {"hue": 0.05, "amount": 0.6, "lightness": 0.2},
    "skin": {"tone": -0.5, "warmth": 0.4},
}


def _portrait(image):
    faces = load_face_model(FacesConfig())
    aligned, lm, _ = align(image, faces.detect(image)[0], SIZE)
    return aligned, lm


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return _portrait(data.astronaut())


@pytest.fixture(scope="module")
def grace():
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return _portrait(np.asarray(Image.open(path).convert("RGB")))


@pytest.fixture(scope="module")
def cfg():
    return load_config("cpu")


def _changed(a, b):
    return np.any(a != b, axis=-1)


# --------------------------------------------------------------------------- edits


@pytest.mark.parametrize("name", sorted(EDIT_PARAMS))
def test_edit_changes_pixels_only_inside_its_mask(name, astronaut, grace):
    for image, lm in (astronaut, grace):
        out, mask = EDITS[name](image, lm, EDIT_PARAMS[name], 3)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == np.float32
        assert 0.0 <= mask.min() and mask.max() <= 1.0
        changed = _changed(out, image)
        assert not np.any(changed & (mask <= 0)), "pixels changed outside the mask"
        assert changed.sum() > 100, "the edit changed (almost) nothing"
        assert np.abs(out.astype(int) - image)[mask > 0.5 * mask.max()].mean() > 5


@pytest.mark.parametrize("name", sorted(EDIT_PARAMS))
def test_edit_is_deterministic_and_zero_params_are_the_identity(name, astronaut):
    image, lm = astronaut
    a = EDITS[name](image, lm, EDIT_PARAMS[name], 5)
    b = EDITS[name](image, lm, EDIT_PARAMS[name], 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    for params in ({}, {k: 0.0 for k in EDIT_PARAMS[name]}):
        out, mask = EDITS[name](image, lm, params, 5)
        assert np.array_equal(out, image) and not mask.any()


@pytest.mark.parametrize("name", sorted(EDIT_PARAMS))
def test_edit_is_continuous_in_its_params(name, astronaut):
    image, lm = astronaut
    full = EDIT_PARAMS[name]
    diffs = []
    for alpha in (0.02, 0.5, 1.0):
        out, _ = EDITS[name](image, lm, lerp_params({}, full, alpha), 1)
        diffs.append(np.abs(out.astype(float) - image).mean())
    assert diffs[0] < 0.1 * diffs[2]  # a tiny step barely changes the image
    assert 0.2 * diffs[2] < diffs[1] < 0.9 * diffs[2]  # the midpoint is in between


def test_edit_regions_sit_where_the_attribute_is(astronaut):
    image, lm = astronaut
    frame = FaceFrame.from_landmarks(lm)

    def centroid(mask):
        ys, xs = np.nonzero(mask > 0.3)
        return frame.to_face(np.array([[xs.mean(), ys.mean()]]))[0]

    eyes_y, nose_y, chin_y = 0.0, frame.to_face(lm[30:31])[0, 1], frame.to_face(lm[8:9])[0, 1]
    glasses = centroid(EDITS["glasses"](image, lm, {"rim": 1.0, "tint": 1.0}, 0)[1])
    assert abs(glasses[0]) < 0.1 and abs(glasses[1] - eyes_y) < 0.2
    beard = centroid(EDITS["beard"](image, lm, {"density": 1.0}, 0)[1])
    assert nose_y < beard[1] < chin_y + 0.3
    hair = centroid(EDITS["hair"](image, lm, {"amount": 1.0}, 0)[1])
    assert hair[1] < eyes_y  # above the eyes
    skin_mask = EDITS["skin"](image, lm, {"tone": 1.0}, 0)[1]
    assert skin_mask[int(round(lm[30, 1])), int(round(lm[30, 0]))] > 0.5  # the nose is skin
    assert skin_mask[2, 2] == 0.0  # the background corner is not


def test_beard_seed_changes_only_the_strands(astronaut):
    image, lm = astronaut
    a, ma = EDITS["beard"](image, lm, {"density": 0.5}, 1)
    b, mb = EDITS["beard"](image, lm, {"density": 0.5}, 2)
    assert not np.array_equal(a, b)
    assert abs(float(ma.sum()) - float(mb.sum())) < 0.1 * float(ma.sum())


def test_unknown_params_and_attributes_are_errors(astronaut, cfg):
    image, lm = astronaut
    with pytest.raises(ValueError, match="rim"):
        EDITS["glasses"](image, lm, {"rimm": 1.0}, 0)
    editor = ClassicalEditor(cfg)
    with pytest.raises(ValueError, match="beard, glasses, hair, skin"):
        editor.edit(image, lm, "hat", EditSpec("x", params={"a": 1.0}), 0)


def test_editor_follows_the_config_specs(astronaut, cfg):
    image, lm = astronaut
    editor = ClassicalEditor(cfg)
    out, mask = editor.edit(image, lm, "hair", None, 0)
    assert np.array_equal(out, image) and not mask.any()
    for attr in cfg.synth.attributes:
        for spec in attr.edits:
            out, mask = editor.edit(image, lm, attr.name, spec, 0)
            assert _changed(out, image).sum() > 50, (attr.name, spec.label)


def test_lerp_params_is_exact_at_the_ends():
    a, b = {"hue": 0.05, "amount": 0.6}, {"hue": 0.13, "amount": 0.9, "lightness": 0.35}
    assert lerp_params(a, b, 1.0) == {"amount": 0.9, "hue": 0.13, "lightness": 0.35}
    assert lerp_params(a, b, 0.0) == {"amount": 0.6, "hue": 0.05, "lightness": 0.0}
    assert lerp_params({}, b, 0.5)["amount"] == pytest.approx(0.45)


# --------------------------------------------------------------------------- animator


def test_neutral_frame_returns_the_input(astronaut):
    image, lm = astronaut
    mask = np.random.default_rng(0).random(image.shape[:2]).astype(np.float32)
    out, lm2, valid, warped = animate(image, lm, MotionFrame(0, 0.0, 0.0, {"jaw_open": 0.0, "smile": 0.0}), mask)
    assert np.abs(out.astype(int) - image).mean() < 0.5
    assert np.allclose(lm2, lm, atol=1e-3)
    assert valid.min() == 1.0
    assert np.abs(warped - mask).mean() < 1e-3


def test_expressions_move_their_landmarks(astronaut):
    image, lm = astronaut
    iod = FaceFrame.from_landmarks(lm).iod
    _, jaw, _, _ = animate(image, lm, MotionFrame(1, 0.0, 0.0, {"jaw_open": 1.0}))
    assert jaw[8, 1] - lm[8, 1] > 0.2 * iod  # the chin drops
    assert np.allclose(jaw[17:48], lm[17:48], atol=1e-3)  # brows, nose and eyes stay
    _, smile, _, _ = animate(image, lm, MotionFrame(2, 0.0, 0.0, {"smile": 1.0}))
    assert smile[48, 0] < lm[48, 0] and smile[54, 0] > lm[54, 0]  # corners out
    assert smile[48, 1] < lm[48, 1] and smile[54, 1] < lm[54, 1]  # and up
    _, brow, _, _ = animate(image, lm, MotionFrame(3, 0.0, 0.0, {"brow_raise": 1.0}))
    assert np.all(brow[17:27, 1] < lm[17:27, 1] - 0.1 * iod)
    _, shut, _, _ = animate(image, lm, MotionFrame(4, 0.0, 0.0, {"eye_close": 1.0}))
    assert abs(shut[37, 1] - shut[41, 1]) < 0.1 * abs(lm[37, 1] - lm[41, 1]) + 0.5
    with pytest.raises(ValueError, match="jaw_open"):
        animate(image, lm, MotionFrame(5, 0.0, 0.0, {"wink": 1.0}))


def test_head_pose_follows_the_camera_convention(astronaut):
    image, lm = astronaut
    iod = FaceFrame.from_landmarks(lm).iod
    nose = lm[30]
    right = move_landmarks(lm, MotionFrame(1, 30.0, 0.0), SIZE)
    left = move_landmarks(lm, MotionFrame(2, -30.0, 0.0), SIZE)
    # +yaw: the camera moves to the image right, so the nose tip moves to the image left.
    assert right[30, 0] < nose[0] - 0.3 * iod and left[30, 0] > nose[0] + 0.3 * iod
    # The near cheek widens, the far one narrows.
    assert right[16, 0] - right[30, 0] > lm[16, 0] - nose[0] > right[30, 0] - right[0, 0]
    # +pitch looks from above: the nose tip, in front of the head centre, moves down.
    above = move_landmarks(lm, MotionFrame(3, 0.0, 12.0), SIZE)
    assert above[30, 1] > nose[1] + 0.1 * iod
    out, lm2, valid, _ = animate(image, lm, MotionFrame(1, 30.0, 0.0))
    assert np.allclose(lm2, right, atol=1e-4)
    assert _changed(out, image).mean() > 0.2
    assert valid.mean() > 0.8
    # Background and border are anchored: the top corners do not move.
    assert np.array_equal(out[:6, :6], image[:6, :6]) and np.array_equal(out[:6, -6:], image[:6, -6:])


def test_every_edit_animates_pixel_aligned(astronaut):
    image, lm = astronaut
    edited, mask = EDITS["glasses"](image, lm, {"tint": 1.0}, 0)  # lenses only
    frame = MotionFrame(7, -20.0, 8.0, {"smile": 0.5, "jaw_open": 0.4})
    src_out, src_lm, src_valid, _ = animate(image, lm, frame)
    out, out_lm, valid, warped = animate(edited, lm, frame, mask)
    assert np.array_equal(src_lm, out_lm) and np.array_equal(src_valid, valid)
    # Outside the warped glasses, the edited video is the source video.
    outside = warped == 0
    assert np.array_equal(out[outside], src_out[outside])
    # The lenses travel with the eyes.
    for eye in (out_lm[36:42].mean(0), out_lm[42:48].mean(0)):
        x, y = np.round(eye).astype(int)
        assert warped[y, x] > 0.9 and out[y, x].max() < 60


def test_animator_uses_the_config_camera(astronaut, cfg):
    image, lm = astronaut
    frame = MotionFrame(1, 25.0, 0.0, {})
    a = ClassicalAnimator(cfg).animate(image, lm, frame, 0)
    wide = dataclasses.replace(cfg, render=dataclasses.replace(cfg.render, fov_deg=60.0))
    b = ClassicalAnimator(wide).animate(image, lm, frame, 0)
    assert np.abs(a[1] - b[1]).max() > 0.5  # a wider lens is closer to the face: stronger perspective


# --------------------------------------------------------------------------- morph


def test_exact_morph_meets_its_endpoints(astronaut, cfg):
    image, lm = astronaut
    editor, animator, morpher = ClassicalEditor(cfg), ClassicalAnimator(cfg), ExactMorpher(cfg)
    frame = MotionFrame(3, 12.0, -5.0, {"jaw_open": 0.5})
    levels = [None] + list(cfg.synth.attributes[1].edits)  # beard: source, stubble, full
    seed = 11
    ends = []
    for spec in levels:
        edited, mask = editor.edit(image, lm, "beard", spec, seed)
        out, _, _, warped = animator.animate(edited, lm, frame, seed, mask)
        ends.append((out, warped))
    for i in range(len(levels) - 1):
        for alpha, end in ((0.0, ends[i]), (1.0, ends[i + 1])):
            out, mask = morpher.morph(image, lm, "beard", levels[i], levels[i + 1], alpha, frame,
                                      ends[i][0], ends[i + 1][0], seed)
            assert np.array_equal(out, end[0]) and np.array_equal(mask, end[1])
        mid, _ = morpher.morph(image, lm, "beard", levels[i], levels[i + 1], 0.5, frame,
                               ends[i][0], ends[i + 1][0], seed)
        d_from = np.abs(mid.astype(float) - ends[i][0]).mean()
        d_to = np.abs(mid.astype(float) - ends[i + 1][0]).mean()
        d_ends = np.abs(ends[i][0].astype(float) - ends[i + 1][0]).mean()
        assert 0 < d_from < d_ends and 0 < d_to < d_ends


# --------------------------------------------------------------------------- caches and completion


def test_cached_warps_and_edits_equal_the_uncached_functions(astronaut, cfg, monkeypatch):
    image, lm = astronaut
    built = []
    real_build = animator_module.build_mesh

    def counting_build(*a, **kw):
        built.append(1)
        return real_build(*a, **kw)

    import perse_ray.synth.classical as classical

    monkeypatch.setattr(classical, "build_mesh", counting_build)
    animator, morpher, editor = ClassicalAnimator(cfg), ExactMorpher(cfg), ClassicalEditor(cfg)
    frames = [MotionFrame(1, 40.0, -15.0, {"smile": 0.6}), MotionFrame(2, -45.0, 20.0, {"jaw_open": 0.7}),
              MotionFrame(3, -45.0, 20.0, {"jaw_open": 0.2})]  # same pose, another expression
    spec = cfg.synth.attributes[1].edits[-1]
    edited, mask = editor.edit(image, lm, cfg.synth.attributes[1].name, spec, 4)
    for _ in range(2):  # the second pass is served from the caches
        for frame in frames:
            for img, m in ((image, None), (edited, mask)):
                got = animator.animate(img, lm, frame, 0, m)
                want = animate(img, lm, frame, m, camera=animator.camera)
                for g, w in zip(got, want):
                    assert (g is None and w is None) or np.array_equal(g, w)
            got = morpher.morph(image, lm, cfg.synth.attributes[1].name, None, spec, 0.5, frame, None, None, 4)
            params = lerp_params({}, spec.params, 0.5)
            e, em = EDITS[cfg.synth.attributes[1].name](image, lm, params, 4)
            want = animate(e, lm, frame, em, camera=animator.camera)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[3])
    assert len(built) == 2  # one mesh per stage object for the subject, not one per call
    assert len(morpher._edits.items) == 1  # the morph's edit was made once for every frame
    # A cached warp cannot be changed by a caller.
    with pytest.raises(ValueError):
        animator.warp(lm, SIZE, frames[0]).map_xy[0, 0, 0] = 1.0


def _turned_two_tone(lm):
    """A portrait turned 25 degrees to the image left (its image-right half seen edge-on) whose
    image-left half of the face is green stripes and image-right half flat red."""
    turned = move_landmarks(lm, MotionFrame(0, -25.0, 0.0), SIZE)
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    xs = np.arange(SIZE)
    midline = turned[27:31, 0].mean()
    stripes = np.where((xs // 3) % 2 == 0, 40, 200)
    image[:, xs < midline] = np.stack([np.zeros(SIZE), stripes, np.full(SIZE, 60)], -1)[xs < midline].astype(np.uint8)
    image[:, xs >= midline] = (220, 30, 30)
    return image, turned


def _cheek(landmarks, side):
    import cv2

    ids = [15, 14, 13, 12, 54, 35, 42, 47, 46, 45] if side == "right" else [1, 2, 3, 4, 48, 31, 39, 40, 41, 36]
    m = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(m, [np.round(np.asarray(landmarks)[ids] * 16).astype(np.int32)], 1, shift=4)
    return m.astype(bool)


def test_mirrored_completion_fills_the_side_the_portrait_saw_edge_on(astronaut):
    _, lm = astronaut
    image, turned = _turned_two_tone(lm)
    warp = frame_warp(build_mesh(turned, SIZE), MotionFrame(1, 45.0, 0.0))
    assert warp.layers, "no completion at a 45 degree turn of a turned portrait"
    completed = apply_warp(image, warp)[0].astype(float)
    stretched = apply_warp(image, dataclasses.replace(warp, layers=()))[0].astype(float)
    cheek = _cheek(warp.landmarks, "right")  # the side +yaw reveals
    green = image[:, : SIZE // 4].reshape(-1, 3).mean(0)  # the seen half's mean colour

    def distance_to_seen_half(out):
        return float(np.linalg.norm(out[cheek] - green, axis=1).mean())

    assert distance_to_seen_half(completed) < 0.7 * distance_to_seen_half(stretched)
    # The well-seen side is the portrait's own texture, untouched by the completion.
    other = _cheek(warp.landmarks, "left")
    assert np.abs(completed[other] - stretched[other]).mean() < 1.0
    # A frontal view of the frontal portrait needs no completion.
    assert not frame_warp(build_mesh(lm, SIZE), MotionFrame(0, 0.0, 0.0)).layers
