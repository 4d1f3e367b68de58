"""The avatar registry: ``<root>/<subject_id>/<version>/{model.safetensors, avatar.json}`` plus an
append-only index, ``<root>/index.jsonl``.

Each version directory is written whole in a temporary directory and renamed into place, so a
reader sees a complete version or none, and a writer killed midway leaves the previous version
readable. Versions are ``v0001``, ``v0002``…; concurrent writers race on the rename and the loser
takes the next number. Every cost stays flat as the registry grows:

    put      write one folder, rename it, append one line to the index (a short lock, O(1))
    get/find read only that subject's folder
    list     one read of the index; ``RegistryIndex`` (Serve) reads only what was appended since

A corrupt entry (a truncated ``avatar.json``, an empty version folder, a model without its
manifest, a garbled index line) is skipped with a logged reason and never breaks a reader or a
writer. A registry written before the index existed is indexed once, on first read.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perse_ray.avatar.io import META_FILE, MODEL_FILE, Avatar, load_avatar, save_avatar
from perse_ray.schema import SUBJECT_ID, validate_subject_id

VERSION = re.compile(r"^v\d{4,}$")
INDEX = "index.jsonl"
INDEX_LOCK = ".index.lock"
# avatar.json fields a client may see (the rest, e.g. the training config, stays internal).
PUBLIC_FIELDS = ("created_at", "preset", "metrics", "camera", "layout", "format", "format_version")

log = logging.getLogger(__name__)


class RegistryError(KeyError):
    """No such subject or version."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION.match(version):
        raise ValueError(f"invalid version {version!r}: expected v0001, v0002, …")
    return version


def _version_number(name: str) -> int:
    return int(name[1:])


@dataclass(frozen=True)
class AvatarEntry:
    subject_id: str
    version: str
    registry_root: Path  # absolute
    latent_layout: str  # JSON
    metrics: dict[str, float]
    config_hash: str  # the training hash
    created_at: dt.datetime
    manifest: dict[str, Any] = field(default_factory=dict, compare=False)  # avatar.json's PUBLIC_FIELDS

    @property
    def path(self) -> Path:
        """The version folder (made on use: building 10^4 paths would dominate ``list``)."""
        return self.registry_root / self.subject_id / self.version

    def index_line(self) -> str:
        return json.dumps({"subject_id": self.subject_id, "version": self.version, "config_hash": self.config_hash,
                           "latent_layout": self.latent_layout, "manifest": self.manifest}, sort_keys=True) + "\n"


def _entry_from_meta(root: Path, subject_id: str, version: str, meta: Any, config_hash: str | None = None,
                     latent_layout: str | None = None) -> AvatarEntry:
    """An entry from avatar.json's content (or an index line's manifest); ValueError if it is unusable."""
    if not isinstance(meta, dict) or not isinstance(meta.get("layout"), dict):
        raise ValueError("no latent layout in the manifest")
    if latent_layout is None:
        latent_layout = json.dumps(meta["layout"], sort_keys=True)
    created = dt.datetime.fromisoformat(str(meta.get("created_at") or "1970-01-01T00:00:00+00:00"))
    metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    public = {k: meta[k] for k in PUBLIC_FIELDS if k in meta}
    config_hash = str(meta.get("config_hash", "")) if config_hash is None else config_hash
    return AvatarEntry(subject_id, version, root, latent_layout, metrics, config_hash, created,
                       public)


