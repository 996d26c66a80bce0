"""Memory modes: where the model's components wait while they are not running.

Owns `MemoryManager` (the mode, the placement of each attached component, the hooks that move
components as they run), the two ways tensors move (`DeviceTransfer` for a real accelerator,
`SimulatedTransfer` as a CPU stand-in for tests), `pick_memory_mode` (the flags, or free VRAM when
no flag is given) and `vae_plan` (when the VAE decodes in tiles / one image at a time).

Modes:
- "normal": every component stays on the compute device. No hooks, no cost.
- "medvram": only the component that is running is on the compute device. A forward pre-hook on
  each text encoder, the UNet and the VAE (and on their direct children, because the VAE's
  `encode` / `decode` are not `forward`) moves that component there and sends the previous one
  back to the offload device, the way A1111's `--medvram` does. Moves are real moves (module
  state lives in one place), so in-place weight edits (LoRA merges) are kept whichever side they
  happen on.
- "lowvram": text encoders and VAE as in medvram; the UNet stays on the offload device and each
  of its blocks (the direct children, and the members of `down_blocks` / `up_blocks`) is copied to
  the compute device by a forward pre-hook just before it runs and dropped by a forward hook
  just after (the offload copy is the master: weights do not change during a forward, so
  nothing is copied back). On CUDA the next block's copy is issued on a second stream while the
  current block computes, from pinned memory, and the compute stream waits on an event.

`use(module)` brings a component to the compute device for a `with` block and offloads it after
(when the block was what brought it there); `offload_all()` empties the compute device, and
`offloaded_after(memory)` does that around a whole job. `park` / `unpark` move whole models to
RAM and back for the checkpoint cache (`webui.models.cache`).

The manager keeps only weak references to components, so a model dropped from the cache is
freed as usual; its hooks go with it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

log = logging.getLogger(__name__)

Mode = Literal["normal", "medvram", "lowvram"]
Where = Literal["compute", "offload"]
OnMove = Callable[[str, Where], None]  # (component or block name, where it went)

MODES: tuple[Mode, ...] = ("normal", "medvram", "lowvram")
GIB = 1 << 30
# Automatic choice on CUDA when no flag is given (free VRAM at start-up).
LOWVRAM_BELOW = 3 * GIB
MEDVRAM_BELOW = 6 * GIB
# VAE tiling when no flag asks for it: above this many pixels per image on a CPU, and on CUDA
# when the estimated decode memory (bytes per pixel x pixels) exceeds the free memory.
CPU_TILE_PIXELS = 2048 * 2048
DECODE_BYTES_PER_PIXEL = 3072  # per element-size byte: SD VAE decoder peak at full resolution, rough


class Transfer(Protocol):
    """How a tensor moves between the offload place and the compute place."""

    compute: torch.device

    def to_compute(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...

    def to_offload(self, t: torch.Tensor) -> torch.Tensor: ...

    def master(self, t: torch.Tensor) -> torch.Tensor:
        """The offload copy a streamed block keeps for its whole life."""
        ...


@dataclass(frozen=True)
class DeviceTransfer:
    """Real moves: weights wait on `offload` (the CPU) and run on `compute` (an accelerator)."""

    compute: torch.device
    offload: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def to_compute(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(self.compute, non_blocking=t.device.type == "cpu" and t.is_pinned())

    def to_offload(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.offload)

    def master(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.offload)
        if self.compute.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            try:
                return t.pin_memory()  # so the copies to the GPU can overlap compute
            except RuntimeError:
                return t
        return t


@dataclass(frozen=True)
class SimulatedTransfer:
    """A CPU stand-in for an accelerator, for tests on machines without one (named as such).

    The compute device is the CPU; "offloaded" floating-point tensors are held as float64 copies
    (lossless for float32 / bfloat16 / float16, so images do not change), which makes every move
    observable and any use of a component that was not brought to the compute side fail loudly
    with a dtype mismatch.
    """

    compute: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def to_compute(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype, copy=True)

    def to_offload(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64) if t.is_floating_point() else t

    def master(self, t: torch.Tensor) -> torch.Tensor:
        return self.to_offload(t)


@dataclass
class _Slot:
    """One parameter or buffer: where it hangs, and the dtype it computes in."""

    owner: torch.nn.Module
    name: str
    is_param: bool
    dtype: torch.dtype

    def get(self) -> torch.Tensor:
        return (self.owner._parameters if self.is_param else self.owner._buffers)[self.name]  # type: ignore[return-value]

    def set(self, t: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = t  # type: ignore[union-attr]  # same Parameter object
        else:
            self.owner._buffers[self.name] = t


def _slots(module: torch.nn.Module) -> list[_Slot]:
    slots, seen = [], set()
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                slots.append(_Slot(owner, name, True, p.dtype))
        for name, b in owner._buffers.items():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                slots.append(_Slot(owner, name, False, b.dtype))
    return slots


def _blocks(module: torch.nn.Module, prefix: str) -> list[tuple[str, torch.nn.Module]]:
    """The units a streamed model runs in: direct children, looking inside containers."""
    out = []
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)) and not _runs_itself(child):
            out += _blocks(child, f"{prefix}.{name}")
        else:
            out.append((f"{prefix}.{name}", child))
    return out


def _runs_itself(container: torch.nn.Module) -> bool:
    """A Sequential is called as a whole; ModuleList / ModuleDict never are."""
    return isinstance(container, torch.nn.Sequential)


class _Block:
    """A streamed block: its offload masters, and a prefetched compute copy when there is one."""

    def __init__(self, name: str, module: torch.nn.Module, slots: list[_Slot]) -> None:
        self.name = name
        self.module = module
        self.slots = slots
        self.masters: list[torch.Tensor] = []
        self.pending: list[torch.Tensor] | None = None
        self.event: Any = None  # torch.cuda.Event of the prefetch


class _Component:
    def __init__(self, name: str, module: torch.nn.Module, streamed: bool) -> None:
        self.name = name
        self.streamed = streamed
        self.slots = _slots(module)
        self.on_compute = False
        self.blocks: list[_Block] = []
        self.order: list[_Block] = []  # blocks in the order the last forward ran them
        self.running: list[_Block] = []  # the current forward's blocks so far
        self.handles: list[Any] = []


class MemoryManager:
    """Places attached components on the compute or offload side as the mode says.

    `transfer` says how tensors move; `on_move(name, where)` is called after every move (the
    tests record it; it is also a debug log). One manager per compute device, shared by every
    model loaded for it, so switching models or running a refiner still keeps one component on
    the device in medvram / lowvram.
    """

    def __init__(self, mode: Mode, transfer: Transfer, *, on_move: OnMove | None = None,
                 prefetch: bool | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown memory mode {mode!r}; choose from {', '.join(MODES)}")
        self.mode = mode
        self.transfer = transfer
        self.on_move = on_move
        cuda = transfer.compute.type == "cuda" and torch.cuda.is_available()
        self.prefetch = cuda if prefetch is None else (prefetch and cuda)
        self._stream: Any = None
        self._active: weakref.ref[_Component] | None = None
        self._lock = threading.RLock()

    # --- what callers use --------------------------------------------------------------------

    @property
    def compute_device(self) -> torch.device:
        return self.transfer.compute

    @property
    def offloads(self) -> bool:
        return self.mode != "normal"

    def attach(self, module: torch.nn.Module, name: str, *, stream: bool = False) -> None:
        """Manage `module` (a text encoder, UNet or VAE): offload it now and install the hooks.
        `stream=True` (the UNet in lowvram) streams its blocks instead of moving it whole."""
        if not self.offloads or getattr(module, "_webui_memory", None) is not None:
            return
        comp = _Component(name, module, streamed=stream and self.mode == "lowvram")
        with self._lock, _ordinary_tensors():
            if comp.streamed:
                self._attach_streamed(comp, module)
            else:
                for slot in comp.slots:
                    slot.set(self.transfer.to_offload(slot.get()))
                hook = self._pre_hook(comp)
                comp.handles.append(module.register_forward_pre_hook(hook))
                for child in module.children():  # VAE encode/decode call children, not forward
                    comp.handles.append(child.register_forward_pre_hook(hook))
        module._webui_memory = comp  # the component lives as long as its module

    def attach_bundle(self, bundle: Any) -> None:
        """Text encoders, UNet (streamed in lowvram) and VAE of a ModelBundle."""
        for i, te in enumerate(bundle.text_encoders):
            self.attach(te.model, f"text_encoder_{i}" if len(bundle.text_encoders) > 1 else "text_encoder")
        self.attach(bundle.unet, "unet", stream=True)
        self.attach(bundle.vae, "vae")

    def activate(self, module: torch.nn.Module) -> None:
        """Bring `module` to the compute device (for a streamed UNet: make room for its blocks)."""
        comp = getattr(module, "_webui_memory", None)
        if comp is not None:
            self._activate(comp)

    def offload(self, module: torch.nn.Module) -> None:
        comp = getattr(module, "_webui_memory", None)
        if comp is not None:
            with self._lock:
                self._offload(comp)
                if self._active is not None and self._active() is comp:
                    self._active = None

    def offload_all(self) -> None:
        """Nothing of the managed models stays on the compute device (e.g. after a job)."""
        with self._lock:
            comp = self._active() if self._active is not None else None
            if comp is not None:
                self._offload(comp)
            self._active = None

    @contextlib.contextmanager
    def use(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`module` on the compute device for the block; offloaded after if the block brought it."""
        comp = getattr(module, "_webui_memory", None)
        if comp is None:
            yield module
            return
        with self._lock:
            was_active = self._active is not None and self._active() is comp
            self._activate(comp)
        try:
            yield module
        finally:
            if not was_active:
                self.offload(module)

    def describe(self) -> str:
        extra = ", blocks prefetched on a second CUDA stream" if self.mode == "lowvram" and self.prefetch else ""
        return f"{self.mode} (compute {self.compute_device}{extra})"

    # --- whole components (medvram) ------------------------------------------------------------

    def _pre_hook(self, comp: _Component) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            if not comp.on_compute or self._active is None or self._active() is not comp:
                self._activate(comp)

        return hook

    def _activate(self, comp: _Component) -> None:
        with self._lock:
            current = self._active() if self._active is not None else None
            if current is not comp:
                if current is not None:
                    self._offload(current)
                self._active = weakref.ref(comp)
            if comp.streamed or comp.on_compute:
                return
            with _ordinary_tensors():
                for slot in comp.slots:
                    slot.set(self.transfer.to_compute(slot.get(), slot.dtype))
            comp.on_compute = True
            self._moved(comp.name, "compute")

    def _offload(self, comp: _Component) -> None:
        if comp.streamed:
            for block in comp.blocks:  # prefetched copies not used
                block.pending, block.event = None, None
            return
        if not comp.on_compute:
            return
        with _ordinary_tensors():
            for slot in comp.slots:
                t = slot.get()
                slot.dtype = t.dtype  # e.g. a VAE upcast for one decode and cast back
                slot.set(self.transfer.to_offload(t))
        comp.on_compute = False
        self._moved(comp.name, "offload")

    def _moved(self, name: str, where: Where) -> None:
        log.debug("memory: %s -> %s", name, where)
        if self.on_move is not None:
            self.on_move(name, where)

    # --- streamed blocks (lowvram) -------------------------------------------------------------

    def _attach_streamed(self, comp: _Component, module: torch.nn.Module) -> None:
        covered: set[int] = set()
        for name, child in _blocks(module, comp.name):
            slots = _slots(child)
            if not slots:
                continue
            block = _Block(name, child, slots)
            covered.update(id(s.get()) for s in slots)
            comp.blocks.append(block)
        rest = [s for s in comp.slots if id(s.get()) not in covered]
        if rest:  # tensors held by the model itself rather than a block: one block for them
            comp.blocks.insert(0, _Block(comp.name, module, rest))
        for block in comp.blocks:
            block.masters = [self.transfer.master(s.get()) for s in block.slots]
            for slot, master in zip(block.slots, block.masters):
                slot.set(master)

        def start(_module: torch.nn.Module, _args: Any) -> None:
            self._activate(comp)  # evicts the text encoder / VAE
            comp.running = []
            if comp.blocks and comp.blocks[0].module is module:
                self._load_block(comp, comp.blocks[0])

        def finish(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
            if comp.running:
                comp.order = comp.running
            comp.running = []
            for block in comp.blocks:
                if block.module is module:
                    self._drop_block(block)
                block.pending, block.event = None, None

        comp.handles.append(module.register_forward_pre_hook(start))
        comp.handles.append(module.register_forward_hook(finish, always_call=True))
        for block in comp.blocks:
            if block.module is module:
                continue
            comp.handles.append(block.module.register_forward_pre_hook(self._block_pre_hook(comp, block)))
            comp.handles.append(block.module.register_forward_hook(self._block_post_hook(block), always_call=True))

    def _block_pre_hook(self, comp: _Component, block: _Block) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            self._load_block(comp, block)

        return hook

    def _block_post_hook(self, block: _Block) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
            self._drop_block(block)

        return hook

    def _load_block(self, comp: _Component, block: _Block) -> None:
        with _ordinary_tensors():
            if block.pending is not None:
                copies, event = block.pending, block.event
                block.pending, block.event = None, None
                if event is not None:
                    torch.cuda.current_stream(self.compute_device).wait_event(event)
            else:
                copies = [self.transfer.to_compute(m, s.dtype) for s, m in zip(block.slots, block.masters)]
            for slot, t in zip(block.slots, copies):
                slot.set(t)
        self._moved(block.name, "compute")
        comp.running.append(block)
        if self.prefetch:
            self._prefetch_next(comp, block)

    def _drop_block(self, block: _Block) -> None:
        for slot, master in zip(block.slots, block.masters):
            slot.set(master)
        self._moved(block.name, "offload")

    def _prefetch_next(self, comp: _Component, block: _Block) -> None:
        """Issue the copy of the block that ran after `block` last time on the side stream."""
        position = len(comp.running)
        if position >= len(comp.order) or comp.order[position - 1] is not block:
            return
        following = comp.order[position]
        if following.pending is not None:
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.compute_device)
        compute = torch.cuda.current_stream(self.compute_device)
        # The copies are allocated on the compute stream, so the allocator hands their memory back
        # only once the compute stream is past their last use; the side stream first waits for what
        # the compute stream has queued so far, so it never writes into memory a finished block
        # still reads. Allocating on the side stream (with record_stream) instead lets reserved
        # memory grow towards the whole UNet while the host runs ahead.
        with _ordinary_tensors():
            targets = [torch.empty_like(m, dtype=s.dtype, device=self.compute_device)
                       for s, m in zip(following.slots, following.masters)]
            self._stream.wait_stream(compute)
            with torch.cuda.stream(self._stream):
                for target, master in zip(targets, following.masters):
                    target.copy_(master, non_blocking=True)
            following.pending = targets
            following.event = torch.cuda.Event()
            following.event.record(self._stream)


