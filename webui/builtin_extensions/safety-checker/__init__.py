"""Safety checker: the classifier the Stable Diffusion release shipped, on by default, with a
setting to turn it off. A worked example of the *post-processing* stage.

- With weights in `models/safety_checker/` (see `classifier.py` for the layout), every decoded
  image is classified before it is saved. A flagged image is blurred (or blacked out, the
  `action` setting) and its infotext says so: `NSFW: blurred` / `NSFW: blacked out`. Unflagged
  images pass through untouched, pixel for pixel.
- Without weights it is inactive: the log says "safety-checker inactive: no weights in
  models/safety_checker" once, and images are left exactly as they are.

How it plugs in -- the parts an extension author copies:

1. `register_settings` declares a pydantic model; the Settings tab edits it and its current
   values arrive as `stage.settings` (None when the app runs without a settings store, so fall
   back to the model's defaults).
2. `postprocess_image` gets an `ImageStage` per image: assign `stage.image` to replace the image,
   add `stage.infotext` pairs to that image's parameters.
3. Expensive things (here: a CLIP model) are loaded on first use, not at import or start-up, and
   cached in `classifier.load` (an `lru_cache` of immutable weights; the module keeps no mutable
   state of its own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from PIL import Image, ImageFilter
from pydantic import BaseModel, Field

from webui.extensions.api import ImageStage, SettingsRegistry, hookimpl

from .classifier import load, stamp

INFOTEXT_KEY = "NSFW"
SAID = {"blur": "blurred", "black": "blacked out"}  # action -> what the infotext says


class SafetySettings(BaseModel):
    enabled: bool = Field(True, title="Check images with the safety classifier",
                          description="Needs its weights in the folder below; inactive without them.")
    action: Literal["blur", "black"] = Field("blur", title="What to do with a flagged image",
                                             description="Blur it beyond recognition, or replace it with black.")
    models_dir: str = Field("models/safety_checker", title="Safety checker folder",
                            description="config.json and model.safetensors of diffusers' StableDiffusionSafetyChecker "
                                        "(and optionally preprocessor_config.json); relative to the data folder.")


@hookimpl
def register_settings(settings: SettingsRegistry) -> None:
    settings.add(SafetySettings)


@hookimpl
def extension_status(settings: SafetySettings | None, data_dir: Path | None) -> str | None:
    """What the Extensions tab shows: whether the classifier will run (cheap: no loading)."""
    config = settings or SafetySettings()
    if not config.enabled:
        return "off (Settings: safety-checker)"
    folder = (Path(data_dir or ".") / Path(config.models_dir).expanduser()).resolve()
    if stamp(folder) is None:
        return f"inactive: no weights in {config.models_dir}"
    return f"active: {config.action} flagged images (weights in {config.models_dir})"


@hookimpl
def postprocess_image(stage: ImageStage) -> None:
    config: SafetySettings = stage.settings or SafetySettings()
    if not config.enabled:
        return
    # A relative folder is relative to the data folder.
    folder = (Path(stage.data_dir or ".") / Path(config.models_dir).expanduser()).resolve()
    classifier = load(folder, config.models_dir, stamp(folder))
    if classifier is None or not classifier.flagged(stage.image):
        return
    stage.image = blur(stage.image) if config.action == "blur" else black(stage.image)
    stage.infotext[INFOTEXT_KEY] = SAID[config.action]


# --- the actions: plain functions of a PIL image -----------------------------------------------


def blur(image: Image.Image) -> Image.Image:
    """A blur that hides the content: Gaussian, with a radius of 1/12 of the longer side (about
    43 pixels at 512), computed on a quarter-size copy (the same look at 1/16 of the work) and
    scaled back up."""
    small = image.convert("RGB").resize((max(1, image.width // 4), max(1, image.height // 4)), Image.Resampling.BOX)
    small = small.filter(ImageFilter.GaussianBlur(radius=max(small.size) / 12))
    return small.resize(image.size, Image.Resampling.BICUBIC).convert(image.mode)


def black(image: Image.Image) -> Image.Image:
    """An opaque black image of the same size and mode."""
    return Image.new("RGB", image.size, (0, 0, 0)).convert(image.mode)
