"""Writing files so that a reader never sees half of one: `write_atomic` for every file the app
writes whole (settings, styles, hashes, extension state, a chosen-name PNG). Numbered images, whose
names must never collide, are published by `webui.images.save_image` instead."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Write `data` to `path`: a temporary file in the same folder, flushed to disk, then renamed
    over `path` (readers see the old file or the new one). Folders are made as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode(encoding) if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
