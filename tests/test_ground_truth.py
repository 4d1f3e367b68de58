"""Ground-truth frames and scores: one head protocol for both heads, combined-edit rows, the
held-out views to ±40° with |yaw| buckets, and the combined-edit figures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from perse_ray.bench.ground_truth import (
    HELDOUT_PITCHES,
    HELDOUT_YAWS,
    YAW_BUCKETS,
    GroundTruthHead,
    Scorer,
    combined_levels,
    frames_from_head,
    picture,
    score_avatar,
)
from perse_ray.bench.procedural import ProceduralHead
from perse_ray.config import load_config
from perse_ray.synth.motion import motion_script

SMALL = ["synth.resolution=32", "render.width=24", "render.height=24", "synth.motion.num_frames=5",
         "synth.morph_alphas=[0.5]", "avatar.num_gaussians=300", "train.steps=20"]


@pytest.fixture(scope="module")
def head():
    return ProceduralHead(seed=0)


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255.0


def test_both_heads_follow_the_protocol(head):
    from perse_ray.bench.ground_truth import make_head
    from perse_ray.bench.mesh_head import MeshHead

    mesh = make_head("mesh")
    assert isinstance(mesh, MeshHead) and isinstance(mesh, GroundTruthHead) and isinstance(head, GroundTruthHead)
    # the same slider semantics; the Gaussian head also models skin tone, for edits after training
    assert head.attributes == (*mesh.attributes, "skin") and head.expressions == mesh.expressions
    assert {a: head.keys[a] for a in mesh.attributes} == mesh.keys
    with pytest.raises(ValueError, match="choices: gaussian, mesh"):
        make_head("voxel")


def test_configs_the_head_cannot_render_are_refused(head):
    with pytest.raises(ValueError, match="moustache"):
        frames_from_head(head, load_config("cpu-smoke", SMALL + [
            "synth.attributes=[{name: moustache, edits: [{label: a}]}]"]))
    five = "[{label: a}, {label: b}, {label: c}, {label: d}]"
    with pytest.raises(ValueError, match="5 levels in the config; the gaussian head models 4"):
        frames_from_head(head, load_config("cpu-smoke", SMALL + [f"synth.attributes=[{{name: hair, edits: {five}}}]"]))
    with pytest.raises(ValueError, match="wink"):
        frames_from_head(head, load_config("cpu-smoke", SMALL + ["synth.motion.expressions=[wink]"]))


def test_combined_frames_render_every_attribute_at_once(head):
    cfg = load_config("cpu", SMALL + ["synth.combined_frames=2"])
    rows = frames_from_head(head, cfg)
    plan = combined_levels(cfg)
    assert [f for f, _ in plan] == [1, 4] and all(set(lv) == {"hair", "beard", "glasses"} for _, lv in plan)
    composed = [r for r in rows if r["also_edits"] is not None]
    assert len(rows) == 5 * (1 + 3 * (2 + 2)) + 2 and len(composed) == 2
    assert all("also_edits" in r for r in rows)
    script = motion_script(cfg.synth.motion)
    for r, (frame, levels) in zip(composed, plan):
        assert r["frame_index"] == frame and r["interpolation"] is None
        assert {r["attribute"]: float(r["edit_index"]), **r["also_edits"]} == levels
        assert r["attribute"] not in r["also_edits"]
        cam, expr = r["camera"], script[frame].expression
        expected, _ = head.render(levels, expr, cam, 32)
        assert np.abs(_decode(r["image_png"]) - expected).max() <= 0.5 / 255 + 1e-6
        single = next(x for x in rows if x["frame_index"] == frame and x["attribute"] == r["attribute"]
                      and x["edit_index"] == r["edit_index"] and x["interpolation"] is None and not x["also_edits"])
        assert np.abs(_decode(r["image_png"]) - _decode(single["image_png"])).max() > 0.2  # really several edits
        union = np.maximum.reduce([head.region_mask(a, expr, cam, 32) for a in levels])
        assert np.array_equal(_decode(r["mask_png"]), union)
    assert not combined_levels(load_config("cpu", SMALL + ["synth.combined_frames=0"]))


def test_heldout_yaws_reach_40_degrees_off_the_training_yaws():
    assert min(HELDOUT_YAWS) == -40 and max(HELDOUT_YAWS) == 40
    for lo, hi in YAW_BUCKETS:
        assert sum(lo <= abs(y) <= hi for y in HELDOUT_YAWS) >= 2
    for preset in ("cpu", "cpu-smoke", "gpu"):  # no held-out view is a training view (pose distance, degrees)
        script = motion_script(load_config(preset).synth.motion)
        assert min(np.hypot(f.yaw - y, f.pitch - p) for f in script for y in HELDOUT_YAWS
                   for p in HELDOUT_PITCHES) > 1.0, preset


@pytest.fixture(scope="module")
def trained(head):
    from perse_ray.train.loop import train_avatar

    cfg = load_config("cpu", SMALL + ["avatar.hidden_dim=16", "train.batch_size=4", "synth.combined_frames=0"])
    return cfg, train_avatar(frames_from_head(head, cfg), cfg, progress=False).avatar


def test_score_avatar_reports_buckets_and_combined_edits(head, trained):
    cfg, avatar = trained
    scorer = Scorer(head, cfg, "auto")
    scores = score_avatar(avatar, head, cfg, scorer=scorer)
    for lo, hi in YAW_BUCKETS:
        assert np.isfinite(scores[f"psnr_heldout_views_yaw_{lo:.0f}_{hi:.0f}"])
    buckets = [scores[f"psnr_heldout_views_yaw_{lo:.0f}_{hi:.0f}"] for lo, hi in YAW_BUCKETS]
    assert min(buckets) <= scores["psnr_heldout_views"] <= max(buckets)
    gaps = []
    for a in ("hair", "beard", "glasses"):
        gap = scores[f"psnr_single_region_{a}"] - scores[f"psnr_combined_region_{a}"]
        assert scores[f"combined_region_gap_{a}"] == pytest.approx(gap)
        gaps.append(gap)
    assert scores["combined_region_gap_max"] == pytest.approx(max(gaps))
    assert np.isfinite(scores["psnr_combined_edits"]) and 0 < scores["ssim_combined_edits"] <= 1
    assert scorer.combined_levels() == [{"hair": 2.0, "beard": 2.0, "glasses": 2.0},
                                        {"hair": 1.0, "beard": 2.0, "glasses": 1.0}]
    img = picture(avatar, scorer)  # GT | avatar at 3 held-out views, then the combined edit
    assert img.shape == (24, 24 * 2 * 4, 3)
    assert np.allclose(img[:, 6 * 24:7 * 24], scorer.target(scorer.combined_levels()[0], {}, 0.0, 0.0).numpy())
    # Scored combinations are never the trained ones.
    trained_cfg = load_config("cpu", SMALL + ["synth.combined_frames=4"])
    trained = [levels for _, levels in combined_levels(trained_cfg)]
    held = Scorer(head, trained_cfg, "auto").combined_levels()
    assert len(held) == 2 and not any({a: int(v) for a, v in h.items()} in trained for h in held)
    every = load_config("cpu", SMALL + ["synth.combined_frames=59", "synth.motion.num_frames=60"])
    assert len({tuple(lv.items()) for _, lv in combined_levels(every)}) == 8
    assert Scorer(head, every, "auto").combined_levels() == [{"hair": 1.5, "beard": 1.5, "glasses": 1.5}]


def test_region_psnr_is_the_psnr_inside_the_region(head, trained):
    cfg, avatar = trained
    scorer = Scorer(head, cfg, "auto")
    case = ({"glasses": 2.0}, {}, 17.0, -7.0)
    rec = scorer.scores(avatar, [case], regions=("glasses",))[0]
    pred, target = scorer.predict(avatar, *case), scorer.target(*case)
    m = scorer.region("glasses", 17.0, -7.0)
    assert 0 < m.float().mean() < 0.3
    mse = float(((pred - target)[m] ** 2).mean())
    assert rec["region_glasses"] == pytest.approx(-10 * np.log10(mse), rel=1e-5)
