"""GPU benchmark: our it/s and peak VRAM next to diffusers' own pipeline, SD1.5 and SDXL.

For each model (SD1.5 at 512x512, SDXL at 1024x1024), batch size (1 and 4) and configuration
- speed:  attention backend SDPA and xformers, eager and `torch.compile`d UNet, memory "normal"
- vram:   memory modes normal, medvram and lowvram (the first attention backend, eager)
it prints, beside each other and measured in the same run:

  ours       the real engine (`webui.app.build_engine` + `engine.runner.generate`, the path the page
             and the API run), configured only through `webui.config.Config` fields (dtype,
             attention, medvram / lowvram, compile / channels_last)
  diffusers  `StableDiffusionPipeline` / `StableDiffusionXLPipeline` built from modules OUR
             loader built (same UNet, VAE, text encoders, tokenizers, hence the same attention
             processors) with `EulerDiscreteScheduler(timestep_spacing="linspace")`, same prompt,
             CFG, steps, size, initial noise (the same seeded CPU noise per image) and dtype. In
             medvram / lowvram its counterparts are diffusers' `enable_model_cpu_offload()` /
             `enable_sequential_cpu_offload()`; with compile, `torch.compile` of its UNet
             (`--diffusers-compile-mode`, channels_last when ours uses it). Where a side needs its
             own copy of the weights (offload, compile) the two sides run one after the other, each
             with only its own copy loaded, so one's weights never count in the other's VRAM.

Figures are ratios and absolute values, never pass/fail:
  it/s      sampling steps per second of the whole batch (A1111's it/s). Measured from the
            per-step callbacks both sides offer (our progress callback, diffusers'
            `callback_on_step_end`): the clock starts when step K finishes (`--skip-steps`, default
            2) and stops when the last step finishes, CUDA synchronised at both instants only (a
            sync every step would stall the CPU's run-ahead). Text encoding, the first K steps
            (medvram's move of the UNet to the GPU, lazy allocations) and VAE decode fall outside
            the window, so it/s = (steps - K) / window. Median of `--rounds` runs after
            `--warmup` untimed runs (`--compile-warmup` for compiled UNets: compilation happens there).
  peak VRAM torch.cuda.max_memory_allocated (and max_memory_reserved) over one whole generation,
            prompt to image: what the GPU must hold. Caches are emptied and peak statistics reset
            before each timed run; the worst run is reported.
  ratios    ours / diffusers: for it/s higher means we are faster, for VRAM lower means we use less.
  goals     printed beside the SD1.5 512x512 batch-1 rows: >= 60 it/s eager, >= 100 it/s compiled,
            peak VRAM <= 2.7 GiB normal, <= 1.5 GiB lowvram.

Weights: full-size random-weight fp16 checkpoints written on the fly by
`webui.testing.make_checkpoint.write_checkpoint(..., full_size=True)` into bench/.cache/
(Stable-diffusion/sd15-random-fp16.safetensors is shared with the other benches), reused when
present; `--sd15-checkpoint` / `--sdxl-checkpoint` use a real file instead. Random weights run the
same kernels as trained ones; images are noise.

    python bench/gpu.py                               # the whole matrix on a CUDA GPU (tens of minutes)
    python bench/gpu.py --models sd15 --batches 1 --sections speed
    python bench/gpu.py --write-docs                  # also write the table into docs/performance.md
    python bench/gpu.py --smoke                       # CPU, tiny models, 64x64, 2 steps: every code
                                                      # path but the CUDA-only figures, < 1 minute

Without CUDA (and without --smoke) it prints "no CUDA device: nothing to measure" and exits 0.
A row whose backend is unavailable (xformers not importable, Config without `compile`, no SDXL
checkpoint) is printed as skipped with the reason; a row that fails prints the error, the run goes
on, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
CACHE = HERE / ".cache"
CKPT_DIR = CACHE / "Stable-diffusion"  # shared with bench/load.py, foundation.py, step_overhead.py
DATA_DIR = CACHE / "gpu-data"  # the engine's data folder: keeps the checkpoint hash cache between runs
DEFAULT_DOCS = REPO / "docs" / "performance.md"
START, END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
PROMPT, NEGATIVE, CFG, SEED = "a photograph of an astronaut riding a horse", "blurry", 7.0, 1234
GIB = 1 << 30
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

ATTENTIONS = ("sdpa", "xformers")
MEMORY_MODES = ("normal", "medvram", "lowvram")
SECTIONS = ("speed", "vram")


@dataclass(frozen=True)
class ModelSpec:
    key: str  # --models name
    label: str
    family: str  # make_checkpoint family
    file: str  # random-weight checkpoint under bench/.cache/Stable-diffusion/
    size: int  # image side in pixels
    min_bytes: int  # a smaller cached file is a broken write: rebuilt


MODELS = {
    "sd15": ModelSpec("sd15", "SD1.5", "sd1", "sd15-random-fp16.safetensors", 512, 2_000_000_000),
    "sdxl": ModelSpec("sdxl", "SDXL", "sdxl", "sdxl-random-fp16.safetensors", 1024, 6_000_000_000),
}


@dataclass(frozen=True)
class Group:
    """One engine configuration; its rows are the batch sizes."""

    model: str
    attention: str
    compile: bool
    memory: str

    def label(self) -> str:
        return f"{self.model} {self.attention} {'compile' if self.compile else 'eager'} {self.memory}"


@dataclass
class Measure:
    its: list[float] = field(default_factory=list)  # it/s of each timed run
    peak_alloc: int | None = None  # bytes; None without CUDA
    peak_reserved: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.its)


@dataclass
class Row:
    group: Group
    batch: int
    size: int
    ours: Measure | None = None
    theirs: Measure | None = None
    skipped: str | None = None  # the reason, when nothing was measured
    failed: str | None = None  # an error in one side (the other may have figures)
    notes: list[str] = field(default_factory=list)
    goal: str = ""
    ours_image: Any = None  # our first image, for the same-work check against diffusers'

    @property
    def its_ratio(self) -> float | None:
        if self.ours and self.theirs and self.ours.its and self.theirs.its:
            return self.ours.median / self.theirs.median
        return None

    @property
    def vram_ratio(self) -> float | None:
        if self.ours and self.theirs and self.ours.peak_alloc and self.theirs.peak_alloc:
            return self.ours.peak_alloc / self.theirs.peak_alloc
        return None


@dataclass
class Ctx:
    """What every group shares: options, device, where checkpoints live."""

    smoke: bool
    device: torch.device
    dtype: str
    steps: int
    skip: int
    warmup: int
    compile_warmup: int
    rounds: int
    batches: list[int]
    sizes: dict[str, int]
    ckpts: dict[str, Path | str]  # model -> checkpoint path, or the reason there is none
    data_dir: Path
    diffusers_compile_mode: str | None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def log(msg: str = "") -> None:
    print(msg, flush=True)


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


class SkipSide(Exception):
    """One side of a row cannot run here (not an error)."""


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- goals (SD1.5 512x512, batch 1) --------------------------------------------------------------


def goal_for(ctx: Ctx, g: Group, batch: int) -> str:
    if ctx.smoke or g.model != "sd15" or batch != 1 or ctx.sizes["sd15"] != 512:
        return ""
    if g.compile:
        return ">= 100 it/s" if g.memory == "normal" else ""
    return {"normal": ">= 60 it/s; VRAM <= 2.7 GiB", "lowvram": "VRAM <= 1.5 GiB"}.get(g.memory, "")


# --- clocks and memory ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Times steps skip+1..total from the step-end callbacks (CUDA synchronised at the two ends)."""

    def __init__(self, device: torch.device, skip: int, total: int) -> None:
        self.device, self.skip, self.total = device, skip, total
        self.t0: float | None = None
        self.t1: float | None = None
        self.seen = 0

    def step_done(self, n: int) -> None:  # n: steps finished so far, 1-based
        self.seen = max(self.seen, n)
        if n == self.skip:
            sync(self.device)
            self.t0 = time.perf_counter()
        elif n == self.total:
            sync(self.device)
            self.t1 = time.perf_counter()

    def its(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"step callbacks incomplete: saw {self.seen} of {self.total} steps")
        return (self.total - self.skip) / (self.t1 - self.t0)


