"""Distributed training on Ray: a Tune grid over subjects, Ray Train DDP per subject, checkpoints
and resume after a killed worker or a killed driver. Run inside a private network namespace:

    scripts/isolated env OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_distributed.py -q
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from perse_ray.bench.ground_truth import frames_from_head
from perse_ray.bench.procedural import ProceduralHead
from perse_ray.config import load_config
from perse_ray.registry import Registry
from perse_ray.train.data import discover, write_partition

REPO = Path(__file__).resolve().parent.parent
TINY = ["synth.resolution=32", "render.width=24", "render.height=24", "synth.motion.num_frames=5",
        "synth.morph_alphas=[0.5]", "avatar.num_gaussians=200", "avatar.hidden_dim=16", "avatar.feature_dim=8",
        "train.batch_size=2", "machine.log_every=5", "train.holdout_fraction=0.25", "train.relocate_every=10",
        "machine.checkpoint_every=5"]
STEPS = 40  # the two-worker runs: eight checkpoints, so a kill can land between two of them


def tiny_config(steps: int):
    return load_config("cpu-smoke", TINY + [f"train.steps={steps}"])


@pytest.fixture(scope="module")
def rows():
    return frames_from_head(ProceduralHead(seed=0), tiny_config(STEPS))


@pytest.fixture(scope="module")
def synth(tmp_path_factory, rows):
    """A synthesis output: alice and bob (the same procedural head), carol with every frame dropped."""
    root = tmp_path_factory.mktemp("synth")
    for sid in ("alice", "bob"):
        write_partition(root, sid, rows, tiny_config(STEPS))
    write_partition(root, "carol", [{**r, "kept": False, "drop_reason": "identity drift"} for r in rows],
                    tiny_config(STEPS))
    return root


def registry_files_are_clean(avatars: Path) -> list[str]:
    """Paths under the registry that are not avatar files (safetensors, JSON) or the index."""
    return [str(p.relative_to(avatars)) for p in avatars.rglob("*")
            if not p.is_dir() and p.suffix not in (".safetensors", ".json")
            and p.name not in ("index.jsonl", ".index.lock")
            or p.is_dir() and p.name.startswith(".")]


def test_discover_reports_why_a_subject_cannot_train(tmp_path, synth, rows):
    found = {s.subject_id: s for s in discover(synth)}
    assert [s for s in found if found[s].trainable] == ["alice", "bob"]
    assert found["alice"].kept == len(rows)
    assert found["carol"].problem == f"all {len(rows)} frames dropped (identity drift x{len(rows)})"
    half = write_partition(tmp_path, "dave", rows[:3], tiny_config(STEPS))
    (half / "_COMPLETE").unlink()  # a partition the synthesis job never finished
    (tmp_path / "frames" / ".staging-x" / "subject_id=erin").mkdir(parents=True)
    assert [(s.subject_id, s.problem) for s in discover(tmp_path)] == [
        ("dave", "frames partition incomplete (no _COMPLETE marker)")]
    assert discover(tmp_path, ["frank"])[0].problem == "no frames partition"


def test_frames_made_by_another_synthesis_config_are_refused(tmp_path, rows):
    made_by, trains = tiny_config(STEPS), tiny_config(STEPS)
    part = write_partition(tmp_path, "alice", rows, made_by)
    # a training setting changes nothing for the frames: they train
    assert discover(tmp_path, None, load_config("cpu-smoke", TINY + ["train.steps=7"]))[0].trainable
    # a synthesis setting does: refused, naming both hashes
    other = load_config("cpu-smoke", TINY + ["synth.motion.num_frames=6"])
    [found] = discover(tmp_path, None, other)
    assert not found.trainable and made_by.synthesis_hash() in found.problem \
        and other.synthesis_hash() in found.problem and "re-run synthesis" in found.problem
    # frames from before stage hashes carry the old single hash: adopted when it is this config's
    (part / "_COMPLETE").write_text(json.dumps({"subject_id": "alice", "frames": len(rows),
                                                "config_hash": trains.legacy_hash()}))
    assert discover(tmp_path, None, trains)[0].trainable
    assert not discover(tmp_path, None, load_config("cpu-smoke", TINY + ["train.steps=7"]))[0].trainable

    # jobs/train.py refuses them before Ray starts, with the message (exit 2: nothing could train)
    (part / "_COMPLETE").write_text(json.dumps({"subject_id": "alice", "frames": len(rows),
                                                "synthesis_hash": made_by.synthesis_hash()}))
    sets = [arg for item in TINY + ["synth.motion.num_frames=6"] for arg in ("--set", item)]
    run = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--frames", str(tmp_path), "--output",
                          str(tmp_path / "out"), "--preset", "cpu-smoke", *sets], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "no subject can train: frames were made by synthesis config" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _train_worker_pids() -> list[int]:
    """This session's Ray Train worker processes (Ray titles them after the actor class)."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def _recorded_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has recorded for a run (a report is recorded a poll later)."""
    try:
        results = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return [int(r["metrics"].get("step", r["metrics"].get("steps", 0))) for r in results]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_subjects_two_workers_each_one_worker_killed_mid_run(ray_cluster, synth, tmp_path):
    """alice and bob train the same frames side by side; once both have a recorded checkpoint one
    training worker (of either) is killed: that subject resumes and must end where the other did."""
    from perse_ray.train.distributed import train_subjects

    cfg = tiny_config(STEPS)
    run_root = tmp_path / "ray_train" / cfg.training_hash()
    killed_at: list[int] = []
    done = threading.Event()

    def kill_a_worker_mid_run():
        while not done.is_set():
            steps = [_recorded_steps(run_root / sid) for sid in ("alice", "bob")]
            pids = _train_worker_pids()
            if all(steps) and max(map(max, steps)) < STEPS and pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed_at.append(min(map(max, steps)))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_mid_run)
    killer.start()
    lines: list[str] = []
    try:
        results = {r.subject_id: r for r in train_subjects(synth, tmp_path, cfg, workers_per_subject=2,
                                                            log=lines.append)}
    finally:
        done.set()
        killer.join()

    assert results["carol"].status == "failed" and "frames dropped" in results["carol"].reason
    assert killed_at, "no training worker was killed mid-run"
    [killed] = [r for r in results.values() if r.resumed_from]
    [unkilled] = [r for r in results.values() if r.status == "done" and not r.resumed_from]
    for r in (killed, unkilled):
        assert (r.status, r.version, r.steps) == ("done", "v0001", STEPS), r
    assert killed_at[0] <= killed.resumed_from < STEPS
    assert abs(killed.heldout_psnr - unkilled.heldout_psnr) < 0.5, (killed, unkilled)
    assert unkilled.heldout_psnr > 15
    assert any(line.startswith(f"[train] alice: step 10/{STEPS}") for line in lines)

    registry = Registry(tmp_path / "avatars")
    assert [(e.subject_id, e.version) for e in registry.list()] == [("alice", "v0001"), ("bob", "v0001")]
    indexed = {e.subject_id: e for e in registry.latest()}
    assert indexed["bob"].version == "v0001"
    assert indexed["bob"].metrics["heldout_psnr"] == pytest.approx(results["bob"].heldout_psnr)
    avatar = registry.load("alice")
    assert avatar.meta["config_hash"] == cfg.training_hash() and avatar.meta["metrics"]["steps"] == STEPS
    assert registry_files_are_clean(tmp_path / "avatars") == []
    # Ray's state (Tune's pickles) lives beside the registry, never in it; spent checkpoints are gone
    assert list(run_root.glob("_tune-*/tuner.pkl")) and not (run_root / "alice").exists()