class Registry:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    # ------------------------------------------------------------------ reading

    def list(self) -> list[AvatarEntry]:
        """Every indexed version of every subject, sorted by subject then version (one read of the index)."""
        index = RegistryIndex(self.root)
        index.refresh()
        return index.entries()

    def latest(self) -> list[AvatarEntry]:
        """The newest version of each subject, sorted by subject."""
        index = RegistryIndex(self.root)
        index.refresh()
        return index.latest()

    def get(self, subject_id: str, version: str | None = None) -> AvatarEntry:
        validate_subject_id(subject_id)
        if version is not None:
            validate_version(version)
            entry = self._read_entry(subject_id, version)
        else:
            entry = next(self._newest_first(subject_id), None)
        if entry is None:
            raise RegistryError(f"no avatar {subject_id!r}" + (f" version {version!r}" if version else ""))
        return entry

    def load(self, subject_id: str, version: str | None = None) -> Avatar:
        return load_avatar(self.get(subject_id, version).path)

    def find(self, subject_id: str, *config_hashes: str) -> AvatarEntry | None:
        """The newest version trained with one of ``config_hashes`` (a re-run skips the subject)."""
        validate_subject_id(subject_id)
        return next((e for e in self._newest_first(subject_id) if e.config_hash in config_hashes), None)

    def _newest_first(self, subject_id: str):
        """Readable versions of one subject, newest first (reads only that subject's folder)."""
        subject_dir = self.root / subject_id
        try:
            names = [v.name for v in os.scandir(subject_dir) if VERSION.match(v.name)]
        except (FileNotFoundError, NotADirectoryError):
            names = []
        names.sort(key=_version_number, reverse=True)
        return filter(None, (self._read_entry(subject_id, v) for v in names))

    def _read_entry(self, subject_id: str, version: str) -> AvatarEntry | None:
        """The entry of one version folder, or None (with the reason logged) when it is not usable."""
        entry, problem = self.inspect(subject_id, version)
        if problem and problem != "missing":
            log.warning("registry %s: skipping %s/%s: %s", self.root, subject_id, version, problem)
        return entry

    def inspect(self, subject_id: str, version: str) -> tuple[AvatarEntry | None, str]:
        """(entry, "") for a usable version folder, else (None, why not)."""
        path = self.root / subject_id / version
        try:
            text = (path / META_FILE).read_text()
        except FileNotFoundError:
            if not path.is_dir():
                return None, "missing"
            return None, f"no {META_FILE}" + ("" if (path / MODEL_FILE).is_file() else f" and no {MODEL_FILE}")
        except (OSError, UnicodeDecodeError) as e:
            return None, f"unreadable {META_FILE}: {e}"
        if not (path / MODEL_FILE).is_file():
            return None, f"no {MODEL_FILE}"
        try:
            return _entry_from_meta(self.root, subject_id, version, json.loads(text)), ""
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            return None, f"bad {META_FILE}: {e}"

    def scan(self) -> tuple[list[AvatarEntry], list[tuple[str, str]]]:
        """Walk the whole tree (O(N): for re-indexing and checks, never on a hot path): the usable
        entries, sorted, and (``subject/version``, reason) for every unusable version folder."""
        entries, problems = [], []
        if not self.root.is_dir():
            return entries, problems
        for subject in sorted(os.scandir(self.root), key=lambda d: d.name):
            if not subject.is_dir() or not SUBJECT_ID.match(subject.name):
                continue
            versions = sorted((v.name for v in os.scandir(subject.path) if VERSION.match(v.name)), key=_version_number)
            for version in versions:
                entry, problem = self.inspect(subject.name, version)
                if entry is not None:
                    entries.append(entry)
                else:
                    problems.append((f"{subject.name}/{version}", problem))
        return entries, problems

    # ------------------------------------------------------------------ writing

    def put(self, subject_id: str, avatar: Avatar) -> AvatarEntry:
        """Store ``avatar`` as the subject's next version, atomically, and index it; returns its entry."""
        validate_subject_id(subject_id)
        subject_dir = self.root / subject_id
        subject_dir.mkdir(parents=True, exist_ok=True)
        with self._index_lock():  # before the new version exists, so indexing an old tree misses it
            self._ensure_index()
        avatar.meta["subject_id"] = subject_id
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=subject_dir))
        try:
            save_avatar(avatar, tmp / "avatar")
            meta = json.loads((tmp / "avatar" / META_FILE).read_text())
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
        entry = _entry_from_meta(self.root, subject_id, version, meta)
        with self._index_lock():
            _append_line(self.root / INDEX, entry.index_line())
        return entry

    @staticmethod
    def _next_number(subject_dir: Path) -> int:
        numbers = [_version_number(v.name) for v in os.scandir(subject_dir) if VERSION.match(v.name)]
        return max(numbers, default=0) + 1

    def _index_lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        return _FileLock(self.root / INDEX_LOCK)

    def _ensure_index(self) -> None:
        """Under the index lock: a registry written before the index existed is indexed once."""
        if (self.root / INDEX).exists():
            return
        entries, problems = self.scan()
        for where, reason in problems:
            log.warning("registry %s: not indexed %s: %s", self.root, where, reason)
        if entries:
            log.warning("registry %s: indexing %d existing version(s) (no %s yet)", self.root, len(entries), INDEX)
        fd, tmp = tempfile.mkstemp(prefix=".index-", dir=self.root)
        with os.fdopen(fd, "w") as fh:
            fh.writelines(e.index_line() for e in entries)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / INDEX)

    def delete(self, subject_id: str) -> int:
        """Remove every version of a subject and its index lines; returns how many versions there
        were (0: nothing to do, so a repeated delete is a no-op). Under the index lock the subject's
        folder is renamed out of sight (``.deleting-*``, which no reader looks at) and the index is
        rewritten without the subject's lines into a new file that replaces it, so concurrent
        ``put``s of other subjects lose nothing and every ``RegistryIndex`` sees a new file (a new
        inode) and reads it again whole. The renamed folder is removed after the lock is released."""
        validate_subject_id(subject_id)
        if not self.root.is_dir():
            return 0
        gone = self.root / f".deleting-{subject_id}-{uuid.uuid4().hex[:8]}"
        with self._index_lock():
            self._ensure_index()
            subject_dir = self.root / subject_id
            versions = 0
            if subject_dir.is_dir():
                versions = sum(1 for v in os.scandir(subject_dir) if VERSION.match(v.name))
                os.rename(subject_dir, gone)
            index = self.root / INDEX
            lines = index.read_bytes().splitlines(keepends=True) if index.exists() else []
            kept = [line for line in lines if not _names_subject(line, subject_id)]
            if len(kept) != len(lines):
                versions = max(versions, len(lines) - len(kept))
                fd, tmp = tempfile.mkstemp(prefix=".index-", dir=self.root)
                with os.fdopen(fd, "wb") as fh:
                    fh.writelines(line if line.endswith(b"\n") else line + b"\n" for line in kept)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, index)
                _fsync_dir(self.root)
        shutil.rmtree(gone, ignore_errors=True)
        for leftover in self.root.glob(f".deleting-{subject_id}-*"):  # from a delete killed midway
            shutil.rmtree(leftover, ignore_errors=True)
        return versions

    def rebuild_index(self) -> list[tuple[str, str]]:
        """Re-index the whole tree (after manual repairs); returns the unusable folders with reasons."""
        with self._index_lock():
            (self.root / INDEX).unlink(missing_ok=True)
            self._ensure_index()
        return self.scan()[1]


