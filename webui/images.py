"""Saving images: folder layout, file names that never overwrite, metadata, atomic writes."""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

_NUMBERED = re.compile(r"^(\d{5,})-")


def dated_dir(root: Path, kind: str, today: dt.date | None = None) -> Path:
    """`<root>/<kind>-images/YYYY-MM-DD`."""
    return Path(root) / f"{kind}-images" / (today or dt.date.today()).isoformat()


def next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.glob("*") if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def read_infotext(image: Image.Image) -> str | None:
    """The `parameters` text chunk of a PNG, if any."""
    return image.info.get("parameters") if isinstance(image.info.get("parameters"), str) else None


def save_image(image: Image.Image, folder: Path, seed: int, infotext: str) -> Path:
    """Save as `NNNNN-SEED.png` with the infotext in the `parameters` chunk.

    The bytes go to a temporary file that is then hard-linked under its final name; linking
    fails if the name exists, so concurrent saves never overwrite each other, and a reader
    never sees a half-written image.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", infotext)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=meta)
            f.flush()
            os.fsync(f.fileno())
        number = next_number(folder)
        while True:
            target = folder / f"{number:05d}-{seed}.png"
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                number += 1
    finally:
        tmp.unlink(missing_ok=True)
