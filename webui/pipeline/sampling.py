"""One run of a sampler over part of a pass: the denoiser with its extension seams, the noise
the sampler asks for, and after each step the `step_end` hooks, progress, previews and the
interrupt check."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from PIL import Image

from webui.controlnet import apply as cn
from webui.controlnet.models import ControlNetLibrary
from webui.extensions import api as ext
from webui.extensions.manager import ExtensionManager
from webui.models.load import ModelBundle
from webui.pipeline.denoiser import CFGDenoiser
from webui.pipeline.progress import Progress
from webui.pipeline.state import BatchState, Interrupted, JobState, PassState
from webui.pipeline.stepcache import step_cache
from webui.pipeline.tome import token_merging
from webui.samplers.schedules import DiscreteSchedule, FlowSchedule, sampler_sigmas
from webui.samplers.table import resolve

Previewer = Callable[[torch.Tensor], list[Image.Image]]


def flow_shift(bundle: ModelBundle, size: tuple[int, int] | None = None) -> float:
    """A flow model's default shift: the family's, or for Flux dev the one its image size gives
    (exp(mu), mu linear in the 2x2-patch count: 0.5 at 256 patches, 1.15 at 4096)."""
    family = bundle.family
    if not (family.flow_dynamic_shift and bundle.distilled_guidance and size):
        return family.flow_shift
    patches = (size[0] // 16) * (size[1] // 16)
    return math.exp(0.5 + (1.15 - 0.5) * (patches - 256) / (4096 - 256))


def noise_schedule(bundle: ModelBundle, zero_snr: bool = False, shift: float | None = None,
                   size: tuple[int, int] | None = None) -> DiscreteSchedule:
    """The model's schedule; with `zero_snr` rescaled to zero terminal SNR (the Settings' or the
    request's choice), unless the file's `ztsnr` key already had it rescaled at load. A flow model
    (SD3, Flux) has its flow schedule with `shift` (None: its default for an image of `size`)."""
    from webui.models.load import rescale_zero_terminal_snr

    if bundle.prediction == "flow":
        return FlowSchedule(flow_shift(bundle, size) if shift is None else shift)
    alphas = bundle.alphas_cumprod
    return DiscreteSchedule(rescale_zero_terminal_snr(alphas) if zero_snr and not bundle.zero_terminal_snr else alphas)


def add_noise(bundle: ModelBundle, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`latents` noised to level `sigma`, where img2img and hires fix start: x0 + sigma * noise, or
    for a flow model (1 - sigma) x0 + sigma * noise."""
    if bundle.prediction == "flow":
        return latents * (1 - sigma) + noise * sigma
    return latents + noise * sigma


