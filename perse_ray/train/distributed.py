"""Train many subjects on Ray (the package's only Ray Train/Tune code).

    results = train_subjects("synth/", "out/", load_config("cpu"), workers_per_subject=2)

One worker per subject (the common case, and the one that scales to thousands): a pool of
long-lived trainer actors, one per concurrent subject, takes subjects from the driver's queue and
runs the loop in-process; a subject costs one actor call of orchestration, not a trial or a worker
group. An actor that dies with its node is replaced and its subject retried (up to
``max_failures``), resuming from the loop's own checkpoints. With ``workers_per_subject > 1`` a
Tune grid runs one trial per subject, each driving a Ray Train ``TorchTrainer``: DDP (gloo on CPUs,
nccl on GPUs), each rank training its share of every step's global batch (``loop.DataParallel``),
rank 0 reporting checkpoints, restarts resuming from the last one. Under ``output``:

    avatars/                                        the registry: safetensors + JSON + its index
    ray_train/<training hash>/<subject>.lease       who trains the subject now (perse_ray.lease)
    ray_train/<training hash>/<subject>/            an unfinished subject's checkpoints, used only by
                                                    the lease holder; a re-run resumes from them
                                                    (removed once the avatar is in the registry)
    ray_train/<training hash>/_tune-<time>-<job>/   a DDP job's Tune experiment state (its pickles)

Subjects already in the registry for the training hash are skipped before any trainer is built. A
trial takes the subject's lease first, so two jobs on one output never train a subject twice: the
second waits while the first trains, then finds the avatar registered and skips it; a lease left
by a killed job expires after ``lease_ttl_s``. A subject that cannot train (frames all dropped,
unreadable or made by another synthesis config, an error after the retries) is reported failed
with its reason while the others finish. Each trial puts its avatar into the registry as soon as
it is trained, so a killed job loses only unfinished work. Trials and workers run wherever Ray
places them: ``frames_root`` and ``output`` must be storage every node sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from perse_ray.avatar.io import Avatar, load_avatar, save_avatar
from perse_ray.config import Config, from_dict
from perse_ray.lease import DEFAULT_TTL_S, Lease
from perse_ray.registry import Registry
from perse_ray.train.data import check_workers, discover, read_frames
from perse_ray.train.loop import CHECKPOINT_PREFIX, TRAINER_FILE, DataParallel, latest_checkpoint, train_avatar

TRIAL_CPU = 0.01  # a trial that only drives a TorchTrainer (Tune rejects 0)
LOOP_CHECKPOINTS = "loop"  # one-worker subjects: the loop's checkpoints, in the subject's run folder
REASON_CHARS = 500


@dataclasses.dataclass
class SubjectResult:
    subject_id: str
    status: str  # done | skipped (already in the registry, or trained by another job meanwhile) | failed
    reason: str = ""
    version: str = ""  # registry version (done, skipped)
    steps: int = 0
    seconds: float = 0.0  # wall time of the subject's trial in this run
    final_loss: float = math.nan
    heldout_psnr: float = math.nan  # on motion-script frames the training never saw
    resumed_from: int = 0  # checkpoint step the training continued from (0: from scratch)
    node: str = ""  # the Ray node it trained on (one-worker subjects)


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every trial needs (Tune ships it to the trials)."""

    output: Path
    run_root: Path
    config: Config
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float  # 0: train on CPUs
    max_failures: int
    partitions: dict[str, str]
    job_id: str  # this call of train_subjects: its leases and Tune experiment
    lease_ttl_s: float

    def registry(self) -> Registry:
        return Registry(self.output / "avatars")

    def trained(self, sid: str):
        """The subject's registry entry for this training config (or one of before stage hashes)."""
        return self.registry().find(sid, self.config.training_hash(), self.config.legacy_hash())


