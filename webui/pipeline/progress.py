"""Progress reports and cancellation for a running job (no torch: the UI imports this)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Progress:
    step: int  # steps finished over the whole job
    total_steps: int
    batch: int  # 0-based batch index
    batches: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0


ProgressFn = Callable[[Progress], None]


class CancelToken:
    """One per job: set by the owner of the job to stop it after the current step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def interrupt(self) -> None:
        self._event.set()

    @property
    def interrupted(self) -> bool:
        return self._event.is_set()
