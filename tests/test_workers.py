"""Several workers behind one queue (#22): scheduling (free workers, model affinity, pinned
jobs), an engine with two CPU workers giving exactly the single worker's images, and a real
server with two workers where each client follows and cancels only its own job."""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import add_checkpoint, start_server, stop_server
from webui.app import build_engine
from webui.cli import device_ids
from webui.config import Config
from webui.jobs.queue import JobQueue
from webui.pipeline.request import GenerationRequest
from webui.workers import plan_devices


@dataclass
class Holder:
    """A worker slot holding the models named in `models` (the queue asks it, nothing more)."""

    name: str
    models: set = field(default_factory=set)

    def holds(self, affinity: Hashable) -> bool:
        return affinity in self.models

    def loaded(self) -> list[Hashable]:
        return list(self.models)

    def start(self) -> None:
        pass


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def gated(gate: threading.Event):
    def work(progress, cancel, every, worker):
        while not gate.wait(0.01):
            if cancel.interrupted:
                return "interrupted"
        return worker.name
    return work


def test_two_workers_run_two_jobs_at_once_and_the_third_waits() -> None:
    q, gate = JobQueue(workers=[Holder("w0"), Holder("w1")]), threading.Event()
    a, b, c = (q.submit("t", gated(gate)) for _ in range(3))
    wait_until(lambda: a.state == b.state == "running")
    assert {a.worker, b.worker} == {"w0", "w1"}
    assert (c.state, q.position(c)) == ("queued", 1)
    assert [j.id for j in q.running_jobs()] == [a.id, b.id] or [j.id for j in q.running_jobs()] == [b.id, a.id]
    q.cancel(a)  # interrupting one job leaves the other running
    wait_until(lambda: a.state == "done")
    assert a.result == "interrupted" and b.state == "running"
    wait_until(lambda: c.state == "running")  # the freed worker takes the waiting job
    assert c.worker == a.worker
    gate.set()
    assert q.wait(b, 5) and q.wait(c, 5)
    assert b.result == b.worker and c.result == c.worker
    q.close()


def test_a_job_goes_to_the_free_worker_that_holds_its_model() -> None:
    workers = [Holder("w0", {"a"}), Holder("w1", {"b"}), Holder("w2")]
    q = JobQueue(workers=workers)
    for affinity, expected in (("b", "w1"), ("a", "w0"), ("b", "w1"), ("c", "w2")):
        job = q.submit("t", lambda p, c, e, w: w.name, affinity=affinity)
        assert q.wait(job, 5)
        assert job.worker == expected, (affinity, job.worker)
    q.close()


def test_a_job_is_not_held_back_for_a_busy_worker_and_pins_are_kept() -> None:
    gate = threading.Event()
    q = JobQueue(workers=[Holder("w0", {"a"}), Holder("w1")])
    busy = q.submit("t", gated(gate), pin=0)  # w0 (holding "a") is busy
    wait_until(lambda: busy.state == "running")
    assert busy.worker == "w0"
    job = q.submit("t", lambda p, c, e, w: w.name, affinity="a")
    assert q.wait(job, 5) and job.worker == "w1"  # not kept waiting for w0
    pinned = q.submit("t", lambda p, c, e, w: w.name, pin=0)
    time.sleep(0.1)
    assert pinned.state == "queued"  # w1 is free, but the job is w0's
    gate.set()
    assert q.wait(pinned, 5) and pinned.result == "w0"
    with pytest.raises(ValueError, match="no worker 2"):
        q.submit("t", lambda *_: None, pin=2)
    q.close()


def test_device_flags_plan_one_worker_per_device() -> None:
    assert device_ids("0,1") == (0, 1) and device_ids("3") == (3,)
    for bad in ("a", "0,0", "-1", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="device ind"):
            device_ids(bad)
    assert plan_devices(Config(device_ids=(0, 1))) == [0, 1]
    assert plan_devices(Config(device_ids=(0, 1), workers=3)) == [0, 1, 0]
    assert plan_devices(Config(use_cpu=True, workers=2)) == [0, 0]
    assert plan_devices(Config()) == [0]


def requests_for_clients() -> list[GenerationRequest]:
    base = {"steps": 2, "width": 64, "height": 64, "save_images": False}
    return [GenerationRequest(prompt=f"a lighthouse {i % 3}", seed=100 + i, batch_size=1 + i % 2,
                              checkpoint="sd1" if i % 4 else "sd2", **base) for i in range(12)]


