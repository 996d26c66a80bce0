"""Progress reports and cancellation for a running job (no torch: the UI imports this)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Progress:
    step: int  # steps finished over the whole job
    total_steps: int
    batch: int  # 0-based batch index
    batches: int
    elapsed: float
    preview: list[Any] | None = None  # PIL images of the current estimate, every few steps

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    @property
    def eta(self) -> float:
        """Seconds left, extrapolated from the steps done so far."""
        return self.elapsed / self.step * (self.total_steps - self.step) if self.step else 0.0


ProgressFn = Callable[[Progress], None]


class CancelToken:
    """One per job, held by whoever started it: interrupt stops the job after the current step
    (keeping what is done); skip ends the current batch and goes on with the next."""

    def __init__(self) -> None:
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    def clear_skip(self) -> None:
        self._skip.clear()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    @property
    def skipped(self) -> bool:
        return self._skip.is_set()
