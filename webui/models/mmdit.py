"""SD3's MMDiT and Flux's transformer (diffusers' SD3Transformer2DModel, FluxTransformer2DModel)
behind the call the sampler makes of a UNet.

The denoiser calls `model(latents, timestep, encoder_hidden_states=context,
added_cond_kwargs={"text_embeds": pooled[, "guidance": g]})`; for a flow model the timestep is
sigma * 1000, which SD3's transformer takes as is (Flux's takes sigma and scales it itself).
What only a UNet has (ControlNet residuals, T2I-Adapter features) is refused with a message.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel


def _refuse(unet_only: dict[str, Any], family: str) -> None:
    if unet_only:
        raise ValueError(f"{family} models do not take {', '.join(sorted(unet_only))} (ControlNet, T2I-Adapter "
                         "and IP-Adapter units are for SD 1.x/2.x/SDXL models)")


class _TransformerDenoiser(torch.nn.Module):
    """A diffusers transformer as `transformer`, its config, dtype and device as a UNet's."""

    def __init__(self, transformer: SD3Transformer2DModel | FluxTransformer2DModel) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device


class MMDiTDenoiser(_TransformerDenoiser):
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None, return_dict: bool = False,
                **unet_only: Any) -> tuple[torch.Tensor]:
        _refuse(unet_only, "SD3")
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs:
            raise ValueError("SD3's MMDiT needs the pooled text vector")
        out = self.transformer(hidden_states=sample, encoder_hidden_states=encoder_hidden_states,
                               pooled_projections=added_cond_kwargs["text_embeds"], timestep=timestep,
                               return_dict=False)[0]
        return (out,)


class FluxDenoiser(_TransformerDenoiser):
    """Flux's transformer on 2x2 patches of the 16-channel latent (64 values a token), with the
    positions of the patches (row, column) and of the text tokens (zeros) for its rotary
    embedding; dev also takes the distilled guidance scale."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None, return_dict: bool = False,
                **unet_only: Any) -> tuple[torch.Tensor]:
        _refuse(unet_only, "Flux")
        b, c, h, w = sample.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux needs the width and height in multiples of 16 (got {w * 8}x{h * 8})")
        added = added_cond_kwargs or {}
        tokens = sample.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=sample.device, dtype=sample.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=sample.device, dtype=sample.dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=sample.device, dtype=sample.dtype)[None, :]
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device, dtype=sample.dtype)
        guidance = added.get("guidance") if self.config.guidance_embeds else None
        out = self.transformer(hidden_states=tokens, encoder_hidden_states=encoder_hidden_states,
                               pooled_projections=added["text_embeds"], timestep=timestep / 1000,
                               img_ids=img_ids.reshape(-1, 3), txt_ids=txt_ids, guidance=guidance,
                               return_dict=False)[0]
        return (out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w),)
