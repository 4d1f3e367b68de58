"""Who may call the render API: API keys and scopes, viewer links, paged listings, the audit lines.

Most checks run the FastAPI app and the gRPC methods in this process over a fake Renderer; one
Serve application (auth: keys) checks the same over real HTTP and gRPC, the admin delete, and
that no key reaches Serve's logs. Run inside a network namespace (``make test`` does).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import time
from pathlib import Path

import pytest

from perse_ray.registry import Registry

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # serve/ is not an installed package
    sys.path.insert(0, str(REPO))

from tests.test_serve import SERVICER, SIZE, make_avatar  # noqa: E402

A, B = "ada", "bob"


def _issue(keys_file: Path, key_id: str, scopes: str, subjects: str = "*") -> str:
    from serve.auth import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["issue", "--keys-file", str(keys_file), "--id", key_id, "--scopes", scopes,
                     "--subjects", subjects]) == 0
    return out.getvalue().strip()


@pytest.fixture
def keys(tmp_path):
    keys_file = tmp_path / "keys.json"
    secret = tmp_path / "link-secret"
    secret.write_text("s" * 48)
    issued = {"admin": _issue(keys_file, "ops", "admin,list,render,export"),
              "render_a": _issue(keys_file, "app-a", "render", A),
              "list_a": _issue(keys_file, "lister", "list,render", A),
              "export_all": _issue(keys_file, "exporter", "export")}
    return keys_file, secret, issued


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- without Ray


def test_keys_file_stores_only_hashes_and_a_missing_one_stops_start_up(keys, tmp_path, monkeypatch):
    from serve.app import build_app
    from serve.auth import Auth, KeyStore

    keys_file, secret, issued = keys
    text = keys_file.read_text()
    assert all(key not in text for key in issued.values())
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    store = KeyStore(keys_file)
    assert store.authenticate(issued["render_a"]).key_id == "app-a"
    assert store.authenticate(issued["render_a"][:-1] + "x") is None
    monkeypatch.delenv("PERSE_KEYS_FILE", raising=False)
    (tmp_path / "reg").mkdir()
    with pytest.raises(ValueError, match="set auth: keys .* or auth: none"):
        build_app({"registry": str(tmp_path / "reg")})  # the mode is never implied
    with pytest.raises(ValueError, match="cannot be read"):
        build_app({"registry": str(tmp_path / "reg"), "auth": "keys", "keys_file": str(tmp_path / "nope.json")})
    with pytest.raises(ValueError, match="needs keys_file"):
        build_app({"registry": str(tmp_path / "reg"), "auth": "keys"})
    (tmp_path / "bad.json").write_text(json.dumps({"keys": [{"id": "x", "sha256": issued["admin"],
                                                             "scopes": ["render"], "subjects": "*"}]}))
    with pytest.raises(ValueError, match="never the key itself"):
        Auth("keys", str(tmp_path / "bad.json"))
    assert "auth: keys (4 key(s)" in Auth("keys", str(keys_file), str(secret)).describe()


def test_key_comparison_is_constant_time(keys, monkeypatch):
    """A wrong key of the right length and one of another length both go through one
    hmac.compare_digest of two sha256 digests (the check is on the function, not on a timing)."""
    import serve.auth as auth

    keys_file, _, issued = keys
    assert auth.compare_digest is hmac.compare_digest
    calls = []

    def recording(a, b):
        calls.append((len(a), len(b)))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(auth, "compare_digest", recording)
    store = auth.KeyStore(keys_file)
    right = issued["render_a"]
    for attempt in (right[:-1] + ("a" if right[-1] != "a" else "b"), right + "xyz", "short", "prk_nobody_" + "a" * 43,
                    right):
        store.authenticate(attempt)
    assert calls == [(64, 64)] * 5  # the same work whatever was sent


def test_viewer_links_are_bound_to_subject_version_scope_and_expiry(keys):
    from serve.auth import Auth, AuthError, sign_link, verify_link

    keys_file, secret, issued = keys
    auth = Auth("keys", str(keys_file), str(secret))
    key = auth.authenticate(f"Bearer {issued['render_a']}")
    token, expires = auth.create_link(key, A, "v0001", ["render"], 60)
    link = auth.authenticate(f"Bearer {token}")
    assert link.key_id == "link:app-a" and link.subjects == {A} and expires > time.time()
    auth.require(link, "render", A, "v0001")
    auth.require(link, "view", A, "v0001")
    auth.require(link, "bundle", A, "v0001")  # the viewer needs the web bundle of its avatar
    for scope, subject, version, status in (("render", B, "v0001", 404), ("export", A, "v0001", 403),
                                            ("render", A, "v0002", 403), ("list", None, None, 403)):
        with pytest.raises(AuthError) as err:
            auth.require(link, scope, subject, version)
        assert err.value.status == status, (scope, subject)
    with pytest.raises(AuthError, match="lacks the 'export' scope"):  # a link never widens its creator's rights
        auth.create_link(key, A, "v0001", ["render", "export"], 60)
    with pytest.raises(AuthError) as err:  # not even onto another subject
        auth.create_link(key, B, "v0001", ["render"], 60)
    assert err.value.status == 404
    raw = secret.read_bytes().strip()
    expired = sign_link(raw, A, "v0001", ["render"], int(time.time()) - 1, "app-a")
    assert verify_link(raw, expired) is None
    assert verify_link(raw, token, now=expires) is None  # not a second past its expiry
    for i in range(4, len(token)):  # any one byte changed (payload or signature) is refused
        changed = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        assert verify_link(raw, changed) is None, i
    with pytest.raises(AuthError) as err:
        auth.authenticate(f"Bearer {_altered(token)}")
    assert err.value.status == 401


def _altered(key: str) -> str:
    """``key`` with its last character changed (to one it is not: keys are random)."""
    return key[:-1] + ("Q" if key[-1] != "Q" else "R")


class _FakeIngress:
    """What make_http_app and GrpcApi need, over a real catalog and a Renderer that answers at once."""

    def __init__(self, root: Path, auth_mode: str, keys_file: str = "", secret: str = "", audit_log: str = ""):
        from serve.api import Catalog, ServeConfig
        from serve.auth import Audit, Auth

        self.cfg = ServeConfig(auth=auth_mode, keys_file=keys_file, link_secret_file=secret, audit_log=audit_log,
                               max_page_size=2)
        self.catalog = Catalog.open(root, self.cfg)
        self.auth = Auth(auth_mode, keys_file, secret)
        self.audit = Audit(audit_log)
        self.calls = []

    async def call(self, method, job):
        self.calls.append((method, job.model_id))
        return b"PNG" if method == "render" else b"PLY"

    async def delete_subject(self, subject_id, key_id):
        return {"subject": subject_id, "by": key_id}


def _app(tmp_path, keys, mode="keys", subjects=(A, B, "cy")):
    from fastapi.testclient import TestClient

    from serve.http_api import make_http_app

    registry = Registry(tmp_path / "avatars")
    for i, s in enumerate(subjects):
        if not (registry.root / s).exists():
            registry.put(s, make_avatar(i))
    keys_file, secret, _ = keys
    ingress = _FakeIngress(registry.root, mode, str(keys_file) if mode == "keys" else "",
                           str(secret) if mode == "keys" else "", str(tmp_path / "audit.jsonl"))
    return TestClient(make_http_app(ingress)), ingress


BODY = {"width": SIZE, "height": SIZE}


def test_every_route_but_the_open_ones_refuses_a_missing_key(tmp_path, keys):
    """Walks the app's routes, so a route added later (the web bundle, say) is covered by default."""
    from fastapi.routing import APIRoute
    from starlette.routing import Mount

    from serve.http_api import OPEN_MOUNTS, OPEN_PATHS, route_scope

    client, _ = _app(tmp_path, keys)

    def walk(routes):  # include_router() wraps a router's routes
        for r in routes:
            yield from walk(r.original_router.routes) if hasattr(r, "original_router") else (r,)

    checked = 0
    for route in walk(client.app.routes):
        if isinstance(route, Mount):
            assert route.path in OPEN_MOUNTS, f"{route.path}: a mount outside the open allow-list"
            continue
        assert route.path_format in OPEN_PATHS or isinstance(route, APIRoute), route.path
        for method in getattr(route, "methods", None) or ():
            if method == "HEAD" or route.path_format in OPEN_PATHS:
                continue
            path = route.path_format.replace("{avatar_id}", A)
            for headers in ({}, {"Authorization": "Bearer prk_ops_" + "A" * 43}, {"Authorization": "Basic x"}):
                reply = client.request(method, path, headers=headers, json=BODY)
                assert reply.status_code == 401, (method, path, headers, reply.text)
                assert reply.headers["www-authenticate"] == "Bearer"
            checked += 1
            assert route_scope(method, route.path_format) is not None
    assert checked >= 7
    assert client.get("/healthz").status_code == 200 and client.get("/openapi.json").status_code == 200
    assert route_scope("GET", "/v1/some/new/route") == "admin"  # closed until given a scope


