"""Run a `GenerationRequest` through named stages:

    model -> prompt -> conditioning -> noise -> sample -> decode -> postprocess -> save

Each stage is a method taking and filling a per-job `Job` object; nothing is kept between jobs
except the loaded model (in the cache). These are the seams extensions will hook.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import webui
from webui.images import dated_dir, save_image
from webui.infotext import format_infotext
from webui.models.errors import ModelError
from webui.models.hashing import HashCache
from webui.models.load import ModelBundle
from webui.networks.embeddings import Embedding, EmbeddingLibrary
from webui.networks.lora import LoraWeights, apply_loras, load_lora
from webui.networks.registry import NetworkFile, NetworkRegistry
from webui.pipeline.conditioning import ScheduledConditioning, plan_prompts
from webui.pipeline.denoiser import CFGDenoiser
from webui.pipeline.progress import CancelToken, Progress, ProgressFn
from webui.pipeline.request import MAX_SEED, GenerationRequest
from webui.prompts.encode import TextConditioner
from webui.prompts.parser import extract_extra_networks, lora_weight
from webui.prompts.styles import StyleStore, apply_styles
from webui.samplers.kdiffusion import StepState
from webui.samplers.schedules import DiscreteSchedule, make_sigmas
from webui.samplers.table import resolve

log = logging.getLogger(__name__)

STAGES = ("model", "prompt", "conditioning", "noise", "sample", "decode", "postprocess", "save")


class Interrupted(Exception):
    """Raised inside the sampling loop when the job's cancel token is set."""


@dataclass(frozen=True)
class Library:
    """The user's files the prompt stage draws on: styles, LoRAs, embeddings."""

    styles: StyleStore
    networks: NetworkRegistry
    embeddings: EmbeddingLibrary
    hashes: HashCache


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    paths: list[Path]
    interrupted: bool = False


@dataclass
class Job:
    """The state one generation accumulates as it passes through the stages."""

    request: GenerationRequest
    bundle: ModelBundle
    seed: int
    seeds: list[int] = field(default_factory=list)  # one per image of the current batch
    prompts: list[str] = field(default_factory=list)  # after styles, without extra-network tags
    negative_prompts: list[str] = field(default_factory=list)
    loras: list[tuple[NetworkFile, float]] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)  # used by this job's texts
    conditioner: TextConditioner | None = None  # per job: caches each distinct text's encoding
    conditioning: ScheduledConditioning | None = None
    generators: list[torch.Generator] = field(default_factory=list)
    latents: torch.Tensor | None = None
    batch_images: list[Image.Image] = field(default_factory=list)  # decoded images of the current batch
    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    steps_done: int = 0


