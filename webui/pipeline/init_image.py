"""img2img inputs in pixel space: resize modes, masks, the crop for "only masked" inpainting,
"fill" of the masked area, and pasting the result back. PIL and numpy only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from webui.pipeline.request import ResizeMode

if TYPE_CHECKING:
    from webui.pipeline.request import GenerationRequest

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL, LATENT_UPSCALE = ResizeMode  # the one definition is the request's


def resize_image(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """The init image at (width, height). LATENT_UPSCALE is done on latents by the caller; here
    it behaves as JUST_RESIZE (used for masks and the final composite)."""
    image = image.convert("RGB") if image.mode not in ("RGB", "L") else image
    if mode in (JUST_RESIZE, LATENT_UPSCALE):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == CROP_AND_RESIZE:
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    # RESIZE_AND_FILL: fit inside, then stretch the edge rows/columns into the empty bands
    if ratio < src_ratio:
        fit_w, fit_h = width, max(1, round(image.height * width / image.width))
    else:
        fit_w, fit_h = max(1, round(image.width * height / image.height)), height
    fitted = image.resize((fit_w, fit_h), Image.Resampling.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    x, y = (width - fit_w) // 2, (height - fit_h) // 2
    canvas.paste(fitted, (x, y))
    if fit_h < height:
        top, bottom = fitted.crop((0, 0, fit_w, 1)), fitted.crop((0, fit_h - 1, fit_w, fit_h))
        canvas.paste(top.resize((fit_w, y)), (x, 0)) if y else None
        rest = height - y - fit_h
        canvas.paste(bottom.resize((fit_w, rest)), (x, y + fit_h)) if rest else None
    if fit_w < width:
        left, right = fitted.crop((0, 0, 1, fit_h)), fitted.crop((fit_w - 1, 0, fit_w, fit_h))
        canvas.paste(left.resize((x, fit_h)), (0, y)) if x else None
        rest = width - x - fit_w
        canvas.paste(right.resize((rest, fit_h)), (x + fit_w, y)) if rest else None
    return canvas


def prepare_mask(mask: Image.Image, invert: bool) -> Image.Image:
    """A mask as "L", white = repaint. An RGBA mask uses its alpha where the colour is empty."""
    if mask.mode == "RGBA" and not np.asarray(mask.convert("L")).any():
        mask = mask.getchannel("A")
    mask = mask.convert("L")
    return ImageOps.invert(mask) if invert else mask


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box around the mask's white pixels, padded, grown to the target's aspect ratio and
    kept inside the image; None when the mask is empty."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    x1, y1 = max(0, x1 - padding), max(0, y1 - padding)
    x2, y2 = min(mask.width, x2 + padding), min(mask.height, y2 + padding)
    target = width / height
    w, h = x2 - x1, y2 - y1
    if w / h < target:  # too tall: widen
        grow = round(h * target) - w
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
    else:  # too wide: heighten
        grow = round(w / target) - h
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
    # shift back inside the image, clipping only if the box is larger than the image
    if x1 < 0:
        x2, x1 = min(mask.width, x2 - x1), 0
    if x2 > mask.width:
        x1, x2 = max(0, x1 - (x2 - mask.width)), mask.width
    if y1 < 0:
        y2, y1 = min(mask.height, y2 - y1), 0
    if y2 > mask.height:
        y1, y2 = max(0, y1 - (y2 - mask.height)), mask.height
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """"Fill" masked content: the masked area takes the mean colour of the rest, softened."""
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    m = np.asarray(mask).astype(np.float32)[..., None] / 255.0
    keep = 1.0 - m
    mean = (rgb * keep).sum(axis=(0, 1)) / max(float(keep.sum()), 1.0)
    filled = rgb * keep + mean * m
    blurred = np.asarray(Image.fromarray(filled.astype(np.uint8)).filter(ImageFilter.GaussianBlur(8))).astype(np.float32)
    return Image.fromarray((rgb * keep + blurred * m).round().astype(np.uint8))


@dataclass(frozen=True)
class InpaintArea:
    """Where a generated image goes back into the original, and with which soft mask."""

    original: Image.Image  # the init image as the user gave it (after resize for whole-picture mode)
    mask: Image.Image  # blurred "L" mask over `original`, white = generated pixels
    crop: tuple[int, int, int, int] | None  # only-masked mode: the box that was generated


def composite(generated: Image.Image, area: InpaintArea) -> Image.Image:
    """Generated pixels where the (blurred) mask is white, the original's elsewhere."""
    original = area.original.convert("RGB")
    if area.crop is not None:
        x1, y1, x2, y2 = area.crop
        placed = original.copy()
        placed.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
        generated = placed
    return Image.composite(generated.convert("RGB"), original, area.mask)


