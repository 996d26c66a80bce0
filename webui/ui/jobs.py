"""Running a generation from the page: live previews while it runs, and Interrupt / Skip that
reach only the job of the browser session that asks."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr

from webui.app import Engine
from webui.models.errors import ModelError
from webui.pipeline.progress import CancelToken, Progress
from webui.pipeline.request import GenerationRequest

PREVIEW_EVERY = 3  # steps between live previews


class JobBoard:
    """The cancel token of each session's running job (one page build owns one board)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, CancelToken] = {}

    def start(self, session: str) -> CancelToken:
        token = CancelToken()
        with self._lock:
            self._tokens[session] = token
        return token

    def finish(self, session: str, token: CancelToken) -> None:
        with self._lock:
            if self._tokens.get(session) is token:
                del self._tokens[session]

    def interrupt(self, session: str) -> bool:
        with self._lock:
            token = self._tokens.get(session)
        if token:
            token.interrupt()
        return token is not None

    def skip(self, session: str) -> bool:
        with self._lock:
            token = self._tokens.get(session)
        if token:
            token.skip()
        return token is not None


def session_of(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "anonymous"


def run_streaming(
    engine: Engine, board: JobBoard, request: GenerationRequest, session: str, progress: gr.Progress
) -> Iterator[tuple[list[Any], str]]:
    """Yield (gallery, info) with previews while the job runs, then the final images."""
    updates: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}
    token = board.start(session)

    def report(p: Progress) -> None:
        updates.put(p)

    def work() -> None:
        try:
            outcome["result"] = engine.runner.generate(request, progress=report, cancel=token,
                                                       preview_every=PREVIEW_EVERY)
        except (ModelError, ValueError) as e:
            outcome["error"] = str(e)
        except Exception as e:  # noqa: BLE001  the page must get a message, never a hang
            outcome["error"] = f"generation failed: {type(e).__name__}: {e}"
        finally:
            updates.put(None)

    thread = threading.Thread(target=work, name=f"job-{session[:8]}", daemon=True)
    thread.start()
    try:
        while (p := updates.get()) is not None:
            progress(p.fraction, desc=f"Step {p.step}/{p.total_steps}, {p.eta:.0f}s left")
            if p.preview:
                yield p.preview, f"Step {p.step}/{p.total_steps}"
        thread.join()
    finally:
        board.finish(session, token)
    if "error" in outcome:
        raise gr.Error(outcome["error"])
    result = outcome["result"]
    images = [str(path) for path in result.paths] if result.paths else result.images
    note = "\n\n(interrupted)" if result.interrupted else ""
    yield images, "\n\n".join(result.infotexts) + note
