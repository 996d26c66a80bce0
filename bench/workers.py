"""Throughput with one and two workers behind the job queue, and the queue's scheduling overhead.

All figures come from one run, as ratios to the single worker measured in it (never pass/fail):

  (a) THROUGHPUT  images per minute of N jobs submitted at once, for
                    1 worker  (torch's threads = the cores)                         the baseline
                    2 workers sharing the CPU (`--workers 2`: cores // 2 threads each)
                    2 workers each with a full team of threads (no sharing; what the engine avoids)
                  each its own engine over the same checkpoint, the model loaded on every worker
                  before timing. On one CPU the workers share the same cores and memory bandwidth,
                  so expect well under 2x: the figure says how much a second worker costs or gains.
  (b) OVERHEAD    submit -> start of a job on an idle worker (ms; median and 95th percentile
                  over 200 jobs that do nothing): what the queue adds before a runner starts.
  (c) RAY (--ray) the same throughput through Ray Serve: a local Ray cluster with 2 CPU replicas
                  (one CPU each), against the single local worker measured in the same run; and
                  a round trip to an idle replica through the Serve handle (ms), what each job adds.

    python bench/workers.py             # full-size SD1.5 architecture (random weights), 256x256, 10 steps
    python bench/workers.py --quick     # tiny model at 64x64: a smoke check, < 1 min
    python bench/workers.py --ray       # also through Ray Serve (the ray extra)
    python bench/workers.py --gpus 0,1  # on a GPU machine: one worker vs one worker a GPU

Run it alone: two cores shared with anything else make its figures meaningless.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
FULL_CKPT = HERE / ".cache" / "Stable-diffusion" / "sd15-random-fp16.safetensors"


def log(msg: str = "") -> None:
    print(msg, flush=True)


def data_dir(quick: bool) -> Path:
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    ckpts = root / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    if quick:
        from webui.testing.make_checkpoint import write_checkpoint

        write_checkpoint(ckpts / "model.safetensors", "sd1", seed=1)
    else:
        if not FULL_CKPT.exists():
            sys.exit(f"{FULL_CKPT} is missing: run bench/foundation.py (or bench/load.py) once to write it")
        (ckpts / "model.safetensors").symlink_to(FULL_CKPT)
    return root


def engine_for(root: Path, workers: int, share: bool, gpus: tuple[int, ...] = ()):
    import torch

    from webui import workers as workers_module
    from webui.app import build_engine
    from webui.config import Config

    torch.set_num_threads(os.cpu_count() or 1)
    original = workers_module.share_cpu
    if not share:  # the comparison the engine avoids: every worker with a full team of threads
        workers_module.share_cpu = lambda n: None
    try:
        config = Config(data_dir=root, device_ids=gpus[:workers]) if gpus else Config(data_dir=root, use_cpu=True,
                                                                                   workers=workers)
        engine = build_engine(config)
        for w in engine.workers:
            w.start()
    finally:
        workers_module.share_cpu = original
    engine.load_checkpoint("model")  # on every worker: loading is not what is timed
    return engine


def throughput(engine, jobs: int, size: int, steps: int) -> tuple[float, set[str]]:
    from webui.pipeline.request import GenerationRequest

    reqs = [GenerationRequest(prompt=f"a lighthouse at dusk {i}", steps=steps, width=size, height=size, seed=i,
                              sampler_name="Euler", save_images=False) for i in range(jobs)]
    for job in [engine.submit(r) for r in reqs[:len(engine.workers)]]:  # warm-up: first-call costs, on each worker
        engine.jobs.wait(job)
    t0 = time.perf_counter()
    submitted = [engine.submit(r) for r in reqs]
    for job in submitted:
        engine.jobs.wait(job)
        assert job.state == "done", job.error
    elapsed = time.perf_counter() - t0
    return jobs / elapsed * 60, {job.worker for job in submitted}


def overhead(engine, n: int = 200) -> tuple[float, float]:
    """(median, p95) ms from submit to start of a job that does nothing, the workers idle."""
    waits = []
    for _ in range(n):
        t = time.time()
        job = engine.jobs.submit("noop", lambda p, c, e, w: None)
        engine.jobs.wait(job)
        waits.append((job.started - t) * 1000)
    waits.sort()
    return statistics.median(waits), waits[int(0.95 * (len(waits) - 1))]


def ray_engine(root: Path):
    import ray

    from webui.app import build_engine
    from webui.config import Config

    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False)
    engine = build_engine(Config(data_dir=root, use_cpu=True, ray="auto", ray_min_replicas=2, ray_max_replicas=2))
    return engine


def ray_round_trip(engine, n: int = 100) -> tuple[float, float]:
    handle = engine.workers[0].cluster.handle.options(stream=False)
    handle.ping.remote().result()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        handle.ping.remote().result()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main() -> None:
    from webui.cli import device_ids

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, help="jobs submitted at once (default 8, quick 24)")
    ap.add_argument("--gpus", type=device_ids, default=(), help="GPU indices (0,1,...): 1 worker vs one a GPU")
    ap.add_argument("--ray", action="store_true", help="also measure through Ray Serve (2 CPU replicas)")
    ap.add_argument("--only-ray", action="store_true", help="the single worker and Ray only")
    args = ap.parse_args()
    size, steps = (64, 4) if args.quick else (256, 10)
    jobs = args.jobs or (24 if args.quick else 8)
    import torch

    log(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {jobs} jobs of {size}x{size}, "
        f"{steps} Euler steps, {'tiny' if args.quick else 'full-size SD1.5'} model")
    root = data_dir(args.quick)
    results = {}
    configs = [("1 worker", 1, True), ("2 workers, CPU shared", 2, True), ("2 workers, full thread teams", 2, False)]
    if args.gpus:  # one worker on the first GPU, then one a GPU on all of them
        configs = [("1 worker", 1, True), (f"{len(args.gpus)} workers, one a GPU", len(args.gpus), True)]
    for label, workers, share in configs[:1] if args.only_ray else configs:
        engine = engine_for(root, workers, share, args.gpus)
        per_min, used = throughput(engine, jobs, size, steps)
        med, p95 = overhead(engine)
        results[label] = per_min
        log(f"{label:30s} {per_min:7.2f} images/min  ({torch.get_num_threads()} thread(s); ran on "
            f"{', '.join(sorted(used))}); submit->start {med:.2f} ms median, {p95:.2f} ms p95")
        engine.jobs.close()
        del engine
    if args.ray or args.only_ray:
        engine = ray_engine(root)
        per_min, used = throughput(engine, jobs, size, steps)
        med, p95 = ray_round_trip(engine)
        results["Ray Serve, 2 replicas"] = per_min
        log(f"{'Ray Serve, 2 replicas':30s} {per_min:7.2f} images/min  (ran on {', '.join(sorted(used))}); "
            f"round trip to an idle replica {med:.2f} ms median, {p95:.2f} ms p95")
        engine.jobs.close()
    base = results["1 worker"]
    log()
    for label, per_min in results.items():
        log(f"THROUGHPUT {label:30s} {per_min / base:.3f} x one worker")


if __name__ == "__main__":
    main()
