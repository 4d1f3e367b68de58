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


def test_evaluate_avatar_reports_every_attribute(trained):
    from perse_ray.evaluate import attribute_masks

    avatar, rows = trained
    masks = attribute_masks(rows, 32)
    assert set(masks) == {a.name for a in avatar.layout.attributes}
    figures = evaluate_avatar(avatar, masks=masks, size=32)
    for a in avatar.layout.attributes:
        assert np.isfinite(figures[f"smoothness_{a.name}"]) and np.isfinite(figures[f"leakage_{a.name}"])
    assert "identity_mean" not in figures  # no face model given: not faked


# --------------------------------------------------------------------------- constructed avatars
#
# A flat grid of Gaussians facing the front camera and one attribute (source + 1 edit, so the
# slider s runs 0..1 and its code is s * code_1). The decoder weights are set so the attribute's
# branch shifts the colour of a chosen set of Gaussians by a known function of s:
#   d(s) = W * (silu(a0 * s + b0 - M * (1 - g)) - silu(a1 * s + b1 - M * (1 - g)))
# with g = the Gaussian's feature 0 (1: moves, 0: stays; M = 600 switches the others off) and
# W = 0.5 on the colour logits (0.5 * DELTA_UNITS = 1 logit per unit of d).
#   even: a0 = 1, b0 = 20, a1 = 0, b1 = 20 -> silu(20 + s) - silu(20) = s (to 1e-7): a ramp;
#   step: a0 = a1 = K, b0 = -K/2, b1 = -K/2 - 1 -> clamp(K (s - 1/2), 0, 1) (K = 1000): a jump at
#   s = 1/2, between two of the 16 slider samples.

GRID_SIZE = 32  # render size of the constructed avatars
RESPONSES = {"even": (1.0, 20.0, 0.0, 20.0), "step": (1000.0, -500.0, 1000.0, -501.0)}


def _constructed_avatar(response: str, moving: str):
    """``moving``: "left" (only Gaussians left of the image centre, with a gap round it) or "all"."""
    import math

    import torch

    from perse_ray.avatar.io import Avatar
    from perse_ray.avatar.layout import AttributeLayout, LatentLayout
    from perse_ray.avatar.model import DELTA_CHANNELS, AvatarModel
    from perse_ray.config import AvatarConfig

    xs = [x for x in np.linspace(-0.15, 0.15, 16) if abs(x) > 0.05]  # columns 4.6+ px from the centre
    grid = np.array([(x, y, 0.0) for x in xs for y in np.linspace(-0.15, 0.15, 16)], np.float32)
    cfg = AvatarConfig(num_gaussians=len(grid), feature_dim=2, code_dim=2, hidden_dim=4, hidden_layers=1,
                       backdrop=False)
    layout = LatentLayout(["smile"], [AttributeLayout("hair", ["source", "dyed"], 2)])
    model = AvatarModel(layout, cfg)
    a0, b0, a1, b1 = RESPONSES[response]
    big = 600.0
    colour = slice(sum(list(DELTA_CHANNELS.values())[:4]), sum(DELTA_CHANNELS.values()))
    with torch.no_grad():
        model.means.copy_(torch.from_numpy(grid))
        model.log_scales.fill_(math.log(0.012))  # ~1.1 px at 32 px
        model.quats.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(len(grid), 4))
        model.opacity_logits.fill_(math.log(0.9 / 0.1))
        model.color_logits.zero_()
        model.features.zero_()
        model.features[:, 0] = torch.from_numpy((grid[:, 0] < 0) if moving == "left" else np.ones(len(grid)))
        model.codes["hair"].copy_(torch.tensor([[1.0, 0.0]]))
        dec, b = model.decoder, 1  # branch 0 is the expression, 1 the attribute
        for p in (dec.w_gauss, dec.w_z, dec.b_in, dec.w_out, dec.b_out):
            p.zero_()
        dec.w_gauss[b, 0, :2] = big
        dec.b_in[b, :2] = torch.tensor([b0 - big, b1 - big])
        dec.w_z[b, 0, :2] = torch.tensor([a0, a1])
        dec.w_out[b, 0, colour] = 0.5
        dec.w_out[b, 1, colour] = -0.5
    model.eval()
    return Avatar(model, {"camera": {"fov_deg": 30.0, "distance": 0.65}})


