"""The one output writer: every image the app saves goes through `OutputWriter` -- txt2img,
img2img, hires, folder batches, Extras (single and folder), from the page, the CLI and the API.
It applies the Settings (the kind's folder, format, JPEG/WebP quality, file-name pattern), the
date folder, atomic publishing (`webui.images`), and calls the `image_saved` hook."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path

from PIL import Image

from webui.extensions import api as ext
from webui.extensions.manager import ExtensionManager, JobExtensions
from webui.files import write_atomic
from webui.images import FORMATS, image_file_bytes, save_image
from webui.settings import Settings


class OutputWriter:
    def __init__(self, data_dir: Path, outputs_dir: Path, settings: Callable[[], Settings],
                 extensions: ExtensionManager) -> None:
        self.data_dir = Path(data_dir)
        self.outputs_dir = Path(outputs_dir)
        self.settings = settings  # read at each save: a change in the Settings tab applies at once
        self.extensions = extensions

    def folder(self, kind: str) -> Path:
        """Today's folder for images of `kind` (txt2img, img2img, extras, and the grids')."""
        return self.settings().samples_dir(kind, self.data_dir, self.outputs_dir) / dt.date.today().isoformat()

    def save(self, image: Image.Image, kind: str, infotext: str, *, seed: int = 0,
             values: Mapping[str, object] | None = None, job: JobExtensions | None = None) -> Path:
        """A numbered file (`NNNNN-<pattern>.<ext>`) in the kind's folder for today."""
        s = self.settings()
        fmt = s.grid_format if kind.endswith("-grids") else s.samples_format
        path = save_image(image, self.folder(kind), seed, infotext, fmt=fmt, quality=s.jpeg_quality,
                          pattern=s.filename_pattern, values=values)
        return self._saved(path, image, infotext, job)

    def save_as(self, image: Image.Image, folder: Path, stem: str, infotext: str, *,
                job: JobExtensions | None = None) -> Path:
        """`<folder>/<stem>.<ext>` (a folder batch keeps its source's names), replaced if it exists."""
        s = self.settings()
        ext_ = FORMATS[s.samples_format][1]
        path = write_atomic(Path(folder) / f"{stem}.{ext_}", image_file_bytes(image, s.samples_format, infotext,
                                                                          s.jpeg_quality))
        return self._saved(path, image, infotext, job)

    def _saved(self, path: Path, image: Image.Image, infotext: str, job: JobExtensions | None) -> Path:
        if self.extensions.has("image_saved"):
            self.extensions.call("image_saved", ext.SavedImage(path, image, infotext), job)
        return path


def unique_stems(stems: list[str]) -> list[str]:
    """`stems` made unique case-insensitively (`a`, `a_2`, ...), for files written into one folder."""
    used: set[str] = set()
    out = []
    for stem in stems:
        candidate, n = stem, 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{stem}_{n}"
        used.add(candidate.lower())
        out.append(candidate)
    return out