def train_subjects(frames_root: str | Path, output: str | Path, config: Config, workers_per_subject: int = 1,
                   subjects: list[str] | None = None, *, max_failures: int = 2, max_concurrent: int | None = None,
                   cpus_per_worker: float = 0.5, gpus_per_worker: float = 1.0, lease_ttl_s: float = DEFAULT_TTL_S,
                   log: Callable[[str], Any] = print) -> list[SubjectResult]:
    """Train every subject of a synthesis output (or just ``subjects``) that is not yet in
    ``<output>/avatars`` for ``config``; one result per subject, sorted. Ray must be up.

    ``max_failures``: restarts per subject after a worker or trial process dies.
    ``max_concurrent``: subjects at once (default: as many as the cluster's CPUs hold).
    ``cpus_per_worker``: logical CPUs per training process (fractional: whole CPUs starve a 2-core box).
    ``gpus_per_worker``: GPUs per training process when it trains on GPUs: ``machine.device=cuda``, or
    ``auto`` on a cluster that has GPUs (fractional packs several small avatars onto one GPU).
    ``lease_ttl_s``: how long a killed job's lease on a subject blocks others (its heartbeat is ttl/4).
    """
    check_workers(config, workers_per_subject)
    if config.train.steps < 1:
        raise ValueError("train.steps must be >= 1")
    output = Path(output).expanduser().resolve()
    training_hash = config.training_hash()
    job = _Job(output, output / "ray_train" / training_hash, config, workers_per_subject, cpus_per_worker, 0.0,
               max_failures, {}, uuid.uuid4().hex[:12], lease_ttl_s)
    results: dict[str, SubjectResult] = {}
    todo: dict[str, str] = {}
    for found in discover(frames_root, subjects, config):
        sid = found.subject_id
        if not found.trainable:
            results[sid] = SubjectResult(sid, "failed", found.problem)
            log(f"[failed] {sid}: {found.problem}")
        elif (entry := job.trained(sid)) is not None:  # reads only this subject's registry folder
            results[sid] = _skipped(entry, f"already trained for config {training_hash}")
            log(f"[skip] {sid}: in the registry as {entry.version} for config {training_hash}")
        else:
            todo[sid] = str(found.partition)
    if todo:
        on_gpus = _trains_on_gpus(config)
        # every trial and worker trains on the device chosen here, not on whatever it happens to see
        placed = dataclasses.replace(config, machine=dataclasses.replace(config.machine,
                                                                         device="cuda" if on_gpus else "cpu"))
        # subjects another job holds go last: by the time they come up, they are likely registered
        held = {sid for sid in todo if (job.run_root / f"{sid}.lease").exists()}
        order = sorted(todo, key=lambda sid: (sid in held, sid))
        job = dataclasses.replace(job, config=placed, gpus_per_worker=gpus_per_worker if on_gpus else 0.0,
                                  partitions={sid: todo[sid] for sid in order})
        results.update((r.subject_id, r) for r in _run_grid(job, max_concurrent, log))
    return [results[sid] for sid in sorted(results)]


def _skipped(entry, reason: str) -> SubjectResult:
    m = entry.metrics
    return SubjectResult(entry.subject_id, "skipped", reason, entry.version, int(m.get("steps", 0)), 0.0,
                         m.get("final_loss", math.nan), m.get("heldout_psnr", math.nan))


def _trains_on_gpus(config: Config) -> bool:
    device = config.machine.device
    return device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0.0) > 0)