def _left_half():
    mask = np.zeros((GRID_SIZE, GRID_SIZE), bool)
    mask[:, : GRID_SIZE // 2] = True
    return mask


def test_constructed_avatars_do_what_they_are_built_to_do():
    """Guards the constructions below: the branch output is the intended function of the slider."""
    import torch

    for response, expect in (("even", lambda s: s), ("step", lambda s: float(s > 0.5))):
        avatar = _constructed_avatar(response, "left")
        for s in (0.0, 0.2, 0.4667, 0.5333, 0.8, 1.0):
            with torch.no_grad():
                g = avatar.model.gaussians(avatar.latent({"hair": s})[None])
            moved = torch.logit(g["colors"][0, :, 0].double()) / 2.0  # colour logit shift / DELTA_UNITS
            left = avatar.model.means[:, 0] < 0
            assert moved[left].sub(0.5 * expect(s)).abs().max() < 1e-3, (response, s)
            assert moved[~left].abs().max() < 1e-6, (response, s)


def test_smoothness_tells_a_jumping_slider_from_an_even_one():
    even = evaluate_avatar(_constructed_avatar("even", "all"), size=GRID_SIZE)["smoothness_hair"]
    jumpy = evaluate_avatar(_constructed_avatar("step", "all"), size=GRID_SIZE)["smoothness_hair"]
    # Even: only the colour sigmoid bends the ramp (slope 0.5 at s = 0 against a mean of 0.46).
    assert even < 1.2
    # Step: one of the 15 steps carries the whole change, so max / mean is close to 15.
    assert jumpy > 10.0


def test_leakage_tells_a_spilling_attribute_from_a_contained_one():
    mask = _left_half()
    contained = evaluate_avatar(_constructed_avatar("even", "left"), masks={"hair": mask},
                                size=GRID_SIZE)["leakage_hair"]
    spilling = evaluate_avatar(_constructed_avatar("even", "all"), masks={"hair": mask},
                               size=GRID_SIZE)["leakage_hair"]
    # Contained: only the Gaussians left of a gap round the mask's edge move; their footprints stay
    # inside it. Spilling: the right half moves the same way, so outside changes as much as inside.
    assert contained < 0.02
    assert spilling > 0.7


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
    assert figures["identity_yaw_m40"] == figures["identity_yaw_0"] == figures["identity_yaw_40"] == 0.75
    left, front, right = (np.asarray(faces.boxes[i]) for i in (1, 3, 5))  # yaw -30, 0, +30
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


# --------------------------------------------------------------------------- cache


def _write_partition(frames_root, rows, synthesis_hash):
    import json

    import pyarrow.parquet as pq

    from perse_ray.schema import table_from_rows
    from perse_ray.synth.write import COMPLETE

    part = frames_root / f"subject_id={rows[0]['subject_id']}"
    part.mkdir(parents=True, exist_ok=True)
    for old in part.glob("part-*.parquet"):
        old.unlink()
    pq.write_table(table_from_rows(rows, "frames"), part / "part-00000.parquet")
    (part / COMPLETE).write_text(json.dumps({"subject_id": rows[0]["subject_id"], "synthesis_hash": synthesis_hash,
                                             "frames": len(rows)}))


def test_cache_is_keyed_by_what_the_figures_were_computed_from(trained, tmp_path):
    from perse_ray.config import Config, from_dict
    from perse_ray.evaluate import evaluate_registry
    from perse_ray.registry import Registry

    avatar, rows = trained
    Registry(tmp_path / "avatars").put(rows[0]["subject_id"], avatar)
    frames, cache = tmp_path / "frames", tmp_path / "eval"
    synthesis_hash = from_dict(Config, avatar.meta["config"]).synthesis_hash()
    _write_partition(frames, rows, synthesis_hash)
    computed = []

    def evaluate(frames_root):
        (figures,) = evaluate_registry(tmp_path / "avatars", frames_root, cache, log=computed.append).values()
        return figures

    without = evaluate(None)
    assert not any(k.startswith("leakage_") for k in without) and len(computed) == 1
    # The same avatar, now with frames: the figures cached without them are not reused.
    with_frames = evaluate(frames)
    assert len(computed) == 2
    assert {k for k in with_frames if k.startswith("leakage_")} == {f"leakage_{a.name}" for a in avatar.layout.attributes}
    # Each is reused for what it was computed from.
    assert evaluate(frames) == with_frames and evaluate(None) == without and len(computed) == 2
    # The partition rewritten with other content (only the hair videos): recomputed, not reused.
    _write_partition(frames, [r for r in rows if r["attribute"] in ("", "hair")], synthesis_hash)
    hair_only = evaluate(frames)
    assert len(computed) == 3 and "leakage_hair" in hair_only and "leakage_glasses" not in hair_only
    # A new version of the avatar is evaluated anew, and the writes left no temp files behind.
    Registry(tmp_path / "avatars").put(rows[0]["subject_id"], avatar)
    evaluate(frames)
    assert len(computed) == 4 and "v0002" in computed[-1]
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")]
