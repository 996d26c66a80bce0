"""Step and image overhead: our txt2img against a bare UNet loop and against diffusers' pipeline.

Both figures are ratios measured in the same run, on the same loaded weights (never pass/fail):

  (a) STEP   seconds per Euler step of `runner.generate` / seconds per call of a bare loop that
             replays the exact UNet calls one generation made (inputs recorded once; the same
             UNet object)                                                       goal <= 1.03
  (b) IMAGE  seconds per image of `runner.generate` (prompt -> PIL image, decode included) /
             seconds per image of diffusers' `StableDiffusionPipeline` built from OUR loaded
             components (same UNet, VAE, text encoder, tokenizer), `EulerDiscreteScheduler` with
             the model's betas and `timestep_spacing="linspace"`, same prompt, CFG, steps, size,
             initial noise and precision                                         goal <= 1.0

  (c) VARIANTS (with --variants) seconds per Euler step with --compile and/or --channels-last /
             seconds per step of an engine with contiguous weights (--no-channels-last), each its own engine over the same file,
             rounds alternating; compiling happens in the untimed warm-up (its time is printed)

Full mode: the full-size SD1.5-architecture random-weight checkpoint (bench/.cache/, written by
bench/foundation.py or bench/load.py) at 256x256, bf16 on the CPU. Rounds alternate which side
goes first; each side is warmed up once first.

    python bench/step_overhead.py                  # full (about 3-4 minutes on a 2-core CPU)
    python bench/step_overhead.py --quick          # tiny model at 64x64: a smoke check, < 1 min
    python bench/step_overhead.py --steps 10 --rounds 4 --size 256
    python bench/step_overhead.py --sections variants --variants compile,channels-last
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
sys.path.insert(0, str(HERE))  # foundation.py's replay helpers
sys.path.insert(0, str(HERE.parent))
FULL_CKPT = HERE / ".cache" / "Stable-diffusion" / "sd15-random-fp16.safetensors"
PROMPT, NEGATIVE, CFG, SEED = "a photograph of an astronaut riding a horse", "blurry", 7.0, 1234


def log(msg: str = "") -> None:
    print(msg, flush=True)


def make_request(size: int, steps: int):
    from webui.pipeline.request import GenerationRequest

    return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg_scale=CFG, seed=SEED,
                             width=size, height=size, sampler_name="Euler", save_images=False)


def diffusers_pipeline(bundle):
    """diffusers' own pipeline around our loaded modules, with the scheduler our Euler matches."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    family = bundle.family
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=family.num_train_timesteps, beta_start=family.beta_start, beta_end=family.beta_end,
        beta_schedule="scaled_linear", timestep_spacing="linspace", steps_offset=1,
    )
    te = bundle.text_encoders[0]
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=te.model, tokenizer=te.tokenizer, unet=bundle.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_ours(engine, size: int, steps: int):
    t0 = time.perf_counter()
    image = engine.runner.generate(make_request(size, steps)).images[0]
    return time.perf_counter() - t0, image


def image_theirs(pipe, bundle, size: int, steps: int):
    import torch

    noise = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(SEED))
    t0 = time.perf_counter()
    with torch.inference_mode():
        image = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG,
                     latents=noise.to(bundle.runtime.dtype), height=size, width=size, output_type="pil").images[0]
    return time.perf_counter() - t0, image


def bench_steps(engine, size: int, steps: int, rounds: int) -> float:
    from foundation import record_unet_calls, step_bare, step_ours

    unet = engine.bundle(None).unet
    calls = record_unet_calls(engine, unet, size, steps)  # also the warm-up of both sides
    ours: list[float] = []
    bare: list[float] = []
    for r in range(rounds):
        for which in (("ours", "bare") if r % 2 == 0 else ("bare", "ours")):
            if which == "ours":
                ours += step_ours(engine, size, steps)
            else:
                bare += step_bare(unet, calls)
    o, b = statistics.median(ours), statistics.median(bare)
    log(f"\n== (a) per step, {size}x{size}, {steps} steps x {rounds} rounds (first step of each run untimed) ==")
    log(f"ours (runner.generate): median {o:.4f} s/step  min {min(ours):.4f}  (n={len(ours)})")
    log(f"bare (UNet call loop):  median {b:.4f} s/step  min {min(bare):.4f}  (n={len(bare)})")
    log(f"STEP {size}x{size}: ours / bare = {o / b:.3f} (medians), {min(ours) / min(bare):.3f} (fastest)  "
        f"(goal <= 1.03)")
    return o / b


def bench_images(engine, size: int, steps: int, rounds: int) -> float:
    import numpy as np

    bundle = engine.bundle(None)
    pipe = diffusers_pipeline(bundle)
    _, first_ours = image_ours(engine, size, steps)  # warm-up, untimed
    _, first_theirs = image_theirs(pipe, bundle, size, steps)
    diff = np.abs(np.asarray(first_ours, dtype=np.int16) - np.asarray(first_theirs, dtype=np.int16))
    ours: list[float] = []
    theirs: list[float] = []
    for r in range(rounds):
        for which in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            if which == "ours":
                ours.append(image_ours(engine, size, steps)[0])
            else:
                theirs.append(image_theirs(pipe, bundle, size, steps)[0])
    o, t = statistics.median(ours), statistics.median(theirs)
    log(f"\n== (b) one image end to end, {size}x{size}, Euler {steps} steps, CFG {CFG:g}, {rounds} round(s) ==")
    log(f"same work check: mean |ours - diffusers| = {diff.mean():.2f} / 255 (max {diff.max()}); "
        f"same weights, noise and schedule, {str(bundle.runtime.dtype).removeprefix('torch.')} rounding differs")
    log(f"ours (runner.generate):          {', '.join(f'{x:.3f}' for x in ours)} s  median {o:.3f} s")
    log(f"diffusers StableDiffusionPipeline: {', '.join(f'{x:.3f}' for x in theirs)} s  median {t:.3f} s")
    log(f"IMAGE {size}x{size}: ours / diffusers = {o / t:.3f} (medians), {min(ours) / min(theirs):.3f} (fastest)  "
        f"(goal <= 1.0)")
    return o / t