@contextlib.contextmanager
def offloaded_after(memory: MemoryManager | None) -> Iterator[None]:
    """Around a job: in medvram / lowvram nothing of its models stays on the compute device
    afterwards, even when the job fails or is interrupted. A no-op in normal mode."""
    try:
        yield
    finally:
        if memory is not None:
            memory.offload_all()


def park(modules: list[torch.nn.Module], transfer: Transfer) -> None:
    """Move whole models to the offload side (a checkpoint kept in RAM by the model cache)."""
    with _ordinary_tensors():
        for module in modules:
            slots = _slots(module)
            for slot in slots:
                slot.set(transfer.to_offload(slot.get()))
            module._webui_parked = slots  # the dtypes to come back in


def unpark(modules: list[torch.nn.Module], transfer: Transfer) -> None:
    """Bring parked models back to the compute device, each tensor in the dtype it left in."""
    with _ordinary_tensors():
        for module in modules:
            for slot in getattr(module, "_webui_parked", None) or _slots(module):
                slot.set(transfer.to_compute(slot.get(), slot.dtype))
            module._webui_parked = None


@contextlib.contextmanager
def _ordinary_tensors() -> Iterator[None]:
    """Moves make ordinary tensors even inside inference mode, so weights keep accepting
    in-place edits (LoRA merges) afterwards."""
    with torch.inference_mode(False), torch.no_grad():
        yield


