"""The model as a k-diffusion denoiser: (x, sigma) -> predicted clean latent, with CFG.

The UNet gets `x / sqrt(sigma^2 + 1)` and the fractional training timestep of sigma; its
epsilon or v output becomes a denoised estimate. Guidance combines, per image,
`uncond + scale * sum_j w_j * (cond_j - uncond)` over the image's AND sub-prompts (one
sub-prompt of weight 1 is the usual `uncond + scale * (cond - uncond)`). All rows of all
images go through the UNet in one batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from webui.extensions.api import Guidance, ModelCall
from webui.models.load import ModelBundle
from webui.pipeline.conditioning import ScheduledConditioning
from webui.samplers.schedules import DiscreteSchedule


class CFGDenoiser:
    def __init__(
        self,
        bundle: ModelBundle,
        schedule: DiscreteSchedule,
        conditioning: ScheduledConditioning,
        cfg_scale: float,
        *,
        image_cond: torch.Tensor | None = None,  # per image: extra UNet input channels (inpainting)
        time_ids: torch.Tensor | None = None,  # per image: SDXL size/crop conditioning [B, 6]
        uncond_time_ids: torch.Tensor | None = None,  # per image, for the negative rows (refiner)
        keep: torch.Tensor | None = None,  # inpainting: latent mask, 1 = keep the init latent
        init_latents: torch.Tensor | None = None,
        guidance: float | None = None,  # Flux dev: the distilled guidance scale, a model input
    ) -> None:
        self.unet = bundle.unet
        self.dtype = bundle.runtime.dtype
        self.v_prediction = bundle.prediction == "v"
        self.flow = bundle.prediction == "flow"  # velocity; the model takes x unscaled
        self.schedule = schedule
        self.conditioning = conditioning
        self.cfg_scale = float(cfg_scale)
        self.image_cond = image_cond
        # Everything a step reads lives on the compute device before the first step: a copy from
        # host memory inside the loop would make the host wait for the GPU on every step.
        device = bundle.runtime.device
        self.time_ids = time_ids.to(device) if time_ids is not None else None
        self.uncond_time_ids = uncond_time_ids.to(device) if uncond_time_ids is not None else None
        self.keep = keep.to(device) if keep is not None else None
        self.init_latents = init_latents.to(device) if init_latents is not None else None
        self._indices: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}  # row lists, on the device
        # how cond and uncond predictions combine (an extension's, via DenoiserStage.combine); None: CFG
        self.combine: Callable[[Guidance], torch.Tensor] | None = None
        self.model_inputs: list[Callable[[ModelCall], None]] = []  # extensions' per-call model inputs
        # each row's denoised estimate changed before guidance combines them (ControlNet tile's colour fix)
        self.corrections: list[Callable[[torch.Tensor, ModelCall], torch.Tensor]] = []
        self.step = 1  # 1-based step being computed; the runner advances it after each step
        self.guidance = guidance

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sc = self.conditioning.at(self.step)
        rows = self._index("rows", sc.row_image.tolist(), x.device)
        if isinstance(sigma, torch.Tensor) and sigma.device == x.device:
            sigma = sigma.to(torch.float32)
        else:  # a number: filled on the device, not copied there
            sigma = torch.full((), float(sigma), dtype=torch.float32, device=x.device)
        c_in = 1.0 if self.flow else 1.0 / (sigma**2 + 1) ** 0.5
        t = self.schedule.sigma_to_t(sigma.reshape(1))
        x_in = x[rows]
        unet_in = (x_in * c_in).to(self.dtype)
        if self.image_cond is not None:
            unet_in = torch.cat([unet_in, self.image_cond[rows].to(self.dtype)], dim=1)
        added = None
        if sc.pooled is not None:  # SDXL (with its size conditioning) and SD3
            added = {"text_embeds": sc.pooled.to(self.dtype)}
            if self.guidance is not None:
                added["guidance"] = torch.full((len(rows),), self.guidance, dtype=torch.float32, device=x.device)
            if self.time_ids is not None:
                time_ids = self.time_ids[rows]
                if self.uncond_time_ids is not None and sc.uncond_rows is not None:
                    time_ids[self._index("uncond", sc.uncond_rows, x.device)] = self.uncond_time_ids
                added["time_ids"] = time_ids.to(self.dtype)
        context = sc.context.to(self.dtype)
        timestep = t.expand(unet_in.shape[0])  # float32: bf16 cannot hold t near 999 exactly
        extra: dict = {}
        call = None
        if self.model_inputs or self.corrections:
            call = ModelCall(unet_in, timestep, sigma, context, self.step, sc.row_image.tolist(),
                             list(sc.uncond_rows) if sc.uncond_rows is not None else None, added_cond_kwargs=added)
            for add in self.model_inputs:
                add(call)
            extra, added = call.kwargs, call.added_cond_kwargs
        out = self.unet(unet_in, timestep, encoder_hidden_states=context, added_cond_kwargs=added,
                        return_dict=False, **extra)[0].float()
        if self.flow:
            denoised = x_in - out * sigma
        elif self.v_prediction:
            denoised = x_in / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
        else:
            denoised = x_in - out * sigma
        for correct in self.corrections:
            denoised = correct(denoised, call)
        result = torch.empty_like(x)
        for image, conds in enumerate(sc.cond_rows):
            if sc.uncond_rows is None:
                result[image] = sum(w * denoised[r] for r, w in conds)
                continue
            uncond = denoised[sc.uncond_rows[image]]
            if self.combine is None:
                result[image] = uncond + self.cfg_scale * sum(w * (denoised[r] - uncond) for r, w in conds)
            else:  # the weighted AND parts as one conditional prediction, so that cfg() is the line above
                cond = uncond + sum(w * (denoised[r] - uncond) for r, w in conds)
                parts = [(denoised[r], w) for r, w in conds]
                result[image] = self.combine(Guidance(cond, uncond, self.cfg_scale, x[image], sigma, parts))
        return self.blend(result)

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        """Inpainting with an ordinary model: outside the mask, the init latent stays."""
        if self.keep is None or self.init_latents is None:
            return x
        return self.init_latents * self.keep + x * (1.0 - self.keep)  # both put on the device at start

    def _index(self, kind: str, values: list[int], device: torch.device) -> torch.Tensor:
        """`values` as an index tensor on `device`, made once per job (the rows rarely change)."""
        key = (kind, tuple(values))
        found = self._indices.get(key)
        if found is None or found.device != device:
            found = self._indices[key] = torch.tensor(values, dtype=torch.long, device=device)
        return found
