"""Workers: one per device (`--device-id 0,1`, `--all-gpus`), or several sharing one (`--workers N`,
the CPU's case). A worker owns its runtime (device, dtypes, attention, memory mode), its model
cache and its runner; the engine's one job queue hands jobs to free workers. What is not tied to a
device (the registries, tokenizers, embeddings, the output writer, the extensions) is shared.

Nothing here imports torch until a worker is started or asked for its runtime.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from webui.config import Config
from webui.models.cache import ModelCache

if TYPE_CHECKING:
    from webui.models.load import ModelBundle
    from webui.pipeline.runner import Runner
    from webui.runtime.devices import Runtime

log = logging.getLogger(__name__)


def plan_devices(config: Config) -> list[int]:
    """The device index of each worker: the listed devices (all visible GPUs with --all-gpus,
    else device 0), one worker each, or `--workers N` spread over them in turn."""
    ids: tuple[int, ...] = config.device_ids
    if config.all_gpus and not config.use_cpu:
        from webui.runtime.devices import accelerator

        count = found[1] if (found := accelerator(config)) else 0
        if count == 0:
            log.warning("--all-gpus: no GPU found; one worker on the CPU")
        ids = tuple(range(count))
    ids = ids or (0,)
    if config.use_cpu:
        ids = (0,)
    n = config.workers or len(ids)
    return [ids[i % len(ids)] for i in range(n)]


class Worker:
    """One worker: a device index, and the runtime, model cache and runner built for it on first use."""

    remote = False  # True for a lane to Ray Serve replicas (webui.scale.ray_serve)

    def __init__(self, index: int, device_index: int, config: Config, *, share: int = 1, rank: int = 0,
                 make_runner: Callable[[Worker], Runner] | None = None,
                 park: Callable[[ModelBundle], None] | None = None,
                 unpark: Callable[[ModelBundle], None] | None = None) -> None:
        self.index = index
        self.device_index = device_index
        self.config = config
        self.share = share  # how many workers use this device
        self._suffix = f"/{rank}" if share > 1 else ""  # "cpu/0", "cpu/1" when workers share a device
        self.cache: ModelCache[ModelBundle] = ModelCache(park=park, unpark=unpark)
        self._runtime: Runtime | None = None
        self._runner: Runner | None = None
        self._lock = threading.RLock()  # the runner's factory asks for the runtime
        self.make_runner = make_runner  # the engine's: a runner on this worker's device and models

    @property
    def name(self) -> str:
        """`cuda:1`, `cpu/0`, ... once its runtime exists, else `worker N`."""
        rt = self._runtime
        return f"{rt.device}{self._suffix}" if rt is not None else f"worker {self.index}"

    @property
    def runtime(self) -> Runtime:
        with self._lock:
            if self._runtime is None:
                from webui.runtime.devices import pick_runtime

                self._runtime = pick_runtime(self.config, self.device_index)
                if self._runtime.device.type == "cpu" and self.share > 1:
                    share_cpu(self.share)
                log.info("worker %s: %s", self.name, self._runtime.describe())
            return self._runtime

    @property
    def runner(self) -> Runner:
        with self._lock:
            if self._runner is None:
                assert self.make_runner is not None, "a worker's runner is made by its engine"
                self._runner = self.make_runner(self)
            return self._runner

    def start(self) -> None:
        """Called once on the worker's thread before its first job: builds the runtime, so the job
        shows the device it runs on. A device that cannot be used is logged; its jobs then fail
        with the same message."""
        try:
            _ = self.runtime
        except Exception as err:  # noqa: BLE001
            log.error("worker %d (device %d): %s", self.index, self.device_index, err)

    def holds(self, affinity: Hashable) -> bool:
        """Whether this worker has that model loaded (ready or parked in RAM)."""
        return affinity in self.loaded() or affinity in self.cache.parked_keys()

    def loaded(self) -> list[Hashable]:
        return self.cache.keys()


def share_cpu(workers: int) -> None:
    """Give each of `workers` CPU workers an equal share of the cores. torch's thread count is one
    setting for the whole process, so each worker's parallel parts get cores // workers threads.
    Without this, two workers each start a full team of threads on the same cores: slower, and the
    order of a parallel sum then varies, which changed images by one level in a pixel here."""
    import os

    import torch

    threads = max(1, (os.cpu_count() or 1) // workers)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info("%d workers share the CPU: %d thread(s) each", workers, threads)


def make_workers(config: Config, make_runner: Callable[[Worker], Runner],
                 park: Callable[[ModelBundle], None] | None = None,
                 unpark: Callable[[ModelBundle], None] | None = None) -> list[Worker]:
    devices = plan_devices(config)
    return [Worker(i, d, config, share=devices.count(d), rank=devices[:i].count(d), make_runner=make_runner,
                   park=park, unpark=unpark) for i, d in enumerate(devices)]