LEASE_TTL = 25  # seconds: longer than a re-run's start, so it meets the dead job's lease still valid


def _job(synth: Path, out: Path, steps: int, log: Path, subjects: str = "alice,bob,dave", mode: str = "w",
         concurrent: int = 1) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}
    sets = [arg for item in TINY + [f"train.steps={steps}"] for arg in ("--set", item)]
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), "--frames", str(synth), "--output",
                             str(out), "--preset", "cpu-smoke", "--workers-per-subject", "1", "--max-concurrent",
                             str(concurrent), "--subjects", subjects, "--lease-ttl", str(LEASE_TTL), *sets],
                            stdout=log.open(mode), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _end_session(job: subprocess.Popen) -> None:
    """End a job at once, as a lost machine would: its driver, the Ray it started and every Ray worker
    (some leave the job's process group), all in the same instant."""
    for pid in [job.pid, *_descendants(job.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_killed_job_reruns_skipping_finished_and_resuming_unfinished_subjects(rows, tmp_path):
    """The job trains alice, bob, then dave (frames the latent layout cannot take) one at a time."""
    steps = 40
    synth = tmp_path / "synth"
    cfg = tiny_config(steps)
    for sid in ("alice", "bob"):
        write_partition(synth, sid, rows, cfg)
    write_partition(synth, "dave", [{**r, "attribute": "moustache"} if r["attribute"] else r for r in rows], cfg)
    out, log = tmp_path / "out", tmp_path / "job.log"
    registry = Registry(out / "avatars")
    bob_checkpoints = out / "ray_train" / cfg.training_hash() / "bob" / "loop"
    job = _job(synth, out, steps, log)
    try:
        deadline = time.monotonic() + 240
        while not (registry.list() and list(bob_checkpoints.glob("ckpt-*"))):
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        _end_session(job)  # the job dies with alice trained and bob mid-run
    killed_at = time.monotonic()
    assert [(e.subject_id, e.version) for e in registry.list()] == [("alice", "v0001")]
    assert "[done] bob" not in log.read_text()
    assert (out / "ray_train" / cfg.training_hash() / "bob.lease").exists()  # the dead job's hold on bob

    rerun = _job(synth, out, steps, log)
    try:
        assert rerun.wait(timeout=150) == 3, log.read_text()[-3000:]  # 3: dave failed, the others are done
    finally:
        _end_session(rerun)
    text = log.read_text()
    # the dead job's lease held bob back until it expired, not longer; its checkpoints were resumed
    assert re.search(r"\[wait\] bob: another job is training it", text), text[-3000:]
    assert LEASE_TTL * 0.75 < time.monotonic() - killed_at < LEASE_TTL + 100
    assert "failed: dave: ValueError: frame attribute 'moustache'" in text
    assert re.search(r"\[skip\] alice: in the registry as v0001", text), text[-3000:]
    resumed = re.search(r"\[done\] bob: v0001, 40 steps .* resumed from step (\d+)", text)
    assert resumed and int(resumed.group(1)) >= 5, text[-3000:]
    assert [(e.subject_id, e.version) for e in registry.list()] == [("alice", "v0001"), ("bob", "v0001")]
    assert registry_files_are_clean(out / "avatars") == []
    assert re.search(r"^dave +failed .*ValueError: frame attribute 'moustache' is not in the latent layout", text, re.M)
    assert re.search(r"^alice +skipped +40 ", text, re.M) and re.search(r"^bob +done +40 ", text, re.M), text[-1500:]


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_two_jobs_started_together_train_each_subject_once(rows, tmp_path):
    cfg = tiny_config(20)
    synth = tmp_path / "synth"
    for sid in ("alice", "bob"):
        write_partition(synth, sid, rows, cfg)
    out = tmp_path / "out"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    jobs = [_job(synth, out, 20, log, subjects="alice,bob", concurrent=2) for log in logs]
    try:
        codes = [job.wait(timeout=300) for job in jobs]
    finally:
        for job in jobs:
            _end_session(job)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], [t[-2000:] for t in texts]
    registry = Registry(out / "avatars")
    assert [(e.subject_id, e.version) for e in registry.list()] == [("alice", "v0001"), ("bob", "v0001")]
    for sid in ("alice", "bob"):  # one job trained it; the other waited, then found it registered
        trained = [t for t in texts if re.search(rf"^{sid} +done ", t, re.M)]
        waited = [t for t in texts if re.search(rf"^{sid} +skipped .*trained by another job meanwhile", t, re.M)]
        assert len(trained) == 1 and len(waited) == 1, texts
    assert registry_files_are_clean(out / "avatars") == []


def test_the_job_refuses_a_missing_frames_folder_before_starting_ray(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--frames", str(tmp_path / "nope"),
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "does not exist" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()
    assert run.stdout == ""


@pytest.mark.parametrize("job", ["train.py", "build_avatars.py"])
@pytest.mark.parametrize("option, value, message", [
    ("--subjects", "alice,../etc", "invalid subject id"),
    ("--gpus-per-worker", "0", "must be positive"),
    ("--workers-per-subject", "two", "invalid int value"),
])
def test_both_jobs_check_the_training_options_before_starting_ray(tmp_path, job, option, value, message):
    inputs = ["--frames", str(tmp_path)] if job == "train.py" else ["--input", str(tmp_path)]
    run = subprocess.run([sys.executable, str(REPO / "jobs" / job), *inputs, "--output", str(tmp_path / "out"),
                          option, value], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and option in run.stderr and message in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()