def free_memory(ctx: Ctx) -> None:
    import torch

    gc.collect()  # modules sit in reference cycles (hooks, pipelines)
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()


def reset_peak(ctx: Ctx) -> None:
    import torch

    free_memory(ctx)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)


def read_peak(ctx: Ctx) -> tuple[int | None, int | None]:
    import torch

    if not ctx.cuda:
        return None, None
    torch.cuda.synchronize(ctx.device)
    return torch.cuda.max_memory_allocated(ctx.device), torch.cuda.max_memory_reserved(ctx.device)


# A side: (batch, clock) -> images. Ours calls the engine; theirs calls a diffusers pipeline.
Generate = Callable[[int, StepClock], "list[Image.Image]"]


def measure(ctx: Ctx, generate: Generate, batch: int, warmup: int) -> tuple[Measure, list[Image.Image]]:
    """`warmup` untimed runs, then `ctx.rounds` timed ones; also the first run's images."""
    first: list[Image.Image] | None = None
    for _ in range(warmup):
        images = generate(batch, StepClock(ctx.device, ctx.skip, ctx.steps))
        first = first or images
    m = Measure()
    for _ in range(ctx.rounds):
        reset_peak(ctx)
        clock = StepClock(ctx.device, ctx.skip, ctx.steps)
        images = generate(batch, clock)
        first = first or images
        m.its.append(clock.its())
        alloc, reserved = read_peak(ctx)
        if alloc is not None:
            m.peak_alloc = max(m.peak_alloc or 0, alloc)
            m.peak_reserved = max(m.peak_reserved or 0, reserved or 0)
    assert first is not None
    return m, first


