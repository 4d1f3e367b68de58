"""End to end through a real `ray job submit` to a head node this test starts (and ends by pid).

Two portraits plus one bad file, the ``tiny`` preset: exit 0, a report naming the quarantined
file, avatars in the registry; a second submit trains nothing; a third with more training steps
trains anew and synthesizes nothing. Run inside a network namespace (``make test`` does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path, tiny_models):
    """`ray start --head --block` in its own process group; killed by process-group id at the end."""
    port, dash = _free_port(), _free_port()
    token = tmp_path / "auth_token"
    token.write_text("perse-ray-test-token-0123456789abcdef")
    env = dict(os.environ, RAY_AUTH_TOKEN_PATH=str(token), RAY_AUTH_MODE="token", OMP_NUM_THREADS="1",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PERSE_RAY_TINY_MODELS=os.environ["PERSE_RAY_TINY_MODELS"])
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="pr-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    log = open(tmp_path / "head.log", "w")
    # Every port of its own: the session's embedded Ray (tests/conftest.py) may already hold the
    # defaults (dashboard agent, runtime-env agent, metrics), and a second node on them never serves jobs.
    agent_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "ray-client-server-port")]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
                             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=4",
                             f"--temp-dir={ray_tmp}", *agent_ports],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:  # the head goes at the end whatever happens, a start that never served jobs included
        deadline = time.time() + 180
        while time.time() < deadline:
            # Ready means a job can run: the dashboard answers `job list` before its job agent exists.
            ok = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"], env=env,
                                capture_output=True).returncode == 0
            if ok:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            time.sleep(2)
        else:
            pytest.fail("the head node did not come up: " + (tmp_path / "head.log").read_text()[-2000:])
        yield address, env
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # only what this test started
            head.wait(5)  # `ray start --block` rarely exits on SIGTERM within 30 s; the group is killed next
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        except ProcessLookupError:
            pass  # already gone
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _submit(address: str, env: dict, portraits: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/build_avatars.py", "--input", str(portraits), "--output", str(output), "--preset", "tiny",
         *extra], env=env, capture_output=True, text=True, timeout=800)


def test_ray_job_submit_builds_reports_and_resubmits_as_a_no_op(head_node, tmp_path):
    from skimage import data

    from PIL import Image

    address, env = head_node
    portraits = tmp_path / "portraits"
    portraits.mkdir()
    Image.fromarray(data.astronaut()).save(portraits / "astronaut.png")
    shutil.copy(REPO / "examples" / "portraits" / "grace_hopper.jpg", portraits)
    (portraits / "broken.jpg").write_bytes(b"not really a jpeg")
    output = tmp_path / "out"

    first = _submit(address, env, portraits, output)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert "2 trained" in first.stdout, first.stdout[-3000:]
    report = (output / "report" / "index.html").read_text()
    assert "broken.jpg" in report and "quarantined" in report
    avatars = sorted(p.parent.name for p in (output / "avatars").glob("*/v0001/avatar.json"))
    assert len(avatars) == 2

    start = time.perf_counter()
    second = _submit(address, env, portraits, output)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "0 trained, 2 skipped" in second.stdout, second.stdout[-3000:]
    assert sorted(p.parent.name for p in (output / "avatars").glob("*/v*/avatar.json")) == avatars  # no new version
    print(f"re-submit took {time.perf_counter() - start:.1f} s")

    # a training setting: every subject trains anew on the frames it has; no frame is recomputed
    parts = sorted((output / "synth" / "frames").glob("subject_id=*/*"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    third = _submit(address, env, portraits, output, "--set", "train.steps=110")
    assert third.returncode == 0, third.stdout[-4000:]
    assert "2 trained, 0 skipped" in third.stdout, third.stdout[-3000:]
    summary = json.loads((output / "synth" / "summary.json").read_text())
    assert summary["skipped_complete"] == 2 and set(summary["seconds_per_stage"].values()) == {0.0}
    assert {p: p.stat().st_mtime_ns for p in sorted((output / "synth" / "frames").glob("subject_id=*/*"))} == stamps
    retrained = sorted(p.parent.parent.name for p in (output / "avatars").glob("*/v0002/avatar.json"))
    assert retrained == sorted(p.parent.parent.name for p in (output / "avatars").glob("*/v0001/avatar.json")) \
        and len(retrained) == 2 and all(
        json.loads(p.read_text())["config"]["train"]["steps"] == 110
        for p in (output / "avatars").glob("*/v0002/avatar.json"))
