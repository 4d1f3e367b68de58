"""Who may call the render API: API keys with scopes, signed viewer links, the route policy, audit lines.

No Ray and no FastAPI here (the front-ends in ``serve.http_api`` and ``serve.grpc_api`` build on it).

    KeyStore     the keys file: key ids, sha256 of each key, scopes and subjects; re-read when it changes
    Principal    an authenticated caller: key id, scopes, the subjects it covers (None: all)
    sign_link    a viewer link token: HMAC-SHA256 over subject, version, scopes and expiry
    Auth         turns an ``Authorization`` value into a Principal (or 401), checks a scope (403/404)
    audit        one JSON line per render, export, link and delete: key id, subject, version, outcome

The keys file (JSON, written by ``python -m serve.auth issue``)::

    {"keys": [{"id": "ops", "sha256": "<hex of sha256(key)>", "scopes": ["admin", "list", "render", "export"],
               "subjects": "*"},
              {"id": "alice-app", "sha256": "...", "scopes": ["render"], "subjects": ["alice-1a2b3c4d"]}]}

A key is ``prk_<id>_<43 url-safe characters>`` (32 random bytes). Only its sha256 is stored: a key is
high-entropy, so a plain hash cannot be reversed by guessing, and a leaked keys file lets nobody
call the API. The id in the key selects the record; the digest is then compared with
``hmac.compare_digest`` (constant time), and an unknown id is compared against a dummy digest, so
the time taken does not tell whether an id exists.

Scopes: ``list`` (the listing and manifests), ``render``, ``export`` (.ply and the web bundle),
``admin`` (stats, deleting a subject). ``subjects`` limits every scope but ``admin`` to the named
subjects; ``"*"`` is all.

Refusals. No credentials or unusable ones: 401 / UNAUTHENTICATED. A valid key that lacks the scope
for a request on a subject it may otherwise see: 403 / PERMISSION_DENIED. A subject the key may not
see at all is answered exactly like a subject that does not exist (404 / NOT_FOUND): a key cannot
find out who else has an avatar here.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from perse_ray.schema import validate_subject_id

SCOPES = ("list", "render", "export", "admin")
KEY_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
KEY_PREFIX = "prk_"
LINK_PREFIX = "prl_"
MAX_LINK_TTL_S = 7 * 24 * 3600
_KEY = re.compile(r"^prk_([a-z0-9][a-z0-9-]{0,31})_([A-Za-z0-9_-]{43})$")
_DUMMY_DIGEST = hashlib.sha256(b"no such key").hexdigest()
# Compared through this name so a test can check that the comparison is the constant-time one.
compare_digest = hmac.compare_digest


class AuthError(Exception):
    """A refused call: 401 (credentials), 403 (scope) or 404 (a subject the caller may not see)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass(frozen=True)
class Principal:
    key_id: str  # "anonymous" in auth: none mode; "link:<issuer>" for a viewer link
    scopes: frozenset[str]
    subjects: frozenset[str] | None  # None: every subject
    version: str | None = None  # a viewer link is for one version

    def covers(self, subject: str) -> bool:
        return self.subjects is None or subject in self.subjects

    def may(self, scope: str, subject: str | None = None) -> bool:
        if scope not in self.scopes:
            return False
        return scope == "admin" or subject is None or self.covers(subject)

    def sees(self, subject: str) -> bool:
        """Whether any scope lets the caller know that ``subject`` exists."""
        return self.covers(subject) and bool(self.scopes & {"list", "render", "export", "view"})


ANONYMOUS = Principal("anonymous", frozenset(SCOPES), None)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(key_id: str) -> str:
    if not KEY_ID.match(key_id):
        raise ValueError(f"invalid key id {key_id!r}: expected [a-z0-9][a-z0-9-]{{0,31}}")
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


# --------------------------------------------------------------------------- the keys file


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    key_id: str
    sha256: str
    scopes: frozenset[str]
    subjects: frozenset[str] | None


