"""The avatar registry: ``<root>/<subject_id>/<version>/{model.safetensors, avatar.json}``.

Each version directory is written whole in a temporary directory and renamed into place, so a
reader (Serve) sees a complete version or none, and a writer killed midway leaves the previous
version readable. Versions are ``v0001``, ``v0002``…; concurrent writers race on the rename and
the loser takes the next number, so several trials finishing at once never clash. The directory
tree is the source of truth; ``manifest.parquet`` (the ``avatars`` schema) is an index rebuilt
under a file lock after every put.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from perse_ray.avatar.io import META_FILE, MODEL_FILE, Avatar, load_avatar, save_avatar
from perse_ray.schema import SUBJECT_ID, validate_subject_id

VERSION = re.compile(r"^v\d{4,}$")
MANIFEST = "manifest.parquet"


class RegistryError(KeyError):
    """No such subject or version."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION.match(version):
        raise ValueError(f"invalid version {version!r}: expected v0001, v0002, …")
    return version


@dataclass(frozen=True)
class AvatarEntry:
    subject_id: str
    version: str
    path: Path  # absolute
    latent_layout: str  # JSON
    metrics: dict[str, float]
    config_hash: str
    created_at: dt.datetime

    def row(self, root: Path) -> dict:
        """This entry as an ``avatars``-schema row (path relative to the registry root)."""
        return {"subject_id": self.subject_id, "version": self.version, "path": str(self.path.relative_to(root)),
                "latent_layout": self.latent_layout, "metrics": self.metrics, "created_at": self.created_at}


class Registry:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    # ------------------------------------------------------------------ reading

    def list(self) -> list[AvatarEntry]:
        """Every complete version of every subject, sorted by subject then version."""
        if not self.root.is_dir():
            return []
        entries = []
        for subject in sorted(p for p in self.root.iterdir() if p.is_dir() and SUBJECT_ID.match(p.name)):
            for version in sorted((v for v in subject.iterdir() if v.is_dir() and VERSION.match(v.name)),
                                  key=lambda v: int(v.name[1:])):
                entry = self._entry(subject.name, version.name)
                if entry is not None:
                    entries.append(entry)
        return entries

    def latest(self) -> list[AvatarEntry]:
        """The newest version of each subject."""
        newest: dict[str, AvatarEntry] = {}
        for e in self.list():
            newest[e.subject_id] = e
        return list(newest.values())

    def get(self, subject_id: str, version: str | None = None) -> AvatarEntry:
        validate_subject_id(subject_id)
        if version is not None:
            validate_version(version)
            entry = self._entry(subject_id, version)
        else:
            entry = next(self._newest_first(subject_id), None)
        if entry is None:
            raise RegistryError(f"no avatar {subject_id!r}" + (f" version {version!r}" if version else ""))
        return entry

    def load(self, subject_id: str, version: str | None = None) -> Avatar:
        return load_avatar(self.get(subject_id, version).path)

    def find(self, subject_id: str, config_hash: str) -> AvatarEntry | None:
        """The newest version trained with ``config_hash`` (a re-run skips the subject)."""
        validate_subject_id(subject_id)
        return next((e for e in self._newest_first(subject_id) if e.config_hash == config_hash), None)

    def _newest_first(self, subject_id: str):
        """Complete versions of one subject, newest first (reads only that subject's folder)."""
        subject_dir = self.root / subject_id
        versions = sorted((v.name for v in subject_dir.iterdir() if VERSION.match(v.name)),
                          key=lambda name: int(name[1:]), reverse=True) if subject_dir.is_dir() else []
        return filter(None, (self._entry(subject_id, v) for v in versions))

    def _entry(self, subject_id: str, version: str) -> AvatarEntry | None:
        path = self.root / subject_id / version
        meta_path = path / META_FILE
        if not meta_path.is_file() or not (path / MODEL_FILE).is_file():
            return None
        meta = json.loads(meta_path.read_text())
        created = dt.datetime.fromisoformat(meta.get("created_at", "1970-01-01T00:00:00+00:00"))
        metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
        return AvatarEntry(subject_id, version, path, json.dumps(meta["layout"], sort_keys=True), metrics,
                           str(meta.get("config_hash", "")), created)

    # ------------------------------------------------------------------ writing

    def put(self, subject_id: str, avatar: Avatar) -> AvatarEntry:
        """Store ``avatar`` as the subject's next version, atomically; returns its entry."""
        validate_subject_id(subject_id)
        subject_dir = self.root / subject_id
        subject_dir.mkdir(parents=True, exist_ok=True)
        avatar.meta["subject_id"] = subject_id
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=subject_dir))
        try:
            save_avatar(avatar, tmp / "avatar")
            _fsync_dir(tmp / "avatar")
            while True:
                version = f"v{self._next_number(subject_dir):04d}"
                try:
                    os.rename(tmp / "avatar", subject_dir / version)  # fails if a racer took it
                    break
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
            _fsync_dir(subject_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.write_manifest()
        return self.get(subject_id, version)

    @staticmethod
    def _next_number(subject_dir: Path) -> int:
        numbers = [int(v.name[1:]) for v in subject_dir.iterdir() if VERSION.match(v.name)]
        return max(numbers, default=0) + 1

    def write_manifest(self) -> Path:
        """Rebuild ``manifest.parquet`` from the tree, under an exclusive lock, atomically."""
        import pyarrow.parquet as pq

        from perse_ray.schema import table_from_rows

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            table = table_from_rows([e.row(self.root) for e in self.list()], "avatars")
            fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=self.root)
            os.close(fd)
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.root / MANIFEST)
        return self.root / MANIFEST


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