def test_scopes_subjects_links_and_paged_listing_over_http(tmp_path, keys):
    client, ingress = _app(tmp_path, keys)
    _, _, issued = keys
    render_a, list_a, admin = _bearer(issued["render_a"]), _bearer(issued["list_a"]), _bearer(issued["admin"])
    assert client.post(f"/v1/avatars/{A}/render", json=BODY, headers=render_a).content == b"PNG"
    # B exists, but this key may not see it: answered like an avatar that does not exist.
    for path in (f"/v1/avatars/{B}/render", f"/v1/avatars/{B}/ply", "/v1/avatars/nobody/render"):
        reply = client.post(path, json=BODY, headers=render_a)
        assert reply.status_code == 404 and reply.json()["detail"] in ("no avatar 'bob'", "no avatar 'nobody'")
    assert client.get(f"/v1/avatars/{B}", headers=render_a).status_code == 404
    assert client.get(f"/v1/avatars/{A}", headers=render_a).json()["id"] == A
    reply = client.post(f"/v1/avatars/{A}/ply", json=BODY, headers=render_a)
    assert reply.status_code == 403 and "lacks the 'export' scope" in reply.json()["detail"]
    assert client.get("/v1/avatars", headers=render_a).status_code == 403  # no list scope
    assert [a["id"] for a in client.get("/v1/avatars", headers=list_a).json()] == [A]  # only what it may see
    assert client.get("/v1/stats", headers=list_a).status_code == 403
    assert client.post(f"/v1/avatars/{B}/ply", json=BODY, headers=_bearer(issued["export_all"])).content == b"PLY"
    assert client.delete(f"/v1/avatars/{A}", headers=render_a).status_code == 403
    assert client.delete(f"/v1/avatars/{A}", headers=admin).json() == {"subject": A, "by": "ops"}
    assert client.post("/v1/avatars/..%2Fx/render", json=BODY, headers=render_a).status_code in (400, 404)

    # Pages: max_page_size is 2 here; the next page is named by X-Next-After.
    first = client.get("/v1/avatars?limit=2", headers=admin)
    assert [a["id"] for a in first.json()] == [A, B] and first.headers["x-next-after"] == B
    last = client.get(f"/v1/avatars?limit=2&after={B}", headers=admin)
    assert [a["id"] for a in last.json()] == ["cy"] and "x-next-after" not in last.headers
    assert client.get("/v1/avatars?limit=3", headers=admin).status_code == 422
    assert [a["id"] for a in client.get("/v1/avatars", headers=admin).json()] == [A, B, "cy"]

    # A viewer link: this avatar, this version, until it expires.
    link = client.post(f"/v1/avatars/{A}/links", json={"ttl_s": 60}, headers=render_a).json()
    assert link["viewer"] == f"/viewer/?avatar={A}#token={link['token']}"  # the token stays out of URLs sent
    viewer = _bearer(link["token"])
    assert client.post(f"/v1/avatars/{A}/render", json=BODY, headers=viewer).content == b"PNG"
    assert client.get(f"/v1/avatars/{A}", headers=viewer).status_code == 200
    assert client.get(f"/v1/avatars/{A}@v0001/bundle", headers=viewer).status_code == 200  # the page's bundle
    assert client.post(f"/v1/avatars/{B}/render", json=BODY, headers=viewer).status_code == 404
    assert client.post(f"/v1/avatars/{A}/ply", json=BODY, headers=viewer).status_code == 403
    assert client.post(f"/v1/avatars/{A}/links", json={}, headers=viewer).status_code == 403
    tampered = link["token"][:-3] + ("AAA" if not link["token"].endswith("AAA") else "BBB")
    assert client.post(f"/v1/avatars/{A}/render", json=BODY, headers=_bearer(tampered)).status_code == 401
    assert client.post(f"/v1/avatars/{B}/links", json={}, headers=render_a).status_code == 404
    Registry(tmp_path / "avatars").put(A, make_avatar(7))  # a new version: the link was for v0001
    ingress.catalog.refresh()
    assert client.post(f"/v1/avatars/{A}/render", json=BODY, headers=viewer).status_code == 403

    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {"audit": "render", "key_id": "app-a", "subject": A, "version": "v0001", "outcome": "ok"}.items() \
        <= lines[0].items() and lines[0]["at"].endswith("Z")
    assert any(r["audit"] == "export" and r["outcome"] == "denied 403" and r["key_id"] == "app-a" for r in lines)
    assert any(r["audit"] == "link" and r["outcome"] == "ok" for r in lines)
    assert any(r["audit"] == "export" and r["outcome"] == "ok bundle" and r["subject"] == A for r in lines)  # sent
    text = (tmp_path / "audit.jsonl").read_text()
    assert all(k not in text for k in issued.values()) and link["token"] not in text


