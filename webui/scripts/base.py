"""What a script is, and what it gets while it runs.

A script (the Script dropdown under txt2img and img2img, A1111's `script_name`) takes the tab's
request as a template and runs generations of its own through the same runner: `plan` lists
them before anything runs (so the engine checks every one, and progress knows the total), `run`
makes them and assembles the result (a grid, say). Scripts see the engine only through
`ScriptEnv` (names that exist here) and `ScriptContext` (generate, upscale, save a grid).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image
from pydantic import BaseModel, ValidationError

from webui.pipeline.progress import CancelToken, Progress, ProgressFn
from webui.pipeline.request import GenerationRequest, validation_message
from webui.pipeline.state import GenerationResult


@dataclass(frozen=True)
class ScriptEnv:
    """What a script may look up while planning: the names that exist on this server."""

    checkpoints: Callable[[], list[str]]  # titles
    upscalers: Callable[[], list[str]]
    styles: Callable[[], list[str]]
    axes: Callable[[], list[Any]]  # extensions' X/Y/Z axes (webui.extensions.api.XyzAxis)


@dataclass
class ScriptContext:
    """A running script's access to the engine, and its progress over all its generations."""

    generate_fn: Callable[..., GenerationResult]  # runner.generate(request, progress, cancel, preview_every)
    cancel: CancelToken
    progress: ProgressFn | None
    preview_every: int
    save_fn: Callable[[Image.Image, str, str, int], Path]  # (image, output kind, infotext, seed)
    upscale_fn: Callable[[Image.Image, str, tuple[int, int]], Image.Image] | None = None
    settings: Any = None  # the current Settings
    total_steps: int = 0  # set by `expect`
    steps_done: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def interrupted(self) -> bool:
        return self.cancel.interrupted

    def generate(self, request: GenerationRequest, index: int = 0, count: int = 1) -> GenerationResult:
        """Run `request` (generation `index` of `count`); progress counts over the whole script."""
        before = self.steps_done

        def report(p: Progress) -> None:
            if self.progress is not None:
                self.progress(Progress(before + p.step, max(self.total_steps, before + p.total_steps), index, count,
                                       time.perf_counter() - self.started, p.preview))

        result = self.generate_fn(request, report, self.cancel, self.preview_every)
        self.steps_done = before + request.total_steps()
        self.cancel.clear_skip()  # a skip ends the current image, not the script
        return result

    def expect(self, requests: list[GenerationRequest]) -> None:
        """The generations the script will run: progress counts their steps as the total."""
        self.total_steps = sum(r.total_steps() for r in requests)

    def generate_all(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run `requests` in order (generation k of n each); stop after an interrupt."""
        self.expect(requests)
        results = []
        for i, request in enumerate(requests):
            if self.interrupted:
                break
            results.append(self.generate(request, i, len(requests)))
        return results

    def upscale(self, image: Image.Image, upscaler: str, size: tuple[int, int]) -> Image.Image:
        if self.upscale_fn is None:
            raise ValueError("no upscaler is available")
        return self.upscale_fn(image, upscaler, size)

    def save_image(self, image: Image.Image, kind: str, infotext: str, seed: int) -> Path:
        """Save to the usual folder of `kind` (txt2img, img2img), as every image is saved."""
        return self.save_fn(image, kind, infotext, seed)

    def save_grid(self, grid: Image.Image, kind: str, infotext: str, seed: int) -> Path | None:
        """Save to the `<kind>-grids` folder when the Settings say so (the path, or None)."""
        if self.settings is not None and not self.settings.grid_save:
            return None
        return self.save_fn(grid, f"{kind}-grids", infotext, seed)


class Script(ABC):
    """A built-in script. `positional` names `args_model`'s fields in A1111's `script_args` order."""

    title: ClassVar[str]
    args_model: ClassVar[type[BaseModel]]
    positional: ClassVar[tuple[str, ...]] = ()
    tabs: ClassVar[tuple[str, ...]] = ("txt2img", "img2img")

    hidden: ClassVar[tuple[str, ...]] = ()  # arguments the page does not show (API-only forms)

    def choices(self, tab: str, env: ScriptEnv) -> dict[str, list[str]]:
        """Arguments the page offers as a dropdown of these values (the rest by their type)."""
        return {}

    @property
    def name(self) -> str:
        """A1111's `script_name`: the title in lower case."""
        return self.title.lower()

    def parse(self, raw: list[Any] | dict[str, Any] | None) -> BaseModel:
        """The arguments from A1111's positional list (extra trailing values ignored, missing ones
        default) or a dict by field name. ValueError naming the field."""
        if raw is None:
            raw = {}
        if isinstance(raw, (list, tuple)):
            raw = {name: value for name, value in zip(self.positional, raw) if value is not None}
        if not isinstance(raw, dict):
            raise ValueError("script_args: a list (A1111's order) or an object by name")
        unknown = sorted(set(raw) - set(self.args_model.model_fields))
        if unknown:
            raise ValueError(f"script_args: unknown argument {unknown[0]!r} for {self.title} "
                             f"(known: {', '.join(self.args_model.model_fields)})")
        try:
            return self.args_model.model_validate(raw)
        except ValidationError as err:
            raise ValueError(f"script_args: {validation_message(err)}") from None

    @abstractmethod
    def plan(self, request: GenerationRequest, args: Any, env: ScriptEnv) -> list[GenerationRequest]:
        """Every generation the script will run, in order (ValueError for arguments that cannot
        work). A later generation may take an earlier one's output as its init image; its other
        fields are as planned."""

    @abstractmethod
    def run(self, ctx: ScriptContext, request: GenerationRequest, args: Any, env: ScriptEnv) -> GenerationResult:
        """Run the planned generations through `ctx` and return the images to show (a grid first
        where A1111 puts one)."""


def kind_of(request: GenerationRequest) -> str:
    return "img2img" if request.is_img2img else "txt2img"


def combine(results: list[GenerationResult]) -> GenerationResult:
    """The images of several generations as one result (interrupted if any was)."""
    out = GenerationResult([], [], [], [], [])
    for r in results:
        out.images += r.images
        out.seeds += r.seeds
        out.subseeds += r.subseeds
        out.infotexts += r.infotexts
        out.paths += r.paths
        out.interrupted = out.interrupted or r.interrupted
    return out
