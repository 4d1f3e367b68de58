"""The gRPC front-end (``perse.v1.Renderer``, serve/render.proto): methods the Ingress deployment mixes in.

Serve's gRPC proxy hands each method the request's raw bytes (``serve.grpc_servicer`` registers
them without a deserializer), so a malformed message is answered INVALID_ARGUMENT and an
oversized one RESOURCE_EXHAUSTED. Refusals carry ``ApiError``'s gRPC code and message.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from serve import render_pb2
from serve.api import DEFAULT_SIDE, ApiError, Catalog, Snapshot


def _set_status(grpc_context, error: ApiError) -> None:
    grpc_context.set_code(error.grpc_code)
    grpc_context.set_details(error.message)


def listing_reply(snapshot: Snapshot) -> render_pb2.ListAvatarsReply:
    return render_pb2.ListAvatarsReply(avatars=[
        render_pb2.AvatarInfo(id=s["id"], version=s["version"], expressions=s["expressions"],
                              attributes=[render_pb2.Attribute(name=n, edit_labels=labels)
                                          for n, labels in s["attributes"].items()])
        for s in snapshot.listing])


class GrpcApi:
    """``Render`` and ``ListAvatars`` for a class with ``cfg`` (ServeConfig), ``catalog`` (Catalog) and
    ``async call(method, job)`` (the Renderer). Both answer validation and listings from memory."""

    catalog: Catalog
    _grpc_listing: tuple[int, render_pb2.ListAvatarsReply] = (-1, render_pb2.ListAvatarsReply())

    async def Render(self, request: bytes, grpc_context) -> render_pb2.RenderReply:  # noqa: N802
        try:
            msg = self._parse(request, render_pb2.RenderRequest)
            job = self.catalog.job(msg.avatar_id, attributes=dict(msg.attributes), expression=dict(msg.expression),
                                   latent=list(msg.latent) or None, yaw=msg.yaw, pitch=msg.pitch,
                                   width=msg.width if msg.HasField("width") else DEFAULT_SIDE,
                                   height=msg.height if msg.HasField("height") else DEFAULT_SIDE, camera="")
            png = await self.call("render", job)
            return render_pb2.RenderReply(png=png, width=job.spec.width, height=job.spec.height)
        except ApiError as e:
            _set_status(grpc_context, e)
            return render_pb2.RenderReply()

    async def ListAvatars(self, request: bytes, grpc_context) -> render_pb2.ListAvatarsReply:  # noqa: N802
        try:
            self._parse(request, render_pb2.ListAvatarsRequest)
        except ApiError as e:
            _set_status(grpc_context, e)
            return render_pb2.ListAvatarsReply()
        snapshot = self.catalog.snapshot
        generation, reply = self._grpc_listing
        if generation != snapshot.generation:  # built once per registry change
            reply = listing_reply(snapshot)
            self._grpc_listing = (snapshot.generation, reply)
        return reply

    def _parse(self, raw: bytes, message_type):
        if len(raw) > self.cfg.max_body_bytes:
            raise ApiError(413, f"request: larger than {self.cfg.max_body_bytes} bytes")
        try:
            return message_type.FromString(raw)
        except DecodeError as e:
            raise ApiError(400, f"request: malformed {message_type.__name__}: {e}") from None