VARIANT_FLAGS = {"compile": {"compile": True}, "channels-last": {"channels_last": True}}


def bench_variants(make_engine, variants: list[str], size: int, steps: int, rounds: int) -> list[tuple]:
    from foundation import step_ours

    engines = {"default": make_engine(channels_last=False)}  # contiguous weights, whatever the app's default
    compile_cache = HERE / ".cache" / "torch-compile"  # kept between runs, like <data-dir>/cache/ in the app
    if "compile" in variants:
        log(f"compile cache {compile_cache}: {'warm' if compile_cache.exists() else 'cold'}")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)  # the engine keeps a folder set here
    for name in variants:
        engines[name] = make_engine(**VARIANT_FLAGS[name])
        t0 = time.perf_counter()
        step_ours(engines[name], size, steps)  # warm-up: loads the model, and compiles with --compile
        log(f"{name}: first run (load{' + compile' if name == 'compile' else ''}) {time.perf_counter() - t0:.1f} s, untimed")
    step_ours(engines["default"], size, steps)
    times: dict[str, list[float]] = {name: [] for name in engines}
    order = list(engines)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name] += step_ours(engines[name], size, steps)
    base = statistics.median(times["default"])
    log(f"\n== (c) variants, per step, {size}x{size}, {steps} steps x {rounds} rounds ==")
    log(f"default: median {base:.4f} s/step")
    out = []
    for name in variants:
        m = statistics.median(times[name])
        log(f"VARIANT {name}: median {m:.4f} s/step, {name} / default = {m / base:.3f}")
        out.append((f"s/step {name} / default (median)", m / base, "< 1 is faster"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model at 64x64: the script works, the figures mean little")
    ap.add_argument("--size", type=int, help="image side in pixels (default 256; quick 64)")
    ap.add_argument("--steps", type=int, help="Euler steps (default 6; quick 4)")
    ap.add_argument("--rounds", type=int, help="rounds per comparison (default 3; quick 1)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="model precision (bfloat16)")
    ap.add_argument("--sections", default="steps,image", help="comma list of steps,image,variants (default: steps,image)")
    ap.add_argument("--variants", default="compile,channels-last",
                    help="for the variants section: comma list of compile,channels-last (default: both)")
    a = ap.parse_args(argv)
    size = a.size or (64 if a.quick else 256)
    steps = a.steps or (4 if a.quick else 6)
    rounds = a.rounds or (1 if a.quick else 3)
    sections = {s.strip() for s in a.sections.split(",") if s.strip()}
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if steps < 2 or not sections <= {"steps", "image", "variants"} or not set(variants) <= set(VARIANT_FLAGS):
        ap.error("at least 2 steps; sections are steps,image,variants; variants are compile,channels-last")

    import torch

    from webui.app import build_engine
    from webui.config import Config
    from webui.testing.make_checkpoint import write_checkpoint

    log(f"step/image overhead benchmark, {'quick' if a.quick else 'full'} mode: python {platform.python_version()}, "
        f"torch {torch.__version__}, {os.cpu_count()} cpu(s), torch threads {torch.get_num_threads()}, "
        f"load avg {os.getloadavg()[0]:.2f} (run it alone: other load makes the figures meaningless)")
    with tempfile.TemporaryDirectory(prefix="webui-bench-steps-") as tmp:
        work = Path(tmp)
        if a.quick:
            ckpt_dir = work / "ckpt"
            write_checkpoint(ckpt_dir / "tiny-sd1.safetensors", "sd1", dtype=torch.float16)
        elif FULL_CKPT.exists():
            ckpt_dir = FULL_CKPT.parent
        else:
            log(f"missing {FULL_CKPT}: run `python bench/load.py` (or bench/foundation.py) first to write it")
            return 2
        def make_engine(**flags):
            return build_engine(Config(data_dir=work, ckpt_dir=ckpt_dir, dtype=a.dtype, use_cpu=True, **flags))

        engine = make_engine()
        t0 = time.perf_counter()
        bundle = engine.bundle(None)
        log(f"model {bundle.name} ({bundle.family.label}), {engine.runtime.describe()}; "
            f"first engine.bundle() {time.perf_counter() - t0:.1f} s (not part of the figures)")
        results = []
        if "steps" in sections:
            results.append(("s/step ours / bare UNet loop (median)", bench_steps(engine, size, steps, rounds), "<= 1.03"))
        if "image" in sections:
            results.append(("s/image ours / diffusers pipeline (median)", bench_images(engine, size, steps, rounds),
                            "<= 1.0"))
        if "variants" in sections:
            results += bench_variants(make_engine, variants, size, steps, rounds)
    log("\n== summary ==")
    for name, value, goal in results:
        log(f"{name:<44} {value:6.3f}  goal {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
