"""Queued jobs: submit answers at once with a job; worker threads, one per worker slot (one per
device), take them in order.

A free worker takes the first queued job, except one that another free worker is better for: a
job pinned to another worker; one whose checkpoint (`affinity`) another free worker already holds
while this one does not (switching models is the expensive part); or one whose checkpoint no free
worker holds, when this worker holds models and another free one holds none (so loading it evicts
nothing). A job is never held back for a busy worker, so nothing waits while a worker is free.

Each job has its own cancel token, progress, latest preview and result, so a page or an API
client follows (and cancels) its own job only. Finished jobs are kept for `retention_s` seconds
so a client polling for its result finds it, then forgotten; at most `max_jobs` of them and
`max_bytes` of their images, the oldest dropped first. A finished job keeps what a client may
still fetch (result, infotext, latest preview), not its inputs: its work callable and whatever
the submitter's `release` drops (the decoded init images) go when it finishes. No torch here: what a job runs is
the callable given at construction (the engine's runner) or one given with the job.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from webui.errors import classify
from webui.pipeline.progress import CancelToken, Progress, ProgressFn

log = logging.getLogger(__name__)

State = Literal["queued", "running", "done", "failed", "cancelled"]
# (progress, cancel, preview_every, worker) -> result; `worker` is the slot running it
Work = Callable[[ProgressFn, CancelToken, int, Any], Any]


class Slot(Protocol):
    """What the queue needs of a worker: a name to show, and the models it holds."""

    name: str

    def holds(self, affinity: Hashable) -> bool: ...

    def loaded(self) -> list[Hashable]: ...

    def start(self) -> None:
        """Called once on the worker's thread before it takes a job."""


@dataclass(frozen=True)
class PlainSlot:
    """A worker slot that holds nothing (the queue's default, and tests')."""

    name: str = "worker"

    def holds(self, affinity: Hashable) -> bool:
        return False

    def loaded(self) -> list[Hashable]:
        return []

    def start(self) -> None:
        pass


@dataclass
class Job:
    id: str
    kind: str  # "txt2img", "img2img", ...
    work: Work
    owner: str | None = None  # who may cancel it besides the server (a page session)
    request: Any = None  # the GenerationRequest, for echoing it back
    state: State = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: Progress | None = None
    preview: Any = None  # the latest preview image (PIL), if any
    result: Any = None
    error: str | None = None
    bad_input: bool = False  # the error is the request's fault (4xx), not the server's
    token: CancelToken = field(default_factory=CancelToken)
    events: queue.Queue = field(default_factory=queue.Queue)  # Progress ..., then None when finished
    done: threading.Event = field(default_factory=threading.Event)
    meta: dict[str, Any] = field(default_factory=dict)  # what the submitter keeps with the job (API body)
    release: Callable[["Job"], None] | None = None  # drops what the finished job needs no more
    affinity: Hashable | None = None  # the model it runs on: a worker holding it is preferred
    pin: int | None = None  # run on this worker only (loading or freeing one worker's models)
    worker: str | None = None  # the name of the worker that runs (ran) it

    @property
    def finished_ok(self) -> bool:
        return self.state == "done"


