"""Regenerates the gRPC stubs from render.proto: ``python -m serve.gen_stubs`` (from the repo root).

The stubs (render_pb2.py, render_pb2.pyi, render_pb2_grpc.py) are committed so serving needs no
grpcio-tools; tests/test_serve.py checks they match render.proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO = "serve/render.proto"


def generate(out_dir: Path = REPO) -> None:
    """Write the stubs under ``out_dir``/serve/ (imports stay ``from serve import render_pb2``)."""
    import grpc_tools
    from grpc_tools import protoc

    (out_dir / "serve").mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    rc = protoc.main(["grpc_tools.protoc", f"-I{REPO}", f"-I{include}", f"--python_out={out_dir}",
                      f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(REPO / PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)
