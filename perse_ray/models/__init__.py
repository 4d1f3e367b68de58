"""Model references: one resolver for every model stage (model id or local path), device choice.

A model string is either a local path or a hub model id. Strings may hold ``${VARS}`` and ``~``
(the ``tiny`` preset points at ``${PERSE_RAY_TINY_MODELS}/...``); they are expanded here, so every
loader accepts the same forms and names the model when it is missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_UNEXPANDED = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


class ModelNotFoundError(FileNotFoundError):
    """A model string that names neither an existing local path nor a loadable model id."""


def expand_model_ref(ref: str) -> str:
    """``${VAR}``/``$VAR`` and ``~`` expanded; an unset variable is an error that names it."""
    if not ref or not ref.strip():
        raise ModelNotFoundError("empty model reference")
    expanded = os.path.expanduser(os.path.expandvars(ref.strip()))
    leftover = _UNEXPANDED.search(expanded)
    if leftover:
        raise ModelNotFoundError(
            f"model {ref!r}: environment variable {leftover.group(1)} is not set"
            + (" (python -m perse_ray.models.tiny writes the tiny models and prints the line to set it)"
               if leftover.group(1) == "PERSE_RAY_TINY_MODELS" else ""))
    return expanded


def is_local_ref(ref: str) -> bool:
    """Paths are absolute, relative (./ ../) or exist; anything else is a hub id like ``org/name``."""
    return ref.startswith(("/", "./", "../")) or Path(ref).exists()


def resolve_model_ref(ref: str) -> str:
    """The string to hand to ``from_pretrained``/``get_model``: a checked local path or a hub id."""
    expanded = expand_model_ref(ref)
    if is_local_ref(expanded):
        path = Path(expanded)
        if not path.exists():
            raise ModelNotFoundError(f"model {ref!r}: local path {path} does not exist")
        return str(path.resolve())
    return expanded


def torch_device_dtype():
    """float16 on CUDA, float32 on CPU (CPU half kernels are slow or missing)."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32
