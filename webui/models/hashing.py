"""sha256 of model files, cached on disk keyed by path, size and mtime.

Hashing a 4 GB file takes seconds, so it is never done at start-up: cached values are used at
once, and missing ones are computed on demand (refresh, loading) or in the background.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


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

    def cached(self, path: Path) -> str | None:
        """The stored hash if the file has not changed since it was computed."""
        key = str(Path(path).resolve())
        try:
            size, mtime = self._stamp(Path(key))
        except OSError:
            return None
        with self._lock:
            e = self._entries.get(key)
        if e and e.get("size") == size and e.get("mtime") == mtime:
            return e.get("sha256")
        return None

    def get(self, path: Path) -> str:
        """The hash, computing and storing it if needed."""
        found = self.cached(path)
        if found:
            return found
        key = str(Path(path).resolve())
        size, mtime = self._stamp(Path(key))
        digest = sha256_file(Path(key))
        with self._lock:
            self._entries[key] = {"size": size, "mtime": mtime, "sha256": digest}
            self._write_locked()
        return digest

    def _write_locked(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(self._entries, indent=1, sort_keys=True))
        os.replace(tmp, self.file)