@pytest.fixture
def cpu_threads() -> Iterator[int]:
    """torch's thread count, put back after a test whose workers shared the CPU out."""
    import torch

    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_two_cpu_workers_make_exactly_the_single_workers_images(data_dir: Path, cpu_threads: int) -> None:
    import torch

    single = build_engine(Config(data_dir=data_dir, use_cpu=True))
    double = build_engine(Config(data_dir=data_dir, use_cpu=True, workers=2))
    assert [w.name for w in double.workers] == ["worker 0", "worker 1"]  # no device until first used
    double.worker.start()
    # the two workers share the cores: each gets half of torch's threads. CPU kernels sum in an
    # order that depends on the thread count, so the single worker runs with the same count.
    assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
    reqs = requests_for_clients()
    expected = [single.run(r) for r in reqs]
    jobs: list = [None] * len(reqs)

    def client(k: int) -> None:  # three clients, each submitting every third request
        for i in range(k, len(reqs), 3):
            jobs[i] = double.submit(reqs[i], owner=f"client {k}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job in jobs:
        assert double.jobs.wait(job, 120), job.state
    assert {job.worker for job in jobs} == {"cpu/0", "cpu/1"}  # both worked
    for req, want, job in zip(reqs, expected, jobs):
        assert job.state == "done", job.error
        got = job.result
        assert got.seeds == want.seeds  # with a batch's grid first (its first seed) as the page shows it
        assert got.seeds[got.grids:] == [req.seed + k for k in range(req.batch_size)]
        assert len(got.images) == len(want.images) == req.batch_size + got.grids
        for a, b in zip(got.images, want.images):
            assert np.array_equal(np.asarray(a), np.asarray(b)), (req.seed, job.worker)
    double.jobs.close()
    single.jobs.close()


def test_jobs_for_a_loaded_model_go_to_the_worker_that_has_it(data_dir: Path, cpu_threads: int) -> None:
    engine = build_engine(Config(data_dir=data_dir, use_cpu=True, workers=2))
    base = {"steps": 1, "width": 64, "height": 64, "save_images": False}
    where = {}
    for ckpt in ("sd1", "sd2", "sd1", "sd2", "sd1"):
        job = engine.submit(GenerationRequest(prompt="x", checkpoint=ckpt, **base))
        assert engine.jobs.wait(job, 60) and job.state == "done", job.error
        where.setdefault(ckpt, set()).add(job.worker)
    assert len(where["sd1"]) == len(where["sd2"]) == 1 and where["sd1"] != where["sd2"]
    assert engine.load_checkpoint("sd2").startswith("sd2")  # the API's "load this model": on every worker
    assert all(any(Path(k[0]).name == "sd2.safetensors" for k in w.loaded()) for w in engine.workers)
    engine.unload_checkpoints()
    assert all(not w.loaded() for w in engine.workers)
    engine.jobs.close()


def test_server_with_two_workers_each_client_follows_and_cancels_its_own_job(tmp_path: Path,
                                                                              checkpoint_store: Path) -> None:
    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    server = start_server(tmp_path, "--api", "--use-cpu", "--workers", "2", ready="/sdapi/v1/workers")
    try:
        api = f"{server.url}/sdapi/v1"
        body = {"prompt": "a harbour", "steps": 150, "width": 64, "height": 64, "seed": 7, "send_images": False}
        results: dict[str, dict] = {}

        def client(name: str) -> None:  # separate sessions, as two programs would be
            with requests.Session() as s:
                job = s.post(f"{api}/jobs", json={**body, "type": "txt2img"}, timeout=30).json()
                assert "id" in job, job
                results[name] = job

        threads = [threading.Thread(target=client, args=(n,)) for n in ("first", "second")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ids = {name: job["id"] for name, job in results.items()}

        def status(job_id: str) -> dict:
            return requests.get(f"{api}/jobs/{job_id}", timeout=30).json()

        wait_until(lambda: all(status(i)["state"] == "running" and status(i)["step"] > 0 for i in ids.values()), 120)
        workers = requests.get(f"{api}/workers", timeout=30).json()
        assert sorted(w["name"] for w in workers) == ["cpu/0", "cpu/1"] and all(w["busy"] for w in workers)
        assert {status(i)["worker"] for i in ids.values()} == {"cpu/0", "cpu/1"}
        memory = requests.get(f"{api}/memory", timeout=30).json()
        assert [w["device"] for w in memory["workers"]] == ["cpu", "cpu"]
        cancelled = requests.delete(f"{api}/jobs/{ids['first']}", timeout=30)
        assert cancelled.status_code == 200
        wait_until(lambda: status(ids["first"])["state"] in ("done", "cancelled"), 60)
        assert status(ids["second"])["state"] == "running"  # the other client's job goes on
        wait_until(lambda: status(ids["second"])["state"] == "done", 300)
        second = status(ids["second"])
        assert second["step"] == 150 and second["result"]["info"]
        assert status(ids["first"])["step"] < 150  # it stopped where it was
    finally:
        stop_server(server)
