"""The classifier itself: find its weights, load them once, ask it about one image.

No hooks here (see `__init__.py` for those), so this is the part to read for "how do I run a
model from an extension": heavy imports happen inside `load`, only once weights exist, so an app
without them never pays for importing diffusers' CLIP classes at start-up.

The folder is the diffusers layout of the `safety_checker` folder of a Stable Diffusion 1.x
pipeline: `config.json` (a `CLIPConfig`) with `model.safetensors` (or `pytorch_model.bin`, read
with `torch.load(weights_only=True)`, which refuses pickled code), plus, optionally, the
`preprocessor_config.json` of its CLIP image processor (the pipeline keeps it in
`feature_extractor/`; copy it next to the weights). Without that file the standard CLIP
preprocessing is used: shortest edge resized to 224, centre crop 224, CLIP mean and std.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in the order they are preferred
PROCESSOR = "preprocessor_config.json"

# (file name, size, modification time) of every file `load` reads: a different stamp means the
# user replaced the weights, and the next image loads them again without a restart.
Stamp = tuple[tuple[str, int, int], ...]


def stamp(folder: Path) -> Stamp | None:
    """What identifies the weights in `folder` right now; None when there are none to load."""
    if not (folder / CONFIG).is_file() or not any((folder / name).is_file() for name in WEIGHTS):
        return None
    files = [folder / name for name in (CONFIG, *WEIGHTS, PROCESSOR)]
    return tuple((f.name, st.st_size, st.st_mtime_ns) for f in files if f.is_file() for st in [f.stat()])


@dataclass(frozen=True)
class Classifier:
    """A loaded safety checker: never changed after `load`, so it can be shared by every job."""

    # diffusers' StableDiffusionSafetyChecker, eval mode, float32, on the CPU: one 224x224 image
    # through CLIP ViT-L/14 is a fraction of a second there, and the GPU memory stays the model's.
    model: Any
    processor: Any  # transformers' CLIPImageProcessor

    def flagged(self, image: Any) -> bool:
        """Whether the classifier flags this PIL image."""
        import numpy as np
        import torch

        pixels = self.processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        # diffusers' checker returns (images, has_nsfw_concepts) and blacks out the flagged ones in
        # `images` itself. We want its flags only (the action is ours: blur or black), so it gets
        # a throw-away placeholder array to black out, and its "a black image will be returned"
        # warning, untrue here, is kept out of the log.
        with torch.no_grad(), _without_diffusers_warning():
            _, has_nsfw_concepts = self.model(clip_input=pixels.to(torch.float32), images=np.zeros((1, 1, 1, 3)))
        return bool(has_nsfw_concepts[0])


@functools.lru_cache(maxsize=1)
def load(folder: Path, shown_as: str, weights: Stamp | None) -> Classifier | None:
    """The classifier in `folder` (None, logged once, when it holds no weights).

    Why an `lru_cache` and not an object kept somewhere: the extension has no state of its own to
    keep, only these weights, which are immutable once loaded. Keyed on the folder and its file
    stamp, the cache loads them on the first image (never at start-up), reloads them when the
    files change, and `maxsize=1` keeps at most one copy in memory. The "inactive" message is
    logged once for the same reason: a second call with the same key never runs this body.
    `shown_as` is the folder as the user wrote it in the settings, for the log.
    """
    if weights is None:
        log.info("safety-checker inactive: no weights in %s", shown_as)
        return None
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    try:
        # A local folder and local_files_only: nothing is ever fetched from the model hub.
        # transformers prefers model.safetensors and reads a .bin with torch.load(weights_only=True).
        model = StableDiffusionSafetyChecker.from_pretrained(str(folder), local_files_only=True, weights_only=True)
        if (folder / PROCESSOR).is_file():
            processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        else:
            processor = CLIPImageProcessor()  # its defaults are CLIP's: 224 crop, CLIP mean and std
    except Exception as err:
        # Weights that are there but unreadable fail the job (the message names this extension):
        # a safety filter the user installed must not silently let images through.
        raise RuntimeError(f"cannot load the safety checker from {shown_as}: {type(err).__name__}: {err}") from err
    model = model.to(device="cpu", dtype=torch.float32).eval().requires_grad_(False)
    log.info("safety-checker active: weights from %s", shown_as)
    return Classifier(model, processor)


class _DropBlackImageWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "black image will be returned" not in record.getMessage()


@contextmanager
def _without_diffusers_warning() -> Iterator[None]:
    logger = logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker")
    quiet = _DropBlackImageWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
