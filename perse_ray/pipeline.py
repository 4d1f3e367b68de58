"""The Ray Data graph over the synthesis stages (the only Ray Data code in the package).

    candidates ─► ingest ─► edit ─► animate ─► morph ─► id_filter ─► driver (write)

Streaming, no materialize in between; one stateful actor pool per model stage, each actor loading
its model once. Every stage reads and writes one Arrow schema, ``STREAM``: a row is a
``candidate`` (a discovered subject), a ``subject`` (a ``subjects`` row), ``edits`` (a subject's
edited portraits), a ``bundle`` (every frame of a subject at one motion index: all edits animated
there, then their morphs), a ``frame`` (a ``frames`` row) or an ``error``. A stage consumes one
kind and passes every other row through, so the subject rows ride along to the driver.

Granularity follows the data volume: a subject fans out into one bundle per motion frame, so
frames spread over actors, while each bundle holds every edit at that frame, which the morph
needs side by side. A raising row never aborts the dataset: it becomes an ``error`` row naming
the stage, and the driver quarantines that subject.
"""

from __future__ import annotations

import abc
import copy
import math
import os
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from perse_ray.config import Config
from perse_ray.models import expand_model_ref, resolve_model_ref
from perse_ray.portraits import Candidate, Discovery, decode_mask_png, decode_png, encode_png
from perse_ray.schema import FRAMES, SUBJECTS
from perse_ray.synth.motion import motion_script, script_to_json
from perse_ray.synth.write import FramesWriter, OutputFolder, reason_category

STAGES = ("ingest", "edit", "animate", "morph", "id_filter")

_frame_item = pa.struct([
    ("attribute", pa.string()),
    ("edit_index", pa.int16()),
    ("interpolation", FRAMES.field("interpolation").type),
    ("image_png", pa.binary()),
    ("mask_png", pa.binary()),
    ("landmarks", pa.list_(pa.list_(pa.float32(), 2))),
    ("also_edits", FRAMES.field("also_edits").type),
])
_edit_item = pa.struct([
    ("attribute", pa.string()),
    ("edit_index", pa.int16()),
    ("image_png", pa.binary()),
    ("mask_png", pa.binary()),
    ("also_edits", FRAMES.field("also_edits").type),
])

# Union of the subjects and frames columns (all nullable here) plus the stages' working columns.
STREAM = pa.schema(
    [pa.field("kind", pa.string()), pa.field("stage", pa.string()), pa.field("error", pa.string())]
    + [f.with_nullable(True) for f in SUBJECTS]
    + [f.with_nullable(True) for f in FRAMES if f.name not in SUBJECTS.names]
    + [pa.field("images", pa.list_(pa.string())), pa.field("image_sha256", pa.list_(pa.string())),
       pa.field("notes", pa.list_(pa.string())), pa.field("edits", pa.list_(_edit_item)),
       pa.field("bundle", pa.list_(_frame_item)), pa.field("id_source", pa.string()),
       pa.field("seconds", pa.map_(pa.string(), pa.float64()))])


def stream_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{name: row.get(name) for name in STREAM.names} for row in rows],
                                schema=STREAM)


def candidate_row(c: Candidate) -> dict:
    return {"kind": "candidate", "subject_id": c.subject_id, "source_path": c.source_path,
            "content_sha256": c.content_sha256, "images": list(c.images),
            "image_sha256": list(c.image_sha256), "notes": list(c.notes)}


def model_fields(cfg: Config) -> list[tuple[str, str]]:
    """(section, key) of the model strings the configured backends load."""
    fields = []
    if cfg.synth.edit_backend == "instruct_pix2pix":
        fields.append(("synth", "edit_model"))
    if cfg.synth.animate_backend == "controlnet":
        fields += [("synth", "animate_model"), ("synth", "controlnet_model")]
    if cfg.synth.morph_backend == "diffusion" and ("synth", "animate_model") not in fields:
        fields.append(("synth", "animate_model"))
    if cfg.faces.backend == "insightface":
        fields.append(("faces", "model"))
    if cfg.faces.identity_model:
        fields.append(("faces", "identity_model"))
    return fields


def resolve_models(cfg: Config) -> Config:
    """A copy whose model strings are expanded (``${VARS}``, ``~``) and, when local, checked to
    exist, on the driver: a missing model fails before any actor starts, and workers need not
    share the driver's environment (a variable set after Ray started never reaches them)."""
    cfg = copy.deepcopy(cfg)
    for section, key in model_fields(cfg):
        node = getattr(cfg, section)
        value = expand_model_ref(getattr(node, key))
        if key == "model" and section == "faces":  # a pack name, looked up by the backend
            setattr(node, key, value)
        else:
            setattr(node, key, resolve_model_ref(value))
    return cfg


