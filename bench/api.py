"""HTTP API overhead and memory: a 1-step 64x64 txt2img on a tiny model, over HTTP against the
real server vs the engine called in process (same request, same machine, same run), and the
server's resident memory after 10 and after 200 requests.

    python bench/api.py [--requests 200]

Run it alone (2-core machine: anything beside it skews the figures).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

BODY = {"prompt": "a lighthouse", "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set of a process, KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def in_process(root: Path, n: int) -> tuple[float, float]:
    """(seconds per request through the engine's job queue, as the page and the API submit,
    seconds per request calling the runner directly)."""
    from webui.app import build_engine
    from webui.config import Config
    from webui.pipeline.request import GenerationRequest

    engine = build_engine(Config(data_dir=root))
    request = GenerationRequest(**BODY, save_images=False)

    def queued() -> None:
        job = engine.submit(request)
        job.done.wait()

    def direct() -> None:
        engine.runner.generate(request)

    times = {}
    for fn in (direct, queued):  # in blocks: alternating threads would make their torch thread pools collide
        for _ in range(5):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times[fn] = (time.perf_counter() - t0) / n
    return times[queued], times[direct]


def start_api_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A `--nowebui` server over `root` on a free port, once it answers: (process, base URL of the API)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "webui", "--nowebui", "--port", str(port), "--data-dir", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    base = f"http://127.0.0.1:{port}/sdapi/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            requests.get(base + "/samplers", timeout=5).raise_for_status()
            return proc, base
        except requests.RequestException:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.terminate()
                raise
            time.sleep(0.3)


def over_http(root: Path, n: int, total: int) -> tuple[float, tuple[int, int], tuple[int, int]]:
    proc, base = start_api_server(root)
    url = base + "/txt2img"
    try:
        requests.post(url, json=BODY, timeout=60).raise_for_status()
        session = requests.Session()
        for _ in range(4):  # 5 warm-up requests in all, as in process
            session.post(url, json=BODY, timeout=60).raise_for_status()
        times = []
        mem_10 = None
        for i in range(total):
            t0 = time.perf_counter()
            session.post(url, json=BODY, timeout=60).raise_for_status()
            times.append(time.perf_counter() - t0)
            if i + 1 == 10:
                mem_10 = rss_kib(proc.pid)
        mem_end = rss_kib(proc.pid)
        timed = times[:n]
        return sum(timed) / len(timed), mem_10, mem_end
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--timed", type=int, default=50, help="requests timed on each side")
    a = ap.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from webui.testing.make_checkpoint import write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", "sd1", seed=1)
        engine_s, runner_s = in_process(root, a.timed)
        api_s, mem_10, mem_end = over_http(root, a.timed, a.requests)
    print(f"in process, engine (job queue): {engine_s * 1000:.1f} ms/request ({1 / engine_s:.1f} req/s)")
    print(f"in process, runner called directly: {runner_s * 1000:.1f} ms/request")
    print(f"over HTTP:  {api_s * 1000:.1f} ms/request ({1 / api_s:.1f} req/s)")
    print(f"ratio HTTP / engine in process: {api_s / engine_s:.3f}  (the HTTP and encoding overhead; goal <= 1.10)")
    print(f"ratio HTTP / runner called directly: {api_s / runner_s:.3f}")
    print(f"server RSS after 10 requests: {mem_10[0] / 1024:.0f} MiB (peak {mem_10[1] / 1024:.0f} MiB)")
    print(f"server RSS after {a.requests} requests: {mem_end[0] / 1024:.0f} MiB (peak {mem_end[1] / 1024:.0f} MiB)")
    print(f"growth: {mem_end[0] / mem_10[0]:.3f}x current, {mem_end[1] / mem_10[1]:.3f}x peak")


if __name__ == "__main__":
    main()