def parse_keys(data: Any, where: str = "keys file") -> dict[str, KeyRecord]:
    """Key records from the keys file's JSON; ``ValueError`` names the first bad record."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{where}: expected {{\"keys\": [...]}}")
    records: dict[str, KeyRecord] = {}
    for i, item in enumerate(data["keys"]):
        at = f"{where}: keys[{i}]"
        if not isinstance(item, dict) or set(item) - {"id", "sha256", "scopes", "subjects", "note"}:
            raise ValueError(f"{at}: expected id, sha256, scopes, subjects (and an optional note)")
        key_id, digest, scopes, subjects = item.get("id"), item.get("sha256"), item.get("scopes"), item.get("subjects")
        if not isinstance(key_id, str) or not KEY_ID.match(key_id) or key_id in records:
            raise ValueError(f"{at}: invalid or repeated id {key_id!r}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"{at}: sha256 must be 64 lowercase hex digits (never the key itself)")
        if not isinstance(scopes, list) or not scopes or set(scopes) - set(SCOPES):
            raise ValueError(f"{at}: scopes must be a non-empty list of {', '.join(SCOPES)}")
        if subjects == "*":
            allowed = None
        elif isinstance(subjects, list):
            try:
                allowed = frozenset(validate_subject_id(s) for s in subjects)
            except ValueError as e:
                raise ValueError(f"{at}: {e}") from None
        else:
            raise ValueError(f"{at}: subjects must be \"*\" or a list of subject ids")
        records[key_id] = KeyRecord(key_id, digest, frozenset(scopes), allowed)
    return records


class KeyStore:
    """The keys file in memory; ``reload_if_changed`` (one ``stat``) picks up issued and revoked keys.
    A file that becomes unreadable or invalid keeps the last good keys and the error is reported."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stat: tuple[int, int, int] | None = None
        self.records: dict[str, KeyRecord] = {}
        self.reload_if_changed(first=True)

    def reload_if_changed(self, first: bool = False) -> bool:
        try:
            st = os.stat(self.path)
        except OSError as e:
            if first:
                raise ValueError(f"auth: keys: keys file {self.path} cannot be read: {e.strerror}") from None
            raise
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key == self._stat:
            return False
        try:
            records = parse_keys(json.loads(self.path.read_text()), str(self.path))
        except (OSError, ValueError) as e:
            if first:
                raise ValueError(f"auth: keys: {e}") from None
            raise
        self.records, self._stat = records, key
        return True

    def authenticate(self, key: str) -> Principal | None:
        m = _KEY.match(key)
        record = self.records.get(m.group(1)) if m else None
        # Always one digest comparison, so an unknown id costs the same as a wrong secret.
        ok = compare_digest(hash_key(key), record.sha256 if record else _DUMMY_DIGEST)
        if not ok or record is None:
            return None
        return Principal(record.key_id, record.scopes, record.subjects)


def write_keys(path: Path, records: Iterable[dict]) -> None:
    data = json.dumps({"keys": list(records)}, indent=1, sort_keys=True) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- viewer links


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_link(secret: bytes, subject: str, version: str, scopes: Iterable[str], expires_at: int, issuer: str) -> str:
    """A viewer link token for one avatar version: ``prl_<payload>.<HMAC-SHA256 of the payload>``."""
    payload = json.dumps({"sub": validate_subject_id(subject), "ver": version, "scp": sorted(set(scopes)),
                          "exp": int(expires_at), "iss": issuer}, sort_keys=True, separators=(",", ":"))
    body = _b64(payload.encode())
    return f"{LINK_PREFIX}{body}.{_b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())}"


def verify_link(secret: bytes, token: str, now: float | None = None) -> Principal | None:
    """The link's Principal (its one subject and version) or None: bad signature, malformed, expired."""
    if not token.startswith(LINK_PREFIX) or token.count(".") != 1:
        return None
    body, signature = token[len(LINK_PREFIX):].split(".")
    expected = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    if not compare_digest(signature, expected):
        return None
    try:
        claims = json.loads(_unb64(body))
        subject, version, scopes = validate_subject_id(claims["sub"]), str(claims["ver"]), claims["scp"]
        expires = int(claims["exp"])
        issuer = str(claims["iss"])
    except (ValueError, KeyError, TypeError):
        return None
    if (time.time() if now is None else now) >= expires or set(scopes) - {"render", "export"}:
        return None
    # "view": the manifest and the web bundle of this one avatar, what the viewer page needs.
    return Principal(f"link:{issuer}", frozenset(scopes) | {"view"}, frozenset({subject}), version)