class Runner:
    """Runs jobs one at a time on one device (a lock serialises callers)."""

    def __init__(self, get_bundle: Callable[[str | None], ModelBundle], outputs_dir: Path, library: Library) -> None:
        self.get_bundle = get_bundle
        self.outputs_dir = Path(outputs_dir)
        self.library = library
        self._lock = threading.Lock()
        self._lora_cache: dict[Path, tuple[int, LoraWeights]] = {}  # path -> (mtime_ns, weights)

    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        cancel = cancel or CancelToken()
        with self._lock:
            bundle = self.get_bundle(request.checkpoint)  # stage: model
            seed = request.seed if request.seed != -1 else random.randint(0, MAX_SEED)
            job = Job(request=request, bundle=bundle, seed=seed)
            started = time.perf_counter()
            all_seeds: list[int] = []
            interrupted = False
            with torch.inference_mode():
                for batch in range(request.n_iter):
                    if cancel.interrupted:
                        interrupted = True
                        break
                    job.seeds = [seed + batch * request.batch_size + i for i in range(request.batch_size)]
                    all_seeds += job.seeds
                    self.stage_prompt(job)
                    with self.stage_networks(job):
                        self.stage_conditioning(job)
                        self.stage_noise(job)
                        try:
                            self.stage_sample(job, batch, started, progress, cancel)
                        except Interrupted:
                            interrupted = True  # keep the partly denoised batch, as A1111 does
                        self.stage_decode(job)
                    self.stage_postprocess(job)
                    self.stage_save(job)
                    if interrupted:
                        break
            log.info("generated %d image(s) in %.2fs", len(job.images), time.perf_counter() - started)
            return GenerationResult(job.images, all_seeds[: len(job.images)], job.infotexts, job.paths, interrupted)

    # --- stages -------------------------------------------------------------------------------

    def stage_prompt(self, job: Job) -> None:
        """Styles, then extra-network tags out of the text, then the embeddings the text uses."""
        r, lib = job.request, self.library
        known = {s.name: s for s in lib.styles.list()}
        missing = [name for name in r.styles if name not in known]
        if missing:
            raise ModelError(f"style {missing[0]!r} not found in {lib.styles.path}")
        styles = [known[name] for name in r.styles]
        prompt, negative = apply_styles(r.prompt, r.negative_prompt, styles)
        prompt, tags = extract_extra_networks(prompt)
        negative, _ = extract_extra_networks(negative)  # tags in the negative are dropped
        job.loras = []
        for tag in tags:
            if tag.kind == "lora":
                weight = lora_weight(tag)  # a malformed tag is reported before a missing file
                job.loras.append((lib.networks.find_lora(tag.name), weight))
            else:
                log.warning("extra network <%s:%s> ignored: only <lora:...> is supported", tag.kind, tag.name)
        n = len(job.seeds)
        job.prompts, job.negative_prompts = [prompt] * n, [negative] * n
        sizes = [enc.model.config.hidden_size for enc in job.bundle.text_encoders]
        job.embeddings = [e for e in lib.embeddings.find_in_prompt(prompt + "\n" + negative) if e.fits(sizes)]

    @contextlib.contextmanager
    def stage_networks(self, job: Job) -> Iterator[None]:
        """LoRA weights merged into the model for this batch only, restored exactly after."""
        if not job.loras:
            yield
            return
        loras = [(self._load_lora(f), weight) for f, weight in job.loras]
        with apply_loras(job.bundle, loras) as resolutions:
            for res in resolutions:
                for warning in res.warnings():
                    log.warning("%s", warning)
            yield

    def _load_lora(self, file: NetworkFile) -> LoraWeights:
        stamp = file.path.stat().st_mtime_ns
        hit = self._lora_cache.get(file.path)
        if hit and hit[0] == stamp:
            return hit[1]
        weights = load_lora(file.path)
        if len(self._lora_cache) >= 8:
            self._lora_cache.pop(next(iter(self._lora_cache)))
        self._lora_cache[file.path] = (stamp, weights)
        return weights

    def stage_conditioning(self, job: Job) -> None:
        r = job.request
        if job.conditioner is None:
            job.conditioner = TextConditioner(job.bundle, r.clip_skip, job.embeddings)
        plan = plan_prompts(job.prompts, job.negative_prompts, r.steps)
        single = all(len(subs) == 1 and subs[0][1] == 1.0 for subs in plan.cond)
        guided = r.cfg_scale != 1.0 or not single  # AND needs the negative even at scale 1
        job.conditioning = ScheduledConditioning(job.conditioner, plan, guided)

    def stage_noise(self, job: Job) -> None:
        """Noise from a CPU generator per image seeded with its seed: the same on any device."""
        r = job.request
        shape = (1, 4, r.height // 8, r.width // 8)
        job.generators = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]
        job.latents = torch.cat([torch.randn(shape, generator=g) for g in job.generators])

    def stage_sample(
        self, job: Job, batch: int, started: float, progress: ProgressFn | None, cancel: CancelToken
    ) -> None:
        r, bundle = job.request, job.bundle
        device = bundle.runtime.device
        spec, schedule_name = resolve(r.sampler_name, r.scheduler)
        schedule = DiscreteSchedule(bundle.alphas_cumprod)
        sigmas = make_sigmas(schedule, schedule_name, r.steps).to(device)
        assert job.conditioning is not None and job.latents is not None
        denoiser = CFGDenoiser(
            bundle,
            schedule,
            job.conditioning,
            r.cfg_scale,
            image_cond=self._image_conditioning(job),
            time_ids=self._time_ids(job),
        )
        generators = job.generators

        def noise(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in generators]).to(x.device)

        def on_step(state: StepState) -> None:
            job.steps_done += 1
            job.latents = state.x
            denoiser.step = state.step + 2  # the 1-based number of the next step
            if progress:
                progress(Progress(job.steps_done, r.steps * r.n_iter, batch, r.n_iter, time.perf_counter() - started))
            if cancel.interrupted:
                raise Interrupted

        x = job.latents.to(device) * sigmas[0]
        job.latents = spec.fn(denoiser, x, sigmas, noise=noise, callback=on_step)

    def _image_conditioning(self, job: Job) -> torch.Tensor | None:
        """Inpainting models see a mask channel and a masked-image latent; for txt2img the whole
        image is masked: mask 1 and the latent of a mid-grey image."""
        bundle = job.bundle
        if bundle.variant != "inpaint":
            return None
        r = job.request
        grey = torch.zeros((1, 3, r.height, r.width), device=bundle.runtime.device, dtype=bundle.runtime.vae_dtype)
        latent = bundle.vae.encode(grey).latent_dist.mode().float() * bundle.family.latent_scaling_factor
        mask = torch.ones_like(latent[:, :1])
        return torch.cat([mask, latent], dim=1).expand(len(job.seeds), -1, -1, -1)

    def _time_ids(self, job: Job) -> torch.Tensor | None:
        """SDXL: original size, crop top-left, target size (no crop, original = target)."""
        if job.bundle.family.name != "sdxl":
            return None
        r = job.request
        ids = torch.tensor([[r.height, r.width, 0, 0, r.height, r.width]], dtype=torch.float32)
        return ids.repeat(len(job.seeds), 1).to(job.bundle.runtime.device)

    def stage_decode(self, job: Job) -> None:
        bundle = job.bundle
        assert job.latents is not None
        latents = job.latents.to(bundle.runtime.device, bundle.runtime.vae_dtype) / bundle.family.latent_scaling_factor
        decoded = bundle.vae.decode(latents, return_dict=False)[0].float()
        pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        job.batch_images = [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]

    def stage_postprocess(self, job: Job) -> None:
        for i, image in enumerate(job.batch_images):
            job.infotexts.append(self.infotext(job, i))
            job.images.append(image)

    def stage_save(self, job: Job) -> None:
        if not job.request.save_images:
            return
        folder = dated_dir(self.outputs_dir, "txt2img")
        first = len(job.images) - len(job.batch_images)
        for i, image in enumerate(job.batch_images):
            job.paths.append(save_image(image, folder, job.seeds[i], job.infotexts[first + i]))

    # --- helpers ------------------------------------------------------------------------------

    def _hashes(self, loras: list[tuple[NetworkFile, float]]) -> str:
        return ", ".join(f"{f.stem}: {f.short_hash(self.library.hashes)}" for f, _ in loras)

    def _embedding_hash(self, embedding: Embedding) -> str:
        file = self.library.embeddings.files().get(embedding.name)
        return file.short_hash(self.library.hashes) if file else "unknown"

    def infotext(self, job: Job, index: int) -> str:
        r, bundle = job.request, job.bundle
        params = {
            "Steps": r.steps,
            "Sampler": r.sampler_name,
            "Schedule type": r.scheduler,
            "CFG scale": f"{r.cfg_scale:g}",
            "Seed": job.seeds[index],
            "Size": f"{r.width}x{r.height}",
            "Model hash": bundle.hash10,
            "Model": bundle.model_name,
            "VAE": bundle.vae_name.rsplit(".", 1)[0] if bundle.vae_name else None,
            "Clip skip": r.clip_skip if r.clip_skip > 1 else None,
            "Lora hashes": self._hashes(job.loras) if job.loras else None,
            "TI hashes": ", ".join(f"{e.name}: {self._embedding_hash(e)}" for e in job.embeddings) or None,
            "Version": f"v{webui.__version__}",
        }
        return format_infotext(job.prompts[index], job.negative_prompts[index], params)
