"""Keep the last N loaded models; loading one more first frees the oldest.

Eviction happens before the new load, so switching checkpoints never holds two models'
weights at once when the cache size is 1.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class ModelCache(Generic[T]):
    def __init__(self, capacity: int = 1) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            while len(self._items) >= self.capacity:
                self._items.popitem(last=False)
                _free_memory()
            item = load()
            self._items[key] = item
            return item

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            _free_memory()


def _free_memory() -> None:
    import torch  # deferred: this module is imported before the model stack

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
