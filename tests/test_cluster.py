"""The multi-node cluster on one machine (scripts/local_cluster.py): a head and two worker nodes in
their own network namespaces, reached the way a user reaches a real cluster (ray job submit).

The tests share one cluster and run in file order: see 3 nodes, spread a job's tasks over them,
kill a node as a unit and add one while a job runs, remove one gracefully, tear down and find
nothing left. About 80 s on 2 cores.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.cluster_fixture import ray_multinode  # noqa: E402,F401  (fixture)
from tests.cluster_fixture import load_local_cluster  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BRIDGE_NET = ipaddress.ip_network("10.213.7.0/24")

SPREAD = """
import json, os, ray
ray.init()
@ray.remote(num_cpus=0.5, scheduling_strategy="SPREAD")
def where(i):
    import time
    time.sleep(0.3)
    return ray.util.get_node_ip_address(), os.getcwd(), open("marker.txt").read()
out = ray.get([where.remote(i) for i in range(12)])
print("RESULT " + json.dumps({"tasks": out, "driver": ray.util.get_node_ip_address(),
                              "driver_cwd_exists": os.path.isdir(os.getcwd())}))
"""

# Rounds of SPREAD tasks until a round uses a node that was not there at the start.
ROUNDS = """
import json, time, ray
ray.init()
@ray.remote(num_cpus=0.5, scheduling_strategy="SPREAD", max_retries=5)
def where():
    time.sleep(0.5)
    return ray.util.get_node_ip_address()
first, deadline = None, time.time() + 100
while time.time() < deadline:
    ips = sorted(set(ray.get([where.remote() for _ in range(6)])))
    print("ROUND " + json.dumps(ips), flush=True)
    first = first or set(ips)
    if set(ips) - first:
        break
"""


def _rounds(logs: str) -> list[list[str]]:
    return [json.loads(line[len("ROUND "):]) for line in logs.splitlines()
            if line.startswith("ROUND [")]


def _result(proc) -> dict:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"no RESULT line (rc {proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")


@pytest.mark.timeout(150)
def test_three_nodes_on_the_bridge(ray_multinode):
    c = ray_multinode
    nodes = c.wait_nodes(alive=3, timeout=30)
    ips = {n["node_ip"] for n in nodes}
    assert len(ips) == 3, nodes
    assert all(ipaddress.ip_address(ip) in BRIDGE_NET for ip in ips), ips
    assert sum(n["is_head_node"] for n in nodes) == 1
    # each node has its own network namespace, processes and Ray temp dir (its own disk)
    mine = c.nodes()
    assert len({n["netns_inode"] for n in mine}) == 3
    for n in mine:
        assert c.node_pids(n["name"]), n
        sessions = list((c.root / "nodes" / n["name"] / "ray").glob("session_2*"))
        assert len(sessions) == 1, (n["name"], sessions)
    # the outer namespace reaches the head over the bridge, not loopback
    route = c.run(["ip", "route", "get", "10.213.7.1"], check=True).stdout
    assert "dev pcbr0" in route, route


@pytest.mark.timeout(150)
def test_job_spreads_tasks_over_nodes(ray_multinode, tmp_path):
    c = ray_multinode
    (tmp_path / "marker.txt").write_text("uploaded")
    proc = c.submit(["python", "-c", SPREAD], working_dir=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = _result(proc)
    assert out["driver"] == "10.213.7.1"  # the job's driver runs on the head
    assert out["driver_cwd_exists"]
    used = {ip for ip, _, _ in out["tasks"]}
    assert len(used) > 1, out
    assert all(text == "uploaded" for _, _, text in out["tasks"])
    # every node unpacked the working dir on its own disk (same path, separate copies)
    by_ip = {n["ip"]: n["name"] for n in c.nodes()}
    for ip in used:
        copies = list((c.root / "nodes" / by_ip[ip] / "ray").glob(
            "session_*/runtime_resources/working_dir_files/*/marker.txt"))
        assert copies, (ip, by_ip[ip])


@pytest.mark.timeout(150)
def test_nodes_leave_and_join_while_a_job_runs(ray_multinode):
    c = ray_multinode
    c.wait_nodes(alive=3, timeout=30)
    job_id = f"rounds-{os.getpid()}"
    proc = c.submit(["python", "-c", ROUNDS], extra=["--no-wait", "--submission-id", job_id],
                    timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deadline = time.monotonic() + 60
    while not _rounds(c.job_logs(job_id)):  # the job is using the three nodes
        assert c.job(job_id)["status"] in ("PENDING", "RUNNING"), c.job_logs(job_id)[-3000:]
        assert time.monotonic() < deadline, c.job_logs(job_id)[-3000:]
        time.sleep(0.5)

    # leave: killed as a unit -- every process in its namespace, at once
    victim = c.node("w1")
    pids = c.node_pids("w1")
    assert len(pids) >= 3, pids  # ray start, raylet, agents, workers …
    result = c.kill_node("w1")
    assert result["node"]["state"] == "killed"
    assert not c.node_pids("w1")
    ns = f"net:[{victim['netns_inode']}]"
    for pid in pids:  # gone (a zombie has no namespace links)
        try:
            assert os.readlink(f"/proc/{pid}/ns/net") != ns, pid
        except OSError:
            pass
    nodes = c.wait_nodes(alive=2, dead=1, timeout=60)
    assert [n["node_ip"] for n in nodes if n["state"] == "DEAD"] == [victim["ip"]]

    # join: a new node registers and the running job starts using it
    name = c.add_worker(cpus=2)
    new_ip = c.node(name)["ip"]
    assert new_ip != victim["ip"]
    nodes = c.wait_nodes(alive=3, timeout=60)
    assert new_ip in {n["node_ip"] for n in nodes if n["state"] == "ALIVE"}
    info = c.wait_job(job_id, timeout=90)
    logs = c.job_logs(job_id)
    assert info["status"] == "SUCCEEDED", logs[-3000:]
    rounds = _rounds(logs)
    assert any(victim["ip"] in r for r in rounds), logs[:4000]
    assert new_ip in rounds[-1] and victim["ip"] not in rounds[-1], rounds


@pytest.mark.timeout(120)
def test_teardown_leaves_nothing(ray_multinode):
    c = ray_multinode
    lc = load_local_cluster()
    mem = c.memory()  # RSS / PSS of the live nodes (printed with -s)
    print("cluster memory:", json.dumps(mem))
    # a graceful leave: the node says goodbye, Ray marks it dead without waiting for health checks
    worker = next(n for n in c.nodes() if n["role"] == "worker" and n["state"] == "alive")
    alive = sum(n["state"] == "ALIVE" for n in c.ray_nodes())
    assert c.remove_node(worker["name"])["node"]["state"] == "removed"
    assert not c.node_pids(worker["name"])
    c.wait_nodes(alive=alive - 1, timeout=30)
    nodes = c.nodes()
    inodes = [n["netns_inode"] for n in nodes] + [c.inodes["outer_netns"]]
    c.stop()
    assert not c.alive()
    assert c.leftovers() == {}
    for inode in inodes:
        assert lc.host_pids_in_ns("net", inode) == []
    assert lc.host_pids_in_ns("pid", c.inodes["pidns"]) == []
    assert not c.root.exists()
    leftover = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if str(c.root).encode() in cmd:
                leftover.append((entry, cmd[:200]))
    assert leftover == []
