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
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from pathlib import Path


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _not_here(name: str):
    def call(*_args, **_kwargs):
        raise RuntimeError(f"torchvision.transforms.functional.{name} called on the torchvision stand-in "
                           "(webui.testing.torchvision_stand_in): this architecture needs a real torchvision")
    return call


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "STAND-IN (webui.testing.torchvision_stand_in), not torchvision")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec reads it
    return module


def _modules() -> dict[str, types.ModuleType]:
    root = _module("torchvision")
    transforms = _module("torchvision.transforms")
    functional = _module("torchvision.transforms.functional")
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
    install()
    try:
        yield True
    finally:
        _forget("spandrel", "torchvision")


def _forget(*packages: str) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in packages]:
        del sys.modules[name]



def install() -> None:
    """Put the stand-in in `sys.modules` (what the context manager and `write_package` do), once
    diffusers and transformers have made their own torchvision checks: they must keep finding
    none, or they import torchvision features the stand-in does not have."""
    import diffusers.utils.import_utils  # noqa: F401  its check runs at import
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached from now on
    sys.modules.update(_modules())


def write_package(folder: Path) -> Path:
    """A `sitecustomize.py` under `folder` that installs the stand-in when Python starts, for a
    server a test starts in a subprocess (put `folder` on its PYTHONPATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        '"""Installs the torchvision STAND-IN of webui.testing.torchvision_stand_in (a test put this here)."""\n'
        "from webui.testing.torchvision_stand_in import install\n\ninstall()\n")
    return folder
