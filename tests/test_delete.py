"""Deleting a person: one real build (tiny preset) on the session's Ray, and jobs/delete_subject.py.

After the delete nothing under the output names or holds the subject id but the deletion record
and the audit line; a re-run of build_avatars skips the portrait and --rebuild brings it back; a
delete that runs while a build trains other subjects loses nothing of them. One synthesizing build
serves all of it (synthesis start-up dominates a tiny build): the earlier deletion it rebuilds and
the earlier subject deleted during it are written beforehand without Ray; the re-run synthesizes
and trains nothing. Run inside a network namespace (``make test`` does).
"""

from __future__ import annotations

import hashlib
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


def _delete(capsys, output: Path, subject: str, *extra: str) -> tuple[int, str]:
    """jobs/delete_subject.py's main in this process (it needs no Ray); returns (exit code, stdout + stderr)."""
    from jobs.delete_subject import main

    capsys.readouterr()
    code = main(["--output", str(output), "--subject", subject, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _delete_cli(output: Path, subject: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "delete_subject.py"), "--output", str(output),
                           "--subject", subject], capture_output=True, text=True, timeout=300)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def _earlier_output(output: Path, portrait: Path) -> tuple[str, str]:
    """An output as earlier runs left it, without building anything: ``portrait``'s subject as ingest
    recorded it, then deleted by jobs/delete_subject.py (so only its deletion record is left), and
    a trained subject of an earlier input (registry versions, checkpoints, evaluation cache, report
    page). Returns (the deleted subject's id, the trained one's)."""
    from perse_ray.config import load_config
    from perse_ray.portraits import discover_subjects
    from tests.test_serve import make_avatar

    [candidate] = [c for c in discover_subjects(portrait.parent).candidates
                   if Path(c.source_path) == portrait.resolve()]
    deleted = candidate.subject_id
    (output / "synth").mkdir(parents=True)
    (output / "synth" / "rejected.json").write_text(json.dumps({deleted: {
        "subject_id": deleted, "status": "rejected", "reason": "no face found",
        "source_path": str(portrait), "content_sha256": candidate.content_sha256}}))
    done = _delete_cli(output, deleted)
    assert done.returncode == 0 and "recorded: a re-run of build_avatars skips" in done.stdout, done.stderr
    assert find_traces(output, deleted) == [] and set(deletion_records(output)) == {candidate.content_sha256}

    earlier = "kay-0e0e0e0e"
    registry = Registry(output / "avatars")
    registry.put(earlier, make_avatar(0))
    registry.put(earlier, make_avatar(1))
    run = output / "ray_train" / load_config("tiny").training_hash() / earlier
    run.mkdir(parents=True)
    (run / "checkpoint.json").write_text(json.dumps({"subject_id": earlier, "step": 5}))
    for folder in (output / "eval" / earlier, output / "report" / earlier):
        folder.mkdir(parents=True)
        (folder / "figures.json").write_text(json.dumps({"subject_id": earlier}))
    return deleted, earlier


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_delete_subject_everywhere_rebuild_and_a_concurrent_build(ray_cluster, tiny_models, tmp_path, capsys):
    """One real build: ``--rebuild`` over an output that holds a deleted portrait's record and a
    trained subject of an earlier input, which is deleted while the build trains; then a delete of
    a subject that build made whole (frames, checkpoints, registry, evaluation, report), and a re-run
    over the deleted portraits that builds neither."""
    first = tmp_path / "in"
    first.mkdir()
    for name in ("astronaut.png", "lfw_face_000.png", "no_face_cat.jpg"):
        shutil.copy(PORTRAITS / name, first / name)
    output = tmp_path / "out"
    gone, earlier = _earlier_output(output, first / "astronaut.png")
    assert find_traces(output, earlier)

    # --rebuild brings the deleted portrait back, while the earlier subject is deleted midway:
    # what this build makes is whole and the earlier subject leaves no trace.
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run=_build(ray_cluster, first, output, "--rebuild")))
    runner.start()
    deadline = time.monotonic() + 300
    while not [p for p in (output / "ray_train").glob("*/*.lease") if not p.name.startswith(earlier)] \
            and runner.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    code, out = _delete(capsys, output, earlier)
    runner.join()
    built = result["run"]
    assert code == 0 and "deleted kay-0e0e0e0e: 2 registry version(s)" in out, out
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert f"[rebuild] {gone}: deleted before, built again" in built.stdout
    assert find_traces(output, earlier) == [], find_traces(output, earlier)
    assert deletion_records(output) == {}
    ids = _subjects(output)
    assert set(ids) == {"astronaut", "lfw-face-000"} and ids["astronaut"] == gone, ids
    kept = ids["lfw-face-000"]
    cat = next(sid for sid in json.loads((output / "synth" / "rejected.json").read_text()))
    for sid in (gone, kept):
        assert (output / "synth" / "frames" / f"subject_id={sid}" / "_COMPLETE").is_file()
        assert (output / "eval" / sid).is_dir() and (output / "report" / sid).is_dir()
        assert sid in (output / "report" / "index.html").read_text()
    assert find_traces(output, gone)
    kept_files = {p: p.read_bytes() for p in (output / "avatars" / kept).rglob("*") if p.is_file()}

    code, out = _delete(capsys, output, gone)
    assert code == 0, out
    assert find_traces(output, gone) == [], find_traces(output, gone)
    assert (first / "astronaut.png").is_file()  # the source belongs to the user
    audit = [json.loads(line) for line in (output / AUDIT_FILE).read_text().splitlines()]
    assert audit[-1]["subject"] == gone and audit[-1]["outcome"] == "deleted" and audit[-1]["key_id"].startswith("cli:")
    assert [r["subject_id"] for r in deletion_records(output).values()] == [gone]
    assert set(json.loads((output / DELETIONS_FILE).read_text())["deleted"]) == {_sha(first / "astronaut.png")}
    code, out = _delete(capsys, output, gone)
    assert code == 0 and "nothing left to delete" in out
    assert {p: p.read_bytes() for p in (output / "avatars" / kept).rglob("*") if p.is_file()} == kept_files
    # A rejected portrait's records go too.
    code, out = _delete(capsys, output, cat)
    assert code == 0 and find_traces(output, cat) == [], out

    # A re-run over the folder that still holds both deleted portraits builds neither of them.
    rerun = _build(ray_cluster, first, output, "--no-evaluation")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"[deleted] {gone}: its portrait was deleted on request" in rerun.stdout
    assert f"[deleted] {cat}" in rerun.stdout
    assert "0 trained, 1 skipped" in rerun.stdout, rerun.stdout[-3000:]
    assert set(_subjects(output)) == {"lfw-face-000"}
    for sid in (gone, cat, earlier):
        assert find_traces(output, sid) == [], (sid, find_traces(output, sid))
    assert {p: p.read_bytes() for p in (output / "avatars" / kept).rglob("*") if p.is_file()} == kept_files
