"""Checkpoint loading benchmark: time and peak memory of `load_bundle` against reading the file.

Each load runs in a fresh child process (imports done and the CLIP tokenizers built before the
clock starts, as the app does in its start-up warm-up); the baseline is the time to read the
file's bytes (1 MiB chunks into one buffer), measured in the same run and interleaved with the
loads, with the page cache warm for both. Prints ratios, never pass/fail:

  load time / read time     goal <= 1.2
  peak RSS delta / file     goal <= 1.3   (peak RSS during the load minus RSS before it)

A second baseline, the time of `f.read()` of the whole file (the same bytes, but into memory the
process has not touched before), shows what any loader that ends with the weights in RAM pays
for fresh pages; it is printed beside the first, as `load / read into fresh memory`.

    python bench/load.py                      # the 2.1 GB fp16 SD1.5-architecture file, bf16 and fp32
    python bench/load.py --dtypes bfloat16 --repeats 5
    python bench/load.py --quick              # tiny checkpoint: a smoke check, under a minute

The full-size checkpoint (random weights) is the one bench/foundation.py writes to bench/.cache/;
it is written here too when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
FULL_CKPT = CACHE / "Stable-diffusion" / "sd15-random-fp16.safetensors"  # shared with foundation.py
MB = 1 << 20
sys.path.insert(0, str(HERE))
from foundation import time_read  # noqa: E402  the same streamed-read baseline as foundation.py
GIB = 1 << 30
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

_CHILD = r"""
import gc, json, resource, sys, time
from pathlib import Path

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

import torch, diffusers, transformers
from webui.models.load import load_bundle
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.devices import Runtime

dtype = getattr(torch, sys.argv[2])
gc.collect()
before = rss()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
runtime = Runtime(torch.device("cpu"), dtype, dtype)
tokenizers = TokenizerFactory()
tokenizers.warm()  # the app does this in its start-up warm-up, before any load
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
bundle = load_bundle(Path(sys.argv[1]), runtime=runtime, tokenizers=tokenizers)
load_s = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
peak = r1.ru_maxrss * 1024
weights = sum(t.numel() * t.element_size() for m in [bundle.unet, bundle.vae] + [te.model for te in bundle.text_encoders]
              for t in list(m.parameters()) + list(m.buffers()))
print(json.dumps(dict(load_s=load_s, before=before, peak_before=peak_before, peak=peak, weights=weights,
                      user_s=r1.ru_utime - r0.ru_utime, sys_s=r1.ru_stime - r0.ru_stime, threads=torch.get_num_threads())))
"""


def log(msg: str = "") -> None:
    print(msg, flush=True)


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.3f} GiB" if n >= GIB / 4 else f"{n / MB:.1f} MiB"


def ensure_checkpoint(quick: bool, workdir: Path) -> Path:
    if quick:
        path = workdir / "tiny-sd1-fp16.safetensors"
        full = False
    elif FULL_CKPT.exists() and FULL_CKPT.stat().st_size > 2_000_000_000:
        return FULL_CKPT
    else:
        path, full = FULL_CKPT, True
        log(f"writing the full-size SD1.5-architecture checkpoint (fp16, random weights) to {path} ...")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent.parent / f"partial-{path.name}"  # outside the models folder until complete
    code = ("import sys, torch\nfrom pathlib import Path\nfrom webui.testing.make_checkpoint import write_checkpoint\n"
            f"write_checkpoint(Path(sys.argv[1]), 'sd1', full_size={full!r}, dtype=torch.float16)\n")
    subprocess.run([sys.executable, "-c", code, str(partial)], env=ENV, cwd=REPO, check=True)
    os.replace(partial, path)
    return path


def time_read_fresh(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        data = f.read()  # one allocation of the file's size, filled by the kernel
    elapsed = time.perf_counter() - t0
    del data
    return elapsed


def load_in_child(path: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), dtype], env=ENV, cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load child exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny checkpoint: the script works, the figures mean nothing")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma list of load dtypes (default: bfloat16,float32)")
    ap.add_argument("--repeats", type=int, help="loads per dtype, each in a fresh process (default 3; quick 1)")
    a = ap.parse_args(argv)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not set(dtypes) <= {"bfloat16", "float32", "float16"}:
        ap.error("dtypes are bfloat16, float32, float16")
    repeats = a.repeats or (1 if a.quick else 3)

    import psutil  # after argument parsing: --help stays fast

    log(f"load benchmark, {'quick' if a.quick else 'full'} mode: python {platform.python_version()}, "
        f"{psutil.cpu_count(logical=True)} logical cpu(s), RAM {psutil.virtual_memory().total / GIB:.0f} GiB, "
        f"load avg {os.getloadavg()[0]:.2f} (other load makes the figures meaningless)")
    summary: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="webui-bench-load-") as tmp:
        path = ensure_checkpoint(a.quick, Path(tmp))
        size = path.stat().st_size
        log(f"file {path.name}: {fmt_bytes(size)}")
        time_read(path)  # untimed: the file into the page cache, so reads and loads start alike
        for dtype in dtypes:
            reads, fresh, runs = [], [], []
            for _ in range(repeats):
                reads.append(time_read(path))
                fresh.append(time_read_fresh(path))
                runs.append(load_in_child(path, dtype))
            read_s = statistics.median(reads)
            fresh_s = statistics.median(fresh)
            load_s = statistics.median(r["load_s"] for r in runs)
            delta = statistics.median(r["peak"] - r["before"] for r in runs)
            last = runs[-1]
            log(f"\n== into {dtype} ({repeats} load(s), fresh process each, {last['threads']} torch threads) ==")
            log(f"read file:   {', '.join(f'{x:.3f}' for x in reads)} s  median {read_s:.3f} s "
                f"({size / MB / read_s:.0f} MiB/s)")
            loads = ", ".join(f"{r['load_s']:.3f}" for r in runs)
            log(f"load_bundle: {loads} s  median {load_s:.3f} s  "
                f"(cpu: user {last['user_s']:.2f} s + system {last['sys_s']:.2f} s in the last one)")
            log(f"weights in memory {fmt_bytes(last['weights'])}; RSS before load {fmt_bytes(last['before'])}, "
                f"peak {fmt_bytes(last['peak'])}")
            log(f"read into fresh memory (f.read()): {', '.join(f'{x:.3f}' for x in fresh)} s  median {fresh_s:.3f} s")
            log(f"LOAD {dtype}: load / read = {load_s / read_s:.2f} (goal <= 1.2); "
                f"load / read into fresh memory = {load_s / fresh_s:.2f}; "
                f"peak RSS delta / file size = {delta / size:.2f} (goal <= 1.3)")
            summary += [(f"{dtype}: load / read", f"{load_s / read_s:.2f}", "<= 1.2"),
                        (f"{dtype}: load / read into fresh memory", f"{load_s / fresh_s:.2f}", ""),
                        (f"{dtype}: peak RSS delta / file size", f"{delta / size:.2f}", "<= 1.3"),
                        (f"{dtype}: load_bundle (median)", f"{load_s:.3f} s", ""),
                        (f"{dtype}: read file (median)", f"{read_s:.3f} s", ""),
                        (f"{dtype}: read into fresh memory (median)", f"{fresh_s:.3f} s", "")]
    log("\n== summary ==")
    w0, w1 = max(len(m) for m, _, _ in summary), max(len(v) for _, v, _ in summary)
    for m, v, g in summary:
        log(f"{m.ljust(w0)}  {v.rjust(w1)}  {g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
