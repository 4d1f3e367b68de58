"""The gRPC front-end (``perse.v1.Renderer``, serve/render.proto): methods the Ingress deployment mixes in.

Serve's gRPC proxy hands each method the request's raw bytes (``serve.grpc_servicer`` registers
them without a deserializer), so a malformed message is answered INVALID_ARGUMENT and an
oversized one RESOURCE_EXHAUSTED. Refusals carry ``ApiError``'s gRPC code and message.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from perse_ray.schema import validate_subject_id
from serve import render_pb2
from serve.api import DEFAULT_SIDE, ApiError, Catalog, Snapshot
from serve.auth import Auth, AuthError, Principal


def _set_status(grpc_context, error: ApiError) -> None:
    grpc_context.set_code(error.grpc_code)
    grpc_context.set_details(error.message)


def _info(s: dict) -> render_pb2.AvatarInfo:
    return render_pb2.AvatarInfo(id=s["id"], version=s["version"], expressions=s["expressions"],
                                 attributes=[render_pb2.Attribute(name=n, edit_labels=labels)
                                             for n, labels in s["attributes"].items()])


def listing_reply(snapshot: Snapshot) -> render_pb2.ListAvatarsReply:
    return render_pb2.ListAvatarsReply(avatars=[_info(s) for s in snapshot.listing])


def _authorization(grpc_context) -> str | None:
    for key, value in grpc_context.invocation_metadata():
        if key.lower() == "authorization":
            return value
    return None


class GrpcApi:
    """``Render`` and ``ListAvatars`` for a class with ``cfg`` (ServeConfig), ``catalog`` (Catalog),
    ``auth`` (serve.auth.Auth), ``audit`` and ``async call(method, job)`` (the Renderer). Both answer
    credentials, validation and listings from memory. Credentials: the ``authorization`` metadata."""

    catalog: Catalog
    auth: Auth
    _grpc_listing: tuple[int, render_pb2.ListAvatarsReply] = (-1, render_pb2.ListAvatarsReply())

    async def Render(self, request: bytes, grpc_context) -> render_pb2.RenderReply:  # noqa: N802
        try:
            msg = self._parse(request, render_pb2.RenderRequest)
            principal = self._principal(grpc_context, "render", msg.avatar_id)
            job = self.catalog.job(msg.avatar_id, attributes=dict(msg.attributes), expression=dict(msg.expression),
                                   latent=list(msg.latent) or None, yaw=msg.yaw, pitch=msg.pitch,
                                   width=msg.width if msg.HasField("width") else DEFAULT_SIDE,
                                   height=msg.height if msg.HasField("height") else DEFAULT_SIDE, camera="")
            version = job.model_id.split("@", 1)[1]
            try:
                png = await self.call("render", job)
            except ApiError as e:
                self.audit("render", principal.key_id, f"error {e.status}", msg.avatar_id, version)
                raise
            self.audit("render", principal.key_id, "ok", msg.avatar_id, version)
            return render_pb2.RenderReply(png=png, width=job.spec.width, height=job.spec.height)
        except ApiError as e:
            _set_status(grpc_context, e)
            return render_pb2.RenderReply()

    async def ListAvatars(self, request: bytes, grpc_context) -> render_pb2.ListAvatarsReply:  # noqa: N802
        try:
            msg = self._parse(request, render_pb2.ListAvatarsRequest)
            principal = self._principal(grpc_context, "list", None)
            if msg.page_size < 0:
                raise ApiError(422, f"page_size: {msg.page_size} is negative")
            if principal.subjects is not None or msg.page_size or msg.page_token:
                items, token = self.catalog.page(msg.page_token, msg.page_size or None, principal.subjects)
                return render_pb2.ListAvatarsReply(avatars=[_info(s) for s in items], next_page_token=token)
        except ApiError as e:
            _set_status(grpc_context, e)
            return render_pb2.ListAvatarsReply()
        snapshot = self.catalog.snapshot
        generation, reply = self._grpc_listing
        if generation != snapshot.generation:  # built once per registry change
            reply = listing_reply(snapshot)
            self._grpc_listing = (snapshot.generation, reply)
        return reply

    def _principal(self, grpc_context, scope: str, avatar_id: str | None) -> Principal:
        """The caller, allowed ``scope`` on ``avatar_id``; else ApiError (401/403/404, audited for render)."""
        if avatar_id is not None:
            try:
                validate_subject_id(avatar_id)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
        principal = None
        try:
            principal = self.auth.authenticate(_authorization(grpc_context))
            avatar = self.catalog.snapshot.avatars.get(avatar_id) if avatar_id else None
            self.auth.require(principal, scope, avatar_id, avatar.entry.version if avatar else None)
        except AuthError as e:
            if scope == "render":
                self.audit("render", principal.key_id if principal else "-", f"denied {e.status}", avatar_id)
            raise ApiError(e.status, e.message) from None
        return principal

    def _parse(self, raw: bytes, message_type):
        if len(raw) > self.cfg.max_body_bytes:
            raise ApiError(413, f"request: larger than {self.cfg.max_body_bytes} bytes")
        try:
            return message_type.FromString(raw)
        except DecodeError as e:
            raise ApiError(400, f"request: malformed {message_type.__name__}: {e}") from None
