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
