"""img2img over a folder: every image in it through the same request, one after another.

With an output folder each result is written there under its source's name (as `.png`, with the
infotext); without one the results go to the usual outputs folder. A mask folder supplies, for
each image, the mask file of the same stem (any image suffix); images without one are plain
img2img. Unreadable files are skipped with a warning, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from webui.images import IMAGE_SUFFIXES, list_images, open_image
from webui.pipeline.progress import CancelToken, Progress, ProgressFn
from webui.pipeline.request import GenerationRequest

if TYPE_CHECKING:  # the page builds a FolderBatch without importing torch
    from webui.pipeline.runner import GenerationResult, Runner



@dataclass(frozen=True)
class FolderBatch:
    input_dir: Path
    output_dir: Path | None = None  # None: the usual outputs folder, usual names
    mask_dir: Path | None = None

    def check(self) -> None:
        """ValueError with the reason when the folders cannot be used."""
        if not self.input_dir.is_dir():
            raise ValueError(f"input folder {self.input_dir} does not exist")
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise ValueError(f"mask folder {self.mask_dir} does not exist")
        if self.output_dir is not None and self.output_dir.resolve() == self.input_dir.resolve():
            raise ValueError("the output folder must differ from the input folder (files would be overwritten)")

    def images(self) -> list[Path]:
        return list_images(self.input_dir)

    def mask_for(self, image: Path) -> Path | None:
        if self.mask_dir is None:
            return None
        return next((p for p in sorted(self.mask_dir.glob(f"{image.stem}.*")) if p.suffix.lower() in IMAGE_SUFFIXES),
                    None)


def _open(path: Path) -> Image.Image | None:
    opened = open_image(path)
    return opened[0] if opened else None


def img2img_folder(
    runner: Runner,
    request: GenerationRequest,
    batch: FolderBatch,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    preview_every: int = 0,
) -> GenerationResult:
    """Run `request` (its init image and mask replaced) on each image of the folder."""
    from webui.pipeline.runner import GenerationResult

    batch.check()
    files = batch.images()
    if not files:
        raise ValueError(f"no images in {batch.input_dir}")
    cancel = cancel or CancelToken()
    total = GenerationResult([], [], [], [], [])
    if batch.output_dir is not None:
        batch.output_dir.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(files):
        if cancel.interrupted:
            total.interrupted = True
            break
        image = _open(path)
        if image is None:
            continue
        mask_path = batch.mask_for(path)
        mask = _open(mask_path) if mask_path else None
        one = request.model_copy(update={
            "init_images": (image,), "mask": mask, "save_images": request.save_images and batch.output_dir is None,
        })

        def report(p: Progress, index: int = index) -> None:  # progress over the whole folder
            if progress:
                progress(Progress(index * p.total_steps + p.step, len(files) * p.total_steps, index, len(files),
                                  p.elapsed, p.preview))

        result = runner.generate(one, progress=report, cancel=cancel, preview_every=preview_every)
        paths = result.paths
        if batch.output_dir is not None and request.save_images:
            names = [path.stem] + [f"{path.stem}-{i}" for i in range(1, len(result.images))]
            paths = [runner.writer.save_as(im, batch.output_dir, name, text)
                     for im, name, text in zip(result.images, names, result.infotexts)]
        total.images += result.images
        total.seeds += result.seeds
        total.subseeds += result.subseeds
        total.infotexts += result.infotexts
        total.paths += paths
        if result.interrupted:
            total.interrupted = True
            break
    return total