@dataclass(frozen=True)
class Outpaint:
    """Pixels to add on each side of the image; the result is rounded up to multiples of 8."""

    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0
    overlap: int = 8  # the mask reaches this far into the original, so the seam is repainted too

    @property
    def active(self) -> bool:
        return any((self.left, self.top, self.right, self.bottom))

    def sizes(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.right, self.bottom

    @classmethod
    def parse(cls, text: str) -> "Outpaint":
        """"L,T,R,B" pixels (e.g. "0,0,128,0" widens to the right). ValueError with the reason."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise ValueError(f"outpaint wants four whole numbers of pixels LEFT,TOP,RIGHT,BOTTOM, got {text!r}")
        return cls(*(int(p) for p in parts))


def extend_canvas(image: Image.Image, out: Outpaint, mask: Image.Image | None = None
                  ) -> tuple[Image.Image, Image.Image]:
    """(bigger image, mask) for outpainting: the new border holds the stretched edge pixels (a
    start the sampler can work from) and is white in the mask; an existing mask is carried over."""
    if min(out.left, out.top, out.right, out.bottom) < 0:
        raise ValueError("outpaint sizes must not be negative")
    rgb = np.asarray(image.convert("RGB"))
    w = rgb.shape[1] + out.left + out.right
    h = rgb.shape[0] + out.top + out.bottom
    right = out.right + (-w % 8)  # round the canvas up to a multiple of 8 on the right and bottom
    bottom = out.bottom + (-h % 8)
    padded = np.pad(rgb, ((out.top, bottom), (out.left, right), (0, 0)), mode="edge")
    new_mask = np.full(padded.shape[:2], 255, dtype=np.uint8)
    o = out.overlap
    y1, x1 = out.top + (o if out.top else 0), out.left + (o if out.left else 0)
    y2 = out.top + rgb.shape[0] - (o if bottom else 0)
    x2 = out.left + rgb.shape[1] - (o if right else 0)
    inner = np.zeros(rgb.shape[:2], dtype=np.uint8)
    if mask is not None:
        inner = np.asarray(mask.convert("L").resize(image.size))
    new_mask[out.top:out.top + rgb.shape[0], out.left:out.left + rgb.shape[1]] = inner
    new_mask[out.top:max(y1, out.top), :] = 255
    new_mask[min(y2, out.top + rgb.shape[0]):, :] = 255
    new_mask[:, out.left:max(x1, out.left)] = 255
    new_mask[:, min(x2, out.left + rgb.shape[1]):] = 255
    return Image.fromarray(padded), Image.fromarray(new_mask)


def apply_outpaint(request: GenerationRequest) -> GenerationRequest:
    """The request with its canvas grown (`request.outpaint`): the bigger image, the border (and
    any drawn mask) as the mask, the size of the new canvas; unchanged without outpainting."""
    if not request.outpaint or not any(request.outpaint):
        return request
    image, mask = extend_canvas(request.init_images[0], Outpaint(*request.outpaint), request.mask)
    return request.model_copy(update={"init_images": (image,), "mask": mask, "width": image.width,
                                      "height": image.height, "resize_mode": 0, "outpaint": None})
