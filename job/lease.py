"""One job per gs:// output: a lease object in the bucket names the job that writes the run directory.

`<output>/lease.json` holds the holder's run id, scheduler job id, host and pid; the holder rewrites it at every
push (its `updated` time is the heartbeat) and deletes it when it ends. Another job finds the output held
while that object is younger than its `ttl_s`, and stops with one error (exit 2). It takes the output over
when the holder is the same scheduler job (a Slurm requeue, a Vertex AI restart), a process of this host that
is gone, has not renewed the lease for `ttl_s`, or when `--take-over` says that job is dead. Writes carry the
generation they replace (`if_generation_match`), so two jobs cannot both win; a holder whose lease another
job took stops writing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import storage

from job.errors import JobError, StorageError
from job.gcs import gcs_errors

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
LEASE_MIN_TTL_S = 300.0  # a lease not renewed for this long (or LEASE_TTL_INTERVALS pushes) is expired
LEASE_TTL_INTERVALS = 5
ABSENT = 0  # if_generation_match=0: only if there is no such object
JSON_CONTENT_TYPE = "application/json"


def lease_ttl(interval_s: float) -> float:
    """How long a lease lives without a renewal when its holder renews it every `interval_s` seconds."""
    return max(LEASE_MIN_TTL_S, LEASE_TTL_INTERVALS * interval_s)


class LeaseLost(JobError):
    """Another job took this job's output over (its lease expired, or --take-over)."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    job: str | None  # the scheduler's id, the same across restarts (job.rundir.job_identity)
    host: str
    pid: int
    ttl_s: float

    @classmethod
    def this_process(cls, job: str | None, ttl_s: float) -> Holder:
        return cls(uuid.uuid4().hex, job, socket.gethostname(), os.getpid(), ttl_s)

    def describe(self) -> str:
        return f"{self.job or 'pid ' + str(self.pid)} on {self.host}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class OutputLease:
    """The lease on one gs:// output: acquire before writing, renew at each push, release at the end."""

    def __init__(self, bucket: storage.Bucket, name: str, uri: str, holder: Holder, retry: Any, timeout_s: float):
        self._bucket, self._name, self.uri, self.holder = bucket, name, uri, holder
        self._retry, self._timeout_s = retry, timeout_s
        self._generation: int | None = None

    def acquire(self, take_over: bool) -> None:
        """Hold the output, or raise one JobError naming the live job that holds it and the ways out."""
        with gcs_errors(self.uri, "read"):
            blob = self._bucket.get_blob(self._name, retry=self._retry, timeout=self._timeout_s)
            current = json.loads(blob.download_as_bytes(retry=self._retry)) if blob is not None else None
        if blob is not None:
            other = Holder(**{k: current.get(k) for k in Holder.__dataclass_fields__}) if current else None
            age = time.time() - blob.updated.timestamp() if blob.updated else float("inf")
            reason = self._may_take(other, age, take_over)
            if reason is None:
                ttl = float(other.ttl_s or LEASE_MIN_TTL_S) if other else LEASE_MIN_TTL_S
                who = other.describe() if other else "another job"
                raise JobError(
                    f"--output {self.uri} is being written by {who} (lease renewed {age:.0f} s ago): wait for it to "
                    f"end, use another --output, or pass --take-over if that job is dead (its lease also expires "
                    f"{max(ttl - age, 0):.0f} s from now)."
                )
            log.warning("Taking over %s from %s: %s", self.uri, other.describe() if other else "?", reason)
        self._write(blob.generation if blob is not None else ABSENT, "acquire")

    def _may_take(self, other: Holder | None, age: float, take_over: bool) -> str | None:
        """Why this job may take the lease from `other`, or None."""
        if other is None:
            return "its lease is unreadable"
        if other.job is not None and other.job == self.holder.job:
            return f"the same job {other.job}, restarted"
        if other.host == self.holder.host and other.pid and not _pid_alive(int(other.pid)):
            return f"its process {other.pid} on this host is gone"
        if age > float(other.ttl_s or LEASE_MIN_TTL_S):
            return f"its lease was not renewed for {age:.0f} s"
        if take_over:
            return "--take-over"
        return None

    def _write(self, expected: int, action: str) -> None:
        blob = self._bucket.blob(self._name)
        try:
            with gcs_errors(self.uri, "write the lease of"):
                blob.upload_from_string(json.dumps(asdict(self.holder)), content_type=JSON_CONTENT_TYPE,
                                        if_generation_match=expected, retry=self._retry, timeout=self._timeout_s)
        except StorageError as err:
            if isinstance(err.__cause__, api_exceptions.PreconditionFailed):
                raise self._lost(action) from err
            raise
        self._generation = blob.generation

    def _lost(self, action: str) -> LeaseLost:
        if action == "acquire":
            return LeaseLost(f"--output {self.uri} was taken by another job just now: use another --output, or "
                             "pass --take-over if that job is dead.")
        return LeaseLost(f"--output {self.uri} was taken over by another job (--take-over, or this job's lease "
                         "expired): this job stopped writing to it; rerun with --take-over to write it again.")

    def renew(self) -> None:
        """Rewrite the lease (the heartbeat); LeaseLost when another job holds it now."""
        if self._generation is None:
            raise self._lost("renew")
        with gcs_errors(self.uri, "read the lease of"):  # the precondition below decides; this names the loss
            current = self._bucket.get_blob(self._name, retry=self._retry, timeout=self._timeout_s)
        if current is None or current.generation != self._generation:
            self._generation = None
            raise self._lost("renew")
        self._write(self._generation, "renew")

    def release(self) -> None:
        """Delete the lease if this job still holds it."""
        if self._generation is None:
            return
        try:
            with gcs_errors(self.uri, "release the lease of"):
                self._bucket.blob(self._name).delete(if_generation_match=self._generation, retry=self._retry,
                                                     timeout=self._timeout_s)
        except StorageError as err:
            if not isinstance(err.__cause__, api_exceptions.PreconditionFailed | api_exceptions.NotFound):
                raise
        self._generation = None
