"""Image models through spandrel: every architecture it recognises from a state dict alone
(ESRGAN, Real-ESRGAN, Compact, SwinIR, HAT, DAT, SCUNet, OmniSR, SPAN, GFPGAN, ...).

`import spandrel` imports torchvision, whose compiled ops must match the installed torch build;
where they do not (or torchvision is missing), importing fails. `Spandrel` tries once, keeps the
reason, and the registry then uses the built-in RRDBNet / SRVGGNetCompact loaders
(`webui.upscale.arch`) alone. The weights always come from our reader (safetensors, or pickles
through the weights-only unpickler): spandrel only sees a state dict.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from webui.models.errors import ModelError
from webui.upscale.arch import Network, StateDict

log = logging.getLogger(__name__)

UPSCALE_PURPOSES = frozenset({"SR", "Restoration"})  # what an upscaler may be (Restoration: 1x)
_PURPOSE_TEXT = {"FaceSR": "face restoration (put it in models/GFPGAN or models/Codeformer)",
                 "Inpainting": "inpainting", "SR": "upscaling", "Restoration": "restoration (1x)"}


class Spandrel:
    """spandrel, imported on first use; `problem` says why it cannot be (None once it is)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self._module: Any = None
        self.problem: str | None = None

    def module(self) -> Any:
        """The spandrel module, or None (the reason in `problem`, logged once)."""
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import spandrel  # it imports torchvision: only when needed
                    self._module = spandrel
                    _install_extra_arches(spandrel)
                except Exception as e:  # noqa: BLE001  a torchvision for another torch raises RuntimeError
                    if isinstance(e, ModuleNotFoundError) and e.name == "spandrel":
                        self.problem = NOT_INSTALLED
                    else:
                        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                        self.problem = _problem_text(f"{type(e).__name__}: {first}" if first else type(e).__name__)
                    log.warning("%s", self.problem)
            return self._module


def _install_extra_arches(spandrel: Any) -> None:
    """CodeFormer and the other architectures under non-commercial or other licences, from the
    optional `spandrel_extra_arches` (the `codeformer` extra), when the user installed it."""
    try:
        import spandrel_extra_arches  # optional dependency
    except Exception:  # noqa: BLE001  absent, or built for another spandrel
        return
    spandrel_extra_arches.install(ignore_duplicates=True)
    log.info("spandrel %s with its extra architectures", spandrel.__version__)


NOT_INSTALLED = ("spandrel is not installed: upscalers load through the built-in ESRGAN / Real-ESRGAN / Compact "
                 "loaders only, and face restoration is off. `python launch.py` installs it; by hand, install "
                 "torchvision built for your torch, then pip install 'sd-webui[upscalers]'.")


def _problem_text(error: str) -> str:
    return (f"spandrel cannot be imported ({error}): upscalers load through the built-in ESRGAN / Real-ESRGAN / "
            f"Compact loaders only, and face restoration is off. spandrel needs a torchvision built for this torch "
            f"({torch.__version__}): install both from the same index (TORCH_COMMAND, see the README).")


class _Described(nn.Module):
    """A spandrel model descriptor as a module: its call pads to the size requirements, runs the
    model and keeps the output in [0, 1]."""

    def __init__(self, descriptor: Any) -> None:
        super().__init__()
        self.model = descriptor.model  # registered, so that .to() moves it
        self._descriptor = descriptor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._descriptor(x)


def describe(spandrel: Any, sd: StateDict, path: Path | None) -> Any:
    """spandrel's descriptor of the model `sd` holds; ModelError naming the file otherwise."""
    try:
        return spandrel.ModelLoader().load_from_state_dict(sd)
    except spandrel.UnsupportedModelError:
        sample = ", ".join(sorted(sd)[:4]) or "no tensors"
        raise ModelError(f"not a model spandrel {spandrel.__version__} knows (found keys such as {sample})",
                         path) from None
    except Exception as e:  # noqa: BLE001  a known architecture with shapes it cannot make sense of
        text = " ".join(str(e).split())
        text = text if len(text) <= 240 else text[:240] + " ..."  # load_state_dict lists every tensor
        raise ModelError(f"spandrel recognised no usable model in it ({type(e).__name__}: {text})", path) from None


def build_network(spandrel: Any, sd: StateDict, path: Path | None = None) -> Network:
    """The upscaler `sd` holds, through spandrel (on CPU, float32)."""
    descriptor = describe(spandrel, sd, path)
    purpose = getattr(descriptor, "purpose", "?")
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or purpose not in UPSCALE_PURPOSES:
        raise ModelError(f"a {descriptor.architecture.name} model for {_PURPOSE_TEXT.get(purpose, purpose)}, "
                         "not an upscaler", path)
    return Network(_Described(descriptor), scale=descriptor.scale, channels=descriptor.input_channels,
                   multiple=1, arch=descriptor.architecture.name, half=descriptor.supports_half,
                   bfloat16=descriptor.supports_bfloat16)
