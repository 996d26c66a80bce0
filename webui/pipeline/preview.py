"""Live previews: a cheap linear map from latents to RGB (no VAE), computed every few steps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def approximate_rgb(latents: torch.Tensor, factors: Sequence[Sequence[float]]) -> list[Image.Image]:
    """One small RGB image per latent of the batch, at latent resolution x 8 (nearest). `factors`:
    RGB per latent channel, the family's `preview_factors`."""
    rgb = torch.einsum("bchw,cr->bhwr", latents.float().cpu(), torch.tensor(factors, dtype=torch.float32))
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)).resize((p.shape[1] * 8, p.shape[0] * 8), Image.Resampling.NEAREST) for p in pixels]
