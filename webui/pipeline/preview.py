"""Live previews: a cheap linear map from latents to RGB (no VAE), computed every few steps."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from webui.models.errors import ModelError
from webui.pipeline.taesd import TaesdPreviewer, find_taesd, load_taesd

if TYPE_CHECKING:
    from webui.models.load import ModelBundle

log = logging.getLogger(__name__)


def approximate_rgb(latents: torch.Tensor, factors: Sequence[Sequence[float]]) -> list[Image.Image]:
    """One small RGB image per latent of the batch, at latent resolution x 8 (nearest). `factors`:
    RGB per latent channel, the family's `preview_factors`; without any, the first three channels,
    each image scaled to [-1, 1] (a rough picture of the layout)."""
    if factors:
        rgb = torch.einsum("bchw,cr->bhwr", latents.float().cpu(), torch.tensor(factors, dtype=torch.float32))
    else:
        rgb = latents[:, :3].float().cpu().permute(0, 2, 3, 1)
        rgb = rgb / rgb.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)).resize((p.shape[1] * 8, p.shape[0] * 8), Image.Resampling.NEAREST) for p in pixels]


class Previewers:
    """The live-preview function for a model: TAESD when `models/VAE-approx` has the family's
    decoder (loaded once per file, device and dtype; a broken file falls back with a warning), else
    the linear approximation."""

    def __init__(self, models_path: Path | None) -> None:
        self.models_path = models_path
        self._taesd: dict[tuple, TaesdPreviewer | None] = {}  # (file, mtime, device, dtype) -> decoder

    def for_model(self, bundle: ModelBundle, method: str) -> Callable[[torch.Tensor], list[Image.Image]]:
        family = bundle.family
        path = find_taesd(self.models_path, family.taesd_stem) if self.models_path and method == "TAESD" else None
        if path is not None:
            rt = bundle.runtime
            key = (path, path.stat().st_mtime_ns, str(rt.device), rt.vae_dtype)
            if key not in self._taesd:
                try:
                    self._taesd[key] = TaesdPreviewer(load_taesd(path, rt.device, rt.vae_dtype))
                    log.info("live previews: TAESD from %s", path.name)
                except ModelError as e:
                    log.warning("live previews: %s; using the approximation", e)
                    self._taesd[key] = None
            if (previewer := self._taesd[key]) is not None:
                return previewer
        return lambda latents: approximate_rgb(latents, family.preview_factors)
