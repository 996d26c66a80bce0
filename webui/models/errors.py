"""The one error type model handling raises: a message fit to show a user as is."""

from __future__ import annotations

from pathlib import Path


class ModelError(Exception):
    """A checkpoint could not be found, read or understood. `str()` is a one-line message."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        prefix = f"{self.path.name}: " if self.path is not None else ""
        super().__init__(prefix + " ".join(message.split()))
