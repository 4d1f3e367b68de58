"""Deleting a person: every file a build output holds of one subject, and the records that keep a
re-run from building them again.

    delete_subject(output, "alice-1a2b3c4d", actor="cli:ops")   -> DeletionReport
    deletion_records(output)                                     -> {portrait content sha256: record}
    find_traces(output, "alice-1a2b3c4d")                        -> paths still naming or holding the id

What goes, under ``<output>``:

    synth/frames/subject_id=<id>/ (and any staging copy)      the synthesized partition
    synth/rejected.json, subjects.parquet, summary.json       the subject's entries (rewritten without them)
    avatars/<id>/ and its index.jsonl lines                   every registry version (``Registry.delete``)
    ray_train/<hash>/<id>/, <id>.lease(.takeover)             checkpoints, run folders and leases
    ray_train/<hash>/_tune-*/ files that name the subject     Tune experiment state of finished DDP jobs
    eval/<id>/                                                the evaluation cache
    report/<id>/ and its rows and section of report/index.html
    build.json                                                the subject's outcome (rewritten without it)

What stays: ``deletions.json`` (the portrait's content sha256 and when: a re-run of
``build_avatars`` over an input folder that still holds the portrait skips it, and ``--rebuild``
removes the record) and one line in ``audit.jsonl`` (who, what, when; the subject id, never face
data). The source portrait belongs to the user: it is removed only with ``delete_source``.

Safe beside a running build of other subjects: the subject's training lease is taken first (so no
trainer writes it meanwhile), the synthesis folder is held with the synthesis run's own lock
(a delete waits while a synthesis stage runs), and the registry index is compacted under its lock.
Idempotent: a second delete finds nothing and reports zero removals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from perse_ray.schema import validate_subject_id

DELETIONS_FILE = "deletions.json"
AUDIT_FILE = "audit.jsonl"
_LOCK = ".deletions.lock"
_SHA = re.compile(r"^[0-9a-f]{64}$")
# Files that are read for traces whole; larger ones (parquet parts) only by name.
_SCAN_BYTES = 64 << 20


@dataclasses.dataclass
class DeletionReport:
    subject_id: str
    content_sha256: list[str]  # the portraits recorded as deleted
    registry_versions: int  # versions removed from the registry
    removed: list[str]  # paths removed, relative to the output
    rewritten: list[str]  # files rewritten without the subject
    source_removed: list[str]  # source portrait files removed (delete_source)
    audit: dict[str, Any]  # the audit line written

    @property
    def found_anything(self) -> bool:
        return bool(self.removed or self.rewritten or self.registry_versions or self.source_removed)


# --------------------------------------------------------------------------- deletion records


@contextlib.contextmanager
def _records_lock(output: Path):
    output.mkdir(parents=True, exist_ok=True)
    with open(output / _LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def deletion_records(output: str | os.PathLike) -> dict[str, dict]:
    """{portrait content sha256: {"deleted_at", "deleted_at_s", "subject_id", "audit_id"}}; an unreadable file is an error (a
    build must not quietly rebuild deleted people because the record could not be read)."""
    path = Path(output) / DELETIONS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable deletion records ({e}): repair or restore it") from None
    records = data.get("deleted") if isinstance(data, dict) else None
    if not isinstance(records, dict) or not all(_SHA.match(k) and isinstance(v, dict) for k, v in records.items()):
        raise ValueError(f"{path}: expected {{\"deleted\": {{<sha256>: {{...}}}}}}")
    return records


def _write_records(output: Path, records: dict[str, dict]) -> None:
    tmp = output / f".{DELETIONS_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps({"deleted": records}, indent=1, sort_keys=True))
    os.replace(tmp, output / DELETIONS_FILE)


def record_deletion(output: Path, subject_id: str, shas: list[str], audit_id: str) -> None:
    with _records_lock(output):
        records = deletion_records(output)
        for sha in shas:
            records[sha] = {"deleted_at": _now(), "deleted_at_s": time.time(), "subject_id": subject_id,
                            "audit_id": audit_id}
        _write_records(output, records)


def forget_deletions(output: str | os.PathLike, shas: list[str]) -> list[str]:
    """Remove the records of these portraits (``build_avatars --rebuild``); returns those removed."""
    output = Path(output)
    with _records_lock(output):
        records = deletion_records(output)
        gone = [s for s in shas if records.pop(s, None) is not None]
        if gone:
            _write_records(output, records)
    return gone


# --------------------------------------------------------------------------- finding the subject


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def subject_rows(output: Path, subject_id: str) -> list[dict]:
    """The subject's ``subjects`` rows wherever synthesis left one (content hash, source path)."""
    import pyarrow.parquet as pq

    synth = output / "synth"
    rows = []
    for table in (synth / "subjects.parquet", synth / "frames" / f"subject_id={subject_id}" / "_subject.parquet"):
        with contextlib.suppress(OSError, ValueError):
            rows += [r for r in pq.read_table(table).to_pylist() if r.get("subject_id") == subject_id]
    with contextlib.suppress(OSError, ValueError, AttributeError):
        row = json.loads((synth / "rejected.json").read_text()).get(subject_id)
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _scrub(value: Any, subject_id: str) -> Any:
    """``value`` without what belongs to the subject: keys equal to the id, list items equal to it
    or dicts whose ``subject_id`` is it."""
    if isinstance(value, dict):
        return {k: _scrub(v, subject_id) for k, v in value.items() if k != subject_id}
    if isinstance(value, list):
        return [_scrub(v, subject_id) for v in value
                if v != subject_id and not (isinstance(v, dict) and v.get("subject_id") == subject_id)]
    return value