class RegistryIndex:
    """An in-memory view of a registry for readers that must not touch the disk per request (Serve).

    ``refresh()`` costs one ``stat`` when nothing changed and otherwise reads only the bytes appended
    since the last refresh (a rewritten index, after ``delete`` or ``rebuild_index``, is a new file:
    it is read again whole, so deleted subjects drop out).
    Every other method answers from memory. Not thread-safe for concurrent ``refresh`` calls; the
    readers may run beside one refresher.
    """

    def __init__(self, root: str | os.PathLike):
        self.registry = Registry(root)
        self.path = self.registry.root / INDEX
        self._lock = threading.Lock()
        self._stat: tuple[int, int, int] | None = None
        self._offset = 0
        self._versions: dict[str, dict[str, AvatarEntry]] = {}
        self._latest: dict[str, AvatarEntry] = {}
        self._latest_sorted: list[AvatarEntry] = []
        self._problems: list[tuple[str, str]] = []
        self.generation = 0  # bumps whenever the content changed

    def refresh(self) -> bool:
        """Take in what was put since the last refresh; True when anything changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not any(True for _ in self._legacy_subjects()):
                return self._reset_if_loaded()
            with self.registry._index_lock():  # a registry from before the index: index it once
                self.registry._ensure_index()
            st = os.stat(self.path)
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key == self._stat:
            return False
        with open(self.path, "rb") as fh:
            # The file opened, not the one stat()ed: a delete may have replaced it in between.
            st = os.fstat(fh.fileno())
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            # A new inode is a rewritten index (a delete, rebuild_index): read it again whole.
            replaced = self._stat is None or st.st_ino != self._stat[0] or st.st_size < self._offset
            offset = 0 if replaced else self._offset
            fh.seek(offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next refresh
        versions = {} if replaced else dict(self._versions)  # copy on write: readers keep their view
        problems = [] if replaced else list(self._problems)
        changed = set()
        for number, raw in enumerate(data[:end].splitlines()):
            entry, problem = self._parse(raw)
            if entry is None:
                if raw.strip():
                    problems.append((f"{INDEX} at byte {offset}+line {number}", problem))
                    log.warning("registry %s: skipping %s line: %s", self.registry.root, INDEX, problem)
                continue
            if entry.subject_id not in changed:
                versions[entry.subject_id] = dict(versions.get(entry.subject_id, {}))
                changed.add(entry.subject_id)
            versions[entry.subject_id][entry.version] = entry
        latest = dict(self._latest) if not replaced else {}
        for sid in changed:
            if sid in versions:
                latest[sid] = versions[sid][max(versions[sid], key=_version_number)]
        latest_sorted = [latest[sid] for sid in sorted(latest)] if changed or replaced else self._latest_sorted
        with self._lock:
            self._versions, self._latest, self._latest_sorted, self._problems = versions, latest, latest_sorted, problems
            self._offset, self._stat = offset + end, key
            self.generation += 1
        return True

    def _legacy_subjects(self):
        if not self.registry.root.is_dir():
            return
        for d in os.scandir(self.registry.root):
            if d.is_dir() and SUBJECT_ID.match(d.name):
                yield d.name

    def _reset_if_loaded(self) -> bool:
        if self._stat is None and not self._versions:
            return False
        with self._lock:
            self._versions, self._latest, self._latest_sorted, self._problems = {}, {}, [], []
            self._stat, self._offset = None, 0
            self.generation += 1
        return True

    def _parse(self, raw: bytes) -> tuple[AvatarEntry | None, str]:
        try:
            line = json.loads(raw)
            sid, version = validate_subject_id(line["subject_id"]), validate_version(line["version"])
            return _entry_from_meta(self.registry.root, sid, version, line["manifest"], str(line["config_hash"]),
                                    str(line["latent_layout"])), ""
        except (ValueError, TypeError, KeyError) as e:
            return None, f"{type(e).__name__}: {e}"

    def entries(self) -> list[AvatarEntry]:
        with self._lock:
            versions = self._versions
        return [versions[sid][v] for sid in sorted(versions) for v in sorted(versions[sid], key=_version_number)]

    def latest(self) -> list[AvatarEntry]:
        """The newest version of each subject, sorted by subject id."""
        with self._lock:
            return list(self._latest_sorted)

    def get(self, subject_id: str, version: str | None = None) -> AvatarEntry:
        validate_subject_id(subject_id)
        if version is not None:
            validate_version(version)
        with self._lock:
            entry = self._latest.get(subject_id) if version is None else \
                self._versions.get(subject_id, {}).get(version)
        if entry is None:
            raise RegistryError(f"no avatar {subject_id!r}" + (f" version {version!r}" if version else ""))
        return entry

    def problems(self) -> list[tuple[str, str]]:
        """(where, reason) of every index line skipped as unusable."""
        with self._lock:
            return list(self._problems)

    def __len__(self) -> int:
        with self._lock:
            return len(self._latest)


class _FileLock:
    """An exclusive ``flock`` on a small lock file, held only around O(1) work."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self._fh = open(self.path, "a")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def _names_subject(raw: bytes, subject_id: str) -> bool:
    """Whether an index line belongs to ``subject_id`` (a garbled line that mentions it counts too:
    a deletion leaves no trace of the subject in the index)."""
    try:
        return json.loads(raw).get("subject_id") == subject_id
    except (ValueError, AttributeError):
        return subject_id.encode() in raw


def _append_line(path: Path, line: str) -> None:
    """Append one whole line: a line left unfinished by a killed writer is closed off first, so it
    spoils only itself."""
    with open(path, "ab+") as fh:
        if fh.tell():
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write(line.encode())
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
