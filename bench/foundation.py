"""Foundation benchmark: start-up, checkpoint loading, seconds per sampling step.

Prints figures and ratios measured in the same run (never a pass/fail test):

  1. start-up   `python -m webui` until GET / answers 200, against `python -c "import gradio"`
  2. load       `load_bundle` of a full-size SD1.5-architecture fp16 checkpoint in a fresh
                process: seconds, peak RSS (delta and absolute) / file size, against reading the file
  3. steps      seconds per Euler step (bf16, CPU, batch 1, CFG 7) through Engine/Runner,
                against a bare loop of UNet calls on the same loaded UNet

    python bench/foundation.py            # full run (about 10-15 minutes on a 2-core CPU)
    python bench/foundation.py --quick    # tiny sizes, under a minute: a smoke check

The full-size checkpoint (~2.1 GB, random weights) is written once to bench/.cache/.
Only the standard library, psutil, requests and torch (plus the webui package) are used.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
FULL_CKPT = CACHE / "Stable-diffusion" / "sd15-random-fp16.safetensors"
MB = 1 << 20
GIB = 1 << 30

ENV = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

SUMMARY: list[tuple[str, str, str]] = []  # (metric, value, goal)


def log(msg: str = "") -> None:
    print(msg, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_list(xs: list[float], unit: str = "s") -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + f"] {unit}"


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.3f} GiB" if n >= GIB / 4 else f"{n / MB:.1f} MiB"


# --- 1. start-up ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_import_gradio() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gradio"], env=ENV, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def time_server_start(workdir: Path, timeout: float = 180.0) -> float:
    data = Path(tempfile.mkdtemp(prefix="data-", dir=workdir))
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "webui", "--port", str(port), "--data-dir", str(data), "--ckpt-dir", str(ckpt_dir)]
    logfile = data / "server.log"
    with open(logfile, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=data, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{logfile.read_text()[-3000:]}")
                try:
                    if requests.get(url, timeout=2).status_code == 200:
                        return time.perf_counter() - t0
                except requests.RequestException:
                    pass
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"no 200 from {url} after {timeout:.0f}s:\n{logfile.read_text()[-3000:]}")
                time.sleep(0.02)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def bench_startup(repeats: int, workdir: Path) -> None:
    log(f"\n== 1. start-up ({repeats} run(s) each, interleaved) ==")
    ours: list[float] = []
    gradio: list[float] = []
    for _ in range(repeats):
        gradio.append(time_import_gradio())
        ours.append(time_server_start(workdir))
    o, g = median(ours), median(gradio)
    log(f"python -m webui until GET / = 200: {fmt_list(ours)}  median {o:.2f} s")
    log(f'python -c "import gradio":         {fmt_list(gradio)}  median {g:.2f} s')
    log(f"START-UP: ours {o:.2f} s / import gradio {g:.2f} s = ratio {o / g:.2f}")
    SUMMARY.append(("start-up, webui (median)", f"{o:.2f} s", ""))
    SUMMARY.append(("start-up, import gradio (median)", f"{g:.2f} s", ""))
    SUMMARY.append(("start-up ratio ours / import gradio", f"{o / g:.2f}", ""))


# --- 2. loading a checkpoint ----------------------------------------------------------------

_LOAD_CHILD = r"""
import gc, json, resource, sys, time
from pathlib import Path

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

import torch, diffusers, transformers
from webui.models.load import load_bundle
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.devices import Runtime

gc.collect()
before = rss()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
runtime = Runtime(torch.device("cpu"), torch.bfloat16, torch.bfloat16)
t0 = time.perf_counter()
bundle = load_bundle(Path(sys.argv[1]), runtime=runtime, tokenizers=TokenizerFactory())
load_s = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gc.collect()
after = rss()
modules = [bundle.unet, bundle.vae] + [te.model for te in bundle.text_encoders]
weights = sum(t.numel() * t.element_size() for m in modules for t in list(m.parameters()) + list(m.buffers()))
print(json.dumps(dict(load_s=load_s, rss_before=before, peak_before=peak_before, peak=peak, rss_after=after,
                      weights=weights, threads=torch.get_num_threads())))