def test_grpc_methods_check_the_authorization_metadata(tmp_path, keys):
    import grpc

    from serve import render_pb2
    from serve.grpc_api import GrpcApi

    _, ingress = _app(tmp_path, keys)
    _, _, issued = keys

    class Api(GrpcApi):
        def __init__(self, inner):
            self.cfg, self.catalog, self.auth, self.audit, self.call = (inner.cfg, inner.catalog, inner.auth,
                                                                        inner.audit, inner.call)

    class Context:
        def __init__(self, token=None):
            self.metadata = [("authorization", f"Bearer {token}")] if token else []
            self.code = None

        def invocation_metadata(self):
            return self.metadata

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    api = Api(ingress)

    def render(avatar, token):
        ctx = Context(token)
        reply = asyncio.run(api.Render(render_pb2.RenderRequest(avatar_id=avatar, width=SIZE, height=SIZE)
                                       .SerializeToString(), ctx))
        return ctx.code, reply.png

    def listing(token, **fields):
        ctx = Context(token)
        reply = asyncio.run(api.ListAvatars(render_pb2.ListAvatarsRequest(**fields).SerializeToString(), ctx))
        return ctx.code, [a.id for a in reply.avatars], reply.next_page_token

    assert render(A, None)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert render(A, "prk_app-a_" + "x" * 43)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert render(A, issued["render_a"]) == (None, b"PNG")
    assert render(B, issued["render_a"])[0] == grpc.StatusCode.NOT_FOUND
    assert listing(issued["render_a"])[0] == grpc.StatusCode.PERMISSION_DENIED
    assert listing(issued["list_a"]) == (None, [A], "")
    assert listing(issued["admin"], page_size=2) == (None, [A, B], B)
    assert listing(issued["admin"], page_size=2, page_token=B) == (None, ["cy"], "")
    assert listing(issued["admin"]) == (None, [A, B, "cy"], "")


