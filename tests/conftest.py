"""Shared fixtures. Ray tests share one local cluster per session (start-up costs seconds)."""

from __future__ import annotations

import os
import secrets

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
    if "RAY_AUTH_TOKEN_PATH" not in os.environ:
        # Ray refuses a token path whose file is missing or empty: write this session's token.
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny random-weight models (perse_ray.models.tiny) in a temp dir, PERSE_RAY_TINY_MODELS set
    for the session so the ``tiny`` preset resolves; the previous value is restored afterwards."""
    from perse_ray.models.tiny import ENV_VAR, ensure_tiny_models

    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(tmp_path_factory.mktemp("tiny-models"))
    yield ensure_tiny_models()
    if previous is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = previous
