"""The Extras stage: upscaling images outside a generation (the Extras tab, the API's
extra-single-image / extra-batch-images, folder batches), as jobs on the engine's queue like every
generation, saved by the one output writer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from webui.images import check_pixels, read_infotext
from webui.models.errors import ModelError

if TYPE_CHECKING:
    import torch

    from webui.app import Engine
    from webui.workers import Worker


@dataclass(frozen=True)
class Upscale:
    """How to upscale: `upscaler` to `scale` x the size or to `size` (width, height); optionally
    `second` blended over the result with weight `visibility` (A1111's upscaler 2). Then, as A1111
    orders them, GFPGAN and CodeFormer on the faces, each blended in at its visibility (0: off)."""

    upscaler: str
    scale: float | None = 2.0
    size: tuple[int, int] | None = None
    second: str | None = None
    visibility: float = 0.0
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.5

    def restorers(self) -> list[tuple[str, float]]:
        """(face restorer, visibility) in the order they run."""
        return [(n, v) for n, v in (("GFPGAN", self.gfpgan_visibility), ("CodeFormer", self.codeformer_visibility))
                if v > 0]

    def infotext(self, out: Image.Image) -> str:
        text = f"Postprocess upscaler: {self.upscaler}"
        if self.second:
            text += f", Postprocess upscaler 2: {self.second}, Postprocess upscaler 2 visibility: {self.visibility:g}"
        for name, visibility in self.restorers():
            text += f", {name} visibility: {visibility:g}"
        if self.codeformer_visibility > 0:
            text += f", CodeFormer weight: {self.codeformer_weight:g}"
        return f"{text}, Postprocess upscale to: {out.width}x{out.height}"


@dataclass
class ExtrasResult:
    images: list[Image.Image]
    infotexts: list[str]  # each source's infotext (if it had one) with the upscale's line added
    paths: list[Path]


def check(engine: Engine, how: Upscale) -> None:
    """Names that must exist here, before a job is queued (ValueError naming the field)."""
    for field, name in (("upscaler_1", how.upscaler), ("upscaler_2", how.second)):
        if name is not None:
            engine.check_upscaler(name, field)
    for name, _ in how.restorers():
        try:
            engine.faces.get(name)
        except ModelError as err:
            raise ValueError(f"{name.lower()}_visibility: {err}") from None


def run(engine: Engine, images: list[Image.Image], how: Upscale, *, save: bool, owner: str | None = None) -> ExtrasResult:
    """Upscale `images` as one job on the queue (waits for it); with `save`, each result is written
    to the Extras folder. Raises what the job raised (ValueError / ModelError for bad input)."""
    check(engine, how)
    for image in images:
        check_pixels(image)
    options = {"size": how.size} if how.size else {"scale": how.scale}

    def work(progress, cancel, every, worker: Worker) -> ExtrasResult:
        result = ExtrasResult([], [], [])
        device = worker.runtime.device
        for image in images:
            def one(name: str) -> Image.Image:
                return engine.upscalers.upscale(image, name, device=device, cancel=lambda: cancel.interrupted,
                                                **options)
            out = one(how.upscaler).convert("RGB")
            if how.second and how.visibility > 0:
                out = Image.blend(out, one(how.second).convert("RGB").resize(out.size, Image.LANCZOS), how.visibility)
            out = restore_faces(engine, out, how, device)
            source = read_infotext(image)
            text = f"{source}\n{how.infotext(out)}" if source else how.infotext(out)
            result.images.append(out)
            result.infotexts.append(text)
            if save:
                result.paths.append(engine.writer.save(out, "extras", text))
        return result

    return _wait(engine.jobs.submit("extras", work, owner=owner))


def run_folder(engine: Engine, src: Path, dst: Path, how: Upscale, *, owner: str | None = None) -> list[Path]:
    """Every image of `src` upscaled into `dst` under its own name (one job)."""
    check(engine, how)
    options = {"size": how.size} if how.size else {"scale": how.scale}

    def work(progress, cancel, every, worker: Worker) -> list[Path]:
        device = worker.runtime.device

        def save(image: Image.Image, folder: Path, stem: str, infotext: str) -> Path:
            return engine.writer.save_as(restore_faces(engine, image, how, device), folder, stem, infotext)

        return engine.upscalers.upscale_folder(src, dst, how.upscaler, save=save, device=device,
                                               cancel=lambda: cancel.interrupted, **options)

    return _wait(engine.jobs.submit("extras", work, owner=owner))


def restore_faces(engine: Engine, image: Image.Image, how: Upscale, device: torch.device) -> Image.Image:
    """The faces of an upscaled image restored as `how` asks (GFPGAN, then CodeFormer), on `device`."""
    for name, visibility in how.restorers():
        image = engine.faces.restore(image, name, visibility=visibility, weight=how.codeformer_weight, device=device)
    return image


def _wait(job):
    """The job's result, or its error again: ValueError for bad input, RuntimeError otherwise."""
    job.done.wait()
    if job.error:
        raise ValueError(job.error) if job.bad_input else RuntimeError(job.error)
    return job.result
