"""Read a weights file into a flat {key: tensor} dict, safely.

- `.safetensors` is memory-mapped (no pickle, no code).
- `.ckpt` / `.pt` / `.pth` / `.bin` are pickles: they are read only with torch's weights-only
  unpickler, which refuses any object outside an allow-list of tensor types, so a file that
  carries code is rejected before that code can run.
Any failure is a `ModelError` with a one-line reason naming the file.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from webui.models.errors import ModelError
from webui.models.registry import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WEIGHT_SUFFIXES

StateDict = dict[str, torch.Tensor]


def read_state_dict(path: Path) -> StateDict:
    path = Path(path)
    if not path.is_file():
        raise ModelError("file not found", path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise ModelError(f"unsupported file type {suffix!r} (expected one of {', '.join(WEIGHT_SUFFIXES)})", path)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` block of a safetensors header, without reading any tensor."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                return {}
            header = json.loads(f.read(length))
        return dict(header.get("__metadata__") or {})
    except (OSError, ValueError, struct.error):
        return {}


def _read_safetensors(path: Path) -> StateDict:
    try:
        return load_file(path, device="cpu")
    except SafetensorError as e:
        raise ModelError(f"not a readable safetensors file (truncated or corrupt): {e}", path) from None
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"could not read safetensors file: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", path) from None


def _read_pickle(path: Path) -> StateDict:
    # mmap needs the zip-based format torch.save writes since 1.6; older files are read whole.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            "refused to load: the pickle holds objects outside the weights-only allow-list "
            f"(it may contain code; nothing in it was run). Convert it to .safetensors. Detail: {first}",
            path,
        ) from None
    except Exception as e:  # noqa: BLE001  the unpickler raises anything on garbage input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"not a readable checkpoint (truncated or corrupt): {first}", path) from None
    return _flatten(obj, path)


def _flatten(obj: object, path: Path) -> StateDict:
    """Checkpoints nest the weights under `state_dict` (Lightning) or store them at the top."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"expected a dict of tensors, found {type(obj).__name__}", path)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError("the file holds no tensors", path)
    return tensors