# --------------------------------------------------------------------------- the policy


class Auth:
    """The server's authentication mode: ``none`` (every caller may do everything) or ``keys``."""

    def __init__(self, mode: str, keys_file: str = "", link_secret_file: str = ""):
        if mode not in ("none", "keys"):
            raise ValueError(f"auth: {mode!r}: expected 'none' or 'keys'")
        self.mode = mode
        self.keys: KeyStore | None = None
        self.link_secret: bytes | None = None
        if mode == "keys":
            if not keys_file:
                raise ValueError("auth: keys needs keys_file (the JSON file of key hashes)")
            self.keys = KeyStore(keys_file)
            if link_secret_file:
                try:
                    secret = Path(link_secret_file).read_bytes().strip()
                except OSError as e:
                    raise ValueError(f"auth: link_secret_file {link_secret_file} cannot be read: {e.strerror}") from None
                if len(secret) < 32:
                    raise ValueError(f"auth: link_secret_file {link_secret_file}: needs at least 32 bytes")
                self.link_secret = secret
        self._lock = threading.Lock()

    def describe(self) -> str:
        if self.keys is None:
            return "auth: none (no credentials checked: local use only)"
        return (f"auth: keys ({len(self.keys.records)} key(s) from {self.keys.path}; viewer links "
                f"{'on' if self.link_secret else 'off (no link_secret_file)'})")

    def refresh(self) -> None:
        if self.keys is not None:
            with self._lock:
                self.keys.reload_if_changed()

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of an ``Authorization`` header / metadata value, or ``AuthError(401)``."""
        if self.keys is None:
            return ANONYMOUS
        if not authorization:
            raise AuthError(401, "missing credentials: send Authorization: Bearer <key or link token>")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(401, "unusable credentials: expected Authorization: Bearer <key or link token>")
        principal = None
        if token.startswith(LINK_PREFIX):
            if self.link_secret is not None:
                principal = verify_link(self.link_secret, token)
        else:
            principal = self.keys.authenticate(token)
        if principal is None:
            raise AuthError(401, "invalid, revoked or expired credentials")
        return principal

    def require(self, principal: Principal, scope: str, subject: str | None = None,
                version: str | None = None) -> None:
        """403 for a missing scope; 404 (as for an unknown avatar) for a subject the caller may not see.
        ``scope`` is one of SCOPES, or ``view`` (the manifest) or ``bundle`` (the web bundle)."""
        if subject is not None and scope != "admin" and not principal.sees(subject):
            raise AuthError(404, f"no avatar {subject!r}")
        if scope == "view":  # the manifest: whoever may see the avatar
            granted = subject is None or principal.sees(subject)
        elif scope == "bundle":  # the web bundle: export, or a viewer link for this avatar
            granted = principal.may("export", subject) or principal.may("view", subject)
        else:
            granted = principal.may(scope, subject)
        if not granted:
            raise AuthError(403, f"key {principal.key_id!r} lacks the {scope!r} scope"
                                 + (f" for {subject!r}" if subject else ""))
        if principal.version is not None and version is not None and version != principal.version:
            raise AuthError(403, f"this link is for version {principal.version}, the avatar is now {version}")

    def create_link(self, principal: Principal, subject: str, version: str, scopes: list[str],
                    ttl_s: float) -> tuple[str, int]:
        if self.keys is None:
            raise AuthError(403, "viewer links need auth: keys (in auth: none every caller may view)")
        if self.link_secret is None:
            raise AuthError(403, "viewer links are off: the server has no link_secret_file")
        if principal.key_id.startswith("link:"):
            raise AuthError(403, "a viewer link cannot create links")
        if not scopes or set(scopes) - {"render", "export"}:
            raise AuthError(403, "a link's scopes are render and/or export")
        for scope in scopes:
            self.require(principal, scope, subject)
        if not 0 < ttl_s <= MAX_LINK_TTL_S:
            raise AuthError(403, f"ttl_s must be in (0, {MAX_LINK_TTL_S}]")
        expires = int(time.time() + ttl_s)
        return sign_link(self.link_secret, subject, version, scopes, expires, principal.key_id), expires


# --------------------------------------------------------------------------- audit


class Audit:
    """One JSON line per audited action, on the ``perse.audit`` logger, written to ``path`` when set
    (else to stderr, which Serve puts in the replica's log). Keys never reach it: only key ids."""

    def __init__(self, path: str = ""):
        self.log = logging.getLogger("perse.audit")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        target = os.path.abspath(path) if path else "<stderr>"
        if not any(getattr(h, "_perse_target", None) == target for h in self.log.handlers):
            handler = logging.FileHandler(target) if path else logging.StreamHandler(sys.stderr)
            handler._perse_target = target
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.log.addHandler(handler)

    def __call__(self, action: str, key_id: str, outcome: str, subject: str | None = None,
                 version: str | None = None, **extra: Any) -> None:
        self.log.info(audit_line(action, key_id, outcome, subject, version, **extra))


def audit_line(action: str, key_id: str, outcome: str, subject: str | None = None, version: str | None = None,
               **extra: Any) -> str:
    record = {"audit": action, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "key_id": key_id,
              "subject": subject, "version": version, "outcome": outcome, **extra}
    return json.dumps(record, sort_keys=True)


# --------------------------------------------------------------------------- the command line


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.auth issue|revoke|list|link-secret``: manage the keys file."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m serve.auth", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    issue = sub.add_parser("issue", help="add a key; prints the key once (only its sha256 is stored)")
    issue.add_argument("--keys-file", required=True)
    issue.add_argument("--id", required=True)
    issue.add_argument("--scopes", required=True, help=f"comma-separated: {', '.join(SCOPES)}")
    issue.add_argument("--subjects", default="*", help="comma-separated subject ids, or * (default)")
    revoke = sub.add_parser("revoke", help="remove a key (a running server drops it within index_refresh_s)")
    revoke.add_argument("--keys-file", required=True)
    revoke.add_argument("--id", required=True)
    show = sub.add_parser("list", help="key ids, scopes and subjects")
    show.add_argument("--keys-file", required=True)
    link = sub.add_parser("link-secret", help="write a new random link signing secret (0600)")
    link.add_argument("--file", required=True)
    args = p.parse_args(argv)

    if args.command == "link-secret":
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
        print(f"wrote {args.file}")
        return 0
    path = Path(args.keys_file)
    raw = json.loads(path.read_text()) if path.exists() else {"keys": []}
    parse_keys(raw, str(path))
    items = raw["keys"]
    if args.command == "list":
        for item in items:
            print(f"{item['id']}\t{','.join(item['scopes'])}\t{item['subjects'] if item['subjects'] == '*' else ','.join(item['subjects'])}")
        return 0
    if args.command == "revoke":
        kept = [i for i in items if i["id"] != args.id]
        if len(kept) == len(items):
            print(f"error: no key {args.id!r} in {path}", file=sys.stderr)
            return 2
        write_keys(path, kept)
        print(f"revoked {args.id}")
        return 0
    if any(i["id"] == args.id for i in items):
        print(f"error: key {args.id!r} exists: revoke it first", file=sys.stderr)
        return 2
    key = new_key(args.id)
    subjects = "*" if args.subjects.strip() == "*" else [s.strip() for s in args.subjects.split(",") if s.strip()]
    record = {"id": args.id, "sha256": hash_key(key), "scopes": [s.strip() for s in args.scopes.split(",")],
              "subjects": subjects}
    parse_keys({"keys": items + [record]}, str(path))
    write_keys(path, items + [record])
    print(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
