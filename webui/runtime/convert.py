"""Bulk copy-and-cast of many tensors into freshly allocated memory, fast.

Owns `Source` (where a tensor's elements come from, and how to give their pages back) and
`convert_into` (fill destination tensors from sources, casting dtypes). It is what makes
checkpoint loading cost about the memory traffic of the copy, not the cast:

- float16 <-> bfloat16 casts go through a small float32 buffer that stays in the core's cache:
  torch's direct half <-> bfloat16 copy is a scalar loop (~0.5 G elements/s on a core), the two
  vectorised casts through float32 run at memory speed (~2 G elements/s on the same core).
  Rounding is the same (half -> float32 is exact, then one round-to-nearest-even).
- Fresh destination pages are pre-faulted a piece at a time with `MADV_POPULATE_WRITE`
  (Linux >= 5.14): one system call instead of a page fault per 4 KiB, about half the kernel time
  on a VM. Without it (other systems, older kernels) pages fault in as they are written.
- The copies run on worker threads (`torch.get_num_threads()` of them for large jobs, one for
  small ones), each copying 8 MiB pieces with single-threaded torch ops (torch releases the GIL
  inside ops). Workers pull pieces as they go, so a core taken by another process slows the copy
  instead of stalling it: many small ops each spread over an OpenMP team spin at barriers when a
  core is busy elsewhere (tens of seconds instead of one, measured on a shared 2-core VM).

Nothing here keeps state between calls.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PIECE_BYTES = 8 << 20  # destination bytes per unit of work: populated, then written while still in cache
STAGE_ELEMENTS = 128 << 10  # float32 staging buffer (512 KiB) for half <-> bfloat16 casts
PARALLEL_MIN_BYTES = 64 << 20  # below this, one worker: more would cost more than they save
POPULATE_MIN_BYTES = 256 << 10  # pieces smaller than this just fault in
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # linux/mman.h, kernel 5.14+
_HALVES = (torch.float16, torch.bfloat16)

Madvise = Callable[[int, int, int], int]


@dataclass(frozen=True)
class Source:
    """The flat elements of one tensor: `read(a, b)` gives elements [a, b) as a 1-D tensor, and
    `release(a, b)` (optional) says they have been copied, e.g. to drop file pages from the
    process's memory."""

    numel: int
    read: Callable[[int, int], torch.Tensor]
    release: Callable[[int, int], None] | None = None

    @staticmethod
    def of(tensor: torch.Tensor) -> Source:
        flat = tensor.reshape(-1)
        return Source(flat.numel(), lambda a, b: flat[a:b])


def _libc_madvise() -> Madvise | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class _Populator:
    """Pre-faults the whole pages inside a tensor's memory; turns itself off after a refusal."""

    def __init__(self) -> None:
        self._madvise = _libc_madvise()

    def __call__(self, t: torch.Tensor) -> None:
        if self._madvise is None or t.device.type != "cpu":
            return
        start = t.data_ptr()
        lo = -(-start // _PAGE) * _PAGE
        hi = (start + t.numel() * t.element_size()) // _PAGE * _PAGE
        if hi - lo >= POPULATE_MIN_BYTES and self._madvise(lo, hi - lo, _MADV_POPULATE_WRITE) != 0:
            log.debug("MADV_POPULATE_WRITE refused (errno %d): pages fault in instead", ctypes.get_errno())
            self._madvise = None


def cast_copy(dst: torch.Tensor, src: torch.Tensor, stage: torch.Tensor | None = None) -> None:
    """`dst.copy_(src)` for 1-D tensors, with half <-> bfloat16 staged through float32 blocks."""
    if dst.dtype == src.dtype or dst.dtype not in _HALVES or src.dtype not in _HALVES:
        dst.copy_(src)
        return
    if dst.device.type != "cpu":  # upload the piece as it is and cast it on the device
        dst.copy_(src.to(dst.device))
        return
    if stage is None:
        stage = torch.empty(min(STAGE_ELEMENTS, src.numel()), dtype=torch.float32)
    step = stage.numel()
    for a in range(0, src.numel(), step):
        b = min(a + step, src.numel())
        s = stage[: b - a]
        s.copy_(src[a:b])
        dst[a:b].copy_(s)


def _pieces(jobs: Sequence[tuple[Source, torch.Tensor]]) -> list[list[tuple[Source, torch.Tensor, int, int]]]:
    """Units of work of about PIECE_BYTES: large tensors split, small ones grouped."""
    units: list[list[tuple[Source, torch.Tensor, int, int]]] = []
    current: list[tuple[Source, torch.Tensor, int, int]] = []
    size = 0
    for source, dst in jobs:
        flat = dst.view(-1)
        step = max(1, PIECE_BYTES // dst.element_size())
        for a in range(0, source.numel, step):
            b = min(a + step, source.numel)
            current.append((source, flat, a, b))
            size += (b - a) * dst.element_size()
            if size >= PIECE_BYTES:
                units.append(current)
                current, size = [], 0
    if current:
        units.append(current)
    return units


def convert_into(jobs: Sequence[tuple[Source, torch.Tensor]], threads: int | None = None) -> None:
    """Fill each destination (a contiguous tensor with `source.numel` elements, on the CPU or an
    accelerator, which then receives the pieces straight from the sources) from its source,
    casting to the destination's dtype. Blocks until every copy is done."""
    for source, dst in jobs:
        if not dst.is_contiguous() or dst.numel() != source.numel:
            raise ValueError("destination must be contiguous and as large as its source")
    total = sum(dst.numel() * dst.element_size() for _, dst in jobs)
    threads = max(1, threads if threads is not None else torch.get_num_threads())
    populate = _Populator()
    units = _pieces(jobs)

    def run(unit: list[tuple[Source, torch.Tensor, int, int]], stage: torch.Tensor) -> None:
        for source, flat, a, b in unit:
            dst = flat[a:b]
            populate(dst)
            cast_copy(dst, source.read(a, b), stage)
            if source.release is not None:
                source.release(a, b)

    if not units:
        return
    workers = 1 if total < PARALLEL_MIN_BYTES else min(threads, len(units))
    local = threading.local()

    def worker(unit: list[tuple[Source, torch.Tensor, int, int]]) -> None:
        if not hasattr(local, "stage"):
            # One torch thread per worker (thread-local under OpenMP): the workers are the
            # parallelism, and nested thread teams would oversubscribe the cores.
            torch.set_num_threads(1)
            local.stage = torch.empty(STAGE_ELEMENTS, dtype=torch.float32)
        run(unit, local.stage)

    previous = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert")
    try:
        for future in [pool.submit(worker, unit) for unit in units]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(previous)  # the count new threads start from is process-wide: restore it