def test_auth_none_is_open_and_says_so(tmp_path, keys):
    client, _ = _app(tmp_path, keys, mode="none")
    assert client.post(f"/v1/avatars/{B}/ply", json=BODY).content == b"PLY"
    assert [a["id"] for a in client.get("/v1/avatars").json()] == [A, B, "cy"]
    assert client.post(f"/v1/avatars/{A}/links", json={}).status_code == 403  # nothing to sign for


def test_paged_listing_stays_cheap_at_scale():
    """A page of 10^5 avatars costs a bisection, not a scan (the catalog's page() alone)."""
    from serve.api import Catalog, ServeConfig, Snapshot

    n = 100_000
    summaries = tuple({"id": f"s{i:06d}", "version": "v0001"} for i in range(n))
    catalog = Catalog.__new__(Catalog)
    catalog.cfg = ServeConfig()
    catalog._snapshot = Snapshot(1, {}, summaries, b"", (), tuple(s["id"] for s in summaries))
    t = time.perf_counter()
    for _ in range(100):
        items, nxt = catalog.page("s099000", 100)
    per_page = (time.perf_counter() - t) / 100
    assert items[0]["id"] == "s099001" and nxt == "s099100"
    assert per_page < 0.005, per_page
    print(json.dumps({"figure": "listing page of 100 at 1e5 avatars", "value": per_page * 1e3, "unit": "ms"}))


