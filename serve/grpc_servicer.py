"""Registers the ``perse.v1.Renderer`` gRPC service on Serve's gRPC proxy (``grpc_servicer_functions``).

The methods take the request's raw bytes: the Ingress deployment parses them itself, so a malformed
message is answered INVALID_ARGUMENT and an oversized one RESOURCE_EXHAUSTED (grpcio's own parser
would answer INTERNAL). Kept apart from app.py so the proxy does not import torch.
"""

from __future__ import annotations

import grpc

from serve import render_pb2

SERVICE = "perse.v1.Renderer"
REPLIES = {"Render": render_pb2.RenderReply, "ListAvatars": render_pb2.ListAvatarsReply}


def add_RendererServicer_to_server(servicer, server) -> None:  # noqa: N802 (grpc naming convention)
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=None,
                                                          response_serializer=reply.SerializeToString)
                for name, reply in REPLIES.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
