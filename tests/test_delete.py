"""Deleting a person: a real build (tiny preset) on the session's Ray, then jobs/delete_subject.py.

After the delete nothing under the output names or holds the subject id but the deletion record
and the audit line; a re-run of build_avatars skips the portrait and --rebuild brings it back; a
delete that runs while a build trains another subject loses nothing of it. Run inside a network
namespace (``make test`` does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from perse_ray.deletion import AUDIT_FILE, DELETIONS_FILE, deletion_records, find_traces, strip_report
from perse_ray.registry import Registry, RegistryIndex

REPO = Path(__file__).resolve().parent.parent
PORTRAITS = REPO / "examples" / "portraits"


def _build(ray_cluster, portraits: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    """jobs/build_avatars.py in a subprocess, joined to the session's Ray (no start-up per build)."""
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "jobs" / "build_avatars.py"), "--input", str(portraits),
                           "--output", str(output), "--preset", "tiny", *extra],
                          env=env, capture_output=True, text=True, timeout=600)


def _delete(output: Path, subject: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "delete_subject.py"), "--output", str(output),
                           "--subject", subject, *extra], capture_output=True, text=True, timeout=300)


def _subjects(output: Path) -> dict[str, str]:
    return {e.subject_id.rsplit("-", 1)[0]: e.subject_id for e in Registry(output / "avatars").latest()}


def test_registry_delete_compacts_the_index_and_readers_follow(tmp_path):
    from tests.test_serve import make_avatar

    registry = Registry(tmp_path / "avatars")
    for i, s in enumerate(("ada", "bob", "ada")):
        registry.put(s, make_avatar(i))
    index = RegistryIndex(registry.root)
    index.refresh()
    assert [e.subject_id for e in index.latest()] == ["ada", "bob"]
    assert registry.delete("ada") == 2 and registry.delete("ada") == 0  # idempotent
    assert index.refresh() is True  # a rewritten index (new inode) is read again whole
    assert [e.subject_id for e in index.latest()] == ["bob"] and index.problems() == []
    registry.put("cy", make_avatar(3))  # appends after a compaction still reach the reader
    index.refresh()
    assert [e.subject_id for e in index.latest()] == ["bob", "cy"]
    assert find_traces(registry.root, "ada") == []


def test_strip_report_removes_only_that_subject(tmp_path):
    from perse_ray.report import SubjectReport, write_report

    write_report(tmp_path, [SubjectReport("ada-1", "done", "", "a.png"), SubjectReport("bob-2", "done", "", "b.png"),
                            SubjectReport("cy-3", "quarantined", "no face", "c.png")])
    for sid in ("ada-1", "cy-3"):
        assert strip_report(tmp_path / "index.html", sid)
    html = (tmp_path / "index.html").read_text()
    assert "ada-1" not in html and "cy-3" not in html and "<section id='bob-2'>" in html


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_delete_subject_everywhere_rebuild_and_a_concurrent_build(ray_cluster, tiny_models, tmp_path):
    first = tmp_path / "in"
    first.mkdir()
    for name in ("astronaut.png", "lfw_face_000.png", "no_face_cat.jpg"):
        shutil.copy(PORTRAITS / name, first / name)
    output = tmp_path / "out"
    built = _build(ray_cluster, first, output)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    ids = _subjects(output)
    gone, kept = ids["astronaut"], ids["lfw-face-000"]
    cat = next(sid for sid in json.loads((output / "synth" / "rejected.json").read_text()))
    assert find_traces(output, gone) and (output / "eval" / gone).is_dir() and (output / "report" / gone).is_dir()
    kept_files = {p: p.read_bytes() for p in (output / "avatars" / kept).rglob("*") if p.is_file()}

    deleted = _delete(output, gone)
    assert deleted.returncode == 0, deleted.stderr
    assert find_traces(output, gone) == [], find_traces(output, gone)
    assert (first / "astronaut.png").is_file()  # the source belongs to the user
    audit = [json.loads(line) for line in (output / AUDIT_FILE).read_text().splitlines()]
    assert audit[-1]["subject"] == gone and audit[-1]["outcome"] == "deleted" and audit[-1]["key_id"].startswith("cli:")
    assert [r["subject_id"] for r in deletion_records(output).values()] == [gone]
    import hashlib

    assert set(json.loads((output / DELETIONS_FILE).read_text())["deleted"]) == {
        hashlib.sha256((first / "astronaut.png").read_bytes()).hexdigest()}  # by the portrait's content
    again = _delete(output, gone)
    assert again.returncode == 0 and "nothing left to delete" in again.stdout
    assert {p: p.read_bytes() for p in (output / "avatars" / kept).rglob("*") if p.is_file()} == kept_files
    # A rejected portrait's records go too.
    assert _delete(output, cat).returncode == 0 and find_traces(output, cat) == []

    # A re-run over the same input, with a new portrait, while the kept subject is deleted midway:
    # the deleted portrait is not rebuilt, the new one is built whole.
    shutil.copy(PORTRAITS / "lfw_face_001.png", first / "lfw_face_001.png")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run=_build(ray_cluster, first, output)))
    runner.start()
    deadline = time.monotonic() + 300
    while not any((output / "ray_train").glob("*/lfw-face-001-*.lease")) and runner.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    during = _delete(output, kept)
    runner.join()
    run = result["run"]
    assert during.returncode == 0, during.stderr
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"[deleted] {gone}: its portrait was deleted on request" in run.stdout
    assert f"[deleted] {cat}" in run.stdout
    now = _subjects(output)
    assert set(now) == {"lfw-face-001"}, now
    new = now["lfw-face-001"]
    assert (output / "synth" / "frames" / f"subject_id={new}" / "_COMPLETE").is_file()
    assert (output / "eval" / new).is_dir() and new in (output / "report" / "index.html").read_text()
    for sid in (gone, kept, cat):
        assert find_traces(output, sid) == [], (sid, find_traces(output, sid))

    rebuilt = _build(ray_cluster, first, output, "--rebuild", "--no-evaluation")
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:] + rebuilt.stderr[-3000:]
    assert f"[rebuild] {gone}" in rebuilt.stdout
    assert set(_subjects(output)) == {"astronaut", "lfw-face-000", "lfw-face-001"}
    assert deletion_records(output) == {}
