"""Speed-ups and what they cost: time per image with each one against the same engine without it,
measured in the same run (rounds alternate), and how far its image moves from the one without
it (PSNR in dB over 8-bit RGB; higher is closer, identical is inf).

Full SD1.5-architecture random-weight checkpoint (bench/.cache/, written by bench/load.py or
bench/foundation.py), bf16 on the CPU. Random weights are fine for speed; their images are
noise-like, so the PSNR here says how much the computation changed, not how a trained model's
picture looks (no LPIPS model is at hand offline).

    python bench/speedups.py                    # ToMe 0.3 and 0.5 at 256² and 512², 6 steps
    python bench/speedups.py --sizes 256 --rounds 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
FULL_CKPT = HERE / ".cache" / "Stable-diffusion" / "sd15-random-fp16.safetensors"


def log(msg: str = "") -> None:
    print(msg, flush=True)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512", help="image sides (default 256,512)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ratios", default="0.3,0.5", help="token merging ratios (default 0.3,0.5)")
    a = ap.parse_args(argv)
    from webui.app import build_engine
    from webui.config import Config
    from webui.pipeline.request import GenerationRequest

    if not FULL_CKPT.exists():
        log(f"missing {FULL_CKPT}: run `python bench/load.py` first to write it")
        return 2
    log(f"speed-ups: python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cpu(s), "
        f"load avg {os.getloadavg()[0]:.2f} (run it alone)")
    ratios = [float(r) for r in a.ratios.split(",") if r.strip()]
    summary = []
    with tempfile.TemporaryDirectory(prefix="webui-bench-speedups-") as tmp:
        engine = build_engine(Config(data_dir=Path(tmp), ckpt_dir=FULL_CKPT.parent, dtype="bfloat16", use_cpu=True))
        log(f"runtime: {engine.runtime.describe()}")
        for size in (int(s) for s in a.sizes.split(",")):
            def run(ratio: float, size: int = size) -> tuple[float, np.ndarray]:
                r = GenerationRequest(prompt="a lighthouse on a cliff at dusk", negative_prompt="blurry", steps=a.steps,
                                      width=size, height=size, seed=1234, sampler_name="Euler", save_images=False,
                                      token_merging_ratio=ratio)
                t0 = time.perf_counter()
                image = engine.runner.generate(r).images[0]
                return time.perf_counter() - t0, np.asarray(image.convert("RGB"))

            configs = [0.0, *ratios]
            for ratio in configs:
                run(ratio)  # warm-up (the first image loads the model)
            times: dict[float, list[float]] = {r: [] for r in configs}
            images: dict[float, np.ndarray] = {}
            for k in range(a.rounds):
                for ratio in (configs if k % 2 == 0 else configs[::-1]):
                    seconds, images[ratio] = run(ratio)
                    times[ratio].append(seconds)
            base = statistics.median(times[0.0])
            log(f"\n== {size}x{size}, {a.steps} Euler steps, {a.rounds} rounds ==")
            log(f"baseline: median {base:.2f} s/image")
            for ratio in ratios:
                m = statistics.median(times[ratio])
                quality = psnr(images[ratio], images[0.0])
                log(f"token merging {ratio:g}: median {m:.2f} s/image, ratio {m / base:.3f}, PSNR {quality:.1f} dB")
                summary.append((f"ToMe {ratio:g} at {size}²: time / baseline", m / base, quality))
    log("\n== summary ==")
    for name, ratio, quality in summary:
        log(f"{name:<36} {ratio:6.3f}   PSNR vs baseline {quality:5.1f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