# --- choosing ------------------------------------------------------------------------------------


def pick_memory_mode(medvram: bool, lowvram: bool, device: torch.device,
                     free_vram: Callable[[torch.device], int] | None = None) -> tuple[Mode, str]:
    """(mode, message): the flag given (lowvram wins over medvram); with no flag, by the CUDA
    device's free memory at start-up (below 3 GiB lowvram, below 6 GiB medvram). Always "normal" on a CPU and on
    Apple MPS (unified memory): there is nothing to offload to. `free_vram` is a parameter so
    tests can stand in for a GPU."""
    flag = "--lowvram" if lowvram else "--medvram" if medvram else None
    if device.type in ("cpu", "mps"):
        if flag:
            return "normal", f"{flag} has no effect on {device.type}: the weights already live in main memory"
        return "normal", "normal"
    if flag:
        return ("lowvram" if lowvram else "medvram"), f"{flag[2:]} ({flag})"
    if device.type != "cuda":
        return "normal", "normal"
    size = (free_vram or _free_vram)(device)
    if size < LOWVRAM_BELOW:
        return "lowvram", f"lowvram (automatic: {size / GIB:.1f} GiB of VRAM free)"
    if size < MEDVRAM_BELOW:
        return "medvram", f"medvram (automatic: {size / GIB:.1f} GiB of VRAM free)"
    return "normal", "normal"


