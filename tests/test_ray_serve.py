"""The engine as Ray Serve replicas (#22): a local Ray cluster on loopback with two CPU replicas.
Jobs from several clients all complete with the single worker's images; interrupt reaches the
replica running the job; a replica killed mid-job makes the job retry on another and finish."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from webui.app import Engine, build_engine
from webui.config import Config
from webui.pipeline.request import GenerationRequest

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'sd-webui[ray]') is not installed")


@pytest.fixture(scope="module")
def cluster_engine(tmp_path_factory: pytest.TempPathFactory, checkpoint_store: Path) -> Iterator[Engine]:
    import shutil

    root = tmp_path_factory.mktemp("ray")
    ckpts = root / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    shutil.copy(checkpoint_store / "sd1.safetensors", ckpts / "sd1.safetensors")
    # one CPU thread a replica: two replicas share this machine's cores (and the reference below
    # runs with the same count, as CPU kernels sum in an order that depends on it)
    os.environ["OMP_NUM_THREADS"] = "1"
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        engine = build_engine(Config(data_dir=root, use_cpu=True, ray="auto", ray_min_replicas=2, ray_max_replicas=2))
        yield engine
        engine.jobs.close()
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        os.environ.pop("OMP_NUM_THREADS", None)


def small(i: int, steps: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt=f"a lighthouse {i}", seed=300 + i, steps=steps, width=64, height=64,
                             save_images=False)


def wait_until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_jobs_from_several_clients_run_on_the_replicas_with_the_same_images(cluster_engine: Engine) -> None:
    import torch

    engine = cluster_engine
    reqs = [small(i) for i in range(12)]
    jobs: list = [None] * len(reqs)

    def client(k: int) -> None:
        for i in range(k, len(reqs), 2):
            jobs[i] = engine.submit(reqs[i], owner=f"client {k}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job in jobs:
        assert engine.jobs.wait(job, 300) and job.state == "done", job.error
    workers = {job.worker for job in jobs}
    assert all(w.startswith("ray:") for w in workers) and len(workers) == 2, workers  # both replicas worked
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = build_engine(Config(data_dir=engine.config.data_dir, use_cpu=True))
        for req, job in zip(reqs, jobs):
            want = local.run(req)
            assert job.result.seeds == want.seeds
            for a, b in zip(job.result.images, want.images):
                assert np.array_equal(np.asarray(a), np.asarray(b)), job.worker
    finally:
        torch.set_num_threads(before)


def test_interrupt_reaches_the_replica_and_bad_input_is_a_clear_error(cluster_engine: Engine) -> None:
    engine = cluster_engine
    job = engine.submit(small(1, steps=150))
    wait_until(lambda: job.progress is not None and job.progress.step > 2, 120)
    assert job.worker.startswith("ray:")
    engine.jobs.cancel(job)
    assert engine.jobs.wait(job, 60) and job.state == "done", job.error
    assert job.result.interrupted and job.progress.step < 150
    bad = engine.submit(small(2).model_copy(update={"sampler_name": "no such sampler"}))
    assert engine.jobs.wait(bad, 60)
    assert bad.state == "failed" and bad.bad_input and "sampler" in bad.error.lower()


def test_a_replica_killed_mid_job_retries_once_on_another(cluster_engine: Engine) -> None:
    engine = cluster_engine
    job = engine.submit(small(3, steps=120))
    wait_until(lambda: job.progress is not None and job.progress.step > 2 and job.worker.startswith("ray:"), 120)
    first = job.worker
    os.kill(int(first.rsplit(":", 1)[1]), signal.SIGKILL)  # the replica's process, as an OOM kill would
    assert engine.jobs.wait(job, 300), job.state
    assert job.state == "done", job.error
    assert job.worker != first and not job.result.interrupted
    assert job.result.seeds[-1] == 303 and len(job.result.images) == 1


def test_the_server_with_ray_runs_api_jobs_on_replicas(tmp_path: Path, checkpoint_store: Path) -> None:
    """`python -m webui --ray auto` (a local cluster it starts itself): an API job runs on a replica
    and /sdapi/v1/workers lists the lanes."""
    import requests

    from tests.conftest import add_checkpoint, start_server, stop_server

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    server = start_server(tmp_path, "--nowebui", "--use-cpu", "--ray", "auto", "--ray-min-replicas", "1",
                          "--ray-max-replicas", "1", ready="/sdapi/v1/workers", timeout=180)
    try:
        api = f"{server.url}/sdapi/v1"
        lanes = requests.get(f"{api}/workers", timeout=30).json()
        assert [(w["name"], w["device"]) for w in lanes] == [("ray lane 0", "ray")]
        job = requests.post(f"{api}/jobs", json={"type": "txt2img", "prompt": "a harbour", "steps": 2, "width": 64,
                                                 "height": 64, "seed": 5}, timeout=30).json()
        deadline = time.monotonic() + 120
        while (status := requests.get(f"{api}/jobs/{job['id']}", timeout=30).json())["state"] in ("queued",
                                                                                                  "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert status["state"] == "done", status
        assert status["worker"].startswith("ray:") and "Seed: 5" in status["result"]["info"]
    finally:
        stop_server(server)


def test_an_img2img_folder_batch_runs_on_the_replicas(cluster_engine: Engine, tmp_path: Path) -> None:
    from PIL import Image

    from webui.pipeline.batch import FolderBatch

    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        Image.new("RGB", (64, 64), colour).save(src / f"{name}.png")
    request = GenerationRequest(prompt="a boat", steps=2, width=64, height=64, seed=9, denoising_strength=0.5,
                                init_images=(Image.new("RGB", (64, 64)),))
    job = cluster_engine.submit(request, folder=FolderBatch(src, dst))
    assert cluster_engine.jobs.wait(job, 300) and job.state == "done", job.error
    assert sorted(p.name for p in dst.iterdir()) == ["blue.png", "red.png"]
    assert job.worker.startswith("ray:")


def test_replicas_find_a_model_added_later_and_say_so_when_none_has_it(cluster_engine: Engine,
                                                                       checkpoint_store: Path) -> None:
    import shutil

    engine = cluster_engine
    folder = engine.config.data_dir / "models" / "Stable-diffusion"
    shutil.copy(checkpoint_store / "sd1-other.safetensors", folder / "later.safetensors")
    engine.registry.refresh(compute_hashes=False)  # the page's refresh button; the replicas started before it
    job = engine.submit(small(4).model_copy(update={"checkpoint": "later"}))
    assert engine.jobs.wait(job, 120) and job.state == "done", job.error
    (folder / "later.safetensors").unlink()  # the front still lists it; no replica has it now
    job = engine.submit(small(5).model_copy(update={"checkpoint": "later"}))
    assert engine.jobs.wait(job, 120) and job.state == "failed"
    assert "no Ray replica has the model files" in job.error and "later" in job.error
    engine.registry.refresh(compute_hashes=False)


def test_a_checkpoints_jobs_go_to_the_replica_that_holds_it(cluster_engine: Engine, checkpoint_store: Path) -> None:
    import shutil

    engine = cluster_engine
    folder = engine.config.data_dir / "models" / "Stable-diffusion"
    shutil.copy(checkpoint_store / "sd1-other.safetensors", folder / "other.safetensors")
    engine.registry.refresh(compute_hashes=False)
    # Serve's multiplexed routing is best effort: a replica tells the routers what it loaded
    # asynchronously, and under load a job can go out on the old picture (seen in CI runs). So the
    # property is checked over up to three rounds of 4 jobs a model: in one of them, each model's
    # jobs after its first stay on one replica. Random routing passes a round 1 time in 16.
    for _ in range(3):
        where: dict[str, list[str]] = {"sd1": [], "other": []}
        for _ in range(4):
            for name in where:
                job = engine.submit(small(6).model_copy(update={"checkpoint": name}))
                assert engine.jobs.wait(job, 120) and job.state == "done", job.error
                where[name].append(job.worker)
                time.sleep(1)  # a user's jobs are seconds apart: the news of a load has that long to arrive
        if len(set(where["sd1"][1:])) == 1 and len(set(where["other"][1:])) == 1:
            break
    assert len(set(where["sd1"][1:])) == 1 and len(set(where["other"][1:])) == 1, where
