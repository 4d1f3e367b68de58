"""Training input: which subjects of a synthesis output can train, and one subject's kept frames.

    <synth output>/frames/subject_id=<id>/part-*.parquet   (``frames`` schema, hive-partitioned)
    <synth output>/frames/subject_id=<id>/_COMPLETE       written last: the partition is whole, and
                                                          the synthesis hash that made it
    <synth output>/subjects.parquet                       every input subject, ok or quarantined

Hidden entries (a writer's staging folders and temp files) are never read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perse_ray.config import Config
from perse_ray.schema import table_from_rows, validate, validate_subject_id
from perse_ray.synth.write import COMPLETE

PARTITION_PREFIX = "subject_id="


class FramesError(ValueError):
    """The frames folder cannot be used at all."""


@dataclasses.dataclass(frozen=True)
class SubjectFrames:
    subject_id: str
    partition: Path | None  # absolute; None when the subject has no partition
    kept: int = 0
    total: int = 0
    problem: str = ""  # why the subject cannot train; "" when it can

    @property
    def trainable(self) -> bool:
        return not self.problem


def frames_dir(root: str | os.PathLike) -> Path:
    """The folder holding ``subject_id=*`` partitions: ``<root>/frames``, or ``root`` itself."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FramesError(f"frames folder {root} does not exist")
    if (root / "frames").is_dir():
        return root / "frames"
    if root.name == "frames" or any(root.glob(f"{PARTITION_PREFIX}*")):
        return root
    raise FramesError(f"{root} has neither a frames/ folder nor {PARTITION_PREFIX}<id>/ partitions "
                      "(expected the output of jobs/synthesize.py)")


def discover(root: str | os.PathLike, subjects: list[str] | None = None,
             config: Config | None = None) -> list[SubjectFrames]:
    """Every subject of the synthesis output (or just ``subjects``), sorted, each trainable or with
    the reason it is not. Reads only the ``kept``/``drop_reason`` columns. With ``config``, frames
    made by another synthesis config are not trainable (their marker names the hash that made them)."""
    folder = frames_dir(root)
    found: dict[str, SubjectFrames] = {}
    for part in sorted(folder.glob(f"{PARTITION_PREFIX}*")):
        sid = part.name[len(PARTITION_PREFIX):]
        if not part.is_dir():
            continue
        try:
            found[validate_subject_id(sid)] = _inspect(sid, part, config)
        except ValueError as e:
            found[sid] = SubjectFrames(sid, part, problem=str(e))
    summary = folder.parent / "subjects.parquet"
    if folder.name == "frames" and summary.is_file():
        table = pq.read_table(summary, columns=["subject_id", "status"])
        for row in table.to_pylist():
            if row["status"] == "ok" and row["subject_id"] not in found:
                found[row["subject_id"]] = SubjectFrames(row["subject_id"], None, problem="no frames partition")
    if subjects is not None:
        found = {sid: found.get(sid) or SubjectFrames(validate_subject_id(sid), None, problem="no frames partition")
                 for sid in subjects}
    return [found[sid] for sid in sorted(found)]


def _inspect(sid: str, part: Path, config: Config | None) -> SubjectFrames:
    try:
        marker = json.loads((part / COMPLETE).read_text())
    except FileNotFoundError:
        return SubjectFrames(sid, part, problem=f"frames partition incomplete (no {COMPLETE} marker)")
    except (OSError, ValueError) as e:
        return SubjectFrames(sid, part, problem=f"unreadable {COMPLETE} marker: {e}")
    if config is not None:
        problem = synthesis_mismatch(marker, config)
        if problem:
            return SubjectFrames(sid, part, problem=problem)
    try:
        table = pa.concat_tables([pq.ParquetFile(p).read(columns=["kept", "drop_reason"]) for p in _parts(part)])
    except (OSError, ValueError, pa.ArrowException) as e:
        return SubjectFrames(sid, part, problem=f"unreadable frames: {e}")
    kept = pc.sum(table.column("kept").cast(pa.int64())).as_py() or 0
    if kept == 0:
        reasons = Counter(table.column("drop_reason").to_pylist())
        detail = ", ".join(f"{reason or 'no reason'} x{n}" for reason, n in reasons.most_common())
        return SubjectFrames(sid, part, 0, table.num_rows, f"all {table.num_rows} frames dropped ({detail})"
                             if table.num_rows else "frames partition has no rows")
    return SubjectFrames(sid, part, kept, table.num_rows)


def check_workers(config: Config, workers_per_subject: int) -> None:
    """DDP ranks split ``train.batch_size`` frames per step: each needs at least one."""
    if workers_per_subject < 1:
        raise ValueError(f"workers_per_subject must be >= 1, got {workers_per_subject}")
    if workers_per_subject > config.train.batch_size:
        raise ValueError(f"{workers_per_subject} workers per subject cannot split train.batch_size="
                         f"{config.train.batch_size} frames: use at most {config.train.batch_size} workers")


def synthesis_mismatch(marker: object, config: Config) -> str:
    """Why frames with this ``_COMPLETE`` marker cannot train under ``config`` ("" if they can)."""
    marker = marker if isinstance(marker, dict) else {}
    want = config.synthesis_hash()
    if marker.get("synthesis_hash") == want or ("synthesis_hash" not in marker
                                                and marker.get("config_hash") == config.legacy_hash()):
        return ""
    got = marker.get("synthesis_hash") or (f"{marker['config_hash']} (an older, single-hash config)"
                                            if "config_hash" in marker else "none recorded")
    return (f"frames were made by synthesis config {got}, not by this config's {want}: re-run synthesis with "
            "this config, or train with the config that made them")


def _parts(part: Path) -> list[Path]:
    files = sorted(part.glob("part-*.parquet"))
    if not files:
        raise ValueError(f"no part-*.parquet files in {part}")
    return files


def read_frames(partition: str | os.PathLike) -> pa.Table:
    """A subject's kept frames as one ``frames``-schema table."""
    table = validate(pa.concat_tables([pq.ParquetFile(p).read() for p in _parts(Path(partition))]), "frames")
    return table.filter(table.column("kept"))


def write_partition(root: str | os.PathLike, subject_id: str, rows: list[dict], config: Config) -> Path:
    """Write ``frames``-schema rows as one complete partition of a synthesis output for ``config``,
    the way jobs/synthesize.py lays it out (ground-truth benchmarks, tests); returns the partition folder."""
    part = Path(root) / "frames" / f"{PARTITION_PREFIX}{validate_subject_id(subject_id)}"
    part.mkdir(parents=True, exist_ok=True)
    table = table_from_rows([{**r, "subject_id": subject_id} for r in rows], "frames")
    pq.write_table(table, part / "part-00000.parquet")
    (part / COMPLETE).write_text(json.dumps({"subject_id": subject_id, "frames": len(rows),
                                             "synthesis_hash": config.synthesis_hash()}))
    return part
