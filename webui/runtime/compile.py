"""Optional UNet speed-ups: channels-last memory format and `torch.compile`.

`--channels-last` puts the UNet's and VAE's convolution weights in NHWC, the layout cuDNN and
oneDNN prefer for half precision. `--compile` compiles the UNet with `torch.compile` (inductor).
Both are off by default: compiling costs a long first image (tens of seconds to minutes), and on a
CPU the gain is small. Compiled kernels are cached on disk under `<data-dir>/cache/torch-compile`,
so a restart with the same model and size reuses them.

A compile that fails (no C++ compiler on a CPU, an unsupported GPU, a bug in the compiler) never
fails the job: the UNet falls back to running eagerly, with a warning saying why. Compiling is
refused in medvram / lowvram, whose per-block hooks move weights during the forward pass.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def cache_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "cache" / "torch-compile"


def use_compile_cache(data_dir: Path) -> None:
    """Point inductor's on-disk cache at the data folder, unless the user chose a folder.

    Importing diffusers already makes inductor write its default (a temporary folder) into
    TORCHINDUCTOR_CACHE_DIR, so only that default value is replaced; inductor reads the variable
    again whenever it looks for a cached kernel."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir(data_dir).resolve())


def to_channels_last(module: torch.nn.Module) -> None:
    module.to(memory_format=torch.channels_last)


def compile_unet(unet: torch.nn.Module) -> None:
    """Compile `unet`'s forward in place; on the first failure, run it eagerly from then on."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    # diffusers' upsampler asks an lru_cache'd version check on every call; dynamo says so once per
    # process in a multi-line warning that means nothing to a user
    warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools\.lru_cache`")
    compiled = torch.compile(unet._call_impl)  # what nn.Module.compile() installs, kept to wrap it

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except (TorchDynamoException, InductorError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("torch.compile failed, running the UNet without it: %s", first[:300])
            unet._compiled_call_impl = None
            unet._webui_compile_failed = first
            return unet._call_impl(*args, **kwargs)

    unet._compiled_call_impl = call
    unet._webui_compile_failed = None


def compile_state(unet: torch.nn.Module) -> str:
    """'compiled', 'eager' (never asked) or 'failed: <reason>'."""
    failed = getattr(unet, "_webui_compile_failed", None)
    if failed:
        return f"failed: {failed}"
    return "compiled" if getattr(unet, "_compiled_call_impl", None) is not None else "eager"
