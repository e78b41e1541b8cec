"""A lease on a stage's output prefix: two pipeline runs on the same storage never run one stage
together.

The lease is one small JSON object, ``<stage output>/_LEASE.json``: its holder, and when it
expires. It is created with a create-exclusive write (O_EXCL locally, If-None-Match on S3), and
renewed, released and taken over with a compare-and-swap on its version (flock + digest locally,
If-Match on the ETag on S3), so exactly one run holds it at a time. The holder renews it in a
background thread; a run that finds it held waits until it is released or expires (or fails,
``workflow.when_busy: fail``), then re-checks the output: complete means the other run made it
and this one reuses it. A lease whose holder was killed expires after ``lease_ttl_s`` and is
taken over; at once when the holder was a process of this same host that no longer exists.

A holder that cannot renew (paused longer than the TTL, storage unreachable) finds out at its
next renewal and logs an error; the stage it runs still commits whole objects and its manifest
last, and a stage's bytes depend only on its identity, so a double run wastes work but cannot
mix outputs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

from tokenflow import storage
from tokenflow.config import WorkflowConfig
from tokenflow.data.manifest import LEASE_NAME
from tokenflow.workflow.durable import StageOutput

log = logging.getLogger(__name__)


class StageBusy(RuntimeError):
    """Another run holds the stage's lease (and ``when_busy`` is ``fail``)."""


@dataclass(frozen=True)
class LeaseRecord:
    owner: str  # unique per pipeline run
    host: str
    pid: int
    expires_at: float  # unix seconds
    released: bool = False

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def free(self, now: float) -> bool:
        """Released, expired, or held by a process of this host that no longer exists (a killed
        driver re-submitted on the same head node need not wait for the expiry)."""
        return self.released or now >= self.expires_at or (self.host == socket.gethostname()
                                                            and not _process_exists(self.pid))

    def describe(self) -> str:
        return f"run {self.owner} on {self.host} (pid {self.pid}), expires {time.ctime(self.expires_at)}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def new_owner() -> str:
    """A lease owner id for one pipeline run."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _decode(url: str, data: bytes) -> LeaseRecord:
    try:
        return LeaseRecord(**json.loads(data))
    except (ValueError, TypeError) as exc:
        raise RuntimeError(f"{url} is not a lease this version wrote ({exc}); remove it if no run "
                           "is making the stage") from exc


class StageLease:
    """This run's hold on one stage output's lease."""

    def __init__(self, output: StageOutput, owner: str, cfg: WorkflowConfig):
        self.url = storage.join(output.url, LEASE_NAME)
        self.owner, self.cfg = owner, cfg
        self.version: str | None = None
        self.lost = threading.Event()

    def _record(self, released: bool = False) -> bytes:
        return LeaseRecord(self.owner, socket.gethostname(), os.getpid(), time.time() + self.cfg.lease_ttl_s,
                           released).encode()

    def try_acquire(self) -> LeaseRecord | None:
        """Take the lease if it is free (absent, released or expired): None on success, else the
        live holder's record."""
        while True:
            data = self._record()
            if storage.create_exclusive(self.url, data):
                self.version = storage.read_versioned(self.url)[1]
                return None
            current = storage.read_versioned(self.url)
            if current is None:
                continue  # released and removed between the two calls
            record = _decode(self.url, current[0])
            if record.owner == self.owner:  # our own write landed, its answer was lost (a retried PUT)
                self.version = current[1]
                return None
            if not record.free(time.time()):
                return record
            if storage.replace_if(self.url, data, current[1]):
                if not record.released:
                    log.warning("took over the lease of %s (expired or its process is gone) at %s",
                                record.describe(), self.url)
                self.version = storage.read_versioned(self.url)[1]
                return None

    def _still_ours(self) -> bool:
        """After a compare-and-swap that lost: True (version updated) when the lease holds our own
        record all the same, as when a retried PUT lands twice."""
        current = storage.read_versioned(self.url)
        if current is not None and _decode(self.url, current[0]).owner == self.owner:
            self.version = current[1]
            return True
        return False

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost`` set) when another run has taken it."""
        if self.version is not None:
            if storage.replace_if(self.url, self._record(), self.version):
                self.version = storage.read_versioned(self.url)[1]
                return True
            if self._still_ours():
                return True
        self.lost.set()
        return False

    def release(self) -> None:
        """Mark the lease released (best effort: an unreleased lease expires)."""
        try:
            if self.version is not None and not self.lost.is_set():
                storage.replace_if(self.url, self._record(released=True), self.version)
        except OSError as exc:
            log.warning("could not release the lease %s (%s); it expires in at most %.0fs", self.url, exc,
                        self.cfg.lease_ttl_s)
        self.version = None


@contextmanager
def _renewed(lease: StageLease) -> Iterator[None]:
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease.cfg.lease_renew_s):
            try:
                if not lease.renew():
                    log.error("lost the lease %s to another run: both may now run this stage", lease.url)
                    return
            except OSError as exc:  # storage briefly unreachable: try again at the next interval
                log.warning("could not renew the lease %s: %s", lease.url, exc)

    thread = threading.Thread(target=renew, name=f"lease-{lease.url}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        lease.release()


@contextmanager
def stage_lease(output: StageOutput, owner: str, cfg: WorkflowConfig, stage: str) -> Iterator[bool]:
    """Hold ``output``'s lease while inside. Yields True when this run must make the output,
    False when another run completed it while this one waited (reuse it)."""
    try:
        lease = StageLease(output, owner, cfg)
        holder = lease.try_acquire()
    except NotImplementedError as exc:
        log.warning("%s: no lease (%s); two runs at once could both run this stage", stage, exc)
        yield not output.complete()
        return
    described = None
    while holder is not None:
        if cfg.when_busy == "fail":
            raise StageBusy(f"stage {stage} is being run by {holder.describe()} ({lease.url}); "
                            "workflow.when_busy is fail")
        if holder.owner != described:
            log.info("stage %s is being run by %s; waiting for it", stage, holder.describe())
            described = holder.owner
        time.sleep(cfg.busy_poll_s)
        if output.complete():
            yield False
            return
        holder = lease.try_acquire()
    with _renewed(lease):
        yield not output.complete()