def fresh_noise(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """The next noise of each image's seeded generator, shaped like one image of `like`.

    Drawn on the CPU (the same seed gives the same image on any device); on CUDA it goes over
    from pinned memory without the host waiting, since ancestral samplers ask for it every step."""
    noise = torch.cat([torch.randn((1, *like.shape[1:]), generator=g) for g in generators])
    if like.device.type == "cuda":
        return noise.pin_memory().to(like.device, non_blocking=True)
    return noise.to(like.device)


def _sigma_next(sigmas: torch.Tensor, state: ext.SamplerStep) -> torch.Tensor | None:
    """The noise level after step `state.step`: from the list when the sampler takes one step per
    entry; for samplers that step otherwise (adaptive, restart) only the last step's is known."""
    if state.total == len(sigmas) - 1:
        return sigmas[state.step + 1]
    return sigmas[-1] if state.step + 1 == state.total else None


class Sampling:
    """Runs samplers for the runner: knows the samplers (built-in and extensions') and the hooks."""

    def __init__(self, extensions: ExtensionManager, previewer: Callable[[ModelBundle], Previewer],
                 controlnets: ControlNetLibrary | None = None) -> None:
        self.extensions = extensions
        self.previewer = previewer
        self.controlnets = controlnets

    def resolve(self, sampler_name: str, scheduler: str) -> tuple[Any, str]:
        """The built-in sampler or an extension's, and the schedule type (ValueError if unknown)."""
        return resolve(sampler_name, scheduler, self.extensions.sampler_specs())

    def sigmas(self, bundle: ModelBundle, sampler_name: str, scheduler: str, steps: int,
               zero_snr: bool = False, shift: float | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The sampler's noise levels: the chosen schedule ("Automatic": the sampler's default; for
        a flow model its own flow schedule). ValueError for a sampler the family cannot use."""
        spec, schedule = self.resolve(sampler_name, scheduler)
        family = bundle.family
        if family.samplers is not None and spec.name not in family.samplers and spec.implementation is None:
            raise ValueError(f"sampler {spec.name!r} does not work with {family.label} models; choose one of "
                             f"{', '.join(family.samplers)}")
        if bundle.prediction == "flow" and schedule == "Automatic":
            return noise_schedule(bundle, shift=shift, size=size).automatic(steps)
        return sampler_sigmas(noise_schedule(bundle, zero_snr, shift, size), spec, schedule, steps,
                              family=family.ays_sigmas)

    def run(self, job: JobState, batch: BatchState, p: PassState, sampler_name: str, sigmas: torch.Tensor,
            x: torch.Tensor, first_step: int = 1, steps: int = 0) -> torch.Tensor:
        """Sample from `x` over `sigmas` (steps `first_step`... of a `steps`-step schedule); on an
        interrupt `p.latents` holds the last step's latents and `Interrupted` goes on up."""
        r, bundle, control = job.request, batch.bundle, job.control
        spec, _ = self.resolve(sampler_name, r.scheduler)
        assert p.conditioning is not None
        rows = bundle.family.time_ids(*p.size)  # the family's size conditioning, if it has one
        time_ids, uncond_time_ids = (torch.tensor([row], dtype=torch.float32).repeat(len(batch), 1) if row else None
                                     for row in rows)
        denoiser = CFGDenoiser(
            bundle, noise_schedule(bundle, job.zero_terminal_snr, r.shift, p.size), p.conditioning, r.cfg_scale,
            image_cond=p.image_cond, time_ids=time_ids, uncond_time_ids=uncond_time_ids,
            keep=p.keep, init_latents=p.init_latents,
            guidance=r.distilled_cfg_scale if bundle.distilled_guidance else None,
        )
        denoiser.step = first_step
        p.conditioning.prepare(range(first_step, first_step + len(sigmas) - 1))  # the steps this run samples
        make_preview = self.previewer(bundle)
        model_fn = self._setup_denoiser(job, bundle, denoiser, sampler_name, len(sigmas) - 1)
        ip_run = None
        if job.controls and self.controlnets is not None:
            loaded = cn.load_units(job.controls, self.controlnets, bundle)
            add = cn.model_input(loaded, bundle, p.size, steps or len(sigmas) - 1)
            if add is not None:
                denoiser.model_inputs.insert(0, add)
            if fix := cn.colour_fix(loaded, bundle, p.size, steps or len(sigmas) - 1, r.width):
                denoiser.corrections.append(fix)
            if ip_run := cn.ip_adapter_run(loaded, self.controlnets, bundle, steps or len(sigmas) - 1):
                denoiser.model_inputs.insert(0, ip_run[1])
        step_hooks = self.extensions.has("step_end")

        def noise(like: torch.Tensor) -> torch.Tensor:
            return fresh_noise(batch.generators, like)

        def on_step(state: ext.SamplerStep) -> None:
            job.steps_done += 1
            if step_hooks:
                stage = ext.StepStage(step=state.step + 1, steps=state.total, sigma=state.sigma,
                                      denoised=state.denoised, x=state.x, request=r,
                                      sigma_next=_sigma_next(sigmas, state))
                self.extensions.call("step_end", stage, job.ext)
                job.infotext_fields.update(stage.infotext)
                if stage.replaced:
                    state.x.copy_(stage.x)  # the sampler goes on from this tensor
            p.latents = state.x
            denoiser.step = state.step + 2  # the 1-based number of the next step
            if control.progress:
                every = control.preview_every
                preview = make_preview(state.denoised) if every and job.steps_done % every == 0 else None
                control.progress(Progress(job.steps_done, job.total_steps, batch.index, r.n_iter,
                                          time.perf_counter() - job.started, preview))
            if control.cancel.interrupted or control.cancel.skipped:
                raise Interrupted

        options = {k: getattr(r, k) for k in ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")
                   if k in spec.options and getattr(r, k) is not None}
        w, h = p.size
        tome = p.token_merging
        if tome and bundle.family.denoiser != "unet":  # ToMe merges a UNet's self-attention tokens only
            tome = 0.0
            for key in ("Token merging ratio", "Token merging ratio hr"):
                job.infotext_fields.pop(key, None)
        try:
            with token_merging(bundle.unet, tome, (w // 8, h // 8)), \
                    step_cache(bundle.unet, *job.step_cache) as cache, ip_run[0] if ip_run else nullcontext():
                if cache is not None:
                    job.infotext_fields.update({"DeepCache interval": job.step_cache[0],
                                                "DeepCache branch": job.step_cache[1]})
                x = spec.fn_for(bundle.prediction == "flow")(model_fn, x, sigmas, noise=noise, callback=on_step,
                                                             **options)
        except Interrupted:
            p.latents = denoiser.blend(p.latents)
            raise
        return denoiser.blend(x)

    def _setup_denoiser(self, job: JobState, bundle: ModelBundle, denoiser: CFGDenoiser, sampler_name: str,
                        steps: int) -> Any:
        """Extensions may wrap the denoiser and change the model (undone after the job)."""
        if not self.extensions.has("setup_denoiser"):
            return denoiser
        unet = bundle.unet

        def patch(obj: Any, attribute: str, value: Any) -> None:
            old = getattr(obj, attribute)
            job.undo.append(lambda: setattr(obj, attribute, old))
            setattr(obj, attribute, value)

        def set_processors(processor: Any) -> None:
            old = unet.attn_processors  # a new dict, by layer name
            job.undo.append(lambda: unet.set_attn_processor(old))
            unet.set_attn_processor(processor)

        stage = ext.DenoiserStage(denoiser=denoiser, unet=unet, cfg_scale=job.request.cfg_scale,
                                  sampler_name=sampler_name, steps=steps, request=job.request, _patch=patch,
                                  _set_processors=set_processors)
        self.extensions.call("setup_denoiser", stage, job.ext)
        job.infotext_fields.update(stage.infotext)
        if stage.combine is not None:
            denoiser.combine = stage.combine
        denoiser.model_inputs = list(stage.model_inputs)
        return stage.denoiser
