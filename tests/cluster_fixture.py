"""Pytest fixtures for a multi-node Ray cluster on this machine (scripts/local_cluster.py).

Every node runs in its own network namespace on a private bridge inside one outer namespace the
cluster creates itself, so pytest can run on the host network or inside ``scripts/isolated``.
Tests talk to the cluster as a user would: ``cluster.submit([...])`` is ``ray job submit`` run
inside the cluster's network; ``cluster.ray_nodes()`` reads Ray's node table from the dashboard.

Use in a test module (no conftest change needed)::

    from tests.cluster_fixture import local_cluster_factory, ray_multinode  # noqa: F401

    @pytest.mark.ray
    @pytest.mark.timeout(180)
    def test_x(ray_multinode):                     # head (2 CPUs) + 2 workers (2 CPUs), shared
        ray_multinode.submit(["python", "-c", "import ray; ray.init(); print(ray.nodes())"])

    def test_y(local_cluster_factory):             # a cluster of your own shape
        c = local_cluster_factory(workers=3, cpus_worker=1, output=tmp_path / "out")
        c.kill_node("w2"); c.add_worker()

or as a plugin: ``pytest_plugins = ["tests.cluster_fixture"]`` in the root conftest.py.
Clusters are skipped (not failed) where namespaces cannot be made (not root, no unshare/ip).
Every cluster a fixture starts is stopped at teardown, and the teardown fails if any process is
left in the cluster's namespaces.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SCRIPT = REPO / "scripts" / "local_cluster.py"

# Fast node-death detection for tests: about 5-7 s instead of Ray's default 15-30 s. Not so
# tight that a node on two busy cores is declared dead by mistake.
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 5,
}


def load_local_cluster():
    """The scripts/local_cluster.py module (scripts/ is not a package)."""
    mod = sys.modules.get("local_cluster")
    if mod is not None and getattr(mod, "__file__", None) == str(_SCRIPT):
        return mod
    spec = importlib.util.spec_from_file_location("local_cluster", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["local_cluster"] = mod
    spec.loader.exec_module(mod)
    return mod


LocalCluster = load_local_cluster().LocalCluster


def cannot_start_reason() -> str | None:
    """Why a LocalCluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("unshare", "nsenter", "ip", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not (REPO / ".venv" / "bin" / "ray").exists():
        return "needs .venv/bin/ray"
    return None


@pytest.fixture
def local_cluster_factory():
    """``make(**LocalCluster kwargs) -> started LocalCluster``; all are stopped afterwards.
    Defaults: FAST_HEALTH_CHECKS, OMP_NUM_THREADS=1 (set for every node process)."""
    reason = cannot_start_reason()
    if reason:
        pytest.skip(reason)
    started = []

    def make(**kwargs):
        kwargs.setdefault("system_config", dict(FAST_HEALTH_CHECKS))
        c = LocalCluster(**kwargs)
        started.append(c)
        return c.start()

    yield make
    problems = []
    for c in reversed(started):
        c.stop()
        left = c.leftovers()
        if left:
            problems.append(f"{c.root}: {left}")
    assert not problems, f"processes left behind: {problems}"


@pytest.fixture(scope="module")
def ray_multinode(tmp_path_factory):
    """One cluster per test module: head (2 CPUs) + 2 worker nodes (2 CPUs each), 300 MB object
    store per node, ``output`` a shared temp dir (``cluster.output``)."""
    reason = cannot_start_reason()
    if reason:
        pytest.skip(reason)
    c = LocalCluster(workers=2, cpus_head=2, cpus_worker=2,
                     output=tmp_path_factory.mktemp("cluster-out"),
                     system_config=dict(FAST_HEALTH_CHECKS))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()
    left = c.leftovers()
    assert not left, f"processes left behind: {left}"