def _run_grid(job: _Job, max_concurrent: int | None, log) -> list[SubjectResult]:
    direct = job.workers == 1
    have, fits = ray.cluster_resources(), []
    for kind, per_worker in (("CPU", job.cpus_per_worker), ("GPU", job.gpus_per_worker)):
        if not per_worker:
            continue
        need = job.workers * per_worker + (TRIAL_CPU if kind == "CPU" and not direct else 0.0)
        if need > have.get(kind, 0.0):  # Tune would wait forever for a placement that can never happen
            raise RuntimeError(f"one subject needs {need:g} {kind}s ({job.workers} worker(s) x {per_worker:g}) but "
                               f"the cluster has {have.get(kind, 0.0):g}: use fewer workers per subject or fewer "
                               f"{kind}s per worker")
        fits.append(int(have[kind] / need + 1e-9))
    concurrency = min(max_concurrent or max(1, min(fits)), len(job.partitions))
    log(f"training {len(job.partitions)} subject(s), {job.workers} worker(s) each"
        f"{' on GPUs' if job.gpus_per_worker else ''}, up to {concurrency} at once; run state in {job.run_root}")
    if direct:
        return _run_pool(job, concurrency, log)
    trainable = tune.with_resources(tune.with_parameters(_subject_trial, job=job), {"cpu": TRIAL_CPU})
    tuner = tune.Tuner(
        trainable,
        param_space={"subject_id": tune.grid_search(list(job.partitions))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=f"_tune-{time.strftime('%Y%m%d-%H%M%S')}-{job.job_id}",
                                  storage_path=str(job.run_root),
                                  failure_config=tune.FailureConfig(max_failures=job.max_failures),
                                  callbacks=[_Progress(job.config.train.steps, log)], verbose=0))
    out = []
    for result in tuner.fit():
        sid = result.config["subject_id"]
        if result.error is not None:
            out.append(SubjectResult(sid, "failed", _reason(result.error)))
        else:
            out.append(_subject_result(sid, result.metrics))
    return out


def _worker_resources(job: _Job) -> dict[str, float]:
    return {"CPU": job.cpus_per_worker, **({"GPU": job.gpus_per_worker} if job.gpus_per_worker else {})}


def _trial_name(trial) -> str:
    return trial.config["subject_id"]


def _subject_result(sid: str, m: dict) -> SubjectResult:
    if m.get("status") == "skipped":
        return SubjectResult(sid, "skipped", m["reason"], m["version"], int(m.get("steps", 0)), m.get("seconds", 0.0),
                             m.get("final_loss", math.nan), m.get("heldout_psnr", math.nan))
    if m.get("status") != "done":
        return SubjectResult(sid, "failed", m.get("reason") or "the trial ended without a result",
                             seconds=m.get("seconds", 0.0))
    return SubjectResult(sid, "done", "", m["version"], int(m["steps"]), m["seconds"], m["final_loss"],
                         m.get("heldout_psnr", math.nan), int(m["resumed_from"]), m.get("node", ""))


