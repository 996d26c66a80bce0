"""The two marks, as plain functions of a PIL image (no hooks here; see `__init__.py`).

- `invisible`: the original release scripts' mark, made with the `invisible-watermark` package
  (`imwatermark.WatermarkEncoder`, method "dwtDct"): the payload bytes hidden in the frequency
  domain, invisible to the eye, readable with `imwatermark.WatermarkDecoder("bytes", 8 * n)`.
  That package is optional (it pulls in OpenCV): without it, or for an image too small to carry
  the mark, `invisible` returns the reason instead of an image and the caller falls back to the
  visible mark.
- `visible`: small semi-transparent text in the bottom-right corner, drawn with Pillow only.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_INVISIBLE_PIXELS = 256 * 256  # imwatermark refuses smaller images ("image too small")


@functools.cache
def _encoder_class() -> type | str:
    """imwatermark's `WatermarkEncoder`, or why it cannot be used (imported once, if ever)."""
    try:
        from imwatermark import WatermarkEncoder  # imports cv2 too: either may be missing
    except ImportError as err:
        return f"the invisible-watermark package is not installed ({err}; pip install 'sd-webui[watermark]' or pip install invisible-watermark)"
    return WatermarkEncoder


def invisible(image: Image.Image, payload: str) -> Image.Image | str:
    """`image` with `payload` hidden in it, or the reason it could not be done."""
    encoder_class = _encoder_class()
    if isinstance(encoder_class, str):
        return encoder_class
    if image.width * image.height < MIN_INVISIBLE_PIXELS:
        return f"the image is smaller than 256x256 pixels ({image.width}x{image.height})"
    encoder: Any = encoder_class()
    encoder.set_watermark("bytes", payload.encode("utf-8"))
    # imwatermark works on OpenCV's BGR arrays: reverse the channels on the way in and out.
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    marked = encoder.encode(bgr, "dwtDct")
    return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]).astype(np.uint8), "RGB").convert(image.mode)


def visible(image: Image.Image, text: str) -> Image.Image:
    """`image` with `text` drawn small and half-transparent in its bottom-right corner: white
    with a dark outline, so it reads on light and dark images alike. Pixels elsewhere are kept."""
    size = max(10, round(min(image.size) / 32))  # 16 px at 512
    font = ImageFont.load_default(size=size)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    _, _, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=1)
    margin = max(2, size // 3)
    draw.text((image.width - margin - right, image.height - margin - bottom), text, font=font,
              fill=(255, 255, 255, 140), stroke_width=1, stroke_fill=(0, 0, 0, 100))
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert(image.mode)
