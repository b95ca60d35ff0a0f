"""QEMU's background jobs, for QMP's snapshot-save, snapshot-load and snapshot-delete.

A job is a small state machine (QEMU's job.c, JobStatus and its verb table):
``created`` -> ``running`` -> (``waiting`` -> ``pending`` -> ``concluded``) on
success, or (``aborting`` -> ``concluded``, with an ``error``) on failure;
``job-dismiss`` then takes it away (``null``).  Each transition is a
JOB_STATUS_CHANGE event.  Snapshot jobs finalize by themselves and wait for
their dismissal (QEMU's JOB_MANUAL_DISMISS), so ``query-jobs`` keeps showing a
concluded job and its error until then.  The work runs on its own thread; the
command returns as soon as the job is created.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Callable

from kemu.errors import KemuError
from kemu.qmp.protocol import QmpError

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
#: The verbs each status accepts (QEMU's JobVerbTable, for the verbs kemu has).
VERBS = {
    "cancel": {"created", "running", "paused", "ready", "standby", "waiting", "pending"},
    "finalize": {"pending"},
    "dismiss": {"concluded"},
}


@dataclass
class Job:
    id: str
    type: str
    status: str = "created"
    error: str | None = None
    done: int = 0

    def info(self) -> dict:
        out = {"current-progress": self.done, "status": self.status, "total-progress": 1,
               "type": self.type, "id": self.id}
        if self.error is not None:
            out["error"] = self.error
        return out


class Jobs:
    """The jobs of one machine; ``emit(id, status)`` reports each transition."""

    def __init__(self, emit: Callable[[str, str], None]) -> None:
        self._emit = emit
        self._lock = threading.Lock()
        self._jobs: list[Job] = []          # newest first, as query-jobs lists them

    def _set(self, job: Job, status: str) -> None:
        job.status = status
        self._emit(job.id, status)

    def start(self, job_id: str, kind: str, work: Callable[[], None]) -> Job:
        if not _ID.fullmatch(job_id):
            raise QmpError(f"Invalid job ID '{job_id}'")
        with self._lock:
            if any(j.id == job_id for j in self._jobs):
                raise QmpError(f"Job ID '{job_id}' already in use")
            job = Job(job_id, kind)
            self._jobs.insert(0, job)
        self._emit(job.id, "created")
        self._set(job, "running")
        threading.Thread(target=self._run, args=(job, work), name=f"job-{job_id}",
                         daemon=True).start()
        return job

    def _run(self, job: Job, work: Callable[[], None]) -> None:
        try:
            work()
        except KemuError as e:
            job.error = str(e)
        except Exception as e:       # a bug in kemu: the job fails, the machine goes on
            log.exception("job %s failed", job.id)
            job.error = f"internal error: {type(e).__name__}: {e}"
        job.done = 1
        if job.error is None:
            self._set(job, "waiting")
            self._set(job, "pending")
        else:
            self._set(job, "aborting")
        self._set(job, "concluded")

    def query(self) -> list[dict]:
        with self._lock:
            return [j.info() for j in self._jobs]

    def _find(self, job_id: str, verb: str) -> Job:
        with self._lock:
            job = next((j for j in self._jobs if j.id == job_id), None)
        if job is None:
            raise QmpError("Job not found")
        if job.status not in VERBS[verb]:
            raise QmpError(f"Job '{job_id}' in state '{job.status}' cannot accept command "
                           f"verb '{verb}'")
        return job

    def dismiss(self, job_id: str) -> None:
        job = self._find(job_id, "dismiss")
        with self._lock:
            self._jobs.remove(job)
        self._set(job, "null")

    def cancel(self, job_id: str) -> None:
        # a snapshot job runs to its end once started (as QEMU's snapshot jobs do)
        self._find(job_id, "cancel")

    def finalize(self, job_id: str) -> None:
        self._find(job_id, "finalize")


def snapshot_commands(vm) -> dict:
    """QMP's snapshot-save, snapshot-load, snapshot-delete and the job commands."""
    from kemu.api import JobStatusChange
    jobs = Jobs(lambda job_id, status: vm._emit(JobStatusChange(id=job_id, status=status)))

    def required(args: dict, *keys: str) -> list:
        for key in keys:
            if key not in args:
                raise QmpError(f"Parameter '{key}' is missing")
        devices = args.get("devices")
        if devices is not None and not all(isinstance(d, str) for d in devices):
            raise QmpError("Invalid parameter type for 'devices[0]', expected: string")
        return [args[k] for k in keys]

    def save(args: dict) -> None:
        job_id, tag, vmstate, devices = required(args, "job-id", "tag", "vmstate", "devices")
        jobs.start(job_id, "snapshot-save", lambda: vm.savevm(
            tag, vmstate=vmstate, devices=devices, overwrite=False))

    def load(args: dict) -> None:
        job_id, tag, vmstate, devices = required(args, "job-id", "tag", "vmstate", "devices")
        jobs.start(job_id, "snapshot-load", lambda: vm.loadvm(tag, vmstate=vmstate,
                                                               devices=devices))

    def delete(args: dict) -> None:
        job_id, tag, devices = required(args, "job-id", "tag", "devices")
        jobs.start(job_id, "snapshot-delete", lambda: vm.delvm(tag, devices=devices))

    def by_id(action: Callable[[str], None]) -> Callable[[dict], None]:
        return lambda args: action(required(args, "id")[0])

    snapshot = {"job-id": str, "tag": str, "vmstate": str, "devices": list}
    return {
        "snapshot-save": (save, snapshot),
        "snapshot-load": (load, snapshot),
        "snapshot-delete": (delete, {"job-id": str, "tag": str, "devices": list}),
        "query-jobs": (lambda args: jobs.query(), {}),
        "job-dismiss": (by_id(jobs.dismiss), {"id": str}),
        "job-cancel": (by_id(jobs.cancel), {"id": str}),
        "job-finalize": (by_id(jobs.finalize), {"id": str}),
    }
