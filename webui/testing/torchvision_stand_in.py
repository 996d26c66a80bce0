"""A STAND-IN for `torchvision`, for tests and benchmarks on a machine where no torchvision
matching the installed torch exists (this project's CI: a local CPU build of torch 2.13, for which
PyPI's torchvision 0.28.0 fails at import with "operator torchvision::nms does not exist").

`import spandrel` imports two names from `torchvision.transforms.functional` (for its LaMa and
RestoreFormer architectures). This module provides exactly those names, and calling any of them
raises, so spandrel's real detection and inference of every other architecture can run. The
product never installs it: the app falls back to its built-in loaders when torchvision is
missing or broken (webui.upscale.spandrel_arch).
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import sys
import types
from collections.abc import Iterator


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _not_here(name: str):
    def call(*_args, **_kwargs):
        raise RuntimeError(f"torchvision.transforms.functional.{name} called on the torchvision stand-in "
                           "(webui.testing.torchvision_stand_in): this architecture needs a real torchvision")
    return call


def _modules() -> dict[str, types.ModuleType]:
    root = types.ModuleType("torchvision")
    root.__doc__ = "STAND-IN (webui.testing.torchvision_stand_in), not torchvision"
    root.__version__ = "0.0.0+stand-in"
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = _InterpolationMode
    functional.rotate = _not_here("rotate")
    functional.normalize = _not_here("normalize")
    root.transforms, transforms.functional = transforms, functional
    return {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}


def real_torchvision_works() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # noqa: BLE001  a torchvision for another torch build raises RuntimeError at import
        _forget("torchvision")
        return False


@contextlib.contextmanager
def torchvision_stand_in() -> Iterator[bool]:
    """While the block runs, `import torchvision` gives the stand-in -- unless a working torchvision
    is installed, which is then used as it is. Yields True when the stand-in is in place. spandrel
    is imported afresh inside the block and dropped after it, so nothing keeps the stand-in."""
    if real_torchvision_works():
        yield False
        return
    _forget("spandrel")  # a failed import may have left some of its submodules
    sys.modules.update(_modules())
    try:
        yield True
    finally:
        _forget("spandrel", "torchvision")


def _forget(*packages: str) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in packages]:
        del sys.modules[name]