def log_measure(side: str, batch: int, m: Measure, seconds: float) -> None:
    log(f"  {side} batch {batch}: {fmt(m.median)} it/s (runs {', '.join(fmt(x) for x in m.its)}), peak VRAM "
        f"{gib(m.peak_alloc)} GiB (reserved {gib(m.peak_reserved)}) [{seconds:.0f} s with warm-up]")


def image_difference(a: Image.Image, b: Image.Image) -> str:
    import numpy as np

    if a.size != b.size:
        return f"image sizes differ: {a.size} vs {b.size}"
    d = np.abs(np.asarray(a.convert("RGB"), dtype=np.int16) - np.asarray(b.convert("RGB"), dtype=np.int16))
    return f"same-work check: mean |ours - diffusers| = {d.mean():.2f}/255 (max {d.max()})"


# --- the two sides -------------------------------------------------------------------------------


def config_for(ctx: Ctx, g: Group, ckpt: Path, *, ours: bool = True, cpu: bool = False) -> Any:
    """`Config` for an engine: ours as the group says; a reference one (diffusers' weights) eager,
    normal memory, on the CPU when diffusers offloads them itself."""
    from webui.config import Config

    kw: dict[str, Any] = dict(data_dir=ctx.data_dir, ckpt_dir=ckpt.parent, ckpt=ckpt.name, dtype=ctx.dtype,
                              attention=g.attention if not cpu else "sdpa", use_cpu=cpu or not ctx.cuda)
    if ours:
        kw.update(medvram=g.memory == "medvram", lowvram=g.memory == "lowvram")
        if g.compile:
            kw["compile"] = True
            if "channels_last" in Config.model_fields:
                kw["channels_last"] = True  # the layout compiled convolutions want
    return Config(**kw)


def uses_channels_last() -> bool:
    from webui.config import Config

    return "channels_last" in Config.model_fields


def ours_generate(engine: Any, size: int, steps: int) -> Generate:
    from webui.pipeline.request import GenerationRequest

    def run(batch: int, clock: StepClock) -> list[Image.Image]:
        request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg_scale=CFG, seed=SEED,
                                    width=size, height=size, sampler_name="Euler", batch_size=batch,
                                    save_images=False)
        return engine.runner.generate(request, progress=lambda p: clock.step_done(p.step)).images

    return run


