"""What a generation holds while it runs, one object per lifetime:

- `JobState`: the whole job -- its request, seeds, progress, what extensions added, the images
  finished so far;
- `BatchState`: one batch of `batch_size` images -- their seeds and prompts, the networks and
  the model sampling them (the refiner once it takes over), the init pixels;
- `PassState`: one sampling pass over the batch's latents (the first pass, the hires pass) --
  its size, conditioning, masks and latents.

Stages read and fill these; nothing outlives the job.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from webui.models.load import ModelBundle
from webui.networks.embeddings import Embedding
from webui.networks.registry import NetworkFile
from webui.pipeline.conditioning import ScheduledConditioning
from webui.pipeline.init_image import InpaintArea
from webui.pipeline.progress import CancelToken, ProgressFn
from webui.pipeline.request import GenerationRequest
from webui.prompts.encode import TextConditioner


class Interrupted(Exception):
    """Raised inside the sampling loop when the job is interrupted or its image skipped."""


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    paths: list[Path]
    interrupted: bool = False
    grids: int = 0  # how many of the first images are grids (each with its first cell's seed and infotext)


@dataclass
class Control:
    """How the caller follows and stops the job."""

    progress: ProgressFn | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    preview_every: int = 0  # a preview every this many steps (0: none)


@dataclass
class JobState:
    request: GenerationRequest
    id: str
    control: Control
    seed: int  # of the first image; image i has seed + i
    subseed: int
    total_steps: int  # over the whole job, for progress
    ext: Any  # JobExtensions: each extension's validated values, settings and scratch for this job
    started: float = field(default_factory=time.perf_counter)
    steps_done: int = 0
    infotext_fields: dict[str, Any] = field(default_factory=dict)  # fields for every image (extensions, ControlNet, ToMe)
    undo: list[Callable[[], None]] = field(default_factory=list)  # extensions' model changes, undone after the job
    hires_size: tuple[int, int] | None = None
    result: GenerationResult = field(default_factory=lambda: GenerationResult([], [], [], [], []))
    controls: list[Any] = field(default_factory=list)  # ControlNet units prepared (webui.controlnet.apply)
    token_merging: tuple[float, float] = (0.0, 0.0)  # ToMe ratio of the first pass, of the hires pass
    zero_terminal_snr: bool = False  # sample on the schedule rescaled to zero terminal SNR (Settings / request)
    step_cache: tuple[int, int] = (0, 0)  # DeepCache interval (0: off) and branch (webui.pipeline.stepcache)
    faces: tuple[str, float] | None = None  # face restorer and CodeFormer weight, when restoring faces
    # one per (model, embeddings): each caches the encoding of every distinct text it met
    conditioners: dict[tuple[int, tuple[str, ...]], TextConditioner] = field(default_factory=dict)

    def conditioner(self, bundle: ModelBundle, embeddings: list[Embedding]) -> TextConditioner:
        key = (id(bundle), tuple(e.name for e in embeddings))
        if key not in self.conditioners:
            self.conditioners[key] = TextConditioner(bundle, self.request.clip_skip, embeddings)
        return self.conditioners[key]


@dataclass
class BatchState:
    index: int  # 0-based batch number
    first: int  # the job-wide index of this batch's first image
    seeds: list[int]
    subseeds: list[int]
    base: ModelBundle  # the requested model
    bundle: ModelBundle  # the model sampling now: `base`, then the refiner once it takes over
    stack: contextlib.ExitStack  # what this batch put on its models (LoRA merges, tiling), undone at its end
    refiner: ModelBundle | None = None  # set once the refiner has run (for the infotext)
    prompts: list[str] = field(default_factory=list)  # after styles, without extra-network tags
    negative_prompts: list[str] = field(default_factory=list)
    loras: list[tuple[NetworkFile, float]] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)  # those the texts use that fit the model
    generators: list[torch.Generator] = field(default_factory=list)  # per image, seeded
    noise: torch.Tensor | None = None  # the initial noise
    init_pixels: list[Image.Image] = field(default_factory=list)  # img2img: what was encoded (after resize/crop)
    areas: list[InpaintArea | None] = field(default_factory=list)  # inpainting: where each result goes back
    images: list[Image.Image] = field(default_factory=list)  # decoded, then post-processed
    infotexts: list[str] = field(default_factory=list)  # one per image, once post-processed

    def __len__(self) -> int:
        return len(self.seeds)


@dataclass
class PassState:
    size: tuple[int, int]  # (width, height) in pixels of the latents this pass samples
    init_latents: torch.Tensor | None = None  # img2img and hires: where sampling starts from
    keep: torch.Tensor | None = None  # latent mask, 1 = keep the init latent
    image_cond: torch.Tensor | None = None  # inpainting models' extra channels
    conditioning: ScheduledConditioning | None = None
    latents: torch.Tensor | None = None  # the result so far (None: nothing to denoise)
    token_merging: float = 0.0  # ToMe ratio for this pass (webui.pipeline.tome)
