"""Pick the device, the dtypes the model runs in, the attention backend and the memory mode.

float16 on CUDA (and MPS, Intel XPU), bfloat16 on a CPU with native bf16 instructions, float32
otherwise; `--no-half` / `--no-half-vae` force float32 for the whole model / the VAE.
The attention backend is chosen by `webui.runtime.attention.pick_attention`, the memory mode
(`--medvram` / `--lowvram` / automatic by free VRAM) by `webui.runtime.memory.pick_memory_mode`.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from webui.config import Config
from webui.runtime.attention import pick_attention
from webui.runtime.compile import use_compile_cache
from webui.runtime.memory import DeviceTransfer, MemoryManager, Transfer, pick_memory_mode

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # UNet and text encoders
    vae_dtype: torch.dtype
    attention: str = "sdpa"  # "sdpa", "xformers" or "sliced" (see webui.runtime.attention)
    attention_message: str = ""  # what was chosen and, after a fallback, why
    memory: MemoryManager | None = None  # medvram / lowvram (see webui.runtime.memory); None = normal
    vae_tiling: bool = False  # --vae-tiling: always decode/encode in tiles (else only large images)
    float8_packed: bool = False  # float8 and GGUF transformer weights stay packed in memory (--fp8-weights)
    # How a model cached in RAM (--ckpt-cache) leaves the compute device and comes back; None when
    # there is nothing to move (the CPU computes in RAM; medvram / lowvram models already wait there).
    park: Transfer | None = None
    compile: bool = False  # --compile asked (webui.runtime.compile); see `compiles`
    channels_last: bool = False  # UNet and VAE weights in channels-last memory format
    channels_last_why: str = ""  # when chosen automatically: why

    @property
    def memory_mode(self) -> str:
        return self.memory.mode if self.memory is not None else "normal"

    @property
    def compiles(self) -> bool:
        """torch.compile the UNet: asked, and no memory mode moving weights during its forward."""
        return self.compile and self.memory is None

    @property
    def weights_device(self) -> torch.device:
        """Where loaded weights are put: the offload device when a memory mode offloads."""
        if self.memory is not None and self.memory.offloads:
            transfer = self.memory.transfer
            return getattr(transfer, "offload", transfer.compute)
        return self.device

    def describe(self) -> str:
        channels = f"channels-last ({self.channels_last_why})" if self.channels_last_why else "channels-last"
        extras = [name for name, on in (("vae tiling", self.vae_tiling), ("compile", self.compiles),
                                         (channels, self.channels_last)) if on]
        return (f"device={self.device}, dtype={_name(self.dtype)}, vae dtype={_name(self.vae_dtype)}, "
                f"attention={self.attention}, memory={self.memory_mode}{''.join(', ' + e for e in extras)}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bfloat16 natively (AVX512-BF16 / AMX on x86, BF16 on Arm)."""
    machine = platform.machine().lower()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return machine in ("arm64",)  # Apple silicon has bf16
    if machine in ("x86_64", "amd64"):
        return "avx512_bf16" in flags or "amx_bf16" in flags
    if machine in ("aarch64", "arm64"):
        return " bf16" in flags
    return False


def accelerator(config: Config) -> tuple[str, int] | None:
    """The accelerator kind the app uses (CUDA, then Apple MPS, then Intel XPU) and how many
    devices of it there are; None on the CPU (or with --use-cpu)."""
    if config.use_cpu:
        return None
    if torch.cuda.is_available():
        return "cuda", torch.cuda.device_count()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps", 1
    xpu = getattr(torch, "xpu", None)  # Intel GPUs, in torch builds that have them
    if xpu is not None and xpu.is_available():
        return "xpu", xpu.device_count()
    return None


def pick_device(config: Config, index: int = 0) -> torch.device:
    """The accelerator with this index, else the CPU. ValueError for an index past the devices there are."""
    if (found := accelerator(config)) is None:
        return torch.device("cpu")
    kind, count = found
    if index >= count:
        raise ValueError(f"--device-id {index}: this machine has {count} {kind} device(s), numbered from 0")
    return torch.device(kind) if kind == "mps" else torch.device(kind, index)


def pick_runtime(config: Config, index: int = 0) -> Runtime:
    device = pick_device(config, index)
    if config.dtype != "auto":
        dtype = _DTYPES[config.dtype]
    elif device.type in ("cuda", "mps", "xpu"):
        dtype = torch.float16
    elif cpu_has_native_bf16():
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    if config.no_half:
        dtype = torch.float32
    vae_dtype = torch.float32 if (config.no_half or config.no_half_vae) else dtype
    attention, message = pick_attention(config.attention, device)
    if config.attention not in ("auto", attention):
        log.warning("%s", message)
    else:
        log.info("attention: %s", message)
    mode, why = pick_memory_mode(config.medvram, config.lowvram, device)
    log.log(logging.WARNING if "no effect" in why else logging.INFO, "memory: %s", why)
    memory = MemoryManager(mode, DeviceTransfer(device)) if mode != "normal" else None
    park = DeviceTransfer(device) if device.type != "cpu" and memory is None else None
    if config.compile and memory is not None:
        log.warning("--compile is off in %s mode: its hooks move weights while the UNet runs", mode)
    elif config.compile:
        use_compile_cache(config.data_dir)
    channels_last, why = pick_channels_last(config.channels_last, device, dtype)
    return Runtime(device=device, dtype=dtype, vae_dtype=vae_dtype, attention=attention, attention_message=message,
                   memory=memory, vae_tiling=config.vae_tiling, park=park, compile=config.compile,
                   channels_last=channels_last, channels_last_why=why,
                   float8_packed=config.fp8_weights == "packed" or (config.fp8_weights == "auto" and device.type == "cuda"))


def pick_channels_last(asked: bool | None, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """--channels-last / --no-channels-last, else on where bench/step_overhead.py measured it
    faster: the CPU in bfloat16 (0.83-0.88 of the time per step, SD1.5 at 256², 2-core x86).
    Elsewhere (CUDA, float32 CPUs) it has not been measured here, so it stays off."""
    if asked is not None:
        return asked, ""
    if device.type == "cpu" and dtype == torch.bfloat16:
        return True, "auto: measured faster on CPUs in bfloat16; --no-channels-last turns it off"
    return False, ""
