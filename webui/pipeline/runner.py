"""Run a `GenerationRequest` through named stages:

    model -> prompt -> networks -> conditioning -> init -> noise -> sample -> hires
          -> decode -> postprocess -> save

Each stage is a method taking and filling a per-job `Job` object; nothing is kept between jobs
except the loaded model (in the cache) and parsed LoRA files. These are the seams extensions
will hook.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from webui.extensions import api as ext
from webui.extensions.manager import ExtensionManager
from webui.infotext import generation_infotext
from webui.models.errors import ModelError
from webui.models.hashing import HashCache
from webui.models.load import ModelBundle
from webui.networks.embeddings import Embedding, EmbeddingLibrary
from webui.networks.lora import LoraCache, apply_loras
from webui.networks.registry import NetworkFile, NetworkRegistry
from webui.outputs import OutputWriter
from webui.pipeline import init_image as pix
from webui.pipeline import latents as lat
from webui.pipeline.conditioning import ScheduledConditioning, plan_prompts
from webui.pipeline.denoiser import CFGDenoiser
from webui.pipeline.noise import image_noise
from webui.pipeline.preview import Previewers
from webui.pipeline.progress import CancelToken, Progress, ProgressFn
from webui.pipeline.request import MAX_SEED, GenerationRequest, MaskedContent, ResizeMode
from webui.prompts.encode import TextConditioner
from webui.prompts.parser import extract_extra_networks, lora_weight
from webui.prompts.styles import StyleStore, apply_styles
from webui.runtime.memory import offloaded_after
from webui.samplers.schedules import DiscreteSchedule, sampler_sigmas
from webui.samplers.table import resolve
from webui.settings import Settings

log = logging.getLogger(__name__)


STAGES = ("model", "prompt", "networks", "conditioning", "init", "noise", "sample", "hires", "decode",
          "postprocess", "save")


class Interrupted(Exception):
    """Raised inside the sampling loop when the job is interrupted or its image skipped."""


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
    subseeds: list[int]
    infotexts: list[str]
    paths: list[Path]
    interrupted: bool = False


@dataclass
class Job:
    """The state one generation accumulates as it passes through the stages."""

    request: GenerationRequest
    bundle: ModelBundle
    seed: int
    subseed: int
    started: float
    total_steps: int  # over the whole job, for progress
    seeds: list[int] = field(default_factory=list)  # one per image of the current batch
    subseeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # after styles, without extra-network tags
    negative_prompts: list[str] = field(default_factory=list)
    loras: list[tuple[NetworkFile, float]] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)  # used by this job's texts
    conditioner: TextConditioner | None = None  # per job: caches each distinct text's encoding
    conditioning: ScheduledConditioning | None = None
    generators: list[torch.Generator] = field(default_factory=list)
    noise: torch.Tensor | None = None  # initial noise of the batch
    # img2img
    init_latents: torch.Tensor | None = None
    init_pixels: list[Image.Image] = field(default_factory=list)  # what was encoded (after resize/crop)
    keep: torch.Tensor | None = None  # latent mask, 1 = keep the init latent
    image_cond: torch.Tensor | None = None  # inpainting models' extra channels
    areas: list[pix.InpaintArea | None] = field(default_factory=list)
    latents: torch.Tensor | None = None
    size: tuple[int, int] = (0, 0)  # (width, height) of `latents` in pixels
    batch_images: list[Image.Image] = field(default_factory=list)  # decoded images of the current batch
    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    all_seeds: list[int] = field(default_factory=list)
    all_subseeds: list[int] = field(default_factory=list)
    steps_done: int = 0
    hires_size: tuple[int, int] | None = None
    ext: Any = None  # JobExtensions: each extension's validated values and settings for this job
    ext_infotext: dict[str, Any] = field(default_factory=dict)  # fields extensions add for every image
    image_infotext: list[dict[str, Any]] = field(default_factory=list)  # per image of the batch
    patches: list[tuple[Any, str, Any]] = field(default_factory=list)  # (object, attribute, old value)
    base: ModelBundle | None = None  # the requested model, when a refiner has taken over `bundle`
    refiner: ModelBundle | None = None  # set once the refiner has run (for the infotext)
    # what the current batch put on its models (LoRA merges, a refiner's tiling), undone when it ends
    batch_stack: contextlib.ExitStack | None = None


@contextlib.contextmanager
def _circular(bundle: ModelBundle) -> Iterator[None]:
    """Circular padding in every convolution of the UNet and VAE while the block runs."""
    convs = [m for model in (bundle.unet, bundle.vae) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    saved = [m.padding_mode for m in convs]
    try:
        for m in convs:
            m.padding_mode = "circular"
        yield
    finally:
        for m, mode in zip(convs, saved):
            m.padding_mode = mode


def _fresh_noise(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """The next noise of each image's seeded generator, shaped like one image of `like`.

    Drawn on the CPU (the same seed gives the same image on any device); on CUDA it goes over
    from pinned memory without the host waiting, since ancestral samplers ask for it every step."""
    noise = torch.cat([torch.randn((1, *like.shape[1:]), generator=g) for g in generators])
    if like.device.type == "cuda":
        return noise.pin_memory().to(like.device, non_blocking=True)
    return noise.to(like.device)


def _fits(embedding: Embedding, bundle: ModelBundle) -> bool:
    encoders = bundle.text_encoders
    return embedding.fits([e.model.config.hidden_size for e in encoders], [e.spec.embedding_slot for e in encoders])


def _denoise_steps(steps: int, strength: float) -> int:
    """img2img runs the last int(strength * steps) steps of a `steps`-step schedule."""
    return int(min(strength, 0.999) * steps)


class Runner:
    """Runs jobs one at a time on one device (a lock serialises callers)."""

    def __init__(
        self,
        get_bundle: Callable[[str | None], ModelBundle],
        outputs_dir: Path,
        library: Library,
        upscale: Callable[..., Image.Image] | None = None,  # (image, name, size=(w, h)) -> image
        models_path: Path | None = None,  # where models/VAE-approx (TAESD preview decoders) lives
        extensions: ExtensionManager | None = None,
        settings: Callable[[], Settings] | None = None,  # the current Settings (read at each save)
        data_dir: Path | None = None,  # relative output folders in the settings start here
        writer: OutputWriter | None = None,  # saves the images (default: one over the arguments above)
    ) -> None:
        self.settings = settings or Settings
        self.data_dir = data_dir or Path(".")
        self.get_bundle = get_bundle
        self.models_path = models_path
        self.extensions = extensions if extensions is not None else ExtensionManager.empty()
        self.previews = Previewers(models_path)
        self.outputs_dir = Path(outputs_dir)
        self.library = library
        self.upscale = upscale
        self.writer = writer or OutputWriter(self.data_dir, self.outputs_dir, self.settings, self.extensions)
        self._lock = threading.Lock()
        self.loras = LoraCache()
        self._nested: Runner | None = None  # see _without_hooks

    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
        preview_every: int = 0,
    ) -> GenerationResult:
        cancel = cancel or CancelToken()
        request = pix.apply_outpaint(request)  # stage: canvas (outpainting grows the init image first)
        with self._lock:
            job_id = uuid.uuid4().hex
            info = ext.JobInfo(request=request, kind="img2img" if request.is_img2img else "txt2img", id=job_id)
            try:
                return self.extensions.run_job(info, lambda: self._generate(request, progress, cancel,
                                                                            preview_every, job_id))
            finally:
                info._run = None  # the closure holds the request (and its images): no cycle keeps it alive

    def _generate(self, r: GenerationRequest, progress: ProgressFn | None, cancel: CancelToken,
                  preview_every: int, job_id: str = "") -> GenerationResult:
        bundle = self.get_bundle(r.checkpoint)  # stage: model
        per_batch = _denoise_steps(r.steps, r.denoising_strength) if r.is_img2img else r.steps
        if r.enable_hr and not r.is_img2img:
            per_batch += _denoise_steps(r.hr_second_pass_steps or r.steps, r.denoising_strength)
        job = Job(
            request=r,
            bundle=bundle,
            seed=r.seed if r.seed != -1 else random.randint(0, MAX_SEED),
            subseed=r.subseed if r.subseed != -1 else random.randint(0, MAX_SEED),
            started=time.perf_counter(),
            total_steps=per_batch * r.n_iter,
        )
        for name in (r.sampler_name, r.hr_sampler_name):
            if name:
                self.resolve(name, r.scheduler)  # an unknown sampler fails before any work
        job.ext = self.extensions.job_context(r.extensions, job_id)
        interrupted = False
        with torch.inference_mode(), offloaded_after(bundle.runtime.memory), self.stage_tiling(job), \
                self._undo_patches(job):
            for batch in range(r.n_iter):
                if cancel.interrupted:
                    interrupted = True
                    break
                first = batch * r.batch_size
                if job.base is not None:  # the refiner took over the last batch
                    job.bundle, job.base = self.get_bundle(r.checkpoint), None
                    job.conditioner = None
                job.seeds = [job.seed + first + i for i in range(r.batch_size)]
                job.subseeds = [job.subseed + first + i for i in range(r.batch_size)]
                self.stage_prompt(job)
                with self.stage_networks(job):
                    self.stage_conditioning(job, job.prompts, job.negative_prompts, r.steps)
                    self.stage_init(job)
                    self.stage_noise(job)
                    try:
                        self.stage_sample(job, batch, progress, cancel, preview_every)
                        if r.enable_hr and not r.is_img2img:
                            self.stage_hires(job, batch, progress, cancel, preview_every)
                    except Interrupted:
                        interrupted = cancel.interrupted  # a skip only ends this batch
                        cancel.clear_skip()
                    self.stage_decode(job)
                self.stage_postprocess(job)
                self.stage_save(job)
                if interrupted:
                    break
        log.info("generated %d image(s) in %.2fs", len(job.images), time.perf_counter() - job.started)
        n = len(job.images)
        return GenerationResult(job.images, job.all_seeds[:n], job.all_subseeds[:n], job.infotexts, job.paths,
                                interrupted)

    # --- prompt and networks ------------------------------------------------------------------

    def stage_prompt(self, job: Job) -> None:
        """Styles, then extra-network tags out of the text, then the embeddings the text uses."""
        r, lib = job.request, self.library
        known = {s.name: s for s in lib.styles.list()}
        missing = [name for name in r.styles if name not in known]
        if missing:
            raise ModelError(f"style {missing[0]!r} not found in {lib.styles.path}")
        prompt, negative = apply_styles(r.prompt, r.negative_prompt, [known[name] for name in r.styles])
        n = len(job.seeds)
        prompts, negatives = [prompt] * n, [negative] * n
        if self.extensions.has("process_prompt"):
            _, parsed = extract_extra_networks(prompt)
            stage = ext.PromptStage(prompts=list(prompts), negative_prompts=list(negatives), seeds=list(job.seeds),
                                    extra_networks=[(t.kind, t.name, tuple(t.args)) for t in parsed],
                                    batch_index=len(job.images) // max(n, 1), request=r, data_dir=self.data_dir)
            self.extensions.call("process_prompt", stage, job.ext)
            if len(stage.prompts) != n or len(stage.negative_prompts) != n:
                raise ValueError("an extension changed the number of prompts in process_prompt")
            prompts, negatives = [str(p) for p in stage.prompts], [str(p) for p in stage.negative_prompts]
            job.ext_infotext.update(stage.infotext)
        cleaned = [extract_extra_networks(p) for p in prompts]
        tags = cleaned[0][1]  # LoRAs apply to the whole batch: the first image's tags
        job.loras = []
        for tag in tags:
            if tag.kind == "lora":
                weight = lora_weight(tag)  # a malformed tag is reported before a missing file
                job.loras.append((lib.networks.find_lora(tag.name), weight))
            else:
                log.warning("extra network <%s:%s> ignored: only <lora:...> is supported", tag.kind, tag.name)
        job.prompts = [text for text, _ in cleaned]
        job.negative_prompts = [extract_extra_networks(p)[0] for p in negatives]  # tags in the negative are dropped
        texts = "\n".join([*job.prompts, *job.negative_prompts, r.hr_prompt, r.hr_negative_prompt])
        job.embeddings = [e for e in lib.embeddings.find_in_prompt(texts) if _fits(e, job.bundle)]

    @contextlib.contextmanager
    def stage_networks(self, job: Job) -> Iterator[None]:
        """LoRA weights merged into the model for this batch only, restored exactly after. A
        refiner taking over during the batch gets them too (restored first)."""
        with contextlib.ExitStack() as stack:
            job.batch_stack = stack
            try:
                self._merge_loras(job, job.bundle)
                yield
            finally:
                job.batch_stack = None

    def _merge_loras(self, job: Job, bundle: ModelBundle) -> None:
        if not job.loras or job.batch_stack is None:
            return
        loras = [(self.loras.get(f.path), weight) for f, weight in job.loras]
        for res in job.batch_stack.enter_context(apply_loras(bundle, loras)):
            for warning in res.warnings():
                log.warning("%s", warning)

    @contextlib.contextmanager
    def _undo_patches(self, job: Job) -> Iterator[None]:
        """Whatever extensions patched through `DenoiserStage.patch` comes back after the job."""
        try:
            yield
        finally:
            for obj, attribute, old in reversed(job.patches):
                setattr(obj, attribute, old)
            job.patches.clear()

    def stage_tiling(self, job: Job) -> contextlib.AbstractContextManager[None]:
        """Seamless textures: circular padding in every convolution, for this job only."""
        return _circular(job.bundle) if job.request.tiling else contextlib.nullcontext()

    def stage_conditioning(self, job: Job, prompts: list[str], negatives: list[str], steps: int) -> None:
        r = job.request
        if job.conditioner is None:
            job.conditioner = TextConditioner(job.bundle, r.clip_skip, job.embeddings)
        plan = plan_prompts(prompts, negatives, steps)
        single = all(len(subs) == 1 and subs[0][1] == 1.0 for subs in plan.cond)
        guided = r.cfg_scale != 1.0 or not single  # AND needs the negative even at scale 1
        job.conditioning = ScheduledConditioning(job.conditioner, plan, guided)

    # --- init image and noise -----------------------------------------------------------------

    def stage_init(self, job: Job) -> None:
        """img2img: resize (or crop, for only-masked inpainting), encode, and build the masks."""
        r, bundle = job.request, job.bundle
        job.init_latents = job.keep = job.image_cond = None
        job.areas, job.init_pixels = [None] * len(job.seeds), []
        job.size = (r.width, r.height)
        if not r.is_img2img:
            job.image_cond = self._txt2img_image_cond(job)
            return
        mask = None
        latent_masks = []
        for i in range(len(job.seeds)):
            source = r.init_images[(len(job.images) + i) % len(r.init_images)].convert("RGB")
            if r.mask is None:
                job.init_pixels.append(pix.resize_image(source, r.resize_mode, r.width, r.height))
                continue
            mask = pix.prepare_mask(r.mask.resize(source.size), bool(r.inpainting_mask_invert))
            crop = pix.crop_region(mask, r.inpaint_full_res_padding, r.width, r.height) if r.inpaint_full_res else None
            if crop is not None:
                image = source.crop(crop).resize((r.width, r.height), Image.Resampling.LANCZOS)
                small_mask = mask.crop(crop).resize((r.width, r.height), Image.Resampling.LANCZOS)
                job.areas[i] = pix.InpaintArea(source, pix.blur_mask(mask, r.mask_blur), crop)
            else:
                image = pix.resize_image(source, r.resize_mode, r.width, r.height)
                small_mask = pix.resize_image(mask, r.resize_mode, r.width, r.height)
                job.areas[i] = pix.InpaintArea(image, pix.blur_mask(small_mask, r.mask_blur), None)
            blurred = pix.blur_mask(small_mask, r.mask_blur)
            if r.inpainting_fill == MaskedContent.FILL:
                image = pix.fill_masked(image, blurred)
            job.init_pixels.append(image)
            latent_masks.append(lat.latent_mask(blurred, r.width, r.height))
        if r.resize_mode == ResizeMode.LATENT_UPSCALE and r.mask is None:
            sources = [r.init_images[(len(job.images) + i) % len(r.init_images)].convert("RGB") for i in range(len(job.seeds))]
            w8, h8 = (max(64, sources[0].width // 8 * 8), max(64, sources[0].height // 8 * 8))
            small = lat.encode(bundle, [s.resize((w8, h8), Image.Resampling.LANCZOS) for s in sources])
            job.init_latents = lat.resize_latents(small, r.height, r.width)
        else:
            job.init_latents = lat.encode(bundle, job.init_pixels)
        device = bundle.runtime.device
        if latent_masks:
            job.keep = (1.0 - torch.cat(latent_masks)).to(device)
        if bundle.variant == "inpaint":
            job.image_cond = self._inpaint_image_cond(job, latent_masks)

    def _inpaint_image_cond(self, job: Job, latent_masks: list[torch.Tensor]) -> torch.Tensor:
        """Inpainting models see the mask and the latent of the image with the masked area grey."""
        bundle, r = job.bundle, job.request
        if latent_masks:
            masks = [a.mask if a.crop is None else a.mask.crop(a.crop).resize((r.width, r.height))
                     for a in job.areas if a is not None]
            grey = []
            for image, m in zip(job.init_pixels, masks):
                hard = m.point(lambda v: 255 if v >= 128 else 0)
                grey.append(Image.composite(Image.new("RGB", image.size, (128, 128, 128)), image, hard))
            cond_mask = torch.cat(latent_masks)
        else:  # img2img without a mask: nothing is masked
            grey, cond_mask = job.init_pixels, torch.zeros((len(job.init_pixels), 1, r.height // 8, r.width // 8))
        latent = lat.encode(bundle, grey)
        return torch.cat([cond_mask.to(latent.device), latent], dim=1)

    def _txt2img_image_cond(self, job: Job) -> torch.Tensor | None:
        """txt2img on an inpainting model: everything masked, over a mid-grey image."""
        bundle = job.bundle
        if bundle.variant != "inpaint":
            return None
        w, h = job.size
        latent = lat.encode(bundle, [Image.new("RGB", (w, h), (128, 128, 128))])
        mask = torch.ones_like(latent[:, :1])
        return torch.cat([mask, latent], dim=1).expand(len(job.seeds), -1, -1, -1)

    def stage_noise(self, job: Job) -> None:
        """Per-image seeded noise; variation seeds; the masked area's content for inpainting."""
        r = job.request
        w, h = job.size
        resize_from = None
        if r.seed_resize_from_w > 0 and r.seed_resize_from_h > 0:
            resize_from = (r.seed_resize_from_h // 8, r.seed_resize_from_w // 8)
        made = [
            image_noise(seed, (4, h // 8, w // 8), sub, r.subseed_strength, resize_from)
            for seed, sub in zip(job.seeds, job.subseeds)
        ]
        job.noise = torch.cat([n for n, _ in made])
        job.generators = [g for _, g in made]
        if job.init_latents is not None and job.keep is not None and \
                r.inpainting_fill in (MaskedContent.LATENT_NOISE, MaskedContent.LATENT_NOTHING):
            masked_content = job.noise.to(job.init_latents.device) if r.inpainting_fill == MaskedContent.LATENT_NOISE \
                else 0.0
            job.init_latents = job.init_latents * job.keep + masked_content * (1.0 - job.keep)

    # --- sampling -----------------------------------------------------------------------------

    def _run_sampler(
        self, job: Job, sampler_name: str, sigmas: torch.Tensor, x: torch.Tensor, batch: int,
        progress: ProgressFn | None, cancel: CancelToken, preview_every: int, first_step: int = 1,
    ) -> torch.Tensor:
        r, bundle = job.request, job.bundle
        spec, _ = self.resolve(sampler_name, r.scheduler)
        assert job.conditioning is not None
        w, h = job.size
        n = len(job.seeds)
        rows = bundle.family.time_ids(w, h)  # the family's size conditioning, if it has one
        time_ids, uncond_time_ids = (torch.tensor([row], dtype=torch.float32).repeat(n, 1) if row else None
                                     for row in rows)
        denoiser = CFGDenoiser(
            bundle, DiscreteSchedule(bundle.alphas_cumprod), job.conditioning, r.cfg_scale,
            image_cond=job.image_cond, time_ids=time_ids, uncond_time_ids=uncond_time_ids,
            keep=job.keep, init_latents=job.init_latents,
        )
        denoiser.step = first_step
        job.conditioning.prepare(range(first_step, first_step + len(sigmas) - 1))  # the steps this run samples
        generators = job.generators
        make_preview = self.previewer(bundle)
        model_fn = self._setup_denoiser(job, denoiser, sampler_name, len(sigmas) - 1)
        step_hooks = self.extensions.has("step_end")

        def noise(like: torch.Tensor) -> torch.Tensor:
            return _fresh_noise(generators, like)

        def on_step(state: ext.SamplerStep) -> None:
            job.steps_done += 1
            if step_hooks:
                stage = ext.StepStage(step=state.step + 1, steps=state.total, sigma=state.sigma,
                                      denoised=state.denoised, x=state.x, request=r)
                self.extensions.call("step_end", stage, job.ext)
                job.ext_infotext.update(stage.infotext)
                if stage.replaced:
                    state.x.copy_(stage.x)  # the sampler goes on from this tensor
            job.latents = state.x
            denoiser.step = state.step + 2  # the 1-based number of the next step
            if progress:
                preview = None
                if preview_every and job.steps_done % preview_every == 0:
                    preview = make_preview(state.denoised)
                progress(Progress(job.steps_done, job.total_steps, batch, r.n_iter,
                                  time.perf_counter() - job.started, preview))
            if cancel.interrupted or cancel.skipped:
                raise Interrupted

        options = {k: getattr(r, k) for k in ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")
                   if k in spec.options and getattr(r, k) is not None}
        try:
            x = spec.fn(model_fn, x, sigmas, noise=noise, callback=on_step, **options)
        except Interrupted:
            job.latents = denoiser.blend(job.latents)
            raise
        return denoiser.blend(x)

    def stage_sample(self, job: Job, batch: int, progress: ProgressFn | None, cancel: CancelToken,
                     preview_every: int) -> None:
        r, bundle = job.request, job.bundle
        device = bundle.runtime.device
        sigmas = self._sigmas(job, r.sampler_name, r.steps).to(device)
        assert job.noise is not None
        noise = job.noise.to(device)
        if job.init_latents is None:
            job.latents = noise * sigmas[0]
        else:
            t_enc = _denoise_steps(r.steps, r.denoising_strength)
            if t_enc == 0:  # nothing to denoise: the init image is the result
                job.latents = None
                return
            sigmas = sigmas[len(sigmas) - t_enc - 1 :]  # the last t_enc steps
            job.latents = job.init_latents.to(device) + noise * sigmas[0]
        job.latents = self._sample_with_refiner(job, r.sampler_name, sigmas, job.latents, batch, progress, cancel,
                                                preview_every, r.steps)

    def _setup_denoiser(self, job: Job, denoiser: CFGDenoiser, sampler_name: str, steps: int) -> Any:
        """Extensions may wrap the denoiser and patch the model (undone after the job)."""
        if not self.extensions.has("setup_denoiser"):
            return denoiser

        def patch(obj: Any, attribute: str, value: Any) -> None:
            job.patches.append((obj, attribute, getattr(obj, attribute)))
            setattr(obj, attribute, value)

        stage = ext.DenoiserStage(denoiser=denoiser, unet=job.bundle.unet, cfg_scale=job.request.cfg_scale,
                                  sampler_name=sampler_name, steps=steps, request=job.request, _patch=patch)
        self.extensions.call("setup_denoiser", stage, job.ext)
        job.ext_infotext.update(stage.infotext)
        if stage.combine is not None:
            denoiser.combine = stage.combine
        denoiser.model_inputs = list(stage.model_inputs)
        return stage.denoiser

    def _sample_with_refiner(
        self, job: Job, sampler_name: str, sigmas: torch.Tensor, x: torch.Tensor, batch: int,
        progress: ProgressFn | None, cancel: CancelToken, preview_every: int, steps: int,
    ) -> torch.Tensor:
        """Sample over `sigmas`; with a refiner, it takes over after `refiner_switch_at` of them."""
        r = job.request
        n = len(sigmas) - 1
        switch = round(r.refiner_switch_at * n) if r.refiner_checkpoint and job.base is None else n
        first_step = steps - n + 1  # img2img and hires run the last n steps of a `steps` schedule
        if switch > 0:
            x = self._run_sampler(job, sampler_name, sigmas[: switch + 1], x, batch, progress, cancel,
                                  preview_every, first_step)
        if switch < n:
            self._switch_to_refiner(job, steps)
            x = self._run_sampler(job, sampler_name, sigmas[switch:].to(x.device), x, batch, progress, cancel,
                                  preview_every, first_step + switch)
        return x

    def _switch_to_refiner(self, job: Job, steps: int) -> None:
        """The refiner replaces the model for the rest of this batch (and its hires pass)."""
        r, base = job.request, job.bundle
        refiner = self.get_bundle(r.refiner_checkpoint)
        if refiner.family.latent_space != base.family.latent_space:
            raise ModelError(f"refiner {refiner.model_name} ({refiner.family.label}) cannot continue from "
                             f"{base.model_name} ({base.family.label}): their latent spaces differ")
        job.base, job.refiner, job.bundle = base, refiner, refiner
        if refiner is not base and job.batch_stack is not None:  # the same model has them already
            self._merge_loras(job, refiner)
            if r.tiling:
                job.batch_stack.enter_context(_circular(refiner))
        job.conditioner = TextConditioner(refiner, r.clip_skip, [e for e in job.embeddings if _fits(e, refiner)])
        self.stage_conditioning(job, job.prompts, job.negative_prompts, steps)
        job.image_cond = self._txt2img_image_cond(job) if refiner.variant == "inpaint" and not r.is_img2img else None

    def stage_hires(self, job: Job, batch: int, progress: ProgressFn | None, cancel: CancelToken,
                    preview_every: int) -> None:
        """Upscale the first pass, then denoise it again at the larger size."""
        r, bundle = job.request, job.bundle
        device = bundle.runtime.device
        size = r.hires_size()
        assert size is not None
        tw, th = job.hires_size = size
        assert job.latents is not None
        if r.hr_upscaler.lower().startswith("latent"):
            start = lat.resize_latents(job.latents, th, tw)
        else:
            if self.upscale is None:
                raise ModelError(f"upscaler {r.hr_upscaler!r} is not available")
            images = lat.decode(bundle, job.latents)
            start = lat.encode(bundle, [self.upscale(im, r.hr_upscaler, size=(tw, th)) for im in images])
        job.size = (tw, th)
        if bundle.variant == "inpaint":
            job.image_cond = self._txt2img_image_cond(job)
        steps = r.hr_second_pass_steps or r.steps
        t_enc = _denoise_steps(steps, r.denoising_strength)
        if t_enc == 0:
            job.latents = start
            return
        if r.hr_prompt or r.hr_negative_prompt:
            prompt, _ = extract_extra_networks(r.hr_prompt or r.prompt)
            negative, _ = extract_extra_networks(r.hr_negative_prompt or r.negative_prompt)
            self.stage_conditioning(job, [prompt] * len(job.seeds), [negative] * len(job.seeds), steps)
        else:
            self.stage_conditioning(job, job.prompts, job.negative_prompts, steps)
        sampler = r.hr_sampler_name or r.sampler_name
        sigmas = self._sigmas(job, sampler, steps)
        sigmas = sigmas[len(sigmas) - t_enc - 1 :].to(device)
        job.init_latents, job.keep = start, None
        x = start + _fresh_noise(job.generators, start) * sigmas[0]
        job.latents = self._sample_with_refiner(job, sampler, sigmas, x, batch, progress, cancel, preview_every,
                                                steps)

    def previewer(self, bundle: ModelBundle) -> Callable[[torch.Tensor], list[Image.Image]]:
        return self.previews.for_model(bundle, self.settings().live_preview_method)

    def resolve(self, sampler_name: str, scheduler: str) -> tuple[Any, str]:
        """The built-in sampler or an extension's, and the schedule type (ValueError if unknown)."""
        return resolve(sampler_name, scheduler, self.extensions.sampler_specs())

    def _sigmas(self, job: Job, sampler_name: str, steps: int) -> torch.Tensor:
        """The sampler's noise levels: the chosen schedule ("Automatic": the sampler's default)."""
        spec, schedule = self.resolve(sampler_name, job.request.scheduler)
        return sampler_sigmas(DiscreteSchedule(job.bundle.alphas_cumprod), spec, schedule, steps,
                              family=job.bundle.family.ays_sigmas)

    # --- output -------------------------------------------------------------------------------

    def stage_decode(self, job: Job) -> None:
        if job.latents is None:  # img2img at denoising strength 0
            job.batch_images = [im.copy() for im in job.init_pixels]
        else:
            job.batch_images = lat.decode(job.bundle, job.latents)

    def stage_postprocess(self, job: Job) -> None:
        hooks = self.extensions.has("postprocess_image")
        for i, image in enumerate(job.batch_images):
            area = job.areas[i] if i < len(job.areas) else None
            if area is not None:
                image = pix.composite(image, area)
            extra: dict[str, Any] = {}
            if hooks:
                stage = ext.ImageStage(image=image, index=len(job.images), seed=job.seeds[i], prompt=job.prompts[i],
                                       request=job.request, data_dir=self.data_dir,
                                       generate=self._nested_generation(job, i))
                self.extensions.call("postprocess_image", stage, job.ext)
                if not isinstance(stage.image, Image.Image):
                    raise ValueError("an extension's postprocess_image left something that is not an image")
                image, extra = stage.image, stage.infotext
            job.images.append(image)
            job.all_seeds.append(job.seeds[i])
            job.all_subseeds.append(job.subseeds[i])
            job.infotexts.append(self.infotext(job, i, extra))

    def _nested_generation(self, job: Job, index: int) -> Callable[..., GenerationResult]:
        """`generate(**fields)` for image `index`'s postprocess stage: the job's request (this image's
        seed, one image, no hires, nothing saved) with `fields` changed, run now on this thread by a
        runner without extension hooks, over the same models."""

        def generate(**fields: Any) -> GenerationResult:
            base = job.request.model_dump(exclude={"init_images", "mask"})
            base.update(seed=job.seeds[index], subseed=job.subseeds[index], batch_size=1, n_iter=1,
                        enable_hr=False, outpaint=None, init_images=job.request.init_images, mask=job.request.mask)
            request = GenerationRequest.model_validate({**base, **fields, "save_images": False, "extensions": {}})
            return self._without_hooks()._generate(pix.apply_outpaint(request), None, CancelToken(), 0)

        return generate

    def _without_hooks(self) -> Runner:
        """This runner (same models, caches and writer) with no extension hooks, made once."""
        if self._nested is None:
            self._nested = copy.copy(self)
            self._nested.extensions = ExtensionManager.empty()
        return self._nested

    def stage_save(self, job: Job) -> None:
        if not job.request.save_images:
            return
        r = job.request
        kind = "img2img" if r.is_img2img else "txt2img"
        first = len(job.images) - len(job.batch_images)
        bundle = job.base or job.bundle
        for i in range(len(job.batch_images)):
            values = {"steps": r.steps, "cfg": f"{r.cfg_scale:g}", "sampler": r.sampler_name, "width": r.width,
                      "height": r.height, "model_name": bundle.model_name, "model_hash": bundle.hash10 or "",
                      "prompt": job.prompts[i]}
            job.paths.append(self.writer.save(job.images[first + i], kind, job.infotexts[first + i],
                                              seed=job.seeds[i], values=values, job=job.ext))

    # --- helpers ------------------------------------------------------------------------------

    def _hashes(self, loras: list[tuple[NetworkFile, float]]) -> str:
        return ", ".join(f"{f.stem}: {f.short_hash(self.library.hashes)}" for f, _ in loras)

    def _embedding_hash(self, embedding: Embedding) -> str:
        file = self.library.embeddings.files().get(embedding.name)
        return file.short_hash(self.library.hashes) if file else "unknown"

    def infotext(self, job: Job, index: int, extra: dict[str, Any] | None = None) -> str:
        """Image `index` of the batch's infotext (written by webui.infotext, beside its reader)."""
        r = job.request
        return generation_infotext(
            r, prompt=job.prompts[index], negative_prompt=job.negative_prompts[index], seed=job.seeds[index],
            subseed=job.subseeds[index], model=job.base or job.bundle, refiner=job.refiner, hires_size=job.hires_size,
            sampler_takes_eta="eta" in self.resolve(r.sampler_name, r.scheduler)[0].options,
            lora_hashes=self._hashes(job.loras) if job.loras else None,
            ti_hashes=", ".join(f"{e.name}: {self._embedding_hash(e)}" for e in job.embeddings) or None,
            extra={**job.ext_infotext, **(extra or {})})
