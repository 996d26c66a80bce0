"""sha256 of model files, cached on disk keyed by path, size and mtime.

Hashing a 4 GB file takes seconds, so it is never done at start-up: cached values are used at
once, and missing ones are computed on demand (refresh, loading) or in the background.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

from webui.files import write_atomic

log = logging.getLogger(__name__)


def sha256_file(path: Path, block: int = 1 << 20, skip_safetensors_header: bool = False) -> str:
    """sha256 of the file; with `skip_safetensors_header`, of the tensor data after the header
    (the "addnet" hash A1111 and civitai give LoRA files, unchanged by metadata edits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_safetensors_header:
            raw = f.read(8)
            if len(raw) == 8:
                f.seek(8 + int.from_bytes(raw, "little"))
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


HashKind = str  # "sha256" (whole file) or "addnet" (safetensors data after the header)


class HashCache:
    """A JSON file of {abs path: {size, mtime, sha256}}; safe to share between threads."""

    def __init__(self, file: Path) -> None:
        self.file = Path(file)
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, float]:
        st = path.stat()
        return st.st_size, st.st_mtime

    def cached(self, path: Path, kind: HashKind = "sha256") -> str | None:
        """The stored hash if the file has not changed since it was computed."""
        key = str(Path(path).resolve())
        try:
            size, mtime = self._stamp(Path(key))
        except OSError:
            return None
        with self._lock:
            e = self._entries.get(key)
        if e and e.get("size") == size and e.get("mtime") == mtime:
            return e.get(kind)
        return None

    def get(self, path: Path, kind: HashKind = "sha256") -> str:
        """The hash, computing and storing it if needed."""
        found = self.cached(path, kind)
        if found:
            return found
        key = str(Path(path).resolve())
        size, mtime = self._stamp(Path(key))
        digest = sha256_file(Path(key), skip_safetensors_header=kind == "addnet")
        with self._lock:
            entry = self._entries.get(key)
            if not entry or entry.get("size") != size or entry.get("mtime") != mtime:
                entry = {"size": size, "mtime": mtime}
            entry[kind] = digest
            self._entries[key] = entry
            self._write_locked()
        return digest

    def _write_locked(self) -> None:
        write_atomic(self.file, json.dumps(self._entries, indent=1, sort_keys=True))
