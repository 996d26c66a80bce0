"""The init and noise stages: where the first sampling pass of a batch starts.

img2img resizes (or, for only-masked inpainting, crops) each init image, encodes it and builds
the latent mask; inpainting models also get their extra input channels. The noise stage draws
each image's seeded noise and fills the masked area as `inpainting_fill` asks.
"""

from __future__ import annotations

import torch
from PIL import Image

from webui.models.load import ModelBundle
from webui.pipeline import init_image as pix
from webui.pipeline import latents as lat
from webui.pipeline.noise import image_noise
from webui.pipeline.request import GenerationRequest, MaskedContent, ResizeMode
from webui.pipeline.state import BatchState, PassState


def stage_init(r: GenerationRequest, batch: BatchState) -> PassState:
    """The first pass of `batch`: txt2img at the request's size, or the encoded init images."""
    bundle = batch.bundle
    first = PassState(size=(r.width, r.height))
    batch.areas, batch.init_pixels = [None] * len(batch), []
    if not r.is_img2img:
        first.image_cond = txt2img_image_cond(bundle, first.size, len(batch))
        return first
    sources = [r.init_images[(batch.first + i) % len(r.init_images)].convert("RGB") for i in range(len(batch))]
    latent_masks = []
    for i, source in enumerate(sources):
        if r.mask is None:
            batch.init_pixels.append(pix.resize_image(source, r.resize_mode, r.width, r.height))
            continue
        mask = pix.prepare_mask(r.mask.resize(source.size), bool(r.inpainting_mask_invert))
        crop = pix.crop_region(mask, r.inpaint_full_res_padding, r.width, r.height) if r.inpaint_full_res else None
        if crop is not None:
            image = source.crop(crop).resize((r.width, r.height), Image.Resampling.LANCZOS)
            small_mask = mask.crop(crop).resize((r.width, r.height), Image.Resampling.LANCZOS)
            batch.areas[i] = pix.InpaintArea(source, pix.blur_mask(mask, r.mask_blur), crop)
        else:
            image = pix.resize_image(source, r.resize_mode, r.width, r.height)
            small_mask = pix.resize_image(mask, r.resize_mode, r.width, r.height)
            batch.areas[i] = pix.InpaintArea(image, pix.blur_mask(small_mask, r.mask_blur), None)
        blurred = pix.blur_mask(small_mask, r.mask_blur)
        if r.inpainting_fill == MaskedContent.FILL:
            image = pix.fill_masked(image, blurred)
        batch.init_pixels.append(image)
        latent_masks.append(lat.latent_mask(blurred, r.width, r.height))
    if r.resize_mode == ResizeMode.LATENT_UPSCALE and r.mask is None:
        w8, h8 = (max(64, sources[0].width // 8 * 8), max(64, sources[0].height // 8 * 8))
        small = lat.encode(bundle, [s.resize((w8, h8), Image.Resampling.LANCZOS) for s in sources])
        first.init_latents = lat.resize_latents(small, r.height, r.width)
    else:
        first.init_latents = lat.encode(bundle, batch.init_pixels)
    if latent_masks:
        first.keep = (1.0 - torch.cat(latent_masks)).to(bundle.runtime.device)
    if bundle.variant == "inpaint":
        first.image_cond = _inpaint_image_cond(r, batch, latent_masks)
    return first


def _inpaint_image_cond(r: GenerationRequest, batch: BatchState, latent_masks: list[torch.Tensor]) -> torch.Tensor:
    """Inpainting models see the mask and the latent of the image with the masked area grey."""
    if latent_masks:
        masks = [a.mask if a.crop is None else a.mask.crop(a.crop).resize((r.width, r.height))
                 for a in batch.areas if a is not None]
        grey = []
        for image, m in zip(batch.init_pixels, masks):
            hard = m.point(lambda v: 255 if v >= 128 else 0)
            grey.append(Image.composite(Image.new("RGB", image.size, (128, 128, 128)), image, hard))
        cond_mask = torch.cat(latent_masks)
    else:  # img2img without a mask: nothing is masked
        grey, cond_mask = batch.init_pixels, torch.zeros((len(batch.init_pixels), 1, r.height // 8, r.width // 8))
    latent = lat.encode(batch.bundle, grey)
    return torch.cat([cond_mask.to(latent.device), latent], dim=1)


def txt2img_image_cond(bundle: ModelBundle, size: tuple[int, int], n: int) -> torch.Tensor | None:
    """txt2img on an inpainting model: everything masked, over a mid-grey image (None for other
    models)."""
    if bundle.variant != "inpaint":
        return None
    latent = lat.encode(bundle, [Image.new("RGB", size, (128, 128, 128))])
    mask = torch.ones_like(latent[:, :1])
    return torch.cat([mask, latent], dim=1).expand(n, -1, -1, -1)


def stage_noise(r: GenerationRequest, batch: BatchState, first: PassState) -> None:
    """Per-image seeded noise; variation seeds; the masked area's content for inpainting."""
    w, h = first.size
    resize_from = None
    if r.seed_resize_from_w > 0 and r.seed_resize_from_h > 0:
        resize_from = (r.seed_resize_from_h // 8, r.seed_resize_from_w // 8)
    shape = (batch.bundle.family.latent_channels, h // 8, w // 8)
    made = [image_noise(seed, shape, sub, r.subseed_strength, resize_from)
            for seed, sub in zip(batch.seeds, batch.subseeds)]
    batch.noise = torch.cat([n for n, _ in made])
    batch.generators = [g for _, g in made]
    if first.init_latents is not None and first.keep is not None and \
            r.inpainting_fill in (MaskedContent.LATENT_NOISE, MaskedContent.LATENT_NOTHING):
        fill = batch.noise.to(first.init_latents.device) if r.inpainting_fill == MaskedContent.LATENT_NOISE else 0.0
        first.init_latents = first.init_latents * first.keep + fill * (1.0 - first.keep)
