"""Pixels <-> latents through the model's VAE (with the float32 retry when a half-precision VAE
produces NaNs), and latent-space resizing.

Every VAE pass runs inside `vae_pass`: in medvram / lowvram the VAE is on the compute device for
the pass only, and large images (or `--vae-tiling`) go through diffusers' tiled VAE, big batches
one image at a time (`webui.runtime.memory.vae_plan` decides)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from webui.models.load import ModelBundle
from webui.runtime.memory import vae_plan

log = logging.getLogger(__name__)


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> [B, 3, H, W] in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@contextlib.contextmanager
def vae_pass(bundle: ModelBundle, width: int, height: int, batch: int) -> Iterator[torch.nn.Module]:
    """The VAE ready for one pass over `batch` images of `width` x `height` pixels: on the compute
    device (memory modes), tiled / sliced as `vae_plan` says; all undone after the pass."""
    rt, vae = bundle.runtime, bundle.vae
    plan = vae_plan(width, height, batch, device=rt.device, itemsize=rt.vae_dtype.itemsize, forced=rt.vae_tiling,
                    offloading=rt.memory is not None and rt.memory.offloads)
    saved = (getattr(vae, "use_tiling", False), getattr(vae, "use_slicing", False))
    memory = rt.memory.use(vae) if rt.memory is not None else contextlib.nullcontext(vae)
    with memory:
        if hasattr(vae, "use_tiling"):
            vae.use_tiling = saved[0] or plan.tiled
            vae.use_slicing = saved[1] or plan.sliced
        try:
            yield vae
        finally:
            if hasattr(vae, "use_tiling"):
                vae.use_tiling, vae.use_slicing = saved


def encode(bundle: ModelBundle, images: list[Image.Image]) -> torch.Tensor:
    """Scaled latents (the distribution's mode: deterministic) of same-sized images."""
    rt = bundle.runtime
    pixels = images_to_tensor(images).to(rt.device, rt.vae_dtype)
    with vae_pass(bundle, pixels.shape[3], pixels.shape[2], pixels.shape[0]) as vae:
        latents = vae.encode(pixels).latent_dist.mode().float()
    return (latents - bundle.family.latent_shift) * bundle.family.latent_scaling_factor


def _unscaled(bundle: ModelBundle, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the VAE decodes: the sampler's latents unscaled (and unshifted: SD3)."""
    family = bundle.family
    return latents.to(bundle.runtime.device, dtype) / family.latent_scaling_factor + family.latent_shift


def decode(bundle: ModelBundle, latents: torch.Tensor) -> list[Image.Image]:
    """Images from scaled latents. A float16/bfloat16 VAE whose output has NaNs (or infinities:
    an overflow) decodes again in float32, with a warning."""
    rt = bundle.runtime
    scaled = _unscaled(bundle, latents, rt.vae_dtype)
    with vae_pass(bundle, latents.shape[3] * 8, latents.shape[2] * 8, latents.shape[0]) as vae:
        decoded = vae.decode(scaled, return_dict=False)[0].float()
        vae_dtype = vae.dtype
        if vae_dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(decoded).all():
            name = str(vae_dtype).removeprefix("torch.")
            log.warning("VAE produced NaNs in %s; decoded again in float32. Use --no-half-vae to skip the first try",
                        name)
            decoded = _decode_float32(vae, _unscaled(bundle, latents, torch.float32))
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def _decode_float32(vae: torch.nn.Module, scaled: torch.Tensor) -> torch.Tensor:
    """Decode with `vae` upcast to float32 for this call only, then cast back to its dtype.

    Upcasting in place is cheaper than keeping a float32 copy: the float32 weights exist only
    while this call runs (a copy would hold them beside the half ones for the model's whole life,
    or cost the same conversion per call plus a second set of weights), and half -> float32 ->
    half is exact, so the module ends bit-for-bit as it was. It mutates the shared bundle, which
    is safe because one job at a time runs per bundle (as for LoRA merging). The casts run
    outside inference mode so the weights stay ordinary tensors that later in-place edits accept;
    `.float()` / `.half()` rather than `.to(dtype)`, which diffusers answers with a warning.
    """
    back = vae.half if next(vae.parameters()).dtype == torch.float16 else vae.bfloat16
    with torch.inference_mode(False):
        vae.float()
    try:
        return vae.decode(scaled, return_dict=False)[0].float()
    finally:
        with torch.inference_mode(False):
            back()


def resize_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Latents resized to pixel size (height, width): the "Latent" upscaler (bilinear)."""
    return F.interpolate(latents, size=(height // 8, width // 8), mode="bilinear", align_corners=False)


def latent_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """A pixel mask (white = repaint) as [1, 1, h/8, w/8] with values rounded to 0 or 1."""
    small = mask.convert("L").resize((width // 8, height // 8), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).round()[None, None]
