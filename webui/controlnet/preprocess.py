"""ControlNet preprocessors under the A1111 extension's module names: those that need no weights,
on numpy, scipy and Pillow, here (each takes an RGB image already at the processor resolution and
the unit's two thresholds, and returns the control image, RGB); those that need weights (depth)
through `webui.controlnet.annotators`, from the user's models folder."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from scipy import ndimage

from webui.controlnet.annotators import DEFAULTS, NAMES, Annotators, is_annotator

Preprocessor = Callable[[Image.Image, float, float], Image.Image]


def canny(image: Image.Image, low: float, high: float) -> Image.Image:
    """Canny edges as OpenCV's `Canny(image, low, high)` finds them (which the ControlNet canny
    models were trained on): 3x3 Sobel gradients on the grey image (unnormalised, as OpenCV's),
    thinning to the gradient's ridge, then hysteresis -- weak edges are kept only where they
    touch a strong one."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    gx, gy = ndimage.sobel(grey, axis=1), ndimage.sobel(grey, axis=0)
    magnitude = np.hypot(gx, gy)
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = ((angle + 22.5) // 45).astype(int) % 4  # 0: horizontal gradient, 1: 45°, 2: vertical, 3: 135°
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape
    neighbours = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    ridge = np.zeros_like(magnitude, dtype=bool)
    for s, ((dy1, dx1), (dy2, dx2)) in neighbours.items():
        a = padded[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        b = padded[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        ridge |= (sector == s) & (magnitude >= a) & (magnitude >= b)
    strong = ridge & (magnitude >= high)
    weak = ridge & (magnitude >= low)
    labels, _ = ndimage.label(weak, structure=np.ones((3, 3)))
    keep = np.unique(labels[strong])
    edges = np.isin(labels, keep[keep > 0])
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def threshold(image: Image.Image, level: float, _: float) -> Image.Image:
    """White where the image is brighter than `level` (0-255), black elsewhere (scribbles)."""
    grey = np.asarray(image.convert("L"))
    return Image.fromarray(((grey > level) * 255).astype(np.uint8)).convert("RGB")


def invert(image: Image.Image, _a: float, _b: float) -> Image.Image:
    """Black lines on white (a drawing) turned into the white-on-black that line models expect."""
    return ImageOps.invert(image.convert("RGB"))


def blur(image: Image.Image, sigma: float, _: float) -> Image.Image:
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(max(0.0, sigma)))


def tile_resample(image: Image.Image, down: float, _: float) -> Image.Image:
    """The tile model's input: the image made `down` times smaller and back (its detail gone)."""
    factor = max(1.0, down)
    small = image.resize((max(1, round(image.width / factor)), max(1, round(image.height / factor))),
                         Image.Resampling.BICUBIC)
    return small.resize(image.size, Image.Resampling.BICUBIC).convert("RGB")


def colour_grid(image: Image.Image, _a: float, _b: float) -> Image.Image:
    """The colour adapter's input: the picture's colours in 64-pixel cells (made 64 times smaller
    with bicubic weights, then enlarged back without blending)."""
    rgb = image.convert("RGB")
    small = rgb.resize((max(1, rgb.width // 64), max(1, rgb.height // 64)), Image.Resampling.BICUBIC)
    return small.resize(rgb.size, Image.Resampling.NEAREST)


def shuffle(image: Image.Image, seed: float, _: float) -> Image.Image:
    """Content shuffle (the `shuffle` model's input): every pixel moved along a smooth random flow,
    so the colours and textures stay and the layout goes. The flow is coarse noise (one value per
    256 px, at least 2x2) bicubically enlarged and stretched over the image; `seed` fixes it."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[:2]
    rng = np.random.default_rng(int(seed))

    def field(extent: int) -> np.ndarray:
        coarse = rng.random((max(2, h // 256 + 2), max(2, w // 256 + 2)), dtype=np.float32)
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))
        smooth = smooth - smooth.min()
        return smooth / max(float(smooth.max()), 1e-6) * (extent - 1)

    ys, xs = field(h), field(w)
    moved = np.stack([ndimage.map_coordinates(rgb[..., c], [ys, xs], order=1, mode="nearest") for c in range(3)],
                     axis=-1)
    return Image.fromarray(np.clip(moved + 0.5, 0, 255).astype(np.uint8))


def lineart_standard(image: Image.Image, _a: float, _b: float) -> Image.Image:
    """Lines of a drawing or photo without a network: where the image is darker than its blurred
    self (by the darkest channel), scaled so a typical line is mid-grey; white lines on black."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    blurred = ndimage.gaussian_filter(rgb, sigma=(6.0, 6.0, 0))
    darker = np.min(blurred - rgb, axis=2).clip(0, 255)
    lines = darker[darker > 8]
    scale = max(16.0, float(np.median(lines))) if lines.size else 16.0
    return Image.fromarray((darker / scale * 127.0).clip(0, 255).astype(np.uint8)).convert("RGB")


def is_inpaint(name: str) -> bool:
    return ALIASES.get(name.strip().lower(), name.strip().lower()) == "inpaint"


def is_colour_fix(name: str) -> bool:
    return name.strip().lower() in ("tile_colorfix", "tile_colorfix+sharp")


def none(image: Image.Image, _a: float, _b: float) -> Image.Image:
    return image.convert("RGB")


# name -> (function, (threshold_a default, threshold_b default))
PREPROCESSORS: dict[str, tuple[Preprocessor, tuple[float, float]]] = {
    "none": (none, (0, 0)),
    "canny": (canny, (100, 200)),
    "invert": (invert, (0, 0)),
    "threshold": (threshold, (127, 0)),
    "blur_gaussian": (blur, (9, 0)),
    "tile_resample": (tile_resample, (1, 0)),
    # the picture as it is; while sampling, its colours replace the result's (webui.controlnet.apply.colour_fix)
    "tile_colorfix": (none, (8, 0)),  # threshold A: "Variation", the blur's radius in latent pixels
    "tile_colorfix+sharp": (none, (8, 1)),  # threshold B: "Sharpness"
    "shuffle": (shuffle, (0, 0)),  # threshold A: the flow's seed
    "t2ia_color_grid": (colour_grid, (0, 0)),  # for the colour T2I-Adapter
    "lineart_standard": (lineart_standard, (0, 0)),
    "inpaint": (none, (0, 0)),  # the picture: the unit's mask sets its pixels to -1 (webui.controlnet.apply)
    "ip-adapter": (none, (0, 0)),  # the picture as it is: its CLIP encoding is the prompt (webui.controlnet.ip_adapter)
}
ALIASES = {"invert (from white bg & black line)": "invert", "scribble_threshold": "threshold",
           "lineart_standard (from white bg & black line)": "lineart_standard", "inpaint_only": "inpaint",
           "inpaint_global_harmonious": "inpaint", **{f"ip-adapter_clip_{n}": "ip-adapter" for n in (
               "sd15", "h", "sdxl", "g", "sdxl_plus_vith")}, "ip-adapter-auto": "ip-adapter"}


def names() -> list[str]:
    """Every preprocessor's name: those that need no weights, then the annotators."""
    return [*PREPROCESSORS, *NAMES]


def _entry(name: str) -> tuple[Preprocessor, tuple[float, float]]:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in PREPROCESSORS:
        raise ValueError(f"ControlNet: unknown preprocessor {name!r} (available: {', '.join(names())}; "
                         "openpose's hands and faces, DW pose and the BAE / DSINE normal maps are not available "
                         "yet)")
    return PREPROCESSORS[key]


def check(name: str, annotators: Annotators | None = None) -> None:
    """ValueError when `name` is not a preprocessor, or is one whose weights are not in `annotators`' folder."""
    if is_annotator(name):
        if annotators is not None and (why := annotators.problem(name)) is not None:
            raise ValueError(why)
        return
    _entry(name)


def defaults(name: str) -> tuple[float, float]:
    """The thresholds `name` uses when a request leaves them at -1."""
    if is_annotator(name):
        return DEFAULTS.get(name.strip().lower(), (0, 0))
    return _entry(name)[1]


def run(name: str, image: Image.Image, resolution: int, a: float, b: float, annotators: Annotators | None = None,
        device: str = "cpu") -> Image.Image:
    """`image` through preprocessor `name`, worked at `resolution` (its shorter side); an
    annotator's model (from `annotators`' folder) runs on `device`."""
    scale = resolution / min(image.size)
    work = image.convert("RGB")
    if name.strip().lower() != "none" and abs(scale - 1) > 1e-3:
        work = work.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                           Image.Resampling.LANCZOS)
    if is_annotator(name):
        if annotators is None:
            raise ValueError(f"preprocessor {name} needs a models folder")
        return annotators.run(name, work, device, a)
    return _entry(name)[0](work, a, b)