def frames_per_subject(cfg: Config) -> int:
    from perse_ray.synth.edit import combined_levels

    edits = sum(len(a.edits) for a in cfg.synth.attributes)
    return cfg.synth.motion.num_frames * (1 + edits + edits * len(cfg.synth.morph_alphas)) + len(combined_levels(cfg))


# --------------------------------------------------------------------------- stages


class _Stage(abc.ABC):
    """Applies ``process`` to rows of kind ``consumes``; passes the rest; turns raises into errors."""

    name = ""
    consumes = ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: list[dict] = []
        for row in batch.to_pylist():
            if row["kind"] != self.consumes:
                out.append(row)
                continue
            start = time.perf_counter()
            try:
                produced = self.process(row)
            except Exception as e:  # noqa: BLE001 - any failure of one row must not abort the dataset
                last = traceback.extract_tb(e.__traceback__)[-1]
                produced = [{"kind": "error", "subject_id": row["subject_id"], "stage": self.name,
                             "error": f"{type(e).__name__}: {e} (at {last.name}:{last.lineno})"}]
            # Busy time goes on the first output row, so the driver's sums are seconds per stage.
            seconds = dict(row.get("seconds") or [])
            seconds[self.name] = seconds.get(self.name, 0.0) + time.perf_counter() - start
            produced[0]["seconds"] = seconds
            out += produced
        return stream_table(out)

    @abc.abstractmethod
    def process(self, row: dict) -> list[dict]:
        """Output rows for one consumed row (at least one)."""


class IngestStage(_Stage):
    name, consumes = "ingest", "candidate"

    def __init__(self, cfg: Config):
        from perse_ray.faces import load_face_model

        self.cfg, self.faces = cfg, load_face_model(cfg.faces)

    def process(self, row):
        from perse_ray.synth.ingest import ingest_subject

        c = Candidate(row["subject_id"], row["source_path"], row["content_sha256"], tuple(row["images"]),
                      tuple(row["image_sha256"]), tuple(row["notes"] or ()))
        return [{"kind": "subject", **ingest_subject(c, self.faces, self.cfg)}]


def _edits_from_row(row: dict):
    from perse_ray.synth.edit import Edit

    return [Edit(e["attribute"], e["edit_index"], decode_png(e["image_png"]),
                 decode_mask_png(e["mask_png"]) if e["mask_png"] is not None else None, _levels(e["also_edits"]))
            for e in row["edits"]]


def _levels(also_edits) -> dict[str, int] | None:
    """A map column's value (a dict, or Arrow's list of pairs) → {attribute: level}."""
    return None if also_edits is None else {k: int(v) for k, v in dict(also_edits).items()}


class EditStage(_Stage):
    name, consumes = "edit", "subject"

    def __init__(self, cfg: Config):
        from perse_ray.synth.backends import load_editor

        self.cfg, self.editor = cfg, load_editor(cfg)

    def process(self, row):
        from perse_ray.synth.edit import edit_subject

        if row["status"] != "ok":
            return [row]
        portrait = decode_png(row["portrait_png"])
        landmarks = np.asarray(row["landmarks"], np.float32)
        edits = edit_subject(row["subject_id"], portrait, landmarks, self.editor, self.cfg)
        items = [{"attribute": e.attribute, "edit_index": e.edit_index, "image_png": encode_png(e.image),
                  "mask_png": encode_png(e.mask) if e.mask is not None else None,
                  "also_edits": e.also_edits} for e in edits]
        return [row, {"kind": "edits", "subject_id": row["subject_id"], "portrait_png": row["portrait_png"],
                      "landmarks": row["landmarks"], "identity": row["identity"], "edits": items}]


def _frame_item_dict(f) -> dict:
    return {"attribute": f.attribute, "edit_index": f.edit_index,
            "interpolation": None if f.interpolation is None else
            dict(zip(("from_edit", "to_edit", "alpha"), f.interpolation)),
            "image_png": encode_png(f.image),
            "mask_png": encode_png(f.mask) if f.mask is not None else None,
            "landmarks": np.asarray(f.landmarks, np.float32).tolist(), "also_edits": f.also_edits}