def diffusers_pipeline(bundle: Any) -> Any:
    """diffusers' own pipeline around modules our loader built, with the scheduler our Euler matches."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    family = bundle.family
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=family.num_train_timesteps, beta_start=family.beta_start, beta_end=family.beta_end,
        beta_schedule="scaled_linear", timestep_spacing="linspace", steps_offset=1,
    )
    tes = bundle.text_encoders
    if family.name == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=bundle.vae, text_encoder=tes[0].model, text_encoder_2=tes[1].model, tokenizer=tes[0].tokenizer,
            tokenizer_2=tes[1].tokenizer, unet=bundle.unet, scheduler=scheduler, add_watermarker=False,
        )
    elif family.name == "sd1":
        pipe = StableDiffusionPipeline(
            vae=bundle.vae, text_encoder=tes[0].model, tokenizer=tes[0].tokenizer, unet=bundle.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        raise ValueError(f"no diffusers counterpart for the {family.label} family here")
    # Our VAE decodes in the run dtype (float32 again only after NaNs); diffusers' SDXL pipeline
    # would upcast it to float32 for every decode, which is other work and a bigger peak. The
    # upcast would also turn the shared VAE's weights into inference tensors.
    bundle.vae.register_to_config(force_upcast=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def theirs_generate(pipe: Any, dtype: torch.dtype, size: int, steps: int) -> Generate:
    import torch

    from webui.pipeline.noise import image_noise

    def run(batch: int, clock: StepClock) -> list[Image.Image]:
        # The noise our engine draws: image i of a batch from a CPU generator seeded SEED + i.
        noise = torch.cat([image_noise(SEED + i, (4, size // 8, size // 8))[0] for i in range(batch)])

        def on_step(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            clock.step_done(i + 1)
            return kwargs

        with torch.inference_mode():
            return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG,
                        num_images_per_prompt=batch, latents=noise.to(dtype), height=size, width=size,
                        output_type="pil", callback_on_step_end=on_step).images

    return run


# --- checkpoints ---------------------------------------------------------------------------------


def full_size_families() -> tuple[str, ...]:
    from webui.testing import make_checkpoint

    return tuple(getattr(make_checkpoint, "FULL_SIZE", ()))


def ensure_checkpoint(spec: ModelSpec) -> Path | str:
    """The cached full-size random-weight checkpoint, written when missing; or why there is none."""
    path = CKPT_DIR / spec.file
    if path.exists() and path.stat().st_size >= spec.min_bytes:
        return path
    if spec.family not in full_size_families():
        return (f"webui.testing.make_checkpoint cannot write a full-size {spec.family!r} checkpoint "
                f"(full-size families: {', '.join(full_size_families())}); pass --{spec.key}-checkpoint PATH")
    log(f"writing the full-size {spec.label}-architecture checkpoint (fp16, random weights) to {path} ...")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent.parent / f"partial-{path.name}"  # outside the models folder until complete
    code = ("import sys, torch\nfrom pathlib import Path\nfrom webui.testing.make_checkpoint import write_checkpoint\n"
            f"write_checkpoint(Path(sys.argv[1]), {spec.family!r}, full_size=True, dtype=torch.float16)\n")
    t0 = time.perf_counter()
    # A child process: building the fp32 modules takes several times the file's size in memory.
    done = subprocess.run([sys.executable, "-c", code, str(partial)], env=ENV, cwd=REPO)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        return f"writing {path.name} failed (exit {done.returncode})"
    os.replace(partial, path)
    log(f"  written in {time.perf_counter() - t0:.0f} s")
    return path


def smoke_checkpoints(folder: Path, models: list[str]) -> dict[str, Path | str]:
    import torch

    from webui.testing.make_checkpoint import write_checkpoint

    out: dict[str, Path | str] = {}
    for key in models:
        spec = MODELS[key]
        out[key] = write_checkpoint(folder / f"tiny-{key}.safetensors", spec.family, dtype=torch.float16)
    return out


# --- one group -----------------------------------------------------------------------------------


def describe_unet(unet: Any) -> str:
    """Which attention processors the UNet runs, and whether it looks compiled."""
    from webui.runtime.attention import attention_backend_of

    base = getattr(unet, "_orig_mod", unet)
    compiled = base is not unet or getattr(unet, "_compiled_call_impl", None) is not None
    return f"attention processors {sorted(attention_backend_of([base]))}" + (", compiled" if compiled else "")


def run_group(ctx: Ctx, g: Group) -> list[Row]:
    size = ctx.sizes[g.model]
    rows = [Row(g, b, size, goal=goal_for(ctx, g, b)) for b in ctx.batches]
    log(f"\n== {MODELS[g.model].label} {size}x{size}, attention {g.attention}, "
        f"{'compiled UNet' if g.compile else 'eager'}, memory {g.memory} ==")

    def skip_all(reason: str) -> list[Row]:
        for r in rows:
            r.skipped = reason
            print_row(r)
        return rows

    from webui.config import Config

    ckpt = ctx.ckpts[g.model]
    if isinstance(ckpt, str):
        return skip_all(ckpt)
    if g.compile and "compile" not in Config.model_fields:
        return skip_all("webui.config.Config has no `compile` field (torch.compile of the UNet not available)")
    if ctx.cuda:
        import torch

        leftover = torch.cuda.memory_allocated(ctx.device)
        if leftover > 64 << 20:
            log(f"note: {leftover / GIB:.2f} GiB still allocated from earlier groups; it counts in the peaks below")

    # Ours. A separate function so that its engine (and model) is garbage once it returns.
    reason, shared_pipe, unet_ref = _run_ours(ctx, g, ckpt, size, rows)
    if reason:
        return skip_all(reason)
    if shared_pipe is not None:  # eager, normal memory: diffusers over the very same modules
        _run_theirs(ctx, g, rows, size, shared_pipe)
        del shared_pipe
    if g.compile:
        import torch

        torch._dynamo.reset()  # compiled code and its guards hold on to the modules
    free_memory(ctx)
    if unet_ref is not None and unet_ref() is not None:
        log("note: our model is still referenced after its engine was dropped; later VRAM figures include it")
    if not any(r.theirs for r in rows):  # diffusers needs its own copy (offload hooks, compile)
        _run_theirs_separately(ctx, g, ckpt, size, rows)
    for r in rows:
        print_row(r)
    return rows


def _engine(config: Any) -> Any:
    from webui.app import build_engine

    return build_engine(config)


def _run_ours(ctx: Ctx, g: Group, ckpt: Path, size: int,
              rows: list[Row]) -> tuple[str | None, Any, weakref.ref[Any] | None]:
    """Measures our side. Returns (a reason to skip the group or None; in eager normal mode the
    diffusers pipeline over the same modules, else None; a weak reference to our UNet)."""
    engine = _engine(config_for(ctx, g, ckpt))
    rt = engine.runtime  # picks attention and memory mode; loads nothing yet
    if rt.attention != g.attention:
        return rt.attention_message, None, None
    if rt.memory_mode != g.memory:
        for r in rows:
            r.notes.append(f"ours ran in memory mode {rt.memory_mode} (--{g.memory} has no effect on {rt.device.type})")
    t0 = time.perf_counter()
    bundle = engine.bundle(None)
    log(f"ours: {bundle.family.label} {ckpt.name}, {rt.describe()}, {describe_unet(bundle.unet)}; "
        f"loaded in {time.perf_counter() - t0:.1f} s")
    unet_ref = weakref.ref(bundle.unet)
    run = ours_generate(engine, size, ctx.steps)
    warmup = ctx.compile_warmup if g.compile else ctx.warmup
    for r in rows:
        try:
            t0 = time.perf_counter()
            r.ours, images = measure(ctx, run, r.batch, warmup)
            r.ours_image = images[0]
            log_measure("ours     ", r.batch, r.ours, time.perf_counter() - t0)
        except Exception as e:  # one failing row (OOM, compile error) must not end a long run
            r.failed = f"ours: {_why(e)}"
            log(f"  ours      batch {r.batch}: FAILED {_why(e)}")
            traceback.print_exc(limit=4)
            free_memory(ctx)
    if g.compile:
        # The engine falls back to eager (with a warning) when compiling fails: say so on the rows,
        # or their figures would pass for compiled ones.
        try:
            from webui.runtime.compile import compile_state
        except ImportError:
            state = "compiled" if "compiled" in describe_unet(bundle.unet) else "eager"
        else:
            state = compile_state(bundle.unet)
        if state != "compiled":
            for r in rows:
                r.notes.append(f"ours NOT compiled ({state})")
            log(f"  ours: the UNet is not compiled ({state})")
    pipe = None
    if g.memory == "normal" and not g.compile and rt.memory_mode == "normal":
        pipe = diffusers_pipeline(bundle)  # same modules, same attention processors
    return None, pipe, unet_ref


def _run_theirs(ctx: Ctx, g: Group, rows: list[Row], size: int, pipe: Any) -> None:
    run = theirs_generate(pipe, pipe.unet.dtype, size, ctx.steps)
    warmup = ctx.compile_warmup if g.compile else ctx.warmup
    for r in rows:  # also where ours failed: diffusers' figures are worth having alone
        try:
            t0 = time.perf_counter()
            r.theirs, images = measure(ctx, run, r.batch, warmup)
            if r.ours_image is not None:
                r.notes.append(image_difference(r.ours_image, images[0]))
            log_measure("diffusers", r.batch, r.theirs, time.perf_counter() - t0)
        except Exception as e:
            r.failed = ((r.failed + "; ") if r.failed else "") + f"diffusers: {_why(e)}"
            log(f"  diffusers batch {r.batch}: FAILED {_why(e)}")
            traceback.print_exc(limit=4)
            free_memory(ctx)


def _run_theirs_separately(ctx: Ctx, g: Group, ckpt: Path, size: int, rows: list[Row]) -> None:
    """diffusers with its own copy of the weights (loaded by our loader): offloaded by accelerate's
    hooks in medvram / lowvram (weights loaded on the CPU), or with its UNet compiled."""
    import torch

    offload = g.memory != "normal"
    try:
        engine = _engine(config_for(ctx, g, ckpt, ours=False, cpu=offload))
        bundle = engine.bundle(None)
        if offload and g.attention != "sdpa":
            from webui.runtime.attention import apply_attention

            apply_attention(bundle, g.attention)  # a CPU runtime picks SDPA; the processor runs on the GPU
        pipe = diffusers_pipeline(bundle)
        how = ""
        if offload:
            pipe.vae.enable_slicing()  # ours decodes a batch one image at a time when offloading
        if g.memory == "medvram":
            pipe.enable_model_cpu_offload(device=ctx.device)
            how = "enable_model_cpu_offload()"
        elif g.memory == "lowvram":
            if not ctx.cuda:
                # accelerate moves each weight to "cpu:0", which on the CPU makes plain-tensor
                # copies where Parameters must stay, and the next forward fails.
                raise SkipSide("enable_sequential_cpu_offload() needs an accelerator")
            pipe.enable_sequential_cpu_offload(device=ctx.device)
            how = "enable_sequential_cpu_offload()"
        if g.compile:
            unet = pipe.unet
            if uses_channels_last():  # as our Config(channels_last=True) does: UNet and VAE
                unet.to(memory_format=torch.channels_last)
                pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(unet, mode=ctx.diffusers_compile_mode)
            how = f"torch.compile(unet, mode={ctx.diffusers_compile_mode!r})" + (
                " after channels_last" if uses_channels_last() else "")
        log(f"diffusers: {type(pipe).__name__} on its own copy of the weights, {how}, "
            f"{describe_unet(pipe.unet)}")
        del engine, bundle  # the pipeline holds what it needs
        _run_theirs(ctx, g, rows, size, pipe)
        del pipe
    except SkipSide as e:
        for r in rows:
            r.notes.append(f"diffusers skipped: {e}")
        log(f"  diffusers: skipped: {e}")
    except Exception as e:
        for r in rows:
            r.failed = ((r.failed + "; ") if r.failed else "") + f"diffusers: {_why(e)}"
        log(f"  diffusers: FAILED {_why(e)}")
        traceback.print_exc(limit=4)
    if g.compile:
        torch._dynamo.reset()
    free_memory(ctx)


# --- output --------------------------------------------------------------------------------------


def row_cells(r: Row) -> list[str]:
    g = r.group
    o, t = r.ours, r.theirs

    def its(m: Measure | None) -> str:
        return fmt(m.median) if m and m.its else "-"

    def vram(m: Measure | None) -> str:
        if not m or not m.its:
            return "-"
        return "n/a" if m.peak_alloc is None else f"{gib(m.peak_alloc)} / {gib(m.peak_reserved)}"

    status = f"skipped: {r.skipped}" if r.skipped else (f"FAILED: {r.failed}" if r.failed else "")
    notes = "; ".join([s for s in [status] if s] + r.notes)
    return [MODELS[g.model].label, f"{r.size}x{r.size}", g.attention, "yes" if g.compile else "no", g.memory,
            str(r.batch), its(o), its(t), fmt(r.its_ratio, 3), vram(o), vram(t), fmt(r.vram_ratio, 3), r.goal, notes]


HEADERS = ["model", "size", "attention", "compile", "memory", "batch", "ours it/s", "diffusers it/s",
           "it/s ours/diffusers", "ours peak GiB (alloc / reserved)", "diffusers peak GiB (alloc / reserved)",
           "VRAM ours/diffusers", "goal", "notes"]


def print_row(r: Row) -> None:
    c = row_cells(r)
    log(f"ROW {c[0]} {c[1]} {c[2]} compile={c[3]} {c[4]} batch {c[5]}: it/s ours {c[6]} diffusers {c[7]} "
        f"ours/diffusers {c[8]} | peak VRAM GiB ours {c[9]} diffusers {c[10]} ours/diffusers {c[11]}"
        + (f" | goal {r.goal}" if r.goal else "") + (f" | {c[13]}" if c[13] else ""))


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row_cells(r)) + " |")
    return "\n".join(lines)


def print_summary(rows: list[Row]) -> None:
    cells = [HEADERS[:13]] + [row_cells(r)[:13] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(13)]
    log("\n== summary (it/s: higher is better; VRAM: lower is better; ratios ours / diffusers) ==")
    for c in cells:
        log("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())
    for r in rows:
        if r.skipped or r.failed:
            why = f"skipped: {r.skipped}" if r.skipped else f"FAILED: {r.failed}"
            log(f"  {r.group.label()} batch {r.batch}: {why}")


def environment(ctx: Ctx) -> dict[str, str]:
    import diffusers
    import torch

    try:
        import xformers

        xf = xformers.__version__
    except Exception as e:  # a broken build fails in many ways; it is reported, not fatal
        xf = f"not available ({_why(e)})"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        device = f"{props.name} ({props.total_memory / GIB:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "device": device,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "xformers": xf,
            "python": platform.python_version()}


def docs_section(ctx: Ctx, env: dict[str, str], rows: list[Row], command: str) -> str:
    kind = ("**Smoke run** on the CPU with tiny random models at 64x64 (compiled rows with TorchDynamo off): "
            "checks the script, the figures mean nothing.\n\n" if ctx.smoke else "")
    return "\n".join([
        START,
        "## GPU benchmark (`bench/gpu.py`)",
        "",
        kind + f"Measured {env['date']} on {env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, "
        f"xformers {env['xformers']}, python {env['python']}.",
        f"`{command}`: {ctx.dtype}, Euler, {ctx.steps} steps (it/s timed over the last {ctx.steps - ctx.skip}), "
        f"CFG {CFG:g}, median of {ctx.rounds} run(s) after {ctx.warmup} warm-up run(s) "
        f"({ctx.compile_warmup} when compiled). Checkpoints: "
        + ", ".join(f"{MODELS[k].label} {c.name if isinstance(c, Path) else 'none'}" for k, c in ctx.ckpts.items())
        + " (`*-random-*`: random weights, same architecture and kernels).",
        "",
        "it/s: sampling steps per second of the whole batch, text encoding and VAE decode excluded. Peak VRAM: "
        "`torch.cuda.max_memory_allocated` / `max_memory_reserved` over a whole generation. Ratios are "
        "ours / diffusers (`StableDiffusionPipeline` / `StableDiffusionXLPipeline` built from our loaded modules; "
        "model / sequential CPU offload for medvram / lowvram): above 1 we are faster (it/s), below 1 we use "
        "less memory (VRAM).",
        "",
        markdown_table(rows),
        END,
    ])


def replace_section(text: str, section: str) -> str:
    """`text` with the marked section replaced by `section` (which carries the markers), or with
    `section` appended when the markers are missing."""
    start = text.find(START)
    end = text.find(END, start + len(START)) if start != -1 else -1
    if start != -1 and end != -1:
        return text[:start] + section + text[end + len(END):]
    if not text:
        return section + "\n"
    return text + ("\n" if text.endswith("\n") else "\n\n") + section + "\n"


def write_docs(path: Path, section: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(old, section), encoding="utf-8")
    log(f"\nwrote the results section into {path}")


# --- main ----------------------------------------------------------------------------------------


def _list(text: str, allowed: tuple[str, ...], what: str, ap: argparse.ArgumentParser) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        ap.error(f"{what}: choose from {', '.join(allowed)} (got {text!r})")
    return list(dict.fromkeys(items))


def plan(models: list[str], sections: list[str], attentions: list[str], memories: list[str],
         compile_rows: bool) -> list[Group]:
    """The groups to run, each once (the vram section's normal row is the speed section's first)."""
    groups: list[Group] = []
    for m in models:
        if "speed" in sections:
            for a in attentions:
                groups.append(Group(m, a, False, "normal"))
                if compile_rows:
                    groups.append(Group(m, a, True, "normal"))
        if "vram" in sections:
            groups += [Group(m, attentions[0], False, mem) for mem in memories]
    return list(dict.fromkeys(groups))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, tiny models, 64x64, 2 steps: exercises every path but the CUDA-only figures")
    ap.add_argument("--models", default="sd15,sdxl", help="comma list of sd15,sdxl (default: both)")
    ap.add_argument("--batches", default="1,4", help="comma list of batch sizes (default 1,4)")
    ap.add_argument("--sections", default="speed,vram", help="comma list of speed,vram (default: both)")
    ap.add_argument("--attention", default="sdpa,xformers",
                    help="comma list of sdpa,xformers for the speed section; the vram section uses the first")
    ap.add_argument("--memory", default="normal,medvram,lowvram", help="memory modes of the vram section")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    ap.add_argument("--steps", type=int, help="sampling steps per generation (default 20; smoke 2)")
    ap.add_argument("--skip-steps", type=int, help="steps before the clock starts (default 2; smoke 1)")
    ap.add_argument("--warmup", type=int, help="untimed runs per row before timing (default 1)")
    ap.add_argument("--compile-warmup", type=int, help="untimed runs per row with a compiled UNet (default 2; smoke 1)")
    ap.add_argument("--rounds", type=int, help="timed runs per row; the median is reported (default 3; smoke 1)")
    ap.add_argument("--size", type=int, help="image side for every model (default: SD1.5 512, SDXL 1024; smoke 64)")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                    help="model precision (default float16; smoke float32)")
    ap.add_argument("--diffusers-compile-mode", default="default",
                    help="torch.compile mode for diffusers' UNet (default: torch's default mode)")
    ap.add_argument("--sd15-checkpoint", type=Path, help="a real SD1.5 checkpoint instead of the random one")
    ap.add_argument("--sdxl-checkpoint", type=Path, help="a real SDXL checkpoint instead of the random one")
    ap.add_argument("--write-docs", nargs="?", const=str(DEFAULT_DOCS), metavar="PATH",
                    help=f"write the results table between {START} and {END} in PATH (appended when the markers "
                         f"are missing; default {DEFAULT_DOCS.relative_to(REPO)})")
    a = ap.parse_args(argv)
    models = _list(a.models, tuple(MODELS), "--models", ap)
    sections = _list(a.sections, SECTIONS, "--sections", ap)
    attentions = _list(a.attention, ATTENTIONS, "--attention", ap)
    memories = _list(a.memory, MEMORY_MODES, "--memory", ap)
    try:
        batches = list(dict.fromkeys(int(b) for b in a.batches.split(",") if b.strip()))
    except ValueError:
        ap.error(f"--batches: comma list of integers (got {a.batches!r})")
    steps = a.steps or (2 if a.smoke else 20)
    skip = a.skip_steps if a.skip_steps is not None else (1 if a.smoke else 2)
    if not batches or min(batches) < 1 or max(batches) > 16:
        ap.error("--batches: sizes from 1 to 16")
    if skip < 1 or steps <= skip:
        ap.error("need --skip-steps >= 1 and --steps > --skip-steps (the clock starts at the end of a step)")
    if a.size is not None and (a.size < 64 or a.size % 8):
        ap.error("--size: a multiple of 8, at least 64")

    import torch  # after argument parsing: --help stays fast

    if not a.smoke and not torch.cuda.is_available():
        log("no CUDA device: nothing to measure")
        return 0
    if a.smoke:
        # torch.compile rows run with TorchDynamo off: the path (Config flag, wrappers) without
        # minutes of CPU compilation.
        torch._dynamo.config.disable = True
        # Tiny models on a small, shared CPU: thread hand-offs cost far more than the maths
        # (one thread was ~50x faster than two here). The figures mean nothing either way.
        torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="webui-bench-gpu-") as tmp:
        ctx = Ctx(
            smoke=a.smoke,
            device=torch.device("cpu") if a.smoke else torch.device("cuda", torch.cuda.current_device()),
            dtype=a.dtype or ("float32" if a.smoke else "float16"),
            steps=steps, skip=skip,
            warmup=a.warmup if a.warmup is not None else 1,
            compile_warmup=a.compile_warmup if a.compile_warmup is not None else (1 if a.smoke else 2),
            rounds=a.rounds or (1 if a.smoke else 3),
            batches=batches,
            sizes={k: a.size or (64 if a.smoke else MODELS[k].size) for k in models},
            ckpts={},
            data_dir=Path(tmp) if a.smoke else DATA_DIR,
            diffusers_compile_mode=None if a.diffusers_compile_mode == "default" else a.diffusers_compile_mode,
        )
        ctx.data_dir.mkdir(parents=True, exist_ok=True)
        env = environment(ctx)
        log(f"GPU benchmark, {'smoke (CPU, tiny models)' if a.smoke else 'full'} mode: {env['device']}; "
            f"python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, xformers {env['xformers']}")
        log(f"{ctx.dtype}, Euler {steps} steps (clock over the last {steps - skip}), CFG {CFG:g}, batches "
            f"{','.join(map(str, batches))}, warm-up {ctx.warmup} (compiled {ctx.compile_warmup}), {ctx.rounds} timed "
            f"run(s) per row; cudnn.benchmark={torch.backends.cudnn.benchmark}")
        if a.smoke:
            ctx.ckpts = smoke_checkpoints(Path(tmp) / "Stable-diffusion", models)
        else:
            for key in models:
                given: Path | None = getattr(a, f"{key}_checkpoint")
                if given is None:
                    ctx.ckpts[key] = ensure_checkpoint(MODELS[key])
                else:
                    ctx.ckpts[key] = given.resolve() if given.is_file() else f"--{key}-checkpoint {given}: not a file"
        groups = plan(models, sections, attentions, memories, compile_rows=not a.no_compile)
        rows: list[Row] = []
        t0 = time.perf_counter()
        for g in groups:
            try:
                rows += run_group(ctx, g)
            except Exception as e:  # engine construction or loading: the group fails, the run goes on
                log(f"group {g.label()} FAILED: {_why(e)}")
                traceback.print_exc(limit=6)
                rows += [Row(g, b, ctx.sizes[g.model], failed=_why(e), goal=goal_for(ctx, g, b)) for b in batches]
                free_memory(ctx)
        print_summary(rows)
        log(f"\ntotal {time.perf_counter() - t0:.0f} s")
        if a.write_docs:
            command = "python bench/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
            write_docs(Path(a.write_docs), docs_section(ctx, env, rows, command.strip()))
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
