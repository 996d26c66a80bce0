"""The model as a k-diffusion denoiser: (x, sigma) -> predicted clean latent, with CFG.

The UNet gets `x / sqrt(sigma^2 + 1)` and the fractional training timestep of sigma; its
epsilon or v output becomes a denoised estimate, and classifier-free guidance combines the
conditional and unconditional estimates as `uncond + scale * (cond - uncond)`.
"""

from __future__ import annotations

import torch

from webui.models.load import ModelBundle
from webui.prompts.encode import Conditioning
from webui.samplers.schedules import DiscreteSchedule


class CFGDenoiser:
    def __init__(
        self,
        bundle: ModelBundle,
        schedule: DiscreteSchedule,
        cond: Conditioning,
        uncond: Conditioning,
        cfg_scale: float,
        *,
        image_cond: torch.Tensor | None = None,  # extra UNet input channels (inpainting models)
        time_ids: torch.Tensor | None = None,  # SDXL size/crop conditioning, [B, 6]
    ) -> None:
        self.unet = bundle.unet
        self.dtype = bundle.runtime.dtype
        self.v_prediction = bundle.prediction == "v"
        self.schedule = schedule
        self.cfg_scale = float(cfg_scale)
        self.guided = self.cfg_scale != 1.0
        if self.guided:
            self.context = torch.cat([cond.context, uncond.context]).to(self.dtype)
            pooled = None if cond.pooled is None else torch.cat([cond.pooled, uncond.pooled])
            image_cond = None if image_cond is None else torch.cat([image_cond, image_cond])
            time_ids = None if time_ids is None else torch.cat([time_ids, time_ids])
        else:
            self.context, pooled = cond.context.to(self.dtype), cond.pooled
        self.image_cond = None if image_cond is None else image_cond.to(self.dtype)
        self.added = None
        if pooled is not None and time_ids is not None:
            self.added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        c_in = 1.0 / (sigma**2 + 1) ** 0.5
        t = self.schedule.sigma_to_t(sigma.reshape(1)).to(x.device)
        x_in = torch.cat([x, x]) if self.guided else x
        unet_in = (x_in * c_in.to(x.device)).to(self.dtype)
        if self.image_cond is not None:
            unet_in = torch.cat([unet_in, self.image_cond], dim=1)
        out = self.unet(
            unet_in,
            t.expand(unet_in.shape[0]),  # float32: bf16 cannot hold t near 999 exactly
            encoder_hidden_states=self.context,
            added_cond_kwargs=self.added,
            return_dict=False,
        )[0].float()
        sigma = sigma.to(x.device)
        if self.v_prediction:
            denoised = x_in / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
        else:
            denoised = x_in - out * sigma
        if not self.guided:
            return denoised
        cond, uncond = denoised.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)
