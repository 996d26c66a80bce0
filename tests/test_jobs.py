"""The job queue (one worker, order, positions, cancel, failures, retention) and the page's job
board: Interrupt and Skip reach only the job of the session that asks."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from webui.app import Engine, build_engine
from webui.config import Config
from webui.jobs.queue import JobQueue
from webui.models.errors import ModelError
from webui.pipeline.request import GenerationRequest
from webui.ui.jobs import JobBoard


def gate_work(gate: threading.Event, log: list, name: str):
    def work(progress, cancel, preview_every, worker):
        log.append(f"start {name}")
        while not gate.wait(0.01):
            if cancel.interrupted:
                log.append(f"interrupted {name}")
                return name
        log.append(f"end {name}")
        return name

    return work


def test_jobs_run_one_at_a_time_in_order_with_positions() -> None:
    q, gate, log = JobQueue(), threading.Event(), []
    a = q.submit("t", gate_work(gate, log, "a"))
    b = q.submit("t", gate_work(gate, log, "b"))
    c = q.submit("t", gate_work(gate, log, "c"))
    deadline = time.monotonic() + 5
    while a.state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (a.state, q.position(a), q.position(b), q.position(c)) == ("running", 0, 1, 2)
    assert q.cancel(b)  # a queued job is dropped without running
    assert b.state == "cancelled" and q.position(c) == 1
    gate.set()
    assert q.wait(c, 5)
    assert log == ["start a", "end a", "start c", "end c"]
    assert (a.result, c.result, a.state) == ("a", "c", "done")
    q.close()


def test_interrupt_stops_the_running_job_only() -> None:
    q, gate, log = JobQueue(), threading.Event(), []
    a = q.submit("t", gate_work(gate, log, "a"))
    b = q.submit("t", gate_work(gate, log, "b"))
    while a.state != "running":
        time.sleep(0.01)
    assert q.cancel(a)
    assert q.wait(a, 5) and "interrupted a" in log
    gate.set()
    assert q.wait(b, 5) and b.result == "b"
    q.close()


def test_a_failing_job_reports_and_the_next_runs() -> None:
    q = JobQueue()

    def bad_input(*_):
        raise ModelError("checkpoint 'nope' not found")

    def crash(*_):
        raise RuntimeError("out of memory")

    j1, j2 = q.submit("t", bad_input), q.submit("t", crash)
    j3 = q.submit("t", lambda *_: 42)
    assert q.wait(j3, 5)
    assert (j1.state, j1.bad_input, j1.error) == ("failed", True, "checkpoint 'nope' not found")
    assert j2.state == "failed" and not j2.bad_input and "out of memory" in j2.error
    assert j3.result == 42
    q.close()


def test_finished_jobs_are_forgotten_after_the_retention_time() -> None:
    q = JobQueue(retention_s=0.2)
    job = q.submit("t", lambda *_: 1)
    assert q.wait(job, 5) and q.get(job.id) is job
    time.sleep(0.3)
    assert q.get(job.id) is None
    q.close()


@pytest.fixture
def engine(data_dir: Path) -> Engine:
    return build_engine(Config(data_dir=data_dir, dtype="float32"))


def test_board_interrupt_and_skip_reach_only_the_callers_job(engine: Engine) -> None:
    board = JobBoard(engine)
    slow = GenerationRequest(prompt="x", steps=40, width=64, height=64, save_images=False, sampler_name="Euler")
    alice = board.start("alice", slow)
    bob = board.start("bob", slow)
    assert not board.interrupt("mallory")  # no job of theirs: nothing happens to others
    assert board.interrupt("bob")  # bob's job is still queued: it is dropped
    assert bob.state == "cancelled"
    assert board.skip("alice")  # ends its current batch early; the job still finishes
    assert engine.jobs.wait(alice, 120) and alice.state == "done"
    board.finish("alice", alice)
    assert not board.interrupt("alice")  # a finished job can no longer be interrupted
