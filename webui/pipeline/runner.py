"""Run a `GenerationRequest` through named stages, batch by batch:

    model -> prompt -> networks -> conditioning -> init -> noise -> sample -> hires
          -> decode -> postprocess -> save

over three state objects, one per lifetime (`webui.pipeline.state`: the job, the batch, the
sampling pass). Stages with more than a few lines live in their own modules (prompt_stage,
init_stage, sampling); this module is the script that calls them in order. Nothing is kept
between jobs but the loaded models (in the engine's cache), parsed LoRA files and preview
decoders.
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
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from webui.controlnet import apply as cn
from webui.controlnet.models import ControlNetLibrary
from webui.extensions import api as ext
from webui.extensions.manager import ExtensionManager
from webui.faces import FaceRestorers
from webui.infotext import generation_infotext
from webui.models.errors import ModelError
from webui.models.load import ModelBundle
from webui.networks.lora import LoraCache, apply_loras
from webui.outputs import OutputWriter
from webui.pipeline import init_image as pix
from webui.pipeline import latents as lat
from webui.pipeline.conditioning import ScheduledConditioning, plan_prompts
from webui.pipeline.init_stage import stage_init, stage_noise, txt2img_image_cond
from webui.pipeline.preview import Previewers
from webui.pipeline.progress import CancelToken, ProgressFn
from webui.pipeline.prompt_stage import Library, fits, stage_prompt
from webui.pipeline.request import MAX_SEED, GenerationRequest, denoise_steps
from webui.pipeline.sampling import Sampling, add_noise, fresh_noise
from webui.pipeline.state import BatchState, Control, GenerationResult, Interrupted, JobState, PassState
from webui.prompts.parser import extract_extra_networks
from webui.runtime.memory import offloaded_after
from webui.settings import Settings

__all__ = ["STAGES", "GenerationResult", "Library", "Runner"]

log = logging.getLogger(__name__)

STAGES = ("model", "prompt", "networks", "conditioning", "init", "noise", "sample", "hires", "decode",
          "postprocess", "save")


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


class Runner:
    """Runs jobs one at a time on one device (a lock serialises callers)."""

    def __init__(
        self,
        get_bundle: Callable[..., ModelBundle],  # (checkpoint query, modules=()) -> the loaded model
        library: Library,
        writer: OutputWriter,
        *,
        upscale: Callable[..., Image.Image] | None = None,  # (image, name, size=(w, h)) -> image
        models_path: Path | None = None,  # where models/VAE-approx (TAESD preview decoders) lives
        extensions: ExtensionManager | None = None,
        settings: Callable[[], Settings] | None = None,  # the current Settings
        data_dir: Path | None = None,  # relative paths in the settings start here
        controlnets: ControlNetLibrary | None = None,  # models/ControlNet
        faces: FaceRestorers | None = None,  # GFPGAN / CodeFormer, for restore_faces
    ) -> None:
        self.get_bundle = get_bundle
        self.library = library
        self.writer = writer
        self.upscale = upscale
        self.faces = faces
        self.extensions = extensions if extensions is not None else ExtensionManager.empty()
        self.settings = settings or Settings
        self.data_dir = data_dir or Path(".")
        self.previews = Previewers(models_path)
        self.controlnets = controlnets
        self.sampling = Sampling(self.extensions, self.previewer, controlnets)
        self.loras = LoraCache()
        self._lock = threading.Lock()
        self._nested: Runner | None = None  # see _without_hooks

    def generate(self, request: GenerationRequest, progress: ProgressFn | None = None,
                 cancel: CancelToken | None = None, preview_every: int = 0) -> GenerationResult:
        control = Control(progress, cancel or CancelToken(), preview_every)
        request = pix.apply_outpaint(request)  # stage: canvas (outpainting grows the init image first)
        with self._lock:
            info = ext.JobInfo(request=request, kind="img2img" if request.is_img2img else "txt2img",
                               id=uuid.uuid4().hex)
            try:
                return self.extensions.run_job(info, lambda: self._generate(request, control, info.id))
            finally:
                info._run = None  # the closure holds the request (and its images): no cycle keeps it alive

    def _generate(self, r: GenerationRequest, control: Control, job_id: str) -> GenerationResult:
        bundle = self.get_bundle(r.checkpoint, r.modules)  # stage: model
        for name in (r.sampler_name, r.hr_sampler_name):
            if name:
                self.resolve(name, r.scheduler)  # an unknown sampler fails before any work
        job = JobState(r, job_id, control, seed=r.seed if r.seed != -1 else random.randint(0, MAX_SEED),
                       subseed=r.subseed if r.subseed != -1 else random.randint(0, MAX_SEED),
                       total_steps=r.total_steps(), ext=self.extensions.job_context(r.extensions, job_id))
        self.stage_speedups(job)
        self.stage_plan_faces(job)
        if self.controlnets is not None and any(u.active for u in r.controlnet):
            job.controls = cn.prepare(r, self.controlnets, bundle)
            job.infotext_fields.update(cn.infotext(job.controls))
        with torch.inference_mode(), offloaded_after(bundle.runtime.memory), self._undo_patches(job):
            for index in range(r.n_iter):
                if control.cancel.interrupted:
                    job.result.interrupted = True
                    break
                if index:  # a refiner may have taken the base model's place in the cache
                    bundle = self.get_bundle(r.checkpoint, r.modules)
                self._run_batch(job, index, bundle)
                if job.result.interrupted:
                    break
        log.info("generated %d image(s) in %.2fs", len(job.result.images), time.perf_counter() - job.started)
        return job.result

    def stage_speedups(self, job: JobState) -> None:
        """Token merging, step caching and the noise schedule for this job: the request's values,
        else the Settings'."""
        r, settings = job.request, self.settings()

        def pick(*values: Any) -> Any:
            return next(v for v in values if v is not None)

        if r.is_img2img:  # A1111: the img2img ratio when set, else the general one
            tome = pick(r.token_merging_ratio, r.token_merging_ratio_img2img,
                        settings.token_merging_ratio_img2img or settings.token_merging_ratio)
        else:
            tome = pick(r.token_merging_ratio, settings.token_merging_ratio)
        tome_hr = pick(r.token_merging_ratio_hr, settings.token_merging_ratio_hr)
        job.token_merging = (tome, tome_hr or tome)
        if tome:
            job.infotext_fields["Token merging ratio"] = tome
        if tome_hr and r.enable_hr and not r.is_img2img:
            job.infotext_fields["Token merging ratio hr"] = tome_hr
        if pick(r.noise_schedule, settings.sd_noise_schedule) == "Zero Terminal SNR":  # not a speed-up: read here too
            job.zero_terminal_snr = True
            job.infotext_fields["Noise Schedule"] = "Zero Terminal SNR"
        interval = pick(r.deepcache_interval, settings.deepcache_interval)
        if interval > 1:  # the infotext says so once a sampling run has it (webui.pipeline.sampling)
            job.step_cache = (interval, pick(r.deepcache_branch, settings.deepcache_branch))

    def stage_plan_faces(self, job: JobState) -> None:
        """Which face restorer runs after decoding, if any (the request's choice, else the Settings')."""
        if self.faces is None:  # the engine always gives its runner the restorers
            if job.request.restore_faces:
                raise ModelError("restore_faces: this runner has no face restorers")
            return
        job.faces = self.faces.plan(job.request, self.settings())
        if job.faces is not None:
            job.infotext_fields["Face restoration"] = job.faces[0]

    def _run_batch(self, job: JobState, index: int, bundle: ModelBundle) -> None:
        r, cancel = job.request, job.control.cancel
        first = index * r.batch_size
        with contextlib.ExitStack() as stack:
            batch = BatchState(index, first, [job.seed + first + i for i in range(r.batch_size)],
                               [job.subseed + first + i for i in range(r.batch_size)], bundle, bundle, stack)
            stage_prompt(job, batch, self.library, self.extensions, self.data_dir)
            self.stage_networks(job, batch, bundle)
            p = stage_init(r, batch)
            p.token_merging = job.token_merging[0]
            p.conditioning = self.stage_conditioning(job, batch, batch.prompts, batch.negative_prompts, r.steps)
            stage_noise(r, batch, p)
            try:
                self.stage_sample(job, batch, p)
                if r.enable_hr and not r.is_img2img:
                    p = self.stage_hires(job, batch, p)
                    self.stage_hires_sample(job, batch, p)
            except Interrupted:
                job.result.interrupted = cancel.interrupted  # a skip only ends this batch
                cancel.clear_skip()
            self.stage_decode(batch, p)
        self.stage_postprocess(job, batch)
        self.stage_save(job, batch)

    # --- networks and conditioning ------------------------------------------------------------

    def stage_networks(self, job: JobState, batch: BatchState, bundle: ModelBundle) -> None:
        """What the batch puts on a model it samples with, undone when the batch ends: its LoRAs
        merged (restored exactly after) and, for seamless textures, circular padding."""
        if batch.loras:
            loras = [(self.loras.get(f.path), weight) for f, weight in batch.loras]
            for res in batch.stack.enter_context(apply_loras(bundle, loras)):
                for warning in res.warnings():
                    log.warning("%s", warning)
        if job.request.tiling:
            batch.stack.enter_context(_circular(bundle))

    @contextlib.contextmanager
    def _undo_patches(self, job: JobState) -> Iterator[None]:
        """What extensions changed on the model (`DenoiserStage.patch`, `set_attn_processor`)
        comes back after the job, last change first."""
        try:
            yield
        finally:
            while job.undo:
                job.undo.pop()()

    def stage_conditioning(self, job: JobState, batch: BatchState, prompts: list[str], negatives: list[str],
                           steps: int) -> ScheduledConditioning:
        plan = plan_prompts(prompts, negatives, steps)
        single = all(len(subs) == 1 and subs[0][1] == 1.0 for subs in plan.cond)
        guided = job.request.cfg_scale != 1.0 or not single  # AND needs the negative even at scale 1
        embeddings = [e for e in batch.embeddings if fits(e, batch.bundle)]  # a refiner may take fewer
        return ScheduledConditioning(job.conditioner(batch.bundle, embeddings), plan, guided)

    # --- sampling -----------------------------------------------------------------------------

    def stage_sample(self, job: JobState, batch: BatchState, p: PassState) -> None:
        r, device = job.request, batch.bundle.runtime.device
        self._flow_infotext(job, batch.bundle)
        sigmas = self.sampling.sigmas(batch.bundle, r.sampler_name, r.scheduler, r.steps,
                                      job.zero_terminal_snr, r.shift, p.size).to(device)
        assert batch.noise is not None
        noise = batch.noise.to(device)
        if p.init_latents is None:
            x = noise * sigmas[0]
        else:
            t_enc = denoise_steps(r.steps, r.denoising_strength)
            if t_enc == 0:  # nothing to denoise: the init image is the result
                return
            sigmas = sigmas[len(sigmas) - t_enc - 1 :]  # the last t_enc steps
            x = add_noise(batch.bundle, p.init_latents.to(device), noise, sigmas[0])
        p.latents = self._sample_with_refiner(job, batch, p, r.sampler_name, sigmas, x, r.steps)

    @staticmethod
    def _flow_infotext(job: JobState, bundle: ModelBundle) -> None:
        """A flow model's fields: the shift when it is not derived from the size (Flux dev), and
        Flux dev's distilled guidance (Forge's names)."""
        if bundle.prediction != "flow":
            return
        r = job.request
        guided = bundle.distilled_guidance
        if r.shift is not None or not (bundle.family.flow_dynamic_shift and guided):
            job.infotext_fields["Shift"] = r.shift or bundle.family.flow_shift
        if guided:
            job.infotext_fields["Distilled CFG Scale"] = r.distilled_cfg_scale

    def _sample_with_refiner(self, job: JobState, batch: BatchState, p: PassState, sampler_name: str,
                             sigmas: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
        """Sample over `sigmas`; with a refiner, it takes over after `refiner_switch_at` of them."""
        r, n = job.request, len(sigmas) - 1
        switch = round(r.refiner_switch_at * n) if r.refiner_checkpoint and batch.refiner is None else n
        first_step = steps - n + 1  # img2img and hires run the last n steps of a `steps` schedule
        if switch > 0:
            x = self.sampling.run(job, batch, p, sampler_name, sigmas[: switch + 1], x, first_step, steps)
        if switch < n:
            self._switch_to_refiner(job, batch, p, steps)
            x = self.sampling.run(job, batch, p, sampler_name, sigmas[switch:].to(x.device), x, first_step + switch,
                                  steps)
        return x

    def _switch_to_refiner(self, job: JobState, batch: BatchState, p: PassState, steps: int) -> None:
        """The refiner replaces the model for the rest of this batch (and its hires pass)."""
        r, base = job.request, batch.bundle
        refiner = self.get_bundle(r.refiner_checkpoint)
        if refiner.family.latent_space != base.family.latent_space:
            raise ModelError(f"refiner {refiner.model_name} ({refiner.family.label}) cannot continue from "
                             f"{base.model_name} ({base.family.label}): their latent spaces differ")
        batch.refiner = batch.bundle = refiner
        if refiner is not base:  # the same model has the batch's networks already
            self.stage_networks(job, batch, refiner)
        p.conditioning = self.stage_conditioning(job, batch, batch.prompts, batch.negative_prompts, steps)
        p.image_cond = txt2img_image_cond(refiner, p.size, len(batch)) if not r.is_img2img else None

    def stage_hires(self, job: JobState, batch: BatchState, first: PassState) -> PassState:
        """The second pass of hires fix: the first pass's result upscaled to the hires size."""
        r, bundle = job.request, batch.bundle
        size = r.hires_size()
        assert size is not None and first.latents is not None
        tw, th = job.hires_size = size
        if r.hr_upscaler.lower().startswith("latent"):
            start = lat.resize_latents(first.latents, th, tw)
        else:
            if self.upscale is None:
                raise ModelError(f"upscaler {r.hr_upscaler!r} is not available")
            images = lat.decode(bundle, first.latents)
            start = lat.encode(bundle, [self.upscale(im, r.hr_upscaler, size=(tw, th)) for im in images])
        return PassState(size, init_latents=start, latents=start, image_cond=txt2img_image_cond(bundle, size, len(batch)),
                         token_merging=job.token_merging[1])

    def stage_hires_sample(self, job: JobState, batch: BatchState, p: PassState) -> None:
        """Denoise the upscaled image again, over the last `denoising_strength` of the steps."""
        r, start = job.request, p.init_latents
        assert start is not None
        steps = r.hr_second_pass_steps or r.steps
        t_enc = denoise_steps(steps, r.denoising_strength)
        if t_enc == 0:
            return
        if r.hr_prompt or r.hr_negative_prompt:
            prompt, _ = extract_extra_networks(r.hr_prompt or r.prompt)
            negative, _ = extract_extra_networks(r.hr_negative_prompt or r.negative_prompt)
            prompts, negatives = [prompt] * len(batch), [negative] * len(batch)
        else:
            prompts, negatives = batch.prompts, batch.negative_prompts
        p.conditioning = self.stage_conditioning(job, batch, prompts, negatives, steps)
        sampler = r.hr_sampler_name or r.sampler_name
        sigmas = self.sampling.sigmas(batch.bundle, sampler, r.scheduler, steps, job.zero_terminal_snr, r.shift, p.size)
        sigmas = sigmas[len(sigmas) - t_enc - 1 :].to(batch.bundle.runtime.device)
        x = add_noise(batch.bundle, start, fresh_noise(batch.generators, start), sigmas[0])
        p.latents = self._sample_with_refiner(job, batch, p, sampler, sigmas, x, steps)

    def previewer(self, bundle: ModelBundle) -> Callable[[torch.Tensor], list[Image.Image]]:
        return self.previews.for_model(bundle, self.settings().live_preview_method)

    def resolve(self, sampler_name: str, scheduler: str) -> tuple[Any, str]:
        """The built-in sampler or an extension's, and the schedule type (ValueError if unknown)."""
        return self.sampling.resolve(sampler_name, scheduler)

    # --- output -------------------------------------------------------------------------------

    def stage_decode(self, batch: BatchState, p: PassState) -> None:
        if p.latents is None:  # img2img at denoising strength 0
            batch.images = [im.copy() for im in batch.init_pixels]
        else:
            batch.images = lat.decode(batch.bundle, p.latents)

    def stage_postprocess(self, job: JobState, batch: BatchState) -> None:
        hooks, result = self.extensions.has("postprocess_image"), job.result
        for i, image in enumerate(batch.images):
            area = batch.areas[i] if i < len(batch.areas) else None
            if area is not None:
                image = pix.composite(image, area)
            if job.faces is not None and self.faces is not None:  # before extensions' post-processing
                name, weight = job.faces
                image = self.faces.restore(image, name, weight=weight, device=batch.bundle.runtime.device)
            extra: dict[str, Any] = {}
            if hooks:
                stage = ext.ImageStage(image=image, index=batch.first + i, seed=batch.seeds[i],
                                       prompt=batch.prompts[i], request=job.request, data_dir=self.data_dir,
                                       generate=self._nested_generation(job, batch, i),
                                       detectors=self.extensions.detectors())
                self.extensions.call("postprocess_image", stage, job.ext)
                if not isinstance(stage.image, Image.Image):
                    raise ValueError("an extension's postprocess_image left something that is not an image")
                image, extra = stage.image, stage.infotext
            batch.images[i] = image
            result.images.append(image)
            result.seeds.append(batch.seeds[i])
            result.subseeds.append(batch.subseeds[i])
            batch.infotexts.append(self.infotext(job, batch, i, extra))
            result.infotexts.append(batch.infotexts[-1])

    def _nested_generation(self, job: JobState, batch: BatchState, index: int) -> Callable[..., GenerationResult]:
        """`generate(**fields)` for image `index`'s postprocess stage: the job's request (this image's
        seed, one image, no hires, nothing saved) with `fields` changed, run now on this thread by a
        runner without extension hooks, over the same models."""

        def generate(**fields: Any) -> GenerationResult:
            request = job.request.derive(**{"seed": batch.seeds[index], "subseed": batch.subseeds[index],
                                            "batch_size": 1, "n_iter": 1, "enable_hr": False, "outpaint": None,
                                            "controlnet": (), **fields, "save_images": False, "extensions": {},
                                            "script_name": ""})
            return self._without_hooks()._generate(pix.apply_outpaint(request), Control(), job.id)

        return generate

    def _without_hooks(self) -> Runner:
        """This runner (same models, caches and writer) with no extension hooks, made once."""
        if self._nested is None:
            self._nested = copy.copy(self)
            self._nested.extensions = ExtensionManager.empty()
            self._nested.sampling = Sampling(self._nested.extensions, self._nested.previewer, self.controlnets)
        return self._nested

    def stage_save(self, job: JobState, batch: BatchState) -> None:
        r = job.request
        if not r.save_images:
            return
        kind = "img2img" if r.is_img2img else "txt2img"
        for i, image in enumerate(batch.images):
            values = {"steps": r.steps, "cfg": f"{r.cfg_scale:g}", "sampler": r.sampler_name, "width": r.width,
                      "height": r.height, "model_name": batch.base.model_name,
                      "model_hash": batch.base.hash10 or "", "prompt": batch.prompts[i]}
            job.result.paths.append(self.writer.save(image, kind, batch.infotexts[i],
                                                     seed=batch.seeds[i], values=values, job=job.ext))

    def infotext(self, job: JobState, batch: BatchState, index: int, extra: dict[str, Any] | None = None) -> str:
        """Image `index` of the batch's infotext (written by webui.infotext, beside its reader)."""
        r, lib = job.request, self.library
        return generation_infotext(
            r, prompt=batch.prompts[index], negative_prompt=batch.negative_prompts[index], seed=batch.seeds[index],
            subseed=batch.subseeds[index], model=batch.base, refiner=batch.refiner, hires_size=job.hires_size,
            sampler_takes_eta="eta" in self.resolve(r.sampler_name, r.scheduler)[0].options,
            lora_hashes=lib.lora_hashes(batch.loras), ti_hashes=lib.ti_hashes(batch.embeddings),
            extra={**job.infotext_fields, **(extra or {})})