@dataclass(frozen=True)
class VaePlan:
    tiled: bool  # decode / encode in overlapping tiles (diffusers' `use_tiling`)
    sliced: bool  # one image of the batch at a time (diffusers' `use_slicing`)


def vae_plan(width: int, height: int, batch: int, *, device: torch.device, itemsize: int, forced: bool,
             offloading: bool, free_bytes: Callable[[torch.device], int] | None = None) -> VaePlan:
    """Whether a VAE pass over `batch` images of `width` x `height` pixels runs tiled / sliced.

    `forced` (--vae-tiling) tiles and slices always. Otherwise: tiles when one image is larger
    than the budget (on CUDA the estimated decode memory against the free memory, on a CPU
    CPU_TILE_PIXELS), and slices a batch when the whole batch is over that budget or the memory
    mode offloads.
    """
    if forced:
        return VaePlan(True, batch > 1)
    pixels = width * height
    if device.type == "cuda":
        free = (free_bytes or _free_vram)(device)
        budget = max(1, free // (DECODE_BYTES_PER_PIXEL * itemsize))
    else:
        budget = CPU_TILE_PIXELS
    return VaePlan(pixels > budget, batch > 1 and (offloading or pixels * batch > budget))


def _free_vram(device: torch.device) -> int:
    """Free device memory, counting what torch holds cached but does not use (it can reuse it)."""
    free = torch.cuda.mem_get_info(device)[0]
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
