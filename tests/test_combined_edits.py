"""Frames with several edits composed: schema, latent selections, and refusal of bad ones."""

from __future__ import annotations

import copy

import pyarrow as pa
import pytest

from perse_ray.avatar.layout import LatentLayout
from perse_ray.bench.ground_truth import frames_from_head
from perse_ray.bench.procedural import ProceduralHead
from perse_ray.config import load_config
from perse_ray.schema import SchemaError, table_from_rows, validate
from perse_ray.train.loop import frameset_from_rows


@pytest.fixture(scope="module")
def cfg():
    return load_config("cpu", ["synth.motion.num_frames=3", "synth.resolution=32", "synth.morph_alphas=[0.5]"])


@pytest.fixture(scope="module")
def rows(cfg):
    return frames_from_head(ProceduralHead(seed=0), cfg)


def _layout(cfg):
    return LatentLayout.from_config(cfg.synth, cfg.avatar.code_dim)


def test_also_edits_select_every_named_attribute(cfg, rows):
    names = [a.name for a in cfg.synth.attributes]
    row = copy.deepcopy(next(r for r in rows if r["attribute"] == names[0] and r["interpolation"] is None))
    k = row["edit_index"]
    row["also_edits"] = {names[1]: 1.0, names[2]: 0.5}
    sel = frameset_from_rows([row], _layout(cfg), 16, 16).selections[0]
    assert sel[0].tolist() == [k, k, 0.0]
    assert sel[1].tolist() == [1.0, 2.0, 0.0]  # slider value 1 of a 3-level attribute: (1, 2, 0)
    assert sel[2].tolist() == pytest.approx([0.0, 1.0, 0.5])
    plain = frameset_from_rows([{**row, "also_edits": None}], _layout(cfg), 16, 16).selections[0]
    assert plain[1:].abs().sum() == 0


@pytest.mark.parametrize("also, message", [({"moustache": 1.0}, "moustache"), ({"hair": 1.0}, "hair"),
                                           ({"beard": 9.0}, "out of range")])
def test_bad_also_edits_are_refused_by_name(cfg, rows, also, message):
    row = copy.deepcopy(next(r for r in rows if r["attribute"] == "hair"))
    with pytest.raises(ValueError, match=message):
        frameset_from_rows([{**row, "also_edits": also}], _layout(cfg), 16, 16)


def test_frames_tables_from_before_also_edits_still_validate(rows):
    table = table_from_rows(rows[:3], "frames")
    old = table.drop_columns(["also_edits"])
    again = validate(old, "frames")
    assert again.column("also_edits").null_count == 3
    assert again.schema.equals(table.schema, check_metadata=True)
    with pytest.raises(SchemaError, match="drop_reason"):
        validate(old.drop_columns(["drop_reason"]), "frames")
    bad = old.append_column("also_edits", pa.array([["x"]] * 3))
    with pytest.raises(SchemaError, match="also_edits"):
        validate(bad, "frames")


@pytest.fixture(scope="module")
def grace(tmp_path_factory):
    """Grace Hopper's portrait, ingested with dlib at 64 px (cpu backends)."""
    import shutil
    from pathlib import Path

    from perse_ray.faces import load_face_model
    from perse_ray.portraits import discover_subjects
    from perse_ray.synth.ingest import ingest_subject

    cfg = load_config("cpu", ["synth.resolution=64", "synth.motion.num_frames=6", "synth.combined_frames=2"])
    root = tmp_path_factory.mktemp("grace")
    shutil.copy(Path(__file__).resolve().parent.parent / "examples/portraits/grace_hopper.jpg", root)
    row = ingest_subject(discover_subjects(root).candidates[0], load_face_model(cfg.faces), cfg)
    assert row["status"] == "ok"
    return cfg, row


def test_composed_edits_chain_every_editor_call_and_animate_only_at_their_frames(grace):
    import numpy as np

    from perse_ray.pipeline import frames_per_subject
    from perse_ray.portraits import decode_png
    from perse_ray.synth.animate import animate_frame
    from perse_ray.synth.backends import load_animator, load_editor, load_morpher
    from perse_ray.synth.edit import attribute_seed, combined_levels, edit_subject
    from perse_ray.synth.morph import morph_frame
    from perse_ray.synth.motion import motion_script

    cfg, row = grace
    plan = combined_levels(cfg)
    assert [f for f, _ in plan] == [1, 5]  # evenly spaced, never the portrait view
    assert all(set(levels) == {"hair", "beard", "glasses"} and all(k >= 1 for k in levels.values())
               for _, levels in plan)
    assert combined_levels(load_config("cpu-smoke", ["synth.combined_frames=2",
                                                     "synth.attributes=[{name: hair, edits: [{label: a}]}]"])) == []
    sid, editor = row["subject_id"], load_editor(cfg)
    portrait, lm = decode_png(row["portrait_png"]), np.asarray(row["landmarks"], np.float32)
    edits = edit_subject(sid, portrait, lm, editor, cfg)
    composed = [e for e in edits if e.also_edits is not None]
    assert len(composed) == len({tuple(levels.items()) for _, levels in plan})
    levels = plan[0][1]
    first = next(e for e in composed if {e.attribute: e.edit_index, **e.also_edits} == levels)
    image, masks = portrait, []
    specs = {a.name: [None, *a.edits] for a in cfg.synth.attributes}
    for attribute, k in levels.items():  # the same editor calls, one after another
        image, mask = editor.edit(image, lm, attribute, specs[attribute][k], attribute_seed(cfg, sid, attribute))
        masks.append(mask)
    assert np.array_equal(first.image, image)
    assert np.allclose(first.mask, np.maximum.reduce(masks))
    singles = {(e.attribute, e.edit_index): e.image for e in edits if e.also_edits is None}
    assert all(not np.array_equal(first.image, im) for im in singles.values())  # really several edits

    script, animator = motion_script(cfg.synth.motion), load_animator(cfg)
    at_combined = animate_frame(sid, edits, lm, script[1], animator, cfg)
    elsewhere = animate_frame(sid, edits, lm, script[2], animator, cfg)
    assert [f.also_edits for f in at_combined if f.also_edits] == [dict(list(plan[0][1].items())[1:])]
    assert all(f.also_edits is None for f in elsewhere) and len(elsewhere) == len(at_combined) - 1
    morphs = morph_frame(sid, portrait, lm, at_combined, script[1], load_morpher(cfg), cfg)
    assert len(morphs) == 6 * len(cfg.synth.morph_alphas) and all(m.also_edits is None for m in morphs)
    assert frames_per_subject(cfg) == 6 * (1 + 6 + 6 * 2) + 2