def _frames_from_bundle(row: dict):
    from perse_ray.synth.animate import Frame

    return [Frame(f["attribute"], f["edit_index"], decode_png(f["image_png"]),
                  np.asarray(f["landmarks"], np.float32),
                  decode_mask_png(f["mask_png"]) if f["mask_png"] is not None else None,
                  None if f["interpolation"] is None else
                  (f["interpolation"]["from_edit"], f["interpolation"]["to_edit"], f["interpolation"]["alpha"]),
                  _levels(f["also_edits"]))
            for f in row["bundle"]]


class AnimateStage(_Stage):
    name, consumes = "animate", "edits"

    def __init__(self, cfg: Config):
        from perse_ray.synth.backends import load_animator

        self.cfg, self.animator = cfg, load_animator(cfg)
        self.script = motion_script(cfg.synth.motion)

    def process(self, row):
        from perse_ray.synth.animate import animate_frame

        edits = _edits_from_row(row)
        landmarks = np.asarray(row["landmarks"], np.float32)
        shared = {k: row[k] for k in ("subject_id", "portrait_png", "landmarks", "identity")}
        return [{"kind": "bundle", **shared, "frame_index": frame.index,
                 "bundle": [_frame_item_dict(f) for f in
                            animate_frame(row["subject_id"], edits, landmarks, frame, self.animator, self.cfg)]}
                for frame in self.script]


class MorphStage(_Stage):
    name, consumes = "morph", "bundle"

    def __init__(self, cfg: Config):
        from perse_ray.synth.backends import load_morpher

        self.cfg, self.morpher = cfg, load_morpher(cfg)
        self.script = motion_script(cfg.synth.motion)

    def process(self, row):
        from perse_ray.synth.morph import morph_frame

        morphs = morph_frame(row["subject_id"], decode_png(row["portrait_png"]),
                             np.asarray(row["landmarks"], np.float32), _frames_from_bundle(row),
                             self.script[row["frame_index"]], self.morpher, self.cfg)
        return [{**row, "bundle": row["bundle"] + [_frame_item_dict(f) for f in morphs]}]


class IdFilterStage(_Stage):
    name, consumes = "id_filter", "bundle"

    def __init__(self, cfg: Config):
        from perse_ray.faces import load_face_model

        self.cfg, self.faces = cfg, load_face_model(cfg.faces)
        self.script = motion_script(cfg.synth.motion)

    def process(self, row):
        from perse_ray.synth.animate import frame_camera
        from perse_ray.synth.id_filter import identity_verdict

        frame = self.script[row["frame_index"]]
        camera, identity = frame_camera(frame, self.cfg), np.asarray(row["identity"], np.float32)
        out = []
        for item in row["bundle"]:
            v = identity_verdict(self.faces, decode_png(item["image_png"]),
                                 np.asarray(item["landmarks"], np.float32), identity,
                                 self.cfg.faces.id_threshold)
            out.append({"kind": "frame", "subject_id": row["subject_id"], "attribute": item["attribute"],
                        "edit_index": item["edit_index"], "interpolation": item["interpolation"],
                        "frame_index": frame.index, "camera": camera, "expression": frame.expression,
                        "image_png": item["image_png"], "mask_png": item["mask_png"],
                        "id_score": v.id_score, "kept": v.kept, "drop_reason": v.drop_reason,
                        "also_edits": _levels(item["also_edits"]),
                        "id_source": v.source})
        return out


STAGE_CLASSES = (IngestStage, EditStage, AnimateStage, MorphStage, IdFilterStage)


