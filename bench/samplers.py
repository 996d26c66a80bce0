"""Sampler overhead: per-step time of each sampler relative to Euler on the same model, and
the cost of live previews relative to a plain step.

A sampler should cost its extra model calls and nothing more, so the figure printed beside each
ratio is the ratio divided by (model calls per step / Euler's): 1.00 means no overhead.

    python bench/samplers.py            # the full-size SD1.5-architecture checkpoint at 256x256
    python bench/samplers.py --quick    # a tiny checkpoint, seconds: a smoke check

Run it alone on an idle machine. The full-size checkpoint is the one bench/foundation.py writes
(bench/.cache/Stable-diffusion/sd15-random-fp16.safetensors); run that first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FULL = HERE / ".cache" / "Stable-diffusion" / "sd15-random-fp16.safetensors"


def timed_steps(engine, sampler: str, steps: int, size: int, preview_every: int = 0) -> tuple[list[float], int]:
    """Per-step seconds (the first step untimed) and the number of UNet calls per step."""
    from webui.pipeline.request import GenerationRequest

    unet = engine.bundle(None).unet
    calls = [0]
    handle = unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    elapsed: list[float] = []
    request = GenerationRequest(prompt="a lighthouse at dusk", steps=steps, width=size, height=size, seed=1,
                                sampler_name=sampler, save_images=False)
    try:
        engine.runner.generate(request, progress=lambda p: elapsed.append(p.elapsed), preview_every=preview_every)
    finally:
        handle.remove()
    return [b - a for a, b in zip(elapsed, elapsed[1:])], calls[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)

    from webui.app import build_engine
    from webui.config import Config
    from webui.samplers.table import SAMPLERS
    from webui.testing.make_checkpoint import write_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-samplers-"))
    if a.quick:
        ckpt_dir, size = tmp / "ckpt", 64
        write_checkpoint(ckpt_dir / "tiny.safetensors", "sd1")
    else:
        if not FULL.exists():
            print(f"missing {FULL}: run `python bench/foundation.py --sections load` first", file=sys.stderr)
            return 2
        ckpt_dir, size = FULL.parent, 256
    engine = build_engine(Config(data_dir=tmp, ckpt_dir=ckpt_dir, dtype="bfloat16"))
    engine.bundle(None)
    print(f"sampler overhead, {'tiny model 64x64' if a.quick else 'SD1.5 architecture 256x256'}, bf16 CPU, "
          f"{a.steps} steps x {a.rounds} rounds, per-step medians")

    def measure(name: str, preview_every: int = 0) -> tuple[float, float]:
        times, calls_total = [], 0
        for _ in range(a.rounds):
            t, calls = timed_steps(engine, name, a.steps, size, preview_every)
            times += t
            calls_total += calls
        return statistics.median(times), calls_total / (a.rounds * a.steps)

    euler, euler_calls = measure("Euler")
    print(f"{'sampler':<18} {'s/step':>8} {'calls/step':>10} {'vs Euler':>9} {'per call':>9}")
    print(f"{'Euler':<18} {euler:8.4f} {euler_calls:10.2f} {1.0:9.3f} {1.0:9.3f}")
    for spec in SAMPLERS:
        if spec.name == "Euler":
            continue
        t, calls = measure(spec.name)
        ratio = t / euler
        print(f"{spec.name:<18} {t:8.4f} {calls:10.2f} {ratio:9.3f} {ratio / (calls / euler_calls):9.3f}")
    plain, _ = measure("Euler a")
    every_step, _ = measure("Euler a", preview_every=1)
    every_third, _ = measure("Euler a", preview_every=3)
    print(f"preview every step / no preview:    {every_step / plain:.3f}  (goal <= 1.05)")
    print(f"preview every 3rd step / no preview: {every_third / plain:.3f}  (the page's setting)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
