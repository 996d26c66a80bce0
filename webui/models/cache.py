"""Loaded checkpoints: the ones ready on the compute device, and the ones parked in RAM.

`ModelCache` keeps up to `capacity` models ready (A1111's "checkpoints loaded at the same time")
and, with `ram_capacity` > 0 (`--ckpt-cache N`), up to that many more parked in RAM: a model
pushed out of the ready set is parked instead of dropped, and asking for it again brings it back
without reading its file. Room is always made before a model is loaded or brought back, so a
switch never holds more than `capacity` models on the compute device (one, by default), and with
no RAM cache the old model's memory is freed before the new one is read.

Parking is the caller's `park` / `unpark` (moving weights to the CPU and back on an accelerator;
nothing to do when the compute device is the CPU itself, where parked and ready are the same RAM).
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class ModelCache(Generic[T]):
    def __init__(self, capacity: int = 1, ram_capacity: int = 0, *,
                 park: Callable[[T], None] | None = None, unpark: Callable[[T], None] | None = None) -> None:
        self.capacity = max(1, capacity)
        self.ram_capacity = max(0, ram_capacity)
        self._park = park
        self._unpark = unpark
        self._ready: OrderedDict[Hashable, T] = OrderedDict()
        self._parked: OrderedDict[Hashable, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._ready:
                self._ready.move_to_end(key)
                return self._ready[key]
            parked = self._parked.pop(key, None)
            self._make_room()
            if parked is not None:
                if self._unpark is not None:
                    self._unpark(parked)
                item = parked
            else:
                item = load()
            self._ready[key] = item
            return item

    def keys(self) -> list[Hashable]:
        """Keys of the ready models, least recently used first."""
        with self._lock:
            return list(self._ready)

    def parked_keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._parked)

    def peek(self, key: Hashable) -> T | None:
        """The model under `key`, ready or parked, without using or moving it."""
        with self._lock:
            return self._ready.get(key) or self._parked.get(key)

    def clear(self) -> None:
        with self._lock:
            self._ready.clear()
            self._parked.clear()
            _free_memory()

    def _make_room(self) -> None:
        """Below `capacity` ready models: park (or drop) the least recently used ones."""
        freed = False
        while len(self._ready) >= self.capacity:
            key, item = self._ready.popitem(last=False)
            if self.ram_capacity > 0:
                if self._park is not None:
                    self._park(item)
                self._parked[key] = item
            freed = True
        while len(self._parked) > self.ram_capacity:
            self._parked.popitem(last=False)
            freed = True
        if freed:
            _free_memory()


def _free_memory() -> None:
    import torch  # deferred: this module is imported before the model stack

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        if empty_host is not None:  # pinned host memory of dropped lowvram masters
            empty_host()
