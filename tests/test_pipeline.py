"""The synthesis graph end to end on Ray (tiny preset), re-runs, resumes, and the CLI's checks.

Ray tests run inside a private network namespace (see conftest.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from perse_ray.config import load_config
from perse_ray.portraits import decode_png, discover_subjects
from perse_ray.schema import validate
from perse_ray.synth.motion import motion_script, script_from_json
from perse_ray.synth.write import COMPLETE, FramesWriter, OutputFolder

from test_portraits import build_hostile_folder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))
import synthesize as cli  # noqa: E402

OK_INPUTS = {"copy of grace.jpg", "cmyk.jpg", "multi-shot", "astronaut.png"}


@pytest.fixture(scope="module")
def first_run(ray_cluster, tiny_models, tmp_path_factory):
    from perse_ray.pipeline import synthesize

    base = tmp_path_factory.mktemp("e2e")
    root = build_hostile_folder(base / "in")
    cfg = load_config("tiny")
    discovery = discover_subjects(root)
    # A file that vanishes between discovery and ingest makes its row raise inside the actor:
    # that subject must be quarantined with the stage's name, the dataset must go on.
    (root / "..jpg").unlink()
    logs: list[str] = []
    summary = synthesize(cfg, discovery, base / "out", log=logs.append)
    return base, cfg, summary, logs


def _frames(out: Path) -> pa.Table:
    return pads.dataset(out / "frames", format="parquet", partitioning="hive").to_table()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_every_input_is_accounted_for(first_run):
    base, cfg, summary, logs = first_run
    out = base / "out"
    assert sorted(p.name for p in base.iterdir()) == ["in", "out"]  # nothing written beside the output
    subjects = validate(pq.read_table(out / "subjects.parquet"), "subjects").to_pylist()
    by_name = {Path(r["source_path"]).name: r for r in subjects}
    assert set(by_name) == {p.name for p in (base / "in").iterdir()} | {"..jpg"}
    assert {n for n, r in by_name.items() if r["status"] == "ok"} == OK_INPUTS
    for name, r in by_name.items():
        assert r["reason"], name  # every row says why (or how the face was chosen)
        assert r["subject_id"].replace("-", "").isalnum() and r["subject_id"].isascii()
    assert by_name["..jpg"]["reason"].startswith("ingest: FileNotFoundError")
    assert by_name["two-faces.png"]["reason"].startswith("2 faces without a dominant one")
    assert by_name["truncated.jpg"]["reason"].startswith("truncated or corrupt image")
    assert by_name["notes.txt"]["reason"].startswith("skipped: not an image file")
    assert by_name["grace_hopper.jpg"]["reason"] == f"duplicate of {by_name['copy of grace.jpg']['subject_id']}"
    assert summary["subjects"] == {"ok": 4, "quarantined": len(subjects) - 4, "total": len(subjects)}
    assert summary["reasons"]["no face found"] == 5 and summary["synthesis_hash"] == cfg.synthesis_hash()
    # the vanished file is a failure (an ingest error); ingest's decisions (no face, …) are not
    assert list(summary["failed"]) == [by_name["..jpg"]["subject_id"]]
    assert set(summary["seconds_per_stage"]) == {"ingest", "edit", "animate", "morph", "id_filter"}
    assert all(v > 0 for v in summary["seconds_per_stage"].values())
    assert any("[write]" in line and "15 frames complete" in line for line in logs)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_frames_follow_the_schema_and_the_shared_motion(first_run):
    base, cfg, summary, _ = first_run
    out = base / "out"
    script = motion_script(cfg.synth.motion)
    assert script_from_json((out / "motion.json").read_text()) == script
    frames = _frames(out)
    ok_ids = {r["subject_id"] for r in pq.read_table(out / "subjects.parquet").to_pylist() if r["status"] == "ok"}
    assert set(frames.column("subject_id").to_pylist()) == ok_ids
    # 3 motion frames x (source + 2 edits + 2 morphs) per subject.
    assert summary["frames"]["per_subject"] == 15 and frames.num_rows == 15 * len(ok_ids)
    for part in (out / "frames").glob("subject_id=*"):
        table = validate(pq.read_table(next(part.glob("part-*.parquet"))), "frames")
        assert json.loads((part / COMPLETE).read_text())["synthesis_hash"] == cfg.synthesis_hash()
        assert table.schema.metadata[b"perse_ray.schema"] == b"frames"
    rows = frames.to_pylist()
    for r in rows:
        f = script[r["frame_index"]]
        assert r["camera"]["yaw"] == pytest.approx(f.yaw) and dict(r["expression"]) == pytest.approx(f.expression)
        assert decode_png(r["image_png"]).shape == (64, 64, 3)
        assert (r["mask_png"] is None) == (r["attribute"] == "")
        assert r["kept"] and r["id_score"] is not None  # id_threshold -1: random weights drop nothing
        if r["interpolation"] is not None:
            assert (r["interpolation"]["from_edit"], r["interpolation"]["to_edit"]) == (0, 1)
            assert r["interpolation"]["alpha"] == 0.5 and r["edit_index"] == 0
    source = [r for r in rows if r["attribute"] == ""]
    assert {(r["subject_id"], r["frame_index"]) for r in source} == {(s, i) for s in ok_ids for i in range(3)}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_rerun_skips_then_killed_run_resumes(first_run):
    from perse_ray.pipeline import synthesize

    base, cfg, first, _ = first_run
    out, root = base / "out", base / "in"
    parts = sorted((out / "frames").glob("subject_id=*"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}

    again_logs: list[str] = []
    again = synthesize(cfg, discover_subjects(root), out, log=again_logs.append)
    assert again["skipped_complete"] == 4 and again["frames"]["written_this_run"] == 0
    assert {p: p.stat().st_mtime_ns for p in parts} == stamps
    assert again["subjects"]["ok"] == 4
    # portraits ingest turned down are remembered: nothing went through the graph this time
    rejected = json.loads((out / "rejected.json").read_text())
    reasons = [r["reason"] for r in rejected.values()]
    assert len(rejected) == 10 and reasons.count("no face found") == 5
    assert all(r["synthesis_hash"] == cfg.synthesis_hash() for r in rejected.values())
    assert not any("FileNotFoundError" in r for r in reasons)  # an error, not a decision: retried
    assert sum("turned down at ingest before" in line for line in again_logs) == 10
    assert again["reasons"]["no face found"] == 5 and set(again["seconds_per_stage"].values()) == {0.0}

    # A killed run: one partition lost its completion marker, another run left a staging folder
    # with a half-written part and a temp file beside the outputs.
    victim = parts[0]
    (victim / COMPLETE).unlink()
    dead = out / "frames" / ".staging-deadbeef" / victim.name
    dead.mkdir(parents=True)
    (dead / "part-00000.parquet").write_bytes(b"PAR1 half")
    (out / ".subjects.parquet.1234.tmp").write_bytes(b"half")
    logs: list[str] = []
    resumed = synthesize(cfg, discover_subjects(root), out, log=logs.append)
    assert resumed["skipped_complete"] == 3 and resumed["frames"]["written_this_run"] == 15
    assert (victim / COMPLETE).exists() and not list((out / "frames").glob(".staging-*"))
    assert not list(out.glob(".*.tmp"))
    assert _frames(out).num_rows == 60 and resumed["subjects"]["ok"] == 4


def _subject_row(sid: str) -> dict:
    return {"kind": "subject", "subject_id": sid, "source_path": f"/in/{sid}.jpg", "content_sha256": "0" * 64,
            "status": "ok", "reason": "dominant face 100 px", "face_box": [0, 0, 1, 1],
            "landmarks": [[0.0, 0.0]] * 68, "identity": [0.0], "portrait_png": b"x"}


def _frame_row(sid: str, index: int) -> dict:
    from perse_ray.camera import camera_record

    return {"kind": "frame", "subject_id": sid, "attribute": "", "edit_index": 0, "frame_index": index,
            "camera": camera_record(0, 0, 8, 8, 30, 1), "expression": {"smile": 0.0},
            "image_png": b"png", "kept": True, "id_score": 0.9, "id_source": "detector",
            "seconds": {"id_filter": 0.5}}


def test_writer_completes_partitions_only_when_whole(tmp_path):
    from perse_ray.pipeline import stream_table

    folder = OutputFolder(tmp_path / "out", "hash1")
    folder.prepare()
    writer = FramesWriter(folder, expected_frames=2, log=lambda _: None)
    writer.add_block(stream_table([_subject_row("a-1"), _frame_row("a-1", 0), _subject_row("b-2")]))
    final = folder.frames_dir / "subject_id=a-1"
    assert not final.exists()  # one of two frames: still staged where readers do not look
    writer.add_block(stream_table([_frame_row("a-1", 1), _frame_row("b-2", 0),
                                   {"kind": "error", "subject_id": "b-2", "stage": "morph", "error": "boom"}]))
    assert (final / COMPLETE).exists() and len(list(final.glob("part-*.parquet"))) == 2
    assert writer.seconds["id_filter"] == pytest.approx(1.5)
    rows = {r["subject_id"]: r for r in writer.finish({})}
    assert rows["a-1"]["status"] == "ok"
    assert rows["b-2"]["status"] == "quarantined" and rows["b-2"]["reason"] == "morph: boom"
    assert not (folder.frames_dir / "subject_id=b-2").exists()
    assert list(OutputFolder(tmp_path / "out", "hash1").prepare()) == ["a-1"]
    # a second run on the folder waits for the first (then finds its subjects complete)
    said, entered = [], threading.Event()

    def second_run():
        with OutputFolder(tmp_path / "out", "hash1", log=said.append).exclusive():
            entered.set()

    with OutputFolder(tmp_path / "out", "hash1").exclusive():
        waiter = threading.Thread(target=second_run)
        waiter.start()
        time.sleep(0.5)
        assert not entered.is_set() and said == [f"output {tmp_path / 'out'} is in use by another run: waiting for it"]
    waiter.join(10)
    assert entered.is_set()
    # another synthesis config: the partition stays (training refuses it) until rewritten, and it is said
    lines = []
    assert OutputFolder(tmp_path / "out", "other-config", log=lines.append).prepare() == {}
    assert final.exists() and lines == ["1 frames partition(s) were made by synthesis config hash1, not other-config: "
                                        "training refuses them; each is replaced when this run synthesizes its subject"]


def test_damaged_partition_is_redone(tmp_path):
    from perse_ray.pipeline import stream_table

    folder = OutputFolder(tmp_path / "out", "h")
    folder.prepare()
    writer = FramesWriter(folder, expected_frames=1, log=lambda _: None)
    writer.add_block(stream_table([_subject_row("a-1"), _frame_row("a-1", 0)]))
    part = folder.frames_dir / "subject_id=a-1"
    assert list(OutputFolder(tmp_path / "out", "h").prepare()) == ["a-1"]
    (part / "part-00000.parquet").write_bytes(b"PAR1 not really")
    assert OutputFolder(tmp_path / "out", "h").prepare() == {} and not part.exists()


def test_cli_refuses_bad_arguments_before_ray(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert cli.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--preset", "cpu"]) == 2
    assert "is empty" in capsys.readouterr().err
    shutil.copy(Path(__file__).with_name("test_portraits.py"), tmp_path / "in" / "x.txt")
    (tmp_path / "file").write_text("x")
    assert cli.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "file"), "--preset", "cpu"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "in" / "o"), "--preset", "cpu"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert cli.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--preset", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--preset", "cpu",
                     "--set", "synth.nope=1"]) == 2
    assert "unknown key synth.nope" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "--preset" in capsys.readouterr().out


def test_resources_and_model_checks():
    from perse_ray.models import ModelNotFoundError
    from perse_ray.pipeline import check_resources, frames_per_subject, resolve_models

    cfg = load_config("cpu", ["machine.actors_per_stage=2"])
    with pytest.raises(RuntimeError, match=r"synthesis needs 6 CPU \(10 actors x 0.5 \+ 1 for its tasks\), the cluster has 5"):
        check_resources(cfg, {"CPU": 5.0})
    check_resources(cfg, {"CPU": 6.0})
    # the hang measured on a 1 + 2 CPU cluster: 5 cpu-smoke actors took 2.5 CPUs, no task could run
    with pytest.raises(RuntimeError, match="synthesis needs 3.5 CPU .*, the cluster has 3"):
        check_resources(load_config("cpu-smoke"), {"CPU": 3.0})
    cpu = load_config("cpu")  # 3 attributes × 2 edits, 2 morph alphas per adjacent pair, 12 combined frames
    assert frames_per_subject(cpu) == cpu.synth.motion.num_frames * (1 + 6 + 6 * 2) + 12
    assert resolve_models(load_config("cpu")).synth.edit_model == "timbrooks/instruct-pix2pix"  # unused: untouched
    with pytest.raises(ModelNotFoundError, match="/missing/ip2p"):
        resolve_models(load_config("gpu", ["synth.edit_model=/missing/ip2p"]))
    np.testing.assert_equal(resolve_models(load_config("gpu")).faces.model, "buffalo_l")


def test_a_graph_that_stalls_on_a_shrunken_cluster_fails_naming_the_shortfall():
    from perse_ray.pipeline import watch_progress

    def blocks(stall_after, pause_s=30.0, then=("never",)):
        yield from range(stall_after)
        time.sleep(pause_s)  # no output for a while: the graph's actors lost their node, or are slow
        yield from then

    needs = {"CPU": 3.5, "GPU": 0.0}
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="no progress for 1 s: it needs 3.5 CPU, the cluster has 2 "):
        assert list(watch_progress(blocks(2), needs, lambda: {"CPU": 2.0}, 1.0)) == [0, 1]
    assert time.monotonic() - start < 10
    # on a cluster that still holds the graph it only says so, and the blocks go on
    lines = []
    assert list(watch_progress(blocks(2, 1.6, [2]), needs, lambda: {"CPU": 4.0}, 0.5, lines.append)) == [0, 1, 2]
    assert lines and "still waiting" in lines[0]
