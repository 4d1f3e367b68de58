"""Shared fixtures. Ray tests share one local cluster per session (start-up costs seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is usable."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray for the whole session; 4 logical CPUs so fractional actors never starve readers.

    Run inside a private network namespace (``make test`` does): Ray binds to the outward address.
    """
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(tmp / "auth_token"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
