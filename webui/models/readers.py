"""Read a weights file into a flat {key: tensor} dict, safely.

- `.safetensors` is memory-mapped (no pickle, no code). Each tensor is copied out of the
  mapping already cast to the dtype it will run in, and its pages are then released, so the
  peak memory is about one copy of the weights rather than file + copy (what
  `safetensors.torch.load_file` costs). The copies run on several threads in big pieces
  (`webui.runtime.convert`), so reading costs about the memory traffic of one copy.
- `.ckpt` / `.pt` / `.pth` / `.bin` are pickles: they are read only with torch's weights-only
  unpickler, which refuses any object outside an allow-list of tensor types, so a file that
  carries code is rejected before that code can run.
- `.gguf` (quantised Flux / SD3.5 transformers, Q8_0, Q5_K, Q4_0, ...) is read with the `gguf`
  package (the `gguf` extra) and each tensor dequantised when it is read: the model then holds
  the weights in the dtype it runs in (a GGUF file saves disk and download, not yet memory).
Any failure is a `ModelError` with a one-line reason naming the file.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from webui.models.errors import ModelError
from webui.models.registry import GGUF_SUFFIXES, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WEIGHT_SUFFIXES
from webui.runtime.convert import Source, convert_into

StateDict = dict[str, torch.Tensor]
# (key, dtype in the file) -> dtype to keep it in, or None to skip the tensor
Select = Callable[[str, torch.dtype], "torch.dtype | None"]

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_state_dict(path: Path, select: Select | None = None, device: torch.device | None = None,
                    keep_quantized: bool = False) -> StateDict:
    """All tensors of `path`; with `select`, only those it keeps, in the dtype it names.

    `device` (safetensors only): put the tensors straight there, piece by piece from the file
    mapping, without a full copy in process memory first (an accelerator load). Default: the CPU.
    `keep_quantized` (GGUF): 2-D weights in the block types `webui.runtime.gguf` computes with
    stay quantised (`QuantizedTensor`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError("file not found", path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            return _read_safetensors(path, select, device)
        except OSError as e:
            raise ModelError(f"could not read the file: {e.strerror or e}", path) from None
    if suffix in PICKLE_SUFFIXES:
        sd = _apply(_read_pickle(path), select)
        return sd if device is None or device.type == "cpu" else {k: v.to(device) for k, v in sd.items()}
    if suffix in GGUF_SUFFIXES:
        sd = _read_gguf(path, select, keep_quantized)
        return sd if device is None or device.type == "cpu" else {k: v.to(device) for k, v in sd.items()}
    raise ModelError(f"unsupported file type {suffix!r} (expected one of {', '.join(WEIGHT_SUFFIXES)})", path)


def _read_gguf(path: Path, select: Select | None, keep_quantized: bool = False) -> StateDict:
    """Every tensor of a GGUF file, dequantised (to float32, then the dtype `select` names; a
    float32 / float16 / bfloat16 tensor as stored when `select` keeps it), or with `keep_quantized`
    the 2-D ones in a block type kept quantised as their blocks."""
    from webui.runtime.gguf import BLOCK_BYTES, QuantizedTensor

    try:
        import gguf
    except ImportError:
        raise ModelError("GGUF files need the gguf package: pip install 'sd-webui[gguf]'", path) from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, struct.error) as e:
        raise ModelError(f"not a readable GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                         path) from None
    out: StateDict = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        if keep_quantized and len(shape) == 2 and t.tensor_type.name in BLOCK_BYTES:
            if select is None or select(t.name, torch.float32) is not None:
                blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(shape[0], -1))
                out[t.name] = QuantizedTensor.wrap(blocks, t.tensor_type.name, shape[1])
            _release(reader, t.data_offset, t.n_bytes)
            continue
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            # a dequantised array is new memory; float32/16 ones are views of the read-only mapping
            values = torch.from_numpy(array if array.flags.writeable else array.copy())
        except (NotImplementedError, ValueError) as e:
            raise ModelError(f"tensor {t.name}: {e}", path) from None
        dtype = select(t.name, values.dtype) if select is not None else values.dtype
        if dtype is not None:
            out[t.name] = values.to(dtype)
        del values
        _release(reader, t.data_offset, t.n_bytes)
    return out


def _release(reader: object, offset: int, size: int) -> None:
    """Drop a read tensor's pages of the file mapping from the process (they stay in the page
    cache), so reading a GGUF file does not hold the file beside the weights made from it."""
    mapping = getattr(getattr(reader, "data", None), "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and size > 0:
        lo = offset // mmap.PAGESIZE * mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, lo, offset + size - lo)


def _apply(sd: StateDict, select: Select | None) -> StateDict:
    if select is None:
        return sd
    out = {}
    jobs: list[tuple[Source, torch.Tensor]] = []
    for key in list(sd):
        tensor = sd.pop(key)
        dtype = select(key, tensor.dtype)
        if dtype is None:
            continue
        if dtype == tensor.dtype:
            out[key] = tensor
            continue
        with torch.inference_mode(False):
            out[key] = torch.empty(tensor.shape, dtype=dtype)
        if tensor.numel():
            jobs.append((Source.of(tensor), out[key]))
    convert_into(jobs)
    return out


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` table of a weights file (training tools' notes), read from the header
    alone; {} for a pickle, a file without one, or one whose header cannot be read (loading it
    says why)."""
    meta = _header_of(path).get("__metadata__")
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, read from a safetensors header alone ({} as `safetensors_metadata`)."""
    return {k: tuple(v["shape"]) for k, v in _header_of(path).items()
            if isinstance(v, dict) and isinstance(v.get("shape"), list)}


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a safetensors or GGUF file, read without the tensors ([] for a pickle
    or a file that cannot be read: loading it says why)."""
    if Path(path).suffix.lower() in GGUF_SUFFIXES:
        try:
            import gguf
        except ImportError:
            return []
        try:
            return [t.name for t in gguf.GGUFReader(str(path)).tensors]
        except (ValueError, OSError, struct.error):
            return []
    return [k for k in _header_of(path) if k != "__metadata__"]


def _header_of(path: Path) -> dict:
    if Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    try:
        with open(path, "rb") as f:
            return _safetensors_header(f, os.fstat(f.fileno()).st_size, path)[0]
    except (OSError, ModelError):
        return {}


def _safetensors_header(f, size: int, path: Path) -> tuple[dict, int]:
    raw = f.read(8)
    if len(raw) < 8:
        raise ModelError("not a safetensors file (too short)", path)
    (length,) = struct.unpack("<Q", raw)
    if length > size - 8 or length > 100_000_000:
        raise ModelError("not a safetensors file (bad header length; truncated or corrupt)", path)
    try:
        header = json.loads(f.read(length))
    except ValueError:
        raise ModelError("not a safetensors file (unreadable header)", path) from None
    if not isinstance(header, dict):
        raise ModelError("not a safetensors file (header is not a table)", path)
    return header, 8 + length


def _read_safetensors(path: Path, select: Select | None, device: torch.device | None) -> StateDict:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, start = _safetensors_header(f, size, path)
        if size == start:
            return {}
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out: StateDict = {}
    jobs: list[tuple[Source, torch.Tensor]] = []
    try:
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = [int(n) for n in info["shape"]]
                begin, end = (int(n) for n in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"not a safetensors file (bad entry for {key!r})", path) from None
            numel = 1
            for n in shape:
                numel *= n
            if not 0 <= begin <= end or start + end > size or end - begin != numel * dtype.itemsize:
                raise ModelError(f"truncated or corrupt: tensor {key!r} lies outside the file", path)
            keep = select(key, dtype) if select else dtype
            if keep is None:
                continue
            # Ordinary tensors even when the caller is in inference mode: weights must accept
            # in-place edits (LoRA merges, VAE upcasts) later, and workers fill them from other threads.
            with torch.inference_mode(False):
                out[key] = torch.empty(shape, dtype=keep, device=device)
            if numel:
                jobs.append((_mapped(mapping, start + begin, dtype, numel), out[key]))
        jobs.sort(key=lambda job: job[0].offset)  # in file order: the reads stream
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": only read from
            convert_into(jobs)
    finally:
        jobs.clear()
        try:
            mapping.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass
    return out


@dataclass(frozen=True)
class _Mapped(Source):
    offset: int = 0


def _mapped(mapping: mmap.mmap, offset: int, dtype: torch.dtype, numel: int) -> _Mapped:
    """A tensor's elements inside the file mapping; released pages leave the process's memory
    (they stay in the page cache), so the peak is about one copy of the weights, not file + copy."""
    item = dtype.itemsize

    def read(a: int, b: int) -> torch.Tensor:
        return torch.frombuffer(mapping, dtype=dtype, count=b - a, offset=offset + a * item)

    def release(a: int, b: int) -> None:
        if hasattr(mapping, "madvise"):
            lo = (offset + a * item) // mmap.PAGESIZE * mmap.PAGESIZE
            mapping.madvise(mmap.MADV_DONTNEED, lo, offset + b * item - lo)

    return _Mapped(numel, read, release, offset)


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
    """Checkpoints nest the weights under `state_dict` (Lightning), upscalers under `params_ema`
    or `params` (Real-ESRGAN), or store them at the top."""
    if isinstance(obj, dict):
        for key in ("state_dict", "params_ema", "params"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ModelError(f"expected a dict of tensors, found {type(obj).__name__}", path)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError("the file holds no tensors", path)
    return tensors