class JobQueue:
    def __init__(self, preview_every: int = 3, retention_s: float = 600.0, max_jobs: int = 100,
                 max_bytes: int = 1 << 30, workers: Sequence[Slot] = (PlainSlot(),)) -> None:
        if not workers:
            raise ValueError("a job queue needs at least one worker")
        self.workers: tuple[Slot, ...] = tuple(workers)
        self.preview_every = preview_every
        self.retention_s = retention_s
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self._lock = threading.Condition()
        self._pending: list[Job] = []
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: dict[int, Job] = {}  # worker index -> its job
        self._threads: list[threading.Thread] = []
        self._closed = False

    # --- submitting and following --------------------------------------------------------------

    def submit(self, kind: str, work: Work, *, request: Any = None, owner: str | None = None,
               release: Callable[[Job], None] | None = None, affinity: Hashable | None = None,
               pin: int | None = None) -> Job:
        if pin is not None and not 0 <= pin < len(self.workers):
            raise ValueError(f"no worker {pin} (there are {len(self.workers)})")
        job = Job(id=uuid.uuid4().hex, kind=kind, work=work, owner=owner, request=request, release=release,
                  affinity=affinity, pin=pin)
        with self._lock:
            if self._closed:
                raise RuntimeError("the job queue is shut down")
            self._prune()
            self._jobs[job.id] = job
            self._pending.append(job)
            if not self._threads:  # started on first use: a server that never generates has no threads
                for i, slot in enumerate(self.workers):
                    thread = threading.Thread(target=self._work, args=(i,), name=f"job-worker-{i}", daemon=True)
                    self._threads.append(thread)
                    thread.start()
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._prune()
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """0 while running or finished, else 1 + the number of jobs ahead of it."""
        with self._lock:
            try:
                return self._pending.index(job) + 1
            except ValueError:
                return 0

    @property
    def running(self) -> Job | None:
        """The running job that started first (None when all workers are free)."""
        jobs = self.running_jobs()
        return jobs[0] if jobs else None

    def running_jobs(self) -> list[Job]:
        """The running jobs, the first started first."""
        with self._lock:
            return sorted(self._running.values(), key=lambda j: j.started or 0.0)

    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    def cancel(self, job: Job) -> bool:
        """A queued job is dropped; a running one is interrupted (it keeps what is done)."""
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
                self._finish(job, "cancelled")
                return True
        if job.state == "running":
            job.token.interrupt()
            return True
        return False

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        return job.done.wait(timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._pending:
                self._finish(job, "cancelled")
            self._pending.clear()
            self._lock.notify_all()

    # --- the worker ----------------------------------------------------------------------------

    def _work(self, index: int) -> None:
        slot = self.workers[index]
        slot.start()
        while True:
            with self._lock:
                while not self._closed and (job := self._take(index)) is None:
                    self._lock.wait()
                if self._closed:
                    return
                self._pending.remove(job)
                job.state, job.started, job.worker = "running", time.time(), slot.name
                self._running[index] = job
            self._run(job, slot)
            with self._lock:
                del self._running[index]
                self._lock.notify_all()  # jobs left for this worker while it was busy are its now

    def _take(self, index: int) -> Job | None:
        """The job worker `index` should run next, or None (called with the lock held)."""
        me = self.workers[index]
        idle = [i for i in range(len(self.workers)) if i != index and i not in self._running]
        for job in self._pending:
            if job.pin is not None:
                if job.pin == index:
                    return job
                continue
            if job.affinity is not None and not me.holds(job.affinity):
                if any(self.workers[i].holds(job.affinity) for i in idle):
                    continue  # a free worker that has its model takes it
                if me.loaded() and any(not self.workers[i].loaded() for i in idle):
                    continue  # a free worker with nothing loaded takes it: loading there evicts nothing
            return job
        return None

    def _run(self, job: Job, slot: Slot) -> None:
        def report(p: Progress) -> None:
            job.worker = slot.name  # a remote worker learns which replica runs the job from its first report
            job.progress = p
            if p.preview:
                job.preview = p.preview[0]
            job.events.put(p)

        try:
            job.result = job.work(report, job.token, self.preview_every, slot)
            state: State = "done"
        except Exception as e:  # noqa: BLE001  a failed job must not stop the worker
            failure = classify(e)
            if failure.log_traceback:  # an extension's: where in it (the cause); the app's: where in it
                log.error("job %s: %s", job.id, failure.message, exc_info=e.__cause__ or e)
            job.error, job.bad_input, state = failure.message, failure.bad_input, "failed"
        job.worker = slot.name
        with self._lock:
            self._finish(job, state)

    def _finish(self, job: Job, state: State) -> None:
        job.state, job.finished = state, time.time()
        job.work = _finished  # its closure held the request, decoded inputs included
        if job.release is not None:
            job.release(job)
        try:  # previews nobody read (an API job has no reader) would stay as long as the job
            while True:
                job.events.get_nowait()
        except queue.Empty:
            pass
        job.events.put(None)
        job.done.set()
        self._prune()
        _return_freed_memory()

    def _prune(self) -> None:
        """Forget finished jobs past their retention time, then the oldest while over the caps."""
        cutoff = time.time() - self.retention_s
        finished = sorted((j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.finished)
        drop = [j for j in finished if j.finished < cutoff]
        kept = [j for j in finished if j.finished >= cutoff]
        total = sum(retained_bytes(j) for j in kept)
        while kept and (len(kept) > self.max_jobs or total > self.max_bytes):
            oldest = kept.pop(0)
            total -= retained_bytes(oldest)
            drop.append(oldest)
        for job in drop:
            del self._jobs[job.id]

    def retained(self) -> tuple[int, int]:
        """(finished jobs kept, bytes of their images), after pruning."""
        with self._lock:
            self._prune()
            kept = [j for j in self._jobs.values() if j.finished is not None]
            return len(kept), sum(retained_bytes(j) for j in kept)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


def _return_freed_memory() -> None:
    """Give the memory a finished job freed (its decoded inputs) back to the system: glibc keeps
    freed large blocks in its arenas otherwise, and the process stays as big as its largest job."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


def _finished(progress: ProgressFn, cancel: CancelToken, preview_every: int, worker: Any) -> Any:
    raise RuntimeError("this job has finished")


def retained_bytes(job: Job) -> int:
    """Bytes of the decoded images a finished job keeps (its results and latest preview)."""
    result = job.result
    images = getattr(result, "images", result if isinstance(result, list) else [result])
    total = 0
    for image in [*images, job.preview]:
        size, bands = getattr(image, "size", None), getattr(image, "getbands", None)
        if size is not None and bands is not None:
            total += size[0] * size[1] * len(bands())
    return total