def _reason(error: BaseException) -> str:
    """The exception's type and its last message line (a worker's traceback ends with the cause)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1].strip() if lines else ''}"[:REASON_CHARS]


@ray.remote
class _SubjectTrainer:
    """A long-lived training process: trains the subjects the driver hands it, one at a time."""

    def __init__(self, job: _Job, events):
        self.job, self.events = job, events

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def train(self, sid: str) -> dict:
        return {**train_subject(self.job, sid, lambda record: self._report(sid, record)), "node": self.node()}

    def _report(self, sid: str, record: dict) -> None:
        """Progress is best effort: a lost queue must not fail the subject it reports on."""
        from ray.util.queue import Full

        try:
            self.events.put((sid, record), timeout=5)
        except (ray.exceptions.RayError, Full):  # a dead or stuck queue only costs a progress line
            pass


def _run_pool(job: _Job, concurrency: int, log) -> list[SubjectResult]:
    """Subjects through ``concurrency`` trainer actors; a dead actor is replaced and its subject retried."""
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: the queue then lives exactly as long as the job (on a worker node it
    # died with that node, and the driver's next read failed the whole build).
    events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)})
    # SPREAD: by default Ray packs small actors onto one node; subjects belong on every node
    options = {"num_cpus": job.cpus_per_worker, "num_gpus": job.gpus_per_worker, "max_concurrency": 1,
               "scheduling_strategy": "SPREAD"}
    progress = _Progress(job.config.train.steps, log)
    pending, failures, running, out = list(reversed(job.partitions)), {}, {}, []

    def start(actor) -> None:
        sid = pending.pop()
        running[actor.train.remote(sid)] = (actor, sid)

    def drain() -> None:
        while not events.empty():
            sid, record = events.get_nowait()
            progress.show(sid, record)

    try:
        for _ in range(concurrency):
            start(_SubjectTrainer.options(**options).remote(job, events))
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            drain()
            for ref in ready:
                actor, sid = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:  # the process or its node died: a new actor retries
                    failures[sid] = failures.get(sid, 0) + 1
                    if failures[sid] > job.max_failures:
                        out.append(SubjectResult(sid, "failed", f"its trainer died {failures[sid]} times: {_reason(e)}"))
                        log(f"[failed] {sid}: {out[-1].reason}")
                    else:
                        log(f"[retry] {sid}: its trainer died ({type(e).__name__}); retrying from its last checkpoint")
                        pending.append(sid)
                    ray.kill(actor)  # dead already, or broken: never reused
                    actor = _SubjectTrainer.options(**options).remote(job, events)
                else:
                    progress.show(sid, result)
                    out.append(_subject_result(sid, result))
                if pending:
                    start(actor)
        drain()
    finally:
        for actor, _ in running.values():
            ray.kill(actor)
        ray.kill(events.actor)
    return out


def _subject_trial(params: dict, job: _Job) -> dict:
    """One Tune trial (DDP subjects): ``train_subject`` reporting to Tune."""
    return train_subject(job, params["subject_id"], tune.report)


def train_subject(job: _Job, sid: str, report: Callable[[dict], Any]) -> dict:
    """Take the subject's lease, train it unless another job registered it meanwhile, put its avatar
    into the registry; the returned result says how it went (``report`` hears progress on the way)."""
    start = time.perf_counter()
    lease = Lease(job.run_root / f"{sid}.lease", owner=f"job {job.job_id} pid {os.getpid()}", job=job.job_id,
                  ttl_s=job.lease_ttl_s)
    try:
        lease.acquire(on_wait=lambda held: report({"status": "waiting", "reason": str(held)}))
        with lease:
            entry = job.trained(sid)
            if entry is not None:
                m = entry.metrics
                return {"status": "skipped", "reason": "trained by another job meanwhile", "version": entry.version,
                        "steps": m.get("steps", 0), "final_loss": m.get("final_loss", math.nan),
                        "heldout_psnr": m.get("heldout_psnr", math.nan), "seconds": time.perf_counter() - start}
            avatar, metrics = _train_in_process(job, sid, report) if job.workers == 1 else _train_with_ray_train(job, sid)
            lease.check()  # never register over a job that took an expired lease over
            entry = job.registry().put(sid, avatar)
            shutil.rmtree(job.run_root / sid, ignore_errors=True)  # a re-run skips it now: checkpoints are spent
    except Exception as e:  # this subject fails with its reason; the grid goes on
        return {"status": "failed", "reason": _reason(e), "seconds": time.perf_counter() - start}
    return {**metrics, "status": "done", "version": entry.version, "seconds": time.perf_counter() - start}


def _train_in_process(job: _Job, sid: str, report: Callable[[dict], Any]) -> tuple[Avatar, dict]:
    """One worker: the loop in this process; a retry or a re-run resumes from its checkpoints."""
    ckpt_dir = job.run_root / sid / LOOP_CHECKPOINTS
    latest = latest_checkpoint(ckpt_dir)
    resumed_from = _step_of(latest) if latest else 0
    result = train_avatar(read_frames(job.partitions[sid]), job.config, ckpt_dir, progress=False, subject_id=sid,
                          on_log=lambda record, _: report(dict(record)))
    return result.avatar, {**result.metrics, "resumed_from": resumed_from}


def _train_with_ray_train(job: _Job, sid: str) -> tuple[Avatar, dict]:
    """Several workers: a TorchTrainer (DDP) whose run, named after the subject, resumes on a re-run."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"subject_id": sid, "partition": job.partitions[sid], "config": job.config.to_dict()},
        torch_config=TorchConfig(backend="nccl" if job.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=bool(job.gpus_per_worker),
                                     resources_per_worker=_worker_resources(job)),
        run_config=RunConfig(
            name=sid, storage_path=str(job.run_root), checkpoint_config=CheckpointConfig(num_to_keep=2),
            # worker-group start timeouts count as controller failures: bound them too
            failure_config=FailureConfig(max_failures=job.max_failures, controller_failure_limit=job.max_failures),
            callbacks=[TuneReportCallback()]))
    result = trainer.fit()
    with result.checkpoint.as_directory() as path:
        avatar = load_avatar(Path(path) / "avatar")
    return avatar, dict(result.metrics)