# --------------------------------------------------------------------------- on Serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_serve_with_keys_over_http_and_grpc_then_an_admin_delete(ray_cluster, tmp_path, keys, monkeypatch):
    import grpc
    import httpx
    from ray import serve

    from serve import render_pb2, render_pb2_grpc
    from serve.app import build_app

    keys_file, secret, issued = keys
    output = tmp_path / "out"
    registry = Registry(output / "avatars")
    for i, s in enumerate((A, B)):
        registry.put(s, make_avatar(i))
    http_port, grpc_port = _free_port(), _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER]})
    monkeypatch.delenv("PERSE_REGISTRY", raising=False)
    monkeypatch.delenv("PERSE_KEYS_FILE", raising=False)
    refresh_s = 0.5
    app = build_app({"registry": str(registry.root), "auth": "keys", "keys_file": str(keys_file),
                     "link_secret_file": str(secret), "audit_log": str(tmp_path / "serve-audit.jsonl"),
                     "index_refresh_s": refresh_s})
    serve.run(app, name="perse-auth", route_prefix="/")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = render_pb2_grpc.RendererStub(channel)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:
            assert http.get("/healthz").status_code == 200
            assert http.get("/v1/avatars").status_code == 401
            assert http.get("/v1/avatars", headers=_bearer(_altered(issued["render_a"]))).status_code == 401
            ok = http.post(f"/v1/avatars/{A}/render", json=BODY, headers=_bearer(issued["render_a"]))
            assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
            assert http.post(f"/v1/avatars/{B}/render", json=BODY,
                             headers=_bearer(issued["render_a"])).status_code == 404
            assert http.post(f"/v1/avatars/{A}/ply", json=BODY,
                             headers=_bearer(issued["render_a"])).status_code == 403
            link = http.post(f"/v1/avatars/{A}/links", json={}, headers=_bearer(issued["render_a"])).json()
            assert http.post(f"/v1/avatars/{A}/render", json=BODY, headers=_bearer(link["token"])).status_code == 200

            request = render_pb2.RenderRequest(avatar_id=A, width=SIZE, height=SIZE)
            with pytest.raises(grpc.RpcError) as err:
                stub.Render(request)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub.Render(request, metadata=(("authorization", "Bearer prk_app-a_" + "z" * 43),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            meta = (("authorization", f"Bearer {issued['render_a']}"),)
            assert stub.Render(request, metadata=meta).png == ok.content
            with pytest.raises(grpc.RpcError) as err:
                stub.Render(render_pb2.RenderRequest(avatar_id=B), metadata=meta)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as err:
                stub.ListAvatars(render_pb2.ListAvatarsRequest(), metadata=meta)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            listed = stub.ListAvatars(render_pb2.ListAvatarsRequest(),
                                      metadata=(("authorization", f"Bearer {issued['list_a']}"),))
            assert [a.id for a in listed.avatars] == [A]

            # Revoking a key takes effect within the refresh delay.
            from serve.auth import main as keys_cli

            assert keys_cli(["revoke", "--keys-file", str(keys_file), "--id", "exporter"]) == 0
            deadline = time.monotonic() + 10 * refresh_s + 5
            while http.post(f"/v1/avatars/{B}/ply", json=BODY,
                            headers=_bearer(issued["export_all"])).status_code != 401:
                assert time.monotonic() < deadline, "a revoked key still works"
                time.sleep(0.1)

            # The admin delete: every path goes, the server answers 404 within index_refresh_s.
            admin = _bearer(issued["admin"])
            assert http.post(f"/v1/avatars/{A}/render", json=BODY, headers=admin).status_code == 200
            done = http.delete(f"/v1/avatars/{A}", headers=admin).json()
            assert done["outcome"] == "deleted" and done["registry_versions"] == 1
            t = time.monotonic()
            while http.get(f"/v1/avatars/{A}", headers=admin).status_code != 404:
                assert time.monotonic() - t < refresh_s + 2, "still served after the refresh delay"
                time.sleep(0.05)
            assert http.post(f"/v1/avatars/{A}/render", json=BODY, headers=admin).status_code == 404
            assert not (registry.root / A).exists() and A not in (registry.root / "index.jsonl").read_text()
            t = time.monotonic()
            while http.get("/v1/stats", headers=admin).json()["renderer"]["dropped_deleted"] < 1:
                assert time.monotonic() - t < refresh_s + 5, "the renderer still holds the deleted avatar"
                time.sleep(0.1)
            assert http.delete(f"/v1/avatars/{A}", headers=admin).json()["outcome"] == "nothing to delete"
            assert http.post(f"/v1/avatars/{B}/render", json=BODY, headers=admin).status_code == 200
    finally:
        channel.close()
        serve.delete("perse-auth")
        serve.shutdown()

    audit = [json.loads(line) for line in (tmp_path / "serve-audit.jsonl").read_text().splitlines()]
    assert any(r["audit"] == "delete" and r["subject"] == A and r["key_id"] == "ops" for r in audit)
    assert any(r["audit"] == "render" and r["key_id"] == "app-a" and r["outcome"] == "ok" for r in audit)
    # No key and no link token in any Serve log of this session, nor in the audit log.
    session = Path(ray_cluster._private.worker._global_node.get_session_dir_path()) / "logs"
    logs = [p for p in session.rglob("*") if p.is_file()] + [tmp_path / "serve-audit.jsonl"]
    assert any("serve" in str(p) for p in logs)
    for path in logs:
        data = path.read_bytes()
        for secret_text in [*issued.values(), link["token"]]:
            assert secret_text.encode() not in data, f"a credential in {path}"
        # the secret alone, without its prefix and id (prk_<id>_<secret>; ids have no "_", secrets may)
        assert issued["admin"].split("_", 2)[2].encode() not in data


def test_the_python_client_sends_its_key_as_a_bearer_token(monkeypatch):
    from perse_ray.client import RenderClient

    monkeypatch.setenv("PERSE_API_KEY", "from-env")
    with RenderClient() as client:
        assert client._http.headers["Authorization"] == "Bearer from-env"
    with RenderClient(token="explicit") as client:
        assert client._http.headers["Authorization"] == "Bearer explicit"
    monkeypatch.delenv("PERSE_API_KEY")
    with RenderClient() as client:
        assert "Authorization" not in client._http.headers
