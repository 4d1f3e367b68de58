"""Write: the synthesis outputs, atomically and resumably, all inside one output folder.

    <output>/subjects.parquet                       every input: ok, or quarantined with a reason
    <output>/frames/subject_id=<id>/part-*.parquet  hive partitions of the ``frames`` schema
    <output>/frames/subject_id=<id>/_COMPLETE       JSON: synthesis hash and frame count
    <output>/frames/subject_id=<id>/_subject.parquet that subject's ``subjects`` row (for re-runs)
    <output>/rejected.json                          portraits ingest turned down (no face, …), by
                                                    subject: content hash, synthesis hash and reason
    <output>/motion.json, <output>/summary.json

A subject's parts are written into ``frames/.staging-<run>/subject_id=<id>/`` and the folder is
renamed into place only when every frame is there and ``_COMPLETE`` is written, so a killed run
never leaves a half-written partition where readers look (pyarrow skips names starting with "." or
"_"). A re-run deletes leftover staging folders and half-written partitions, skips subjects whose
partition is complete for the current synthesis hash, and those whose unchanged portrait ingest
already turned down with this config (that decision is deterministic; errors and crashes are not
remembered, so they are retried). A complete partition made by another synthesis config stays
where it is (training refuses it) until this run writes that subject anew, and the run says so.
Partitions from before stage hashes (a ``config_hash`` marker) are adopted when that old hash is
this config's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perse_ray.schema import FRAMES, SUBJECTS, table_from_rows, validate, validate_subject_id

COMPLETE = "_COMPLETE"
SUBJECT_FILE = "_subject.parquet"
REJECTED_FILE = "rejected.json"


class OutputError(ValueError):
    """The output folder cannot be used (a file, or inside the input folder)."""


def check_output_dir(output: str | os.PathLike, input_dir: str | os.PathLike) -> Path:
    out = Path(output).expanduser().resolve()
    inp = Path(input_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if out == inp or inp in out.parents:
        raise OutputError(f"output {out} is inside the input folder {inp}: it would be read as a subject")
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def partition_dir(frames_dir: Path, subject_id: str) -> Path:
    return frames_dir / f"subject_id={validate_subject_id(subject_id)}"


def reason_category(reason: str) -> str:
    """A reason without its particulars (numbers, ids, file names), for counting in the summary."""
    head = re.split(r" \(|: ", reason, maxsplit=1)[0]
    return re.sub(r"^duplicate of .*", "duplicate", head)


class OutputFolder:
    def __init__(self, root: Path, config_hash: str, legacy_hash: str | None = None, log=print):
        self.root = root
        self.frames_dir = root / "frames"
        self.config_hash = config_hash  # the synthesis hash
        self.legacy_hash = legacy_hash  # the single config hash of older outputs, for adopting them
        self.log = log

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the folder for one run (a second run would delete the first one's staging): a second
        run waits for the first, then finds its subjects complete."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.log(f"output {self.root} is in use by another run: waiting for it")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield self

    def prepare(self) -> dict[str, dict]:
        """Create the folders, clear what a killed run left; the complete subjects' rows by id."""
        self.frames_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.frames_dir.glob(".staging-*"):
            shutil.rmtree(leftover)
        for tmp in list(self.root.glob(".*.tmp")):
            tmp.unlink()
        complete, other = {}, Counter()
        for part in self.frames_dir.glob("subject_id=*"):
            row, made_by = self._complete_row(part)
            if row is None:
                shutil.rmtree(part)  # half-written: redone
            elif made_by == self.config_hash:
                complete[row["subject_id"]] = row
            else:
                other[made_by] += 1
        for made_by, n in other.items():
            self.log(f"{n} frames partition(s) were made by synthesis config {made_by}, not {self.config_hash}: "
                     "training refuses them; each is replaced when this run synthesizes its subject")
        return complete

    def _complete_row(self, part: Path) -> tuple[dict | None, str]:
        """(the partition's subject row, the synthesis hash that made it) if it is whole, else (None, "")."""
        try:
            marker = json.loads((part / COMPLETE).read_text())
            rows = validate(pq.read_table(part / SUBJECT_FILE), "subjects").to_pylist()
            frames = sum(pq.read_metadata(p).num_rows for p in part.glob("part-*.parquet"))
        except (OSError, ValueError, pa.ArrowException):
            return None, ""
        whole = isinstance(marker, dict) and marker.get("frames") == frames > 0 and len(rows) == 1 \
            and part.name == f"subject_id={rows[0]['subject_id']}"
        if not whole:
            return None, ""
        made_by = marker.get("synthesis_hash")
        if made_by is None and self.legacy_hash and marker.get("config_hash") == self.legacy_hash:
            atomic_write_bytes(part / COMPLETE, json.dumps({**marker, "synthesis_hash": self.config_hash}).encode())
            self.log(f"[adopt] {rows[0]['subject_id']}: frames from before stage hashes, made by this config")
            made_by = self.config_hash
        return rows[0], str(made_by or f"{marker.get('config_hash')} (older, single-hash)")

    def rejected(self) -> dict[str, dict]:
        """Ingest's earlier rejections under this config: subject id → its quarantined subjects row."""
        try:
            entries = json.loads((self.root / REJECTED_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        return {sid: row for sid, row in entries.items()
                if isinstance(row, dict) and set(SUBJECTS.names) <= set(row)
                and (row.get("synthesis_hash") == self.config_hash
                     or (self.legacy_hash and row.get("config_hash") == self.legacy_hash))}

    def write_rejected(self, rows: list[dict]) -> None:
        self.write_json(REJECTED_FILE, {r["subject_id"]: {**{k: r[k] for k in SUBJECTS.names},
                                                          "synthesis_hash": self.config_hash} for r in rows})

    def write_json(self, name: str, payload: dict | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload, indent=1, sort_keys=True)
        atomic_write_bytes(self.root / name, text.encode())

    def write_subjects(self, rows: list[dict]) -> pa.Table:
        table = table_from_rows(sorted(rows, key=lambda r: r["subject_id"]), "subjects")
        atomic_write_table(self.root / "subjects.parquet", table)
        return table


class FramesWriter:
    """Receives the pipeline's rows on the driver; writes and completes partitions per subject."""

    def __init__(self, folder: OutputFolder, expected_frames: int, log=print):
        self.folder = folder
        self.expected = expected_frames
        self.staging = folder.frames_dir / f".staging-{uuid.uuid4().hex[:12]}"
        self.log = log
        self.subjects: dict[str, dict] = {}
        self.counts: Counter[str] = Counter()
        self.parts: Counter[str] = Counter()
        self.failed: dict[str, str] = {}
        self.done: set[str] = set()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.frame_stats: Counter[str] = Counter()

    def add_block(self, block: pa.Table) -> None:
        for seconds in block.column("seconds").to_pylist():
            for stage, s in seconds or []:
                self.seconds[stage] += s
        kinds = block.column("kind")
        for row in block.filter(pc.equal(kinds, "error")).select(["subject_id", "stage", "error"]).to_pylist():
            self.fail(row["subject_id"], f"{row['stage']}: {row['error']}")
        for row in block.filter(pc.equal(kinds, "subject")).select(SUBJECTS.names).to_pylist():
            self.subjects[row["subject_id"]] = row
            if row["status"] != "ok":
                self.log(f"[ingest] {row['subject_id']}: quarantined ({row['reason']})")
            self._maybe_complete(row["subject_id"])
        frames = block.filter(pc.equal(kinds, "frame"))
        if frames.num_rows:
            self._add_frames(frames)

    def _add_frames(self, frames: pa.Table) -> None:
        for source, n in Counter(frames.column("id_source").to_pylist()).items():
            self.frame_stats[f"identity_from_{source}"] += n
        ids = frames.column("subject_id")
        for sid in pc.unique(ids).to_pylist():
            if sid in self.failed:
                continue
            table = validate(frames.filter(pc.equal(ids, sid)).select(FRAMES.names), "frames")
            part = partition_dir(self.staging, sid)
            part.mkdir(parents=True, exist_ok=True)
            atomic_write_table(part / f"part-{self.parts[sid]:05d}.parquet", table)
            self.parts[sid] += 1
            self.counts[sid] += table.num_rows
            kept = pc.sum(table.column("kept").cast(pa.int64())).as_py() or 0
            self.frame_stats["kept"] += kept
            self.frame_stats["dropped"] += table.num_rows - kept
            self._maybe_complete(sid)

    def _maybe_complete(self, sid: str) -> None:
        row = self.subjects.get(sid)
        if sid in self.failed or sid in self.done or row is None or row["status"] != "ok" \
                or self.counts[sid] < self.expected:
            return
        if self.counts[sid] > self.expected:
            self.fail(sid, f"write: {self.counts[sid]} frames, expected {self.expected}")
            return
        staged = partition_dir(self.staging, sid)
        atomic_write_table(staged / SUBJECT_FILE, table_from_rows([row], "subjects"))
        atomic_write_bytes(staged / COMPLETE, json.dumps(
            {"subject_id": sid, "synthesis_hash": self.folder.config_hash, "frames": self.counts[sid]}).encode())
        final = partition_dir(self.folder.frames_dir, sid)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staged, final)
        self.done.add(sid)
        self.log(f"[write] {sid}: {self.counts[sid]} frames complete")

    def unsettled(self, sid: str) -> bool:
        """Neither complete, nor failed, nor turned down at ingest: the graph must run it (again)."""
        row = self.subjects.get(sid)
        return sid not in self.done and sid not in self.failed and (row is None or row["status"] == "ok")

    def drop_unfinished(self) -> None:
        """Forget what arrived of unsettled subjects (a rerun of the graph sends all of it again)."""
        for sid in [s for s in set(self.counts) | set(self.subjects) if self.unsettled(s)]:
            self.counts.pop(sid, None)
            self.parts.pop(sid, None)
            self.subjects.pop(sid, None)
            shutil.rmtree(partition_dir(self.staging, sid), ignore_errors=True)

    def fail(self, sid: str, reason: str) -> None:
        if sid in self.failed:
            return
        self.failed[sid] = reason
        shutil.rmtree(partition_dir(self.staging, sid), ignore_errors=True)
        self.log(f"[{reason.split(':')[0]}] {sid}: quarantined ({reason})")

    def rejected(self) -> list[dict]:
        """The subjects rows ingest turned down in this run (its decisions, not errors)."""
        return [row for sid, row in self.subjects.items() if row["status"] != "ok" and sid not in self.failed]

    def finish(self, sources: dict[str, tuple[str, str]]) -> list[dict]:
        """The subjects rows of this run, failures and incomplete subjects quarantined.
        ``sources``: (source_path, content_sha256) by subject id, for subjects that failed before
        their row was made."""
        rows = []
        for sid, row in self.subjects.items():
            if row["status"] == "ok" and sid not in self.done:
                reason = self.failed.get(sid) or f"incomplete: {self.counts[sid]} of {self.expected} frames"
                row = {**row, "status": "quarantined", "reason": reason}
            rows.append(row)
        for sid, reason in self.failed.items():  # failed before any subject row arrived (ingest)
            if sid not in self.subjects:
                path, sha = sources[sid]
                rows.append({"subject_id": sid, "source_path": path, "content_sha256": sha,
                             "status": "quarantined", "reason": reason})
        shutil.rmtree(self.staging, ignore_errors=True)
        return rows