def synthesize_subject(cfg: Config, subject: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``frames`` rows of one ingested subject (a ``subjects`` row), made in this process by the
    same stages the graph runs (edit, animate, morph, identity filter), without Ray: for work on
    one subject, such as an edit added to a trained avatar. A failing stage raises."""
    if subject.get("status") != "ok":
        raise ValueError(f"subject {subject.get('subject_id')!r} was not ingested ({subject.get('reason')})")
    rows = [{"kind": "subject", **subject}]
    for stage_class in STAGE_CLASSES[1:]:
        stage = stage_class(cfg)
        rows = [out for row in rows for out in (stage.process(row) if row["kind"] == stage.consumes else [row])]
    return [{k: v for k, v in row.items() if k in FRAMES.names} for row in rows if row["kind"] == "frame"]


# --------------------------------------------------------------------------- graph


# Beside its actor pools the graph runs plain tasks (the repartitions between stages), each asking
# Ray Data's default of one CPU: a cluster without room for one beside the actors stands still
# with every stage at 0 and no error ("backpressured: ResourceBudget").
TASK_CPU = 1.0


def graph_needs(cfg: Config) -> dict[str, float]:
    """Logical resources the whole graph holds at once: every actor plus one task."""
    actors = len(STAGE_CLASSES) * cfg.machine.actors_per_stage
    return {"CPU": actors * cfg.machine.cpus_per_actor + TASK_CPU, "GPU": actors * cfg.machine.gpus_per_actor}


def check_resources(cfg: Config, resources: dict[str, float]) -> None:
    """A graph that cannot be placed whole waits forever: refuse it up front, naming the shortfall."""
    actors = len(STAGE_CLASSES) * cfg.machine.actors_per_stage
    for key, need in graph_needs(cfg).items():
        have = resources.get(key, 0.0)
        if need > have + 1e-9:
            tasks = f" + {TASK_CPU:g} for its tasks" if key == "CPU" else ""
            raise RuntimeError(f"synthesis needs {need:g} {key} ({actors} actors x "
                               f"{getattr(cfg.machine, key.lower() + 's_per_actor'):g}{tasks}), the cluster has "
                               f"{have:g}: lower machine.actors_per_stage or machine.{key.lower()}s_per_actor, "
                               "or add nodes")


def local_num_cpus(cfg: Config) -> int:
    """Logical CPUs for a local Ray: the machine's, raised so the whole graph fits with one to spare
    (actors are mostly waiting on each other's output: oversubscribing the logical count is safe,
    starving the tasks is not)."""
    return max(os.cpu_count() or 1, math.ceil(graph_needs(cfg)["CPU"]) + 1)


def build_dataset(cfg: Config, candidates: list[Candidate]):
    """The lazy Ray dataset of the whole synthesis graph over ``candidates``."""
    import ray

    check_resources(cfg, ray.cluster_resources())
    cfg = resolve_models(cfg)
    m = cfg.machine
    ds = ray.data.from_arrow(stream_table([candidate_row(c) for c in candidates]))
    # One block per subject so ingest and edit spread subjects over the actors.
    ds = ds.repartition(target_num_rows_per_block=1)
    for cls in STAGE_CLASSES:
        ds = ds.map_batches(cls, fn_constructor_args=(cfg,), batch_size=m.synth_batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=m.actors_per_stage),
                            num_cpus=m.cpus_per_actor, num_gpus=m.gpus_per_actor or None)
        if cls is AnimateStage:
            # A subject just became num_frames bundles in one block: split it so every actor of the
            # next stages gets work (streaming; no materialize).
            ds = ds.repartition(target_num_rows_per_block=m.synth_batch_size)
    return ds


GRAPH_ATTEMPTS = 3  # runs of the graph when a node (its actors, its blocks) is lost mid-run


def _cluster_lost_work(error: BaseException) -> bool:
    """A failure of the cluster (a dead node, actor or object), not of the data or the code."""
    import ray.exceptions as rex

    lost = (rex.NodeDiedError, rex.ActorDiedError, rex.ObjectLostError, rex.OwnerDiedError, rex.WorkerCrashedError,
            rex.RaySystemError, rex.ActorUnavailableError)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, lost) or "died" in str(error).lower() and isinstance(error, rex.RayError):
            return True
        error = error.__cause__ or error.__context__
    return False


def run_pipeline(cfg: Config, candidates: list[Candidate], log=print) -> Iterator[pa.Table]:
    """Stream the graph's output blocks (subject, frame and error rows) as they complete."""
    if not candidates:
        return
    import ray

    blocks = build_dataset(cfg, candidates).iter_batches(batch_size=None, batch_format="pyarrow")
    yield from watch_progress(blocks, graph_needs(cfg), ray.cluster_resources, cfg.machine.stall_timeout_s, log)


def watch_progress(blocks: Iterator, needs: dict[str, float], cluster_resources, stall_timeout_s: float,
                   log=print) -> Iterator:
    """``blocks``, failing instead of hanging when none came for ``stall_timeout_s`` while the cluster
    (e.g. after a node left) holds less than the graph ``needs``; a slow graph on a big enough
    cluster only gets a line saying so."""
    import queue
    import threading

    inbox: queue.Queue = queue.Queue(maxsize=2)
    done = object()

    def pump():
        try:
            for block in blocks:
                inbox.put(block)
            inbox.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            inbox.put(e)

    threading.Thread(target=pump, name="synthesis blocks", daemon=True).start()
    last = time.monotonic()
    while True:
        try:
            item = inbox.get(timeout=min(stall_timeout_s, 10.0))
        except queue.Empty:
            idle = time.monotonic() - last
            if idle < stall_timeout_s:
                continue
            have = cluster_resources()
            short = {k: (need, have.get(k, 0.0)) for k, need in needs.items() if need > have.get(k, 0.0) + 1e-9}
            if short:
                raise RuntimeError("synthesis made no progress for {:.0f} s: ".format(idle) + "; ".join(
                    f"it needs {need:g} {k}, the cluster has {got:g}" for k, (need, got) in short.items())
                    + " (a node left?): add nodes or lower machine.actors_per_stage")
            log(f"no synthesis output for {idle:.0f} s; the cluster holds what the graph needs: still waiting")
            last = time.monotonic()
            continue
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        last = time.monotonic()
        yield item


def synthesize(cfg: Config, discovery: Discovery, output: Path, log=print) -> dict:
    """Run the graph for every discovered subject not already complete in ``output``; write
    subjects.parquet, frames/, motion.json and summary.json; return the summary. Ray must be up."""
    start = time.perf_counter()
    folder = OutputFolder(output, cfg.synthesis_hash(), cfg.legacy_hash(), log)
    with folder.exclusive():
        return _synthesize(cfg, discovery, folder, start, log)


def _synthesize(cfg: Config, discovery: Discovery, folder: OutputFolder, start: float, log) -> dict:
    complete = folder.prepare()
    folder.write_json("motion.json", script_to_json(motion_script(cfg.synth.motion)))
    earlier = folder.rejected()
    rejected = {c.subject_id: earlier[c.subject_id] for c in discovery.candidates
                if c.subject_id in earlier and earlier[c.subject_id]["content_sha256"] == c.content_sha256}
    todo = [c for c in discovery.candidates if c.subject_id not in complete and c.subject_id not in rejected]
    reused = [complete[c.subject_id] for c in discovery.candidates if c.subject_id in complete]
    for row in reused:
        log(f"[skip] {row['subject_id']}: frames complete for synthesis {folder.config_hash}")
    for row in rejected.values():
        log(f"[skip] {row['subject_id']}: turned down at ingest before ({row['reason']})")
    writer = FramesWriter(folder, frames_per_subject(cfg), log)
    remaining = todo
    for attempt in range(GRAPH_ATTEMPTS):
        try:
            for block in run_pipeline(cfg, remaining, log):
                writer.add_block(block)
            break
        except Exception as e:  # noqa: BLE001 - only the cluster's losses are retried, below
            if not _cluster_lost_work(e) or attempt + 1 == GRAPH_ATTEMPTS:
                raise
            writer.drop_unfinished()
            remaining = [c for c in todo if writer.unsettled(c.subject_id)]
            log(f"[retry] the graph lost work with a node ({type(e).__name__}); running it again for the "
                f"{len(remaining)} subject(s) not yet complete")
    rejected_before = [{k: row[k] for k in SUBJECTS.names} for row in rejected.values()]
    turned_down = writer.rejected()
    written = writer.finish({c.subject_id: (c.source_path, c.content_sha256) for c in todo})
    # ingest's decisions (no face, …) are outcomes; a stage error or a missing frame is a failure
    declined = {r["subject_id"] for r in turned_down}
    failed = {r["subject_id"]: r["reason"] for r in written if r["status"] != "ok" and r["subject_id"] not in declined}
    rows = discovery.quarantined + reused + rejected_before + written
    folder.write_rejected(rejected_before + turned_down)
    folder.write_subjects(rows)
    in_input = {r["subject_id"] for r in rows}
    summary = {
        "synthesis_hash": folder.config_hash, "preset": cfg.preset,
        "subjects": dict(Counter(r["status"] for r in rows), total=len(rows)),
        "reasons": dict(Counter(reason_category(r["reason"]) for r in rows if r["status"] != "ok")),
        "skipped_complete": len(reused),
        "failed": failed,
        "frames": {"per_subject": frames_per_subject(cfg), "written_this_run": sum(writer.counts[s] for s in writer.done),
                   **writer.frame_stats},
        "seconds_per_stage": {stage: round(writer.seconds.get(stage, 0.0), 3) for stage in STAGES},
        "wall_seconds": round(time.perf_counter() - start, 3),
        "partitions_not_in_input": sorted(p.name.split("=", 1)[1] for p in folder.frames_dir.glob("subject_id=*")
                                          if p.name.split("=", 1)[1] not in in_input),
    }
    folder.write_json("summary.json", summary)
    return summary
