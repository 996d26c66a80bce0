"""Pixels <-> latents through the model's VAE, and latent-space resizing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from webui.models.load import ModelBundle


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> [B, 3, H, W] in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def encode(bundle: ModelBundle, images: list[Image.Image]) -> torch.Tensor:
    """Scaled latents (the distribution's mode: deterministic) of same-sized images."""
    rt = bundle.runtime
    pixels = images_to_tensor(images).to(rt.device, rt.vae_dtype)
    latents = bundle.vae.encode(pixels).latent_dist.mode().float()
    return latents * bundle.family.latent_scaling_factor


def decode(bundle: ModelBundle, latents: torch.Tensor) -> list[Image.Image]:
    rt = bundle.runtime
    scaled = latents.to(rt.device, rt.vae_dtype) / bundle.family.latent_scaling_factor
    decoded = bundle.vae.decode(scaled, return_dict=False)[0].float()
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def resize_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Latents resized to pixel size (height, width): the "Latent" upscaler (bilinear)."""
    return F.interpolate(latents, size=(height // 8, width // 8), mode="bilinear", align_corners=False)


def latent_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """A pixel mask (white = repaint) as [1, 1, h/8, w/8] with values rounded to 0 or 1."""
    small = mask.convert("L").resize((width // 8, height // 8), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).round()[None, None]