def _rewrite_json(path: Path, subject_id: str) -> bool:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return False
    if subject_id not in text:
        return False
    scrubbed = json.dumps(_scrub(json.loads(text), subject_id), indent=1, sort_keys=True, default=str)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(scrubbed)
    os.replace(tmp, path)
    return True


def _rewrite_subjects_table(path: Path, subject_id: str) -> bool:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError):
        return False
    keep = pc.not_equal(table["subject_id"], subject_id)
    if pc.all(keep).as_py() is not False:
        return False
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table.filter(keep), tmp)
    os.replace(tmp, path)
    return True


def strip_report(index: Path, subject_id: str) -> bool:
    """Take the subject's summary row, quarantine row and section out of report/index.html (written
    by ``perse_ray.report.write_report``: one summary row per line, a section from its
    ``<section id=...>`` line to its ``</section>`` line)."""
    import html

    try:
        text = index.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    sid = html.escape(subject_id)
    if sid not in text:
        return False
    out, skipping = [], False
    for line in text.split("\n"):
        if line.startswith(f"<section id='{sid}'>"):
            skipping = True
        if skipping:
            skipping = line != "</section>"
            continue
        if line.startswith(f"<tr><td><a href='#{sid}'>"):
            continue
        out.append(re.sub(rf"<tr><td>[^<]*</td><td>{re.escape(sid)}</td>.*?</tr>", "", line))
    tmp = index.with_name(f".{index.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text("\n".join(out), encoding="utf-8")
    os.replace(tmp, index)
    return True


def _remove(path: Path, removed: list[str], output: Path) -> None:
    """Rename out of sight, then delete (a reader sees the whole folder or nothing)."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        hidden = path.with_name(f".deleting-{uuid.uuid4().hex[:8]}")
        os.rename(path, hidden)
        shutil.rmtree(hidden)
    else:
        path.unlink()
    removed.append(str(path.relative_to(output)))


def _run_roots(output: Path) -> list[Path]:
    root = output / "ray_train"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _mentions(path: Path, needle: bytes) -> bool:
    try:
        if path.stat().st_size > _SCAN_BYTES:
            return False
        return needle in path.read_bytes()
    except OSError:
        return False


# --------------------------------------------------------------------------- deleting


def delete_subject(output: str | os.PathLike, subject_id: str, actor: str, *, delete_source: bool = False,
                   lease_timeout_s: float | None = 600.0, log: Callable[[str], None] = print) -> DeletionReport:
    """Remove the subject from the build output (see the module docstring); returns what was done.
    Raises ``LeaseHeld`` when a trainer keeps the subject past ``lease_timeout_s``."""
    from perse_ray.lease import Lease
    from perse_ray.registry import Registry
    from perse_ray.synth.write import REJECTED_FILE, OutputFolder, partition_dir

    validate_subject_id(subject_id)
    output = Path(output).expanduser().resolve()
    if not output.is_dir():
        raise ValueError(f"output {output} is not a folder")
    audit_id = uuid.uuid4().hex
    removed: list[str] = []
    rewritten: list[str] = []
    rows = subject_rows(output, subject_id)
    shas = sorted({r["content_sha256"] for r in rows if isinstance(r.get("content_sha256"), str)
                   and _SHA.match(r["content_sha256"])})
    sources = sorted({r["source_path"] for r in rows if r.get("source_path")})
    # First the record: a build that starts from now on skips this portrait.
    if shas:
        record_deletion(output, subject_id, shas, audit_id)

    leases = []
    try:
        for run_root in _run_roots(output):
            lease = Lease(run_root / f"{subject_id}.lease", owner=f"delete {audit_id[:12]} pid {os.getpid()}",
                          job=f"delete-{audit_id}")
            lease.acquire(timeout_s=lease_timeout_s, poll_s=0.5,
                          on_wait=lambda held: log(f"waiting for the trainer of {subject_id}: {held}"))
            leases.append(lease)

        synth = output / "synth"
        if synth.is_dir():
            folder = OutputFolder(synth, "", log=log)
            with folder.exclusive():  # the synthesis run's lock: no run rewrites these files meanwhile
                _remove(partition_dir(synth / "frames", subject_id), removed, output)
                for staging in (synth / "frames").glob(".staging-*"):
                    _remove(staging / f"subject_id={subject_id}", removed, output)
                for name in (REJECTED_FILE, "summary.json"):
                    if _rewrite_json(synth / name, subject_id):
                        rewritten.append(f"synth/{name}")
                if _rewrite_subjects_table(synth / "subjects.parquet", subject_id):
                    rewritten.append("synth/subjects.parquet")

        versions = Registry(output / "avatars").delete(subject_id) if (output / "avatars").is_dir() else 0

        for run_root in _run_roots(output):
            _remove(run_root / subject_id, removed, output)
            for tune in run_root.glob("_tune-*"):
                for path in sorted(tune.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if subject_id in path.name or (path.is_file() and _mentions(path, subject_id.encode())):
                        _remove(path, removed, output)
    finally:
        for lease in leases:
            lease.release()
    for run_root in _run_roots(output):
        for name in (f"{subject_id}.lease", f"{subject_id}.lease.takeover"):
            _remove(run_root / name, removed, output)

    _remove(output / "eval" / subject_id, removed, output)
    _remove(output / "report" / subject_id, removed, output)
    if strip_report(output / "report" / "index.html", subject_id):
        rewritten.append("report/index.html")
    if _rewrite_json(output / "build.json", subject_id):
        rewritten.append("build.json")

    source_removed = []
    if delete_source:
        for source in sources:
            path = Path(source)
            if path.is_file():
                path.unlink()
                source_removed.append(str(path))
            elif path.is_dir():
                shutil.rmtree(path)
                source_removed.append(str(path))

    audit = {"audit": "delete", "at": _now(), "id": audit_id, "key_id": actor, "subject": subject_id,
             "outcome": "deleted" if (removed or rewritten or versions or source_removed) else "nothing to delete",
             "registry_versions": versions, "paths_removed": len(removed), "files_rewritten": len(rewritten),
             "portraits_recorded": len(shas), "source_removed": len(source_removed)}
    with _records_lock(output), open(output / AUDIT_FILE, "a") as fh:
        fh.write(json.dumps(audit, sort_keys=True) + "\n")
    return DeletionReport(subject_id, shas, versions, removed, rewritten, source_removed, audit)


def find_traces(output: str | os.PathLike, subject_id: str,
                exempt: tuple[str, ...] = (DELETIONS_FILE, AUDIT_FILE)) -> list[str]:
    """Every path under ``output`` whose name holds the subject id, or whose content does (files up to
    64 MiB), but the deletion record and the audit log: what a completed delete leaves is []."""
    output = Path(output)
    needle = subject_id.encode()
    found = []
    for dirpath, dirnames, filenames in os.walk(output):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(output))
            if rel in exempt:
                continue
            if subject_id in name or (name in filenames and _mentions(path, needle)):
                found.append(rel)
    return sorted(found)
