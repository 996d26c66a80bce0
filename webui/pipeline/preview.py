"""Live previews: a cheap linear map from latents to RGB (no VAE), computed every few steps."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Least-squares fits of RGB on the 4 latent channels, per VAE family (community-measured).
_FACTORS = {
    "sd": torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]),
    "sdxl": torch.tensor([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]]),
}


def approximate_rgb(latents: torch.Tensor, family: str) -> list[Image.Image]:
    """One small RGB image per latent of the batch, at latent resolution x 8 (nearest)."""
    factors = _FACTORS["sdxl" if family.startswith("sdxl") else "sd"]
    rgb = torch.einsum("bchw,cr->bhwr", latents.float().cpu(), factors)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)).resize((p.shape[1] * 8, p.shape[0] * 8), Image.Resampling.NEAREST) for p in pixels]