"""


def write_checkpoint_subprocess(path: Path, full: bool) -> float:
    """Write the checkpoint in a child (building the fp32 modules needs ~9 GB, freed on exit)."""
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from webui.testing.make_checkpoint import write_checkpoint\n"
        f"write_checkpoint(Path(sys.argv[1]), 'sd1', full_size={full!r}, dtype=torch.float16)\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the models folder (so no scan lists it half-written), renamed when complete.
    partial = path.parent.parent / f"partial-{path.name}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(partial)], env=ENV, check=True)
    os.replace(partial, path)
    return time.perf_counter() - t0


def ensure_checkpoint(quick: bool, workdir: Path) -> Path:
    if quick:
        path = workdir / "ckpt" / "tiny-sd1-fp16.safetensors"
        if not path.exists():
            write_checkpoint_subprocess(path, full=False)
        return path
    if FULL_CKPT.exists() and FULL_CKPT.stat().st_size > 2_000_000_000:
        log(f"using cached checkpoint {FULL_CKPT} ({fmt_bytes(FULL_CKPT.stat().st_size)})")
        return FULL_CKPT
    log(f"writing full-size SD1.5-architecture checkpoint (fp16, random weights) to {FULL_CKPT} ...")
    s = write_checkpoint_subprocess(FULL_CKPT, full=True)
    log(f"  written in {s:.1f} s ({fmt_bytes(FULL_CKPT.stat().st_size)})")
    return FULL_CKPT


def time_read(path: Path) -> float:
    """Seconds to stream the file's bytes through one 1 MiB buffer (the load benchmarks' baseline)."""
    buf = bytearray(MB)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def load_in_child(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(path)], env=ENV, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load child exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load(path: Path, repeats: int) -> None:
    size = path.stat().st_size
    log(f"\n== 2. loading {path.name} ({fmt_bytes(size)}), {repeats} run(s), fresh process each ==")
    time_read(path)  # untimed: bring the file into the page cache so read and load start alike
    reads: list[float] = []
    runs: list[dict] = []
    for _ in range(repeats):
        reads.append(time_read(path))
        runs.append(load_in_child(path))
    loads = [r["load_s"] for r in runs]
    deltas = [r["peak"] - r["rss_before"] for r in runs]
    peaks = [r["peak"] for r in runs]
    load_s, read_s = median(loads), median(reads)
    delta, peak = median(deltas), median(peaks)
    last = runs[-1]
    log(f"read file (1 MiB chunks, warm page cache): {fmt_list(reads)}  median {read_s:.3f} s "
        f"({size / MB / read_s:.0f} MiB/s)")
    log(f"load_bundle (bf16, cpu, {last['threads']} threads):     {fmt_list(loads)}  median {load_s:.3f} s")
    log(f"RSS before load {fmt_bytes(last['rss_before'])} (peak during imports {fmt_bytes(last['peak_before'])}); "
        f"after load {fmt_bytes(last['rss_after'])}; weights in memory {fmt_bytes(last['weights'])}")
    log(f"peak RSS: absolute {fmt_bytes(peak)}, delta over pre-load RSS {fmt_bytes(delta)}")
    log(f"LOAD: peak RSS delta / file size = {delta / size:.2f} (goal <= 1.3); "
        f"absolute peak / file size = {peak / size:.2f}")
    log(f"LOAD: load {load_s:.2f} s / read {read_s:.2f} s = ratio {load_s / read_s:.1f}")
    SUMMARY.append(("checkpoint file size", fmt_bytes(size), ""))
    SUMMARY.append(("load_bundle time (median)", f"{load_s:.2f} s", ""))
    SUMMARY.append(("read file time (median)", f"{read_s:.2f} s", ""))
    SUMMARY.append(("load / read", f"{load_s / read_s:.1f}", ""))
    SUMMARY.append(("peak RSS delta", fmt_bytes(delta), ""))
    SUMMARY.append(("peak RSS absolute", fmt_bytes(peak), ""))
    SUMMARY.append(("peak RSS delta / file size", f"{delta / size:.2f}", "<= 1.3"))


# --- 3. seconds per sampling step -----------------------------------------------------------


class _SamplingDone(Exception):
    """Raised from the progress callback after the last step: the VAE decode (not timed) is skipped."""


def step_ours(engine, size: int, steps: int, **fields) -> list[float]:
    """Seconds per Euler step of one generation (steps 2..N); `fields`: more request fields."""
    from webui.pipeline.request import GenerationRequest

    elapsed: list[float] = []

    def progress(p) -> None:
        elapsed.append(p.elapsed)
        if p.step >= p.total_steps:
            raise _SamplingDone

    request = GenerationRequest(
        prompt="a photograph of an astronaut riding a horse",
        negative_prompt="blurry",
        steps=steps,
        cfg_scale=7.0,
        seed=1234,
        width=size,
        height=size,
        sampler_name="Euler",
        save_images=False,
        **fields,
    )
    try:
        engine.runner.generate(request, progress=progress)
    except _SamplingDone:
        pass
    if len(elapsed) != steps:
        raise RuntimeError(f"expected {steps} progress calls, got {len(elapsed)}")
    return [b - a for a, b in zip(elapsed, elapsed[1:])]  # steps 2..N: the first one is warm-up


def record_unet_calls(engine, unet, size: int, steps: int) -> list:
    """The exact UNet calls one generation makes (inputs cloned), for the bare loop to replay:
    on a CPU the time of a call depends on the values it computes on, so both sides must match."""
    import torch

    calls: list = []

    def hook(module, args, kwargs):
        clone = lambda v: v.clone() if torch.is_tensor(v) else v  # noqa: E731
        calls.append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        step_ours(engine, size, steps)
    finally:
        handle.remove()
    return calls


def step_bare(unet, calls: list) -> list[float]:
    """Replay the recorded calls in a plain loop: no sampler, no CFG maths, no callbacks."""
    import torch

    with torch.inference_mode():
        unet(*calls[0][0], **calls[0][1])  # warm-up, not timed (as the first step of ours)
        times = []
        for args, kwargs in calls[1:]:
            t0 = time.perf_counter()
            unet(*args, **kwargs)
            times.append(time.perf_counter() - t0)
        return times


def bench_steps(ckpt: Path, sizes: list[tuple[int, int]], rounds: int, workdir: Path) -> None:
    import torch

    from webui.app import build_engine
    from webui.config import Config

    log(f"\n== 3. seconds per sampling step (Euler, bf16, cpu, batch 1, CFG 7; {rounds} round(s), interleaved) ==")
    data = Path(tempfile.mkdtemp(prefix="engine-", dir=workdir))
    engine = build_engine(Config(data_dir=data, ckpt_dir=ckpt.parent, dtype="bfloat16", use_cpu=True))
    t0 = time.perf_counter()
    bundle = engine.bundle(None)
    log(f"engine: {engine.runtime.describe()}, torch threads {torch.get_num_threads()}; "
        f"first engine.bundle() {time.perf_counter() - t0:.1f} s (imports, hash, load: not part of the figures)")
    unet = bundle.unet
    assert unet.dtype == torch.bfloat16, unet.dtype
    for size, steps in sizes:
        calls = record_unet_calls(engine, unet, size, steps)
        ours: list[float] = []
        bare: list[float] = []
        for r in range(rounds):
            order = ("ours", "bare") if r % 2 == 0 else ("bare", "ours")  # alternate who goes first
            for which in order:
                if which == "ours":
                    ours += step_ours(engine, size, steps)
                else:
                    bare += step_bare(unet, calls)
        # Per-step samples pooled over the rounds. This VM's step times swing by tens of percent
        # from moment to moment, so the fastest steps (least disturbed) are reported beside the median.
        o, b = median(ours), median(bare)
        omin, bmin = min(ours), min(bare)
        log(f"{size}x{size}, {steps} steps x {rounds} rounds (per-step samples, first step of each run untimed):")
        log(f"  ours (runner.generate): median {o:.4f}  min {omin:.4f} s/step  (n={len(ours)})")
        log(f"  bare (unet loop):       median {b:.4f}  min {bmin:.4f} s/step  (n={len(bare)})")
        log(f"STEP {size}x{size}: ours/bare = {o / b:.3f} (medians), {omin / bmin:.3f} (fastest steps)  (goal <= 1.03)")
        SUMMARY.append((f"s/step {size}x{size} ours (median)", f"{o:.4f}", ""))
        SUMMARY.append((f"s/step {size}x{size} bare UNet (median)", f"{b:.4f}", ""))
        SUMMARY.append((f"s/step {size}x{size} ours / bare, medians", f"{o / b:.3f}", "<= 1.03"))
        SUMMARY.append((f"s/step {size}x{size} ours / bare, fastest", f"{omin / bmin:.3f}", "<= 1.03"))
    del unet, bundle
    engine.cache.clear()
    gc.collect()


# --- main -----------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_summary(mode: str, total: float) -> None:
    log(f"\n== summary ({mode} mode, {total:.0f} s in all) ==")
    w0 = max(len(m) for m, _, _ in SUMMARY)
    w1 = max(len(v) for _, v, _ in SUMMARY)
    log(f"{'metric'.ljust(w0)}  {'value'.rjust(w1)}  goal")
    log(f"{'-' * w0}  {'-' * w1}  ----")
    for m, v, g in SUMMARY:
        log(f"{m.ljust(w0)}  {v.rjust(w1)}  {g}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, under a minute: a smoke check, not figures")
    ap.add_argument("--sections", default="startup,load,steps", help="comma list of startup,load,steps (default: all)")
    ap.add_argument("--repeats", type=int, help="start-up runs and load runs each (default: 3 / 2; quick: 1)")
    ap.add_argument("--rounds", type=int, help="rounds of ours+bare per size (default: 4; quick: 1)")
    ap.add_argument("--steps-256", type=int, default=10, help="steps at 256x256 (default: 10)")
    ap.add_argument("--steps-512", type=int, default=6, help="steps at 512x512 (default: 6)")
    a = ap.parse_args(argv)
    sections = {s.strip() for s in a.sections.split(",") if s.strip()}
    unknown = sections - {"startup", "load", "steps"}
    if unknown:
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if a.steps_256 < 2 or a.steps_512 < 2:
        ap.error("at least 2 steps are needed (the first one is warm-up)")
    mode = "quick" if a.quick else "full"
    started = time.perf_counter()

    import torch  # after argument parsing: --help stays fast

    log(f"foundation benchmark, {mode} mode")
    log(f"python {platform.python_version()}, torch {torch.__version__}, {cpu_name()}, "
        f"{psutil.cpu_count(logical=True)} logical cpu(s), torch threads {torch.get_num_threads()}, "
        f"RAM {psutil.virtual_memory().total / GIB:.0f} GiB, load avg {os.getloadavg()[0]:.2f}")
    if a.quick:
        log("(quick mode: tiny sizes; the figures only show the script works)")

    with tempfile.TemporaryDirectory(prefix="webui-bench-") as tmp:
        workdir = Path(tmp)
        if "startup" in sections:
            bench_startup(a.repeats or (1 if a.quick else 3), workdir)
        if sections & {"load", "steps"}:
            ckpt = ensure_checkpoint(a.quick, workdir)
            if "load" in sections:
                bench_load(ckpt, a.repeats or (1 if a.quick else 2))
            if "steps" in sections:
                sizes = [(64, 4)] if a.quick else [(256, a.steps_256), (512, a.steps_512)]
                bench_steps(ckpt, sizes, a.rounds or (1 if a.quick else 4), workdir)
    print_summary(mode, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
