"""Config presets and overrides, stage schemas, the cluster config, and a side-effect-free import."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from perse_ray.config import PRESETS, Config, ConfigError, load_config
from perse_ray.schema import SchemaError, rows_from_table, table_from_rows, validate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config) and cfg.preset == preset
    assert cfg.synth.attributes, "every preset edits at least one attribute"
    assert all(a.edits for a in cfg.synth.attributes)


def test_presets_differ_where_they_should():
    cpu, smoke, gpu, tiny = (load_config(p) for p in ("cpu", "cpu-smoke", "gpu", "tiny"))
    assert smoke.avatar.num_gaussians < cpu.avatar.num_gaussians < gpu.avatar.num_gaussians
    assert cpu.synth.edit_backend == "classical" and gpu.synth.edit_backend == "instruct_pix2pix"
    assert tiny.synth.edit_backend == gpu.synth.edit_backend  # tiny goes through the gpu loaders
    assert cpu.train.lambda_lpips == 0.0  # no LPIPS backbone offline: SSIM instead


def test_overrides_apply_and_parse_types():
    cfg = load_config("cpu", ["train.steps=200", "avatar.num_gaussians=5000", "avatar.background=[0,0,0]",
                              "synth.motion.num_frames=5", "train.lambda_ssim=1", "train.lr_decoder=3e-3",
                              "train.lr_means=1.5e3", "train.lr_codes=1e-2"])
    assert cfg.train.steps == 200 and cfg.avatar.num_gaussians == 5000
    assert cfg.avatar.background == [0.0, 0.0, 0.0]
    assert cfg.synth.motion.num_frames == 5
    assert cfg.train.lambda_ssim == 1.0 and isinstance(cfg.train.lambda_ssim, float)
    # YAML 1.1 reads these exponent forms (no dot, or no sign) as strings
    assert (cfg.train.lr_decoder, cfg.train.lr_means, cfg.train.lr_codes) == (0.003, 1500.0, 0.01)


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown key train.stepz; choices:"),
    ("nosuch.key=3", "unknown key config.nosuch"),
    ("train.steps=many", "train.steps: expected int"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("train.steps=2e3", "train.steps: expected int"),
    ("train.lr_decoder=3e-3x", "train.lr_decoder: expected float"),
    ("train.lr_decoder=nan", "train.lr_decoder: expected float"),
    ("synth.morph_alphas=0.5", "synth.morph_alphas: expected a list"),
    ("train.steps", "must look like section.key=value"),
    ("train=3", "train: expected a mapping"),
    ("synth.edit_backend=clasical", "synth.edit_backend: 'clasical' is not a choice; choices: classical, instruct_pix2pix"),
    ("faces.backend=insight", "faces.backend: 'insight' is not a choice; choices: dlib, insightface"),
    ("machine.render_backend=cuda", "machine.render_backend: 'cuda' is not a choice"),
    ("synth.actors_per_stage=2", "synth.actors_per_stage is now machine.actors_per_stage"),
    ("train.device=cpu", "train.device is now machine.device"),
    ("train.lambda_identity=0.1", "unknown key train.lambda_identity"),
    ("serve.max_batch_size=4", "unknown key config.serve"),
])
def test_bad_overrides_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_config("cpu", [override])


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="unknown preset 'gpus'; choices: cpu, cpu-smoke, gpu, tiny, scale"):
        load_config("gpus")


def test_stage_hashes_cover_what_each_stage_computes():
    base = load_config("cpu")
    same = lambda *o: load_config("cpu", list(o))  # noqa: E731
    assert base.training_hash() == same().training_hash() and base.synthesis_hash() == same().synthesis_hash()
    # what changes frames changes both hashes
    for override in ("synth.motion.num_frames=5", "faces.id_threshold=0.4", "render.fov_deg=25", "synth.seed=3"):
        other = same(override)
        assert other.synthesis_hash() != base.synthesis_hash() and other.training_hash() != base.training_hash(), override
    # what changes only the avatar leaves the frames' hash alone
    for override in ("train.steps=7", "avatar.num_gaussians=100", "render.width=32", "train.batch_size=8",
                     "avatar.background=[0,0,0]", "train.lambda_attr_delta=0.5"):
        other = same(override)
        assert other.synthesis_hash() == base.synthesis_hash() and other.training_hash() != base.training_hash(), override
    # where it runs is in no hash
    for override in ("machine.actors_per_stage=4", "machine.cpus_per_actor=1", "machine.gpus_per_actor=0.5",
                     "machine.synth_batch_size=8", "machine.device=cuda", "machine.render_backend=torch",
                     "machine.log_every=7", "machine.checkpoint_every=7"):
        other = same(override)
        assert (other.synthesis_hash(), other.training_hash()) == (base.synthesis_hash(), base.training_hash()), override
    assert load_config("cpu-smoke").synthesis_hash() != base.synthesis_hash()  # presets differ in values


@pytest.mark.parametrize("preset, overrides, old_hash", [
    # what Config.hash() gave for these configs before stage hashes existed (so old outputs are reused)
    ("cpu", ["avatar.num_gaussians=4000", "render.width=64", "render.height=64", "train.coarse_fraction=0"],
     "d3b38af9a8bb"), ("cpu-smoke", [], "9d644ad4affe"), ("tiny", [], "70028c281c0c"),
    ("gpu", [], "0082c5352d88"), ("cpu-smoke", ["train.steps=130", "machine.device=cpu"], "7ec36cf37c5c"),
])
def test_legacy_hash_reproduces_the_single_hash_of_older_outputs(preset, overrides, old_hash):
    # Older outputs were synthesized with the motion script's earlier ranges (+-30 deg yaw, +-12
    # pitch) and no combined-edit frames.
    then = ["synth.motion.yaw_range=30.0", "synth.motion.pitch_range=12.0", "synth.combined_frames=0",
            "avatar.branch_regions=false", "train.lambda_attr_delta=0",
            "avatar.attribute_composition=sum"]
    assert load_config(preset, overrides + then).legacy_hash() == old_hash
    assert load_config(preset, overrides).legacy_hash() != old_hash  # today's wider turns are new frames


@pytest.mark.parametrize("preset, old_hash", [("gpu", "6dba5bd1e42b"), ("tiny", "4497e633bcd3"),
                                              ("cpu-smoke", "a757d6f805e9")])
def test_training_hash_is_unchanged_by_keys_added_at_their_off_value(preset, old_hash):
    # what training_hash gave before train.lambda_attr_delta existed: avatars trained then are reused
    assert load_config(preset).training_hash() == old_hash
    assert load_config(preset, ["train.lambda_attr_delta=0.1"]).training_hash() != old_hash


def _frame_row(**kw):
    row = {
        "subject_id": "ada-0123abcd", "attribute": "hair", "edit_index": 1,
        "interpolation": {"from_edit": 0, "to_edit": 1, "alpha": 0.25}, "frame_index": 3,
        "camera": {"yaw": 10.0, "pitch": -5.0, "K": [1.0] * 9, "viewmat": [0.0] * 16},
        "expression": {"smile": 0.5, "jaw_open": 0.0}, "image_png": b"\x89PNG", "mask_png": None,
        "id_score": 0.8, "kept": True, "drop_reason": None,
    }
    row.update(kw)
    return row


def test_frames_round_trip_through_parquet(tmp_path):
    rows = [_frame_row(), _frame_row(interpolation=None, attribute="", edit_index=0, id_score=None)]
    table = table_from_rows(rows, "frames")
    pq.write_table(table, tmp_path / "f.parquet")
    back = pq.read_table(tmp_path / "f.parquet")
    assert back.schema.metadata[b"perse_ray.schema"] == b"frames"
    assert rows_from_table(validate(back, "frames")) == rows_from_table(table)
    assert rows_from_table(back)[0]["expression"] == {"smile": 0.5, "jaw_open": 0.0}


def test_subjects_and_avatars_round_trip(tmp_path):
    import datetime as dt
    subj = table_from_rows([{"subject_id": "x-1", "source_path": "in/x.jpg", "content_sha256": "ab",
                             "status": "quarantined", "reason": "no face found", "face_box": None,
                             "landmarks": None, "identity": None, "portrait_png": None}], "subjects")
    av = table_from_rows([{"subject_id": "x-1", "version": "v1", "path": "x-1/v1", "latent_layout": "{}",
                           "metrics": {"psnr": 30.5}, "created_at": dt.datetime.now(dt.timezone.utc)}],
                         "avatars")
    for t, name in ((subj, "subjects"), (av, "avatars")):
        pq.write_table(t, tmp_path / f"{name}.parquet")
        assert validate(pq.read_table(tmp_path / f"{name}.parquet"), name).equals(t)


def test_mismatching_tables_fail_clearly():
    table = table_from_rows([_frame_row()], "frames")
    with pytest.raises(SchemaError, match=r"missing columns \['kept'\]"):
        validate(table.drop_columns(["kept"]), "frames")
    with pytest.raises(SchemaError, match="unexpected columns"):
        validate(table.append_column("extra", pa.array([1])), "frames")
    bad_type = table.set_column(table.schema.get_field_index("frame_index"), "frame_index", pa.array(["x"]))
    with pytest.raises(SchemaError, match="frames.frame_index: type string does not fit int32"):
        validate(bad_type, "frames")
    nulls = table.set_column(table.schema.get_field_index("kept"), "kept", pa.array([None], pa.bool_()))
    with pytest.raises(SchemaError, match="frames.kept: 1 null"):
        validate(nulls, "frames")
    with pytest.raises(SchemaError, match="unknown value"):
        table_from_rows([{"subject_id": "a", "source_path": "b", "status": "maybe"}], "subjects")
    with pytest.raises(SchemaError, match="unknown schema"):
        validate(table, "framez")


def test_cluster_yaml_passes_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert cfg["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    validate_config(prepare_config(copy.deepcopy(cfg)))
    cfg["available_node_types"]["gpu_worker"]["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config(cfg))


def test_import_has_no_ray_side_effects():
    """Importing the library must not import Ray or torch (jobs pay for those, not config loads)."""
    code = ("import sys, perse_ray, perse_ray.config, perse_ray.schema, perse_ray.camera;"
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
