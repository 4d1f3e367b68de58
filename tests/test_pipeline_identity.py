"""The identity filter inside the Ray graph (cpu preset backends, filter on): frames of another
person spliced into a subject's video are dropped, and only those.

The splice is planted honestly: the real animate stage runs for every row; for the victim, at a
few motion indices, its bundle is replaced by the bundle the same stage makes at that index from
another real portrait (ingested and edited by the real stages). Everything downstream — the exact
morphs and the id filter with dlib — is the real graph. The exact morphs re-animate the victim's
own portrait, so at a planted index only the animated source and edit frames show the donor. Ray tests run inside a private network
namespace (see conftest.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from perse_ray.config import load_config
from perse_ray.portraits import discover_subjects

PORTRAITS = Path(__file__).resolve().parent.parent / "examples" / "portraits"
VICTIM, DONOR = "grace_hopper.jpg", "lfw_face_001.png"
PLANTED = (1, 3)  # motion indices of the victim's video that show the donor (cpu-smoke: 4 frames)


def splicing_animate_stage(victim: str, donor_edits: dict, planted: tuple[int, ...]):
    """AnimateStage, except that ``victim``'s bundles at ``planted`` motion indices are the ones it
    makes from ``donor_edits`` (an ``edits`` row of another subject). Defined in a function so Ray
    ships the class by value to the actors."""
    from perse_ray.pipeline import AnimateStage

    class SplicingAnimateStage(AnimateStage):
        def process(self, row):
            bundles = super().process(row)
            if row["subject_id"] != victim:
                return bundles
            donor = {b["frame_index"]: b["bundle"] for b in super().process(donor_edits)}
            return [dict(b, bundle=donor[b["frame_index"]]) if b["frame_index"] in planted else b
                    for b in bundles]

    return SplicingAnimateStage


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_id_filter_drops_a_spliced_identity_swap(ray_cluster, tmp_path, monkeypatch):
    from perse_ray import pipeline
    from perse_ray.synth.motion import motion_script

    cfg = load_config("cpu-smoke")
    assert cfg.faces.backend == "dlib" and cfg.faces.id_threshold > 0  # the filter is on
    assert len(motion_script(cfg.synth.motion)) > max(PLANTED)
    (tmp_path / "in").mkdir()
    shutil.copy(PORTRAITS / VICTIM, tmp_path / "in" / VICTIM)
    shutil.copy(PORTRAITS / DONOR, tmp_path / "donor.png")
    discovery = discover_subjects(tmp_path / "in")
    (victim,) = [c.subject_id for c in discovery.candidates]

    # The donor through the real ingest and edit stages (as the graph would run them).
    (donor,) = discover_subjects_of(tmp_path / "donor.png", tmp_path / "donor-in").candidates
    (donor_subject,) = pipeline.IngestStage(cfg).process(pipeline.candidate_row(donor))
    assert donor_subject["status"] == "ok", donor_subject["reason"]
    _, donor_edits = pipeline.EditStage(cfg).process(donor_subject)

    stage = splicing_animate_stage(victim, donor_edits, PLANTED)
    monkeypatch.setattr(pipeline, "AnimateStage", stage)
    monkeypatch.setattr(pipeline, "STAGE_CLASSES", tuple(stage if c.__name__ == "AnimateStage" else c
                                                         for c in pipeline.STAGE_CLASSES))
    summary = pipeline.synthesize(cfg, discovery, tmp_path / "out", log=lambda line: None)
    assert summary["subjects"]["ok"] == 1

    frames = pads.dataset(tmp_path / "out" / "frames", format="parquet", partitioning="hive").to_table()
    rows = frames.to_pylist()
    assert len(rows) == pipeline.frames_per_subject(cfg)
    threshold = cfg.faces.id_threshold

    def spliced(r):
        # The animated frames (source and edits) at the planted indices show the donor. The exact
        # morphs there do not: they re-edit and re-animate the victim's own portrait.
        return r["frame_index"] in PLANTED and r["interpolation"] is None

    from perse_ray.synth.edit import combined_levels

    composed_planted = sum(f in PLANTED for f, _ in combined_levels(cfg))  # composed edits are animated too
    assert sum(map(spliced, rows)) == len(PLANTED) * (1 + sum(len(a.edits) for a in cfg.synth.attributes)) \
        + composed_planted
    for r in rows:
        what = (r["frame_index"], r["attribute"], r["edit_index"], r["interpolation"], r["id_score"])
        if spliced(r):  # the donor's face: dropped for its identity
            assert not r["kept"], what
            assert r["id_score"] is not None and r["id_score"] < threshold, what
            assert r["drop_reason"].startswith("identity"), what
        else:  # the victim's own frames, edits and morphs: kept
            assert r["kept"] and r["drop_reason"] is None, (what, r["drop_reason"])
            assert r["id_score"] >= threshold, what


def discover_subjects_of(image: Path, folder: Path):
    """Discovery of a folder holding just ``image``."""
    folder.mkdir()
    shutil.copy(image, folder / image.name)
    return discover_subjects(folder)
