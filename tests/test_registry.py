"""Avatar registry: versions, atomic writes, concurrent writers, id validation, the index, corrupt
entries; leases."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time

import pytest
import torch

from perse_ray.avatar import Avatar, AvatarModel, LatentLayout
from perse_ray.config import load_config
from perse_ray.lease import Lease, LeaseHeld, LeaseLost
from perse_ray.registry import Registry, RegistryError, RegistryIndex, validate_subject_id


def _avatar(seed=0, config_hash="abc") -> Avatar:
    cfg = load_config("cpu-smoke", ["avatar.num_gaussians=50"])
    model = AvatarModel(LatentLayout.from_config(cfg.synth, 2), cfg.avatar, seed=seed)
    return Avatar(model, {"camera": {"fov_deg": 30.0, "distance": 0.65}, "config_hash": config_hash,
                          "metrics": {"heldout_psnr": 30.0 + seed}})


def test_put_get_list_versions_and_index(tmp_path):
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
    lines = (tmp_path / "avatars" / "index.jsonl").read_text().splitlines()
    assert [(json.loads(x)["subject_id"], json.loads(x)["version"]) for x in lines] == [
        ("ada-1234abcd", "v0001"), ("ada-1234abcd", "v0002"), ("bob-00000000", "v0001")]
    assert reg.list()[0].path == tmp_path / "avatars" / "ada-1234abcd" / "v0001"
    assert reg.list()[0].manifest["metrics"]["heldout_psnr"] == 30.0 and "config" not in reg.list()[0].manifest
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
    assert len((root / "index.jsonl").read_text().splitlines()) == 4  # no append lost or torn


def test_validate_subject_id_accepts_slugs():
    assert validate_subject_id("grace-hopper-1a2b3c4d") == "grace-hopper-1a2b3c4d"


def _plant_corrupt_entries(root):
    """Three broken versions beside good ones, the way a crash or a bad copy leaves them."""
    good = Registry(root)
    good.put("ada-1", _avatar(0))
    good.put("bob-1", _avatar(1))
    truncated = good.put("cid-1", _avatar(2)).path / "avatar.json"
    truncated.write_text(truncated.read_text()[:40])  # truncated avatar.json of an indexed version
    (root / "dan-1" / "v0001").mkdir(parents=True)  # an empty version folder
    model_only = root / "eve-1" / "v0001"
    model_only.mkdir(parents=True)
    (model_only / "model.safetensors").hardlink_to(good.get("ada-1").path / "model.safetensors")  # no avatar.json
    return good


def test_corrupt_entries_are_skipped_with_reasons_and_never_break_reads_or_puts(tmp_path, caplog):
    root = tmp_path / "avatars"
    reg = _plant_corrupt_entries(root)
    with open(root / "index.jsonl", "a") as fh:  # a garbled index line and one cut off by a killed writer
        fh.write('{"subject_id": "zed-1", "version": \n{"subject_id": "yan-1"')
    reg.put("fay-1", _avatar(3))  # a put after a torn line still lands whole
    listed = {e.subject_id for e in reg.list()}
    assert {"ada-1", "bob-1", "fay-1"} <= listed and not listed & {"dan-1", "eve-1", "zed-1", "yan-1"}
    with caplog.at_level(logging.WARNING, "perse_ray.registry"):
        with pytest.raises(RegistryError):
            reg.get("cid-1")  # its only version is unreadable: skipped with the reason logged
        assert reg.find("dan-1", "abc") is None and reg.find("eve-1", "abc") is None
        assert reg.get("ada-1").version == "v0001"
    assert any("cid-1/v0001: bad avatar.json" in r.getMessage() for r in caplog.records)
    index = RegistryIndex(root)
    index.refresh()
    assert [w for w, _ in index.problems()] and all("line" in w for w, _ in index.problems())
    _, problems = reg.scan()
    assert dict(problems) == {"cid-1/v0001": dict(problems)["cid-1/v0001"], "dan-1/v0001": "no avatar.json and no model.safetensors",
                              "eve-1/v0001": "no avatar.json"}
    assert dict(problems)["cid-1/v0001"].startswith("bad avatar.json")
    assert reg.put("cid-1", _avatar(4)).version == "v0002" and reg.get("cid-1").version == "v0002"


def test_list_is_one_read_of_the_index_and_the_view_reads_only_what_was_appended(tmp_path, monkeypatch):
    root = tmp_path / "avatars"
    reg = Registry(root)
    for i in range(3):
        reg.put(f"s{i}-1", _avatar(i))
    index = RegistryIndex(root)
    assert index.refresh() and len(index) == 3 and not index.refresh()  # nothing new: no read
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    index.latest(), index.get("s1-1"), index.entries()
    assert opened == []  # answered from memory
    monkeypatch.undo()
    size = (root / "index.jsonl").stat().st_size
    reg.put("s3-1", _avatar(3))
    reg.put("s0-1", _avatar(4))
    assert index.refresh()
    assert [e.subject_id for e in index.latest()] == ["s0-1", "s1-1", "s2-1", "s3-1"]
    assert index.get("s0-1").version == "v0002" and index.get("s0-1", "v0001").version == "v0001"
    assert index._offset == (root / "index.jsonl").stat().st_size > size
    # a registry from before the index is indexed once, on first read
    (root / "index.jsonl").unlink()
    assert [e.subject_id for e in Registry(root).latest()] == ["s0-1", "s1-1", "s2-1", "s3-1"]
    assert (root / "index.jsonl").is_file()
    assert index.refresh() and index.get("s0-1").version == "v0002"  # the rewritten index is read whole


def test_put_find_and_get_read_only_their_subject_folder(tmp_path, monkeypatch):
    root = tmp_path / "avatars"
    reg = Registry(root)
    for i in range(5):
        reg.put(f"s{i}-1", _avatar(i))
    touched = []
    real_scandir = os.scandir

    def scandir(p="."):
        if not isinstance(p, int):  # an int is a directory fd: rmtree clearing the put's own temp folder
            touched.append(os.path.relpath(p, root))
        return real_scandir(p)

    monkeypatch.setattr(os, "scandir", scandir)
    reg.put("s2-1", _avatar(7))
    reg.find("s3-1", "abc"), reg.get("s4-1")
    assert touched and set(touched) <= {"s2-1", "s3-1", "s4-1"}, touched


def test_a_lease_is_exclusive_expires_when_its_holder_dies_and_a_slow_holder_learns_it_lost(tmp_path):
    path = tmp_path / "alice.lease"
    first = Lease(path, "job a", job="a", ttl_s=1.0)
    first.try_acquire()
    with pytest.raises(LeaseHeld, match="held by job a"):
        Lease(path, "job b", job="b", ttl_s=1.0).try_acquire()
    time.sleep(1.5)  # the heartbeat (every ttl/4) keeps a live holder's lease fresh
    with pytest.raises(LeaseHeld):
        Lease(path, "job b", job="b", ttl_s=1.0).try_acquire()
    first._stop.set()
    first._beat.join()  # the holder dies: no more heartbeats
    waited = []
    second = Lease(path, "job b", job="b", ttl_s=1.0)
    start = time.monotonic()
    second.acquire(poll_s=0.1, on_wait=waited.append)
    assert 0.5 < time.monotonic() - start < 3.0 and len(waited) == 1  # blocked only until the expiry
    with pytest.raises(LeaseLost):
        first.check()  # it must not write anything now
    first.release()  # and releasing leaves the new holder's lease alone
    second.check()
    # a retried trial of the same job takes its own lease over at once
    again = Lease(path, "job b, retried", job="b", ttl_s=60)
    again.try_acquire()
    with pytest.raises(LeaseLost):
        second.check()
    again.release()
    second.release()
    assert not path.exists()