def _worker_loop(loop_config: dict) -> None:
    """One DDP rank: restore the last reported checkpoint, train, report at every checkpoint (rank 0
    with it, the others without), then the final avatar with its metrics. Reports only go out with
    checkpoints: Train synchronises the ranks at each one, and a report arriving before the
    controller has collected the previous one waits for its next poll (1-2 s here)."""
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    config = from_dict(Config, loop_config["config"])
    sid = loop_config["subject_id"]
    scratch = Path(tempfile.mkdtemp(prefix=f"perse-train-{sid}-"))
    try:
        resumed_from = _restore(ray.train.get_checkpoint(), scratch)
        last: dict[str, float] = {}

        def on_checkpoint(path: Path | None, step: int) -> None:
            if step < config.train.steps:  # the last one goes out below, with the metrics
                ray.train.report(dict(last) if last.get("step") == step else {"step": step},
                                 checkpoint=None if path is None else ray.train.Checkpoint.from_directory(path))

        result = train_avatar(read_frames(loop_config["partition"]), config, scratch, progress=False, subject_id=sid,
                              on_log=lambda record, _: last.update(record), on_checkpoint=on_checkpoint,
                              parallel=DataParallel(rank, ctx.get_world_size()))
        final = None
        if rank == 0:
            final = latest_checkpoint(scratch)  # the last step's: a resume from it just re-evaluates
            save_avatar(result.avatar, final / "avatar")  # the same weights, now carrying the metrics
        ray.train.report({**result.metrics, "resumed_from": resumed_from},
                         checkpoint=None if final is None else ray.train.Checkpoint.from_directory(final))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _restore(checkpoint, scratch: Path) -> int:
    """Copy a reported checkpoint where the loop resumes from; its step (0: none)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        step = _step_of(Path(path))
        shutil.copytree(path, scratch / f"{CHECKPOINT_PREFIX}{step:08d}")
    return step


def _step_of(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / TRAINER_FILE).read_text())["step"])


class _Progress(tune.Callback):
    """A line per reported step (log steps with one worker, checkpoints with several), wait, retry
    and end of each subject (runs in the driver: Tune's callback, or called by the trainer pool)."""

    def __init__(self, steps: int, log: Callable[[str], Any]):
        self.steps, self.log = steps, log

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.show(trial.config["subject_id"], result)

    def show(self, sid: str, result: dict) -> None:
        if result.get("status") == "done":
            resumed = f", resumed from step {result['resumed_from']}" if result["resumed_from"] else ""
            self.log(f"[done] {sid}: {result['version']}, {int(result['steps'])} steps in {result['seconds']:.1f} s, "
                     f"held-out PSNR {result.get('heldout_psnr', math.nan):.2f} dB{resumed}")
        elif result.get("status") == "failed":
            self.log(f"[failed] {sid}: {result['reason']}")
        elif result.get("status") == "waiting":
            self.log(f"[wait] {sid}: another job is training it ({result['reason']}); waiting for it")
        elif result.get("status") == "skipped":
            self.log(f"[skip] {sid}: {result['reason']} ({result['version']})")
        elif "step" in result:
            losses = f", loss {result['loss']:.4f}, batch PSNR {result['psnr']:.2f} dB" if "loss" in result else ""
            self.log(f"[train] {sid}: step {int(result['step'])}/{self.steps}{losses}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.log(f"[retry] {trial.config['subject_id']}: the trial process died; restarting from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"[failed] {trial.config['subject_id']}: the trial process died more often than max_failures")
