"""Avatar registry: versions, atomic writes, concurrent writers, id validation, manifest."""

from __future__ import annotations

import multiprocessing as mp
import os

import pyarrow.parquet as pq
import pytest
import torch

from perse_ray.avatar import Avatar, AvatarModel, LatentLayout
from perse_ray.config import load_config
from perse_ray.registry import Registry, RegistryError, validate_subject_id
from perse_ray.schema import validate


def _avatar(seed=0, config_hash="abc") -> Avatar:
    cfg = load_config("cpu-smoke", ["avatar.num_gaussians=50"])
    model = AvatarModel(LatentLayout.from_config(cfg.synth, 2), cfg.avatar, seed=seed)
    return Avatar(model, {"camera": {"fov_deg": 30.0, "distance": 0.65}, "config_hash": config_hash,
                          "metrics": {"heldout_psnr": 30.0 + seed}})


def test_put_get_list_versions_and_manifest(tmp_path):
    reg = Registry(tmp_path / "avatars")
    assert reg.list() == []
    e1 = reg.put("ada-1234abcd", _avatar(0))
    e2 = reg.put("ada-1234abcd", _avatar(1, config_hash="def"))
    reg.put("bob-00000000", _avatar(2))
    assert (e1.version, e2.version) == ("v0001", "v0002")
    assert reg.get("ada-1234abcd").version == "v0002"
    assert reg.get("ada-1234abcd", "v0001").metrics["heldout_psnr"] == 30.0
    assert reg.find("ada-1234abcd", "abc").version == "v0001" and reg.find("ada-1234abcd", "zzz") is None
    assert [(e.subject_id, e.version) for e in reg.latest()] == [("ada-1234abcd", "v0002"), ("bob-00000000", "v0001")]
    loaded = reg.load("ada-1234abcd", "v0001")
    assert torch.equal(loaded.model.means, _avatar(0).model.means)
    table = validate(pq.read_table(tmp_path / "avatars" / "manifest.parquet"), "avatars")
    assert table.num_rows == 3 and table.column("path").to_pylist()[0] == "ada-1234abcd/v0001"
    with pytest.raises(RegistryError, match="no avatar 'carl-00000000'"):
        reg.get("carl-00000000")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "A-upper", "x" * 64, "a\x00b", ".hidden", "a b"])
def test_invalid_ids_are_rejected_before_touching_the_filesystem(tmp_path, bad):
    reg = Registry(tmp_path / "avatars")
    with pytest.raises(ValueError, match="invalid subject id"):
        reg.put(bad, _avatar())
    with pytest.raises(ValueError, match="invalid subject id"):
        reg.get(bad)
    assert not (tmp_path / "avatars").exists()
    with pytest.raises(ValueError, match="invalid version"):
        reg.get("ok-1", "../../etc")


def test_writer_killed_before_rename_leaves_previous_version(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "avatars")
    reg.put("ada-1", _avatar(0))

    def die(*a, **k):
        raise KeyboardInterrupt("killed between temp and rename")

    monkeypatch.setattr(os, "rename", die)
    with pytest.raises(KeyboardInterrupt):
        reg.put("ada-1", _avatar(1))
    monkeypatch.undo()
    assert [e.version for e in reg.list()] == ["v0001"]
    assert reg.load("ada-1").meta["metrics"]["heldout_psnr"] == 30.0
    leftovers = [p.name for p in (tmp_path / "avatars" / "ada-1").iterdir()]
    assert leftovers == ["v0001"]


def _put_one(root, seed):
    Registry(root).put("ada-1", _avatar(seed))


def test_concurrent_writers_get_distinct_versions(tmp_path):
    root = tmp_path / "avatars"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_put_one, args=(str(root), s)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reg = Registry(root)
    assert [e.version for e in reg.list()] == ["v0001", "v0002", "v0003", "v0004"]
    assert sorted(e.metrics["heldout_psnr"] for e in reg.list()) == [30.0, 31.0, 32.0, 33.0]
    assert pq.read_table(root / "manifest.parquet").num_rows == 4


def test_validate_subject_id_accepts_slugs():
    assert validate_subject_id("grace-hopper-1a2b3c4d") == "grace-hopper-1a2b3c4d"
