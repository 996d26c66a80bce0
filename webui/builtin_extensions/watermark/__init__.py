"""Watermark: mark every generated image as generated. Optional and off by default. A second
worked example of the *post-processing* stage (the first is `safety-checker`).

- `invisible` (the default method once enabled): the mark the original Stable Diffusion release
  scripts put in every image, the `invisible-watermark` package's "dwtDct" method with the payload
  `text` ("SDV2", as in the 2.x scripts). That package is not a dependency of this app (it pulls
  in OpenCV): when it is missing, or an image is smaller than 256x256, the visible mark is used
  instead and the log says why (once per reason).
- `visible`: `visible_text` ("generated") in small half-transparent letters in the bottom-right
  corner; nothing else in the image changes.

The infotext records what was done: `Watermark: invisible` or `Watermark: visible`.

How it plugs in: `register_settings` declares the settings model (its values arrive as
`stage.settings`, None without a settings store: fall back to the defaults), and
`postprocess_image` replaces `stage.image` and adds an infotext pair. It runs after
`safety-checker` (that extension's manifest says `load_before = ["watermark"]`), so the classifier
sees the image as the model made it.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

from pydantic import BaseModel, Field

from webui.extensions.api import ImageStage, SettingsRegistry, hookimpl

from .marks import invisible, visible

log = logging.getLogger(__name__)

INFOTEXT_KEY = "Watermark"


class WatermarkSettings(BaseModel):
    enabled: bool = Field(False, title="Watermark generated images",
                          description="Off by default.")
    method: Literal["invisible", "visible"] = Field(
        "invisible", title="Watermark method",
        description="invisible: hidden in the image (needs the invisible-watermark package; otherwise visible is "
                    "used); visible: small text in the bottom-right corner.")
    text: str = Field("SDV2", title="Invisible watermark payload", max_length=64,
                      description="The bytes hidden by the invisible mark (the release scripts used SDV2).")
    visible_text: str = Field("generated", title="Visible watermark text", max_length=64,
                              description="The text the visible mark draws.")


@hookimpl
def register_settings(settings: SettingsRegistry) -> None:
    settings.add(WatermarkSettings)


@hookimpl
def postprocess_image(stage: ImageStage) -> None:
    config: WatermarkSettings = stage.settings or WatermarkSettings()
    if not config.enabled:
        return
    if config.method == "invisible":
        marked = invisible(stage.image, config.text)
        if not isinstance(marked, str):
            stage.image = marked
            stage.infotext[INFOTEXT_KEY] = "invisible"
            return
        _falling_back(marked)
    stage.image = visible(stage.image, config.visible_text)
    stage.infotext[INFOTEXT_KEY] = "visible"


@functools.cache
def _falling_back(reason: str) -> None:
    """Log why the invisible mark was replaced by the visible one, once per distinct reason."""
    log.warning("watermark: using the visible mark instead of the invisible one: %s", reason)
