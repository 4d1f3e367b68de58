"""Leases on a shared file system: one holder of a piece of work at a time, across jobs and nodes.

    with Lease(run_root / "alice.lease", owner="job-1f2e/trial", ttl_s=60) as lease:
        ...train...
        lease.check()        # raises LeaseLost if another job took it over meanwhile
        registry.put(...)

A lease is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on POSIX and NFSv3+). Its
holder touches it every ``ttl_s / 4`` seconds from a thread; a lease whose file was not touched
for ``ttl_s`` belongs to a holder that died (a killed job, a lost node) and may be taken over.
Take-overs are serialised by a ``flock`` on a side file, so two waiters never both take the same
stale lease; a holder that was only slow finds its lease gone at its next ``check()`` and stops
before writing anything. A holder of the same ``job`` (a retried trial of the same run) takes
over at once instead of waiting for the expiry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

DEFAULT_TTL_S = 60.0


class LeaseHeld(RuntimeError):
    """Someone else holds the lease."""

    def __init__(self, path: Path, holder: dict, age_s: float):
        super().__init__(f"{path.name} is held by {holder.get('owner', '?')} (touched {age_s:.0f} s ago)")
        self.holder, self.age_s = holder, age_s


class LeaseLost(RuntimeError):
    """The lease expired and another holder took it over."""


class Lease:
    def __init__(self, path: str | os.PathLike, owner: str, job: str = "", ttl_s: float = DEFAULT_TTL_S):
        self.path = Path(path)
        self.owner, self.job, self.ttl_s = owner, job, float(ttl_s)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.lost = False

    # ------------------------------------------------------------------ acquiring

    def try_acquire(self) -> None:
        """Take the lease now, or raise ``LeaseHeld``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create():
            holder, age = self._holder()
            if age <= self.ttl_s and not (self.job and holder.get("job") == self.job):
                raise LeaseHeld(self.path, holder, age)
            with self._takeover_lock():  # stale (or our own job's): take it over, one taker at a time
                holder, age = self._holder()
                stale = age > self.ttl_s or (self.job and holder.get("job") == self.job)
                if stale:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                if not self._create():
                    holder, age = self._holder()
                    raise LeaseHeld(self.path, holder, age)
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease {self.path.name}", daemon=True)
        self._beat.start()

    def acquire(self, timeout_s: float | None = None, poll_s: float = 1.0,
                on_wait: Callable[[LeaseHeld], None] | None = None) -> None:
        """Wait until the lease is free or stale, then take it; ``on_wait`` hears about the first wait.
        Raises ``LeaseHeld`` after ``timeout_s`` (None: wait as long as its holder lives)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        told = False
        while True:
            try:
                return self.try_acquire()
            except LeaseHeld as held:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if on_wait and not told:
                    on_wait(held)
                    told = True
            time.sleep(poll_s)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"owner": self.owner, "job": self.job, "token": self.token, "host": socket.gethostname(),
                       "pid": os.getpid(), "ttl_s": self.ttl_s, "acquired_at": time.time()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _holder(self) -> tuple[dict, float]:
        """(the holder's record, seconds since it was last touched). A vanished file counts as stale,
        so the take-over path resolves it; one still being written is as young as its mtime."""
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except OSError:
            return {}, float("inf")
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}
        return (holder if isinstance(holder, dict) else {}), age

    @contextlib.contextmanager
    def _takeover_lock(self):
        with open(self.path.with_name(self.path.name + ".takeover"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    # ------------------------------------------------------------------ holding

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            if not self._ours():
                self.lost = True
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _ours(self) -> bool:
        holder, _ = self._holder()
        return holder.get("token") == self.token

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this lease is still ours (call before writing results)."""
        if self.lost or not self._ours():
            self.lost = True
            raise LeaseLost(f"{self.path.name} expired and was taken over by another job")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self._ours():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> "Lease":
        if self._beat is None:
            self.try_acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
