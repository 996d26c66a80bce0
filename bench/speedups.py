"""Speed-ups and what they cost: time per image with each one against the same engine without it,
measured in the same run (rounds alternate), and how far its image moves from the one without
it (PSNR in dB over 8-bit RGB; higher is closer, identical is inf).

Full SD1.5-architecture random-weight checkpoint (bench/.cache/, written by bench/load.py or
bench/foundation.py), bf16 on the CPU. Random weights are fine for speed; their images are
noise-like, so the PSNR here says how much the computation changed, not how a trained model's
picture looks (no LPIPS model is at hand offline).

    python bench/speedups.py                    # every speed-up at 256² and 512², 6 steps
    python bench/speedups.py --sizes 256 --rounds 2 --only deepcache3,fewstep

Variants (request fields over the baseline: Euler, CFG 7, --steps steps):
    tome0.3, tome0.5        token merging ratio
    deepcache2, deepcache3  step caching (DeepCache) interval, branch 0
    fewstep                 LCM, SGM Uniform, 4 steps, CFG 1 -- against a 20-step baseline of its own
                            (Euler, CFG 7), since that is what a few-step model replaces; no PSNR
                            (a different sampling, and random weights are not a distilled model)
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


VARIANTS: dict[str, dict] = {
    "tome0.3": {"token_merging_ratio": 0.3},
    "tome0.5": {"token_merging_ratio": 0.5},
    "deepcache2": {"deepcache_interval": 2},
    "deepcache3": {"deepcache_interval": 3},
    "fewstep": {"steps": 4, "sampler_name": "LCM", "scheduler": "SGM Uniform", "cfg_scale": 1.0},
}
FEW_STEP_BASELINE = {"steps": 20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512", help="image sides (default 256,512)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(VARIANTS), help=f"variants (default all: {','.join(VARIANTS)})")
    a = ap.parse_args(argv)
    from webui.app import build_engine
    from webui.config import Config
    from webui.pipeline.request import GenerationRequest

    if not FULL_CKPT.exists():
        log(f"missing {FULL_CKPT}: run `python bench/load.py` first to write it")
        return 2
    chosen = [v.strip() for v in a.only.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        log(f"unknown variant(s) {unknown}: pick from {list(VARIANTS)}")
        return 2
    log(f"speed-ups: python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cpu(s), "
        f"load avg {os.getloadavg()[0]:.2f} (run it alone)")
    # what runs: each variant, and the baselines they are compared with
    configs: dict[str, dict] = {"baseline": {}}
    configs.update({v: VARIANTS[v] for v in chosen})
    if "fewstep" in chosen:
        configs["baseline20"] = FEW_STEP_BASELINE
    summary = []
    with tempfile.TemporaryDirectory(prefix="webui-bench-speedups-") as tmp:
        engine = build_engine(Config(data_dir=Path(tmp), ckpt_dir=FULL_CKPT.parent, dtype="bfloat16", use_cpu=True))
        log(f"runtime: {engine.runtime.describe()}")
        for size in (int(s) for s in a.sizes.split(",")):
            def run(changes: dict, size: int = size) -> tuple[float, np.ndarray]:
                fields = {"prompt": "a lighthouse on a cliff at dusk", "negative_prompt": "blurry", "steps": a.steps,
                              "width": size, "height": size, "seed": 1234, "sampler_name": "Euler", "cfg_scale": 7.0,
                              "save_images": False}
                r = GenerationRequest(**{**fields, **changes})
                t0 = time.perf_counter()
                image = engine.runner.generate(r).images[0]
                return time.perf_counter() - t0, np.asarray(image.convert("RGB"))

            names = list(configs)
            for name in names:
                run(configs[name])  # warm-up (the first image loads the model)
            times: dict[str, list[float]] = {n: [] for n in names}
            images: dict[str, np.ndarray] = {}
            for k in range(a.rounds):  # rounds alternate their order, so drift hits all alike
                for name in (names if k % 2 == 0 else names[::-1]):
                    seconds, images[name] = run(configs[name])
                    times[name].append(seconds)
            med = {n: statistics.median(t) for n, t in times.items()}
            log(f"\n== {size}x{size}, {a.steps} Euler steps, {a.rounds} rounds ==")
            log(f"baseline: median {med['baseline']:.2f} s/image")
            for name in chosen:
                if name == "fewstep":
                    ratio = med[name] / med["baseline20"]
                    log(f"fewstep (LCM 4 steps, CFG 1): median {med[name]:.2f} s/image; 20-step Euler CFG 7 "
                        f"{med['baseline20']:.2f} s/image; ratio {ratio:.3f}")
                    summary.append((f"fewstep at {size}²: time / 20 steps", ratio, None))
                    continue
                ratio, quality = med[name] / med["baseline"], psnr(images[name], images["baseline"])
                log(f"{name}: median {med[name]:.2f} s/image, ratio {ratio:.3f}, PSNR {quality:.1f} dB")
                summary.append((f"{name} at {size}²: time / baseline", ratio, quality))
    log("\n== summary ==")
    for name, ratio, quality in summary:
        log(f"{name:<40} {ratio:6.3f}" + (f"   PSNR vs baseline {quality:5.1f} dB" if quality is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
