"""SD3's MMDiT (a diffusers SD3Transformer2DModel) behind the call the sampler makes of a UNet.

The denoiser calls `model(latents, timestep, encoder_hidden_states=context,
added_cond_kwargs={"text_embeds": pooled})`; for a flow model the timestep is sigma * 1000, which
is what the transformer takes. What only a UNet has (ControlNet residuals, T2I-Adapter features,
IP-Adapter's processors, token merging, DeepCache) is refused with a message, not ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel


class MMDiTDenoiser(torch.nn.Module):
    def __init__(self, transformer: SD3Transformer2DModel) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None, return_dict: bool = False,
                **unet_only: Any) -> tuple[torch.Tensor]:
        if unet_only:
            raise ValueError(f"SD3 models do not take {', '.join(sorted(unet_only))} (ControlNet, T2I-Adapter and "
                             "IP-Adapter units are for SD 1.x/2.x/SDXL models)")
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs:
            raise ValueError("SD3's MMDiT needs the pooled text vector")
        out = self.transformer(hidden_states=sample, encoder_hidden_states=encoder_hidden_states,
                               pooled_projections=added_cond_kwargs["text_embeds"], timestep=timestep,
                               return_dict=False)[0]
        return (out,)
