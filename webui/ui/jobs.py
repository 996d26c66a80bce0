"""Running a generation from the page through the engine's job queue: the queue position while
waiting, live previews while it runs, and Interrupt / Skip that reach only the job of the
browser session that asks."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr

from webui.app import Engine
from webui.jobs.queue import Job
from webui.pipeline.batch import FolderBatch
from webui.pipeline.request import GenerationRequest
from webui.ui.messages import user_error


class JobBoard:
    """The running job of each browser session (one page build owns one board)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    def start(self, session: str, request: GenerationRequest, folder: FolderBatch | None = None) -> Job:
        job = self.engine.submit(request, owner=session, folder=folder)
        with self._lock:
            self._jobs[session] = job
        return job

    def finish(self, session: str, job: Job) -> None:
        with self._lock:
            if self._jobs.get(session) is job:
                del self._jobs[session]

    def _job(self, session: str) -> Job | None:
        with self._lock:
            return self._jobs.get(session)

    def interrupt(self, session: str) -> bool:
        job = self._job(session)
        return job is not None and self.engine.jobs.cancel(job)

    def skip(self, session: str) -> bool:
        job = self._job(session)
        if job:
            job.token.skip()
        return job is not None


def session_of(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "anonymous"


def run_streaming(
    board: JobBoard, request: GenerationRequest, session: str, progress: gr.Progress,
    folder: FolderBatch | None = None,
) -> Iterator[tuple[list[Any], str]]:
    """Yield (gallery, info) with previews while the job runs, then the final images.
    With `folder`, the request runs on each image of that folder (img2img batch)."""
    job = board.start(session, request, folder)
    try:
        while True:
            try:
                p = job.events.get(timeout=0.5)
            except queue.Empty:
                if job.state == "queued":
                    ahead = board.engine.jobs.position(job) - 1
                    progress(0.0, desc=f"Queued: {ahead} job(s) ahead" if ahead else "Starting")
                continue
            if p is None:
                break
            where = f" on {job.worker}" if len(board.engine.workers) > 1 else ""  # which device runs it
            progress(p.fraction, desc=f"Step {p.step}/{p.total_steps}{where}, {p.eta:.0f}s left")
            if p.preview:
                yield p.preview, f"Step {p.step}/{p.total_steps}"
    finally:
        board.finish(session, job)
        if job.state == "queued":  # the page went away before the job started
            board.engine.jobs.cancel(job)
    if job.state == "cancelled":
        raise user_error("Interrupted before it started.")
    if job.error:
        raise user_error(job.error)
    result = job.result
    images = [str(path) for path in result.paths] if result.paths else result.images
    if folder is not None and len(images) > 64:  # the files are on disk; the page shows the last ones
        images = images[-64:]
    note = "\n\n(interrupted)" if result.interrupted else ""
    yield images, "\n\n".join(result.infotexts) + note
