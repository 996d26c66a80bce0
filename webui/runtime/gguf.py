"""GGUF-quantised weights kept quantised in memory, dequantised per layer when it runs.

A GGUF transformer (city96's Flux / SD3.5 files) stores its big 2-D weights in blocks of 32
values: Q8_0 (8-bit), Q4_0 / Q4_1 / Q5_0 / Q5_1 (4- and 5-bit, with or without an offset), or in
super-blocks of 256 with 6-bit sub-block scales: Q4_K, Q5_K, Q6_K (the _S / _M files). With
`--fp8-weights packed` (the default on CUDA) such a weight stays as its raw blocks, a uint8
tensor of one row per output row, and its linear layer dequantises it on the device each call:
memory is the file's, arithmetic the runtime dtype's, and the values exactly those gguf's own
dequantiser gives. Other block types (Q2_K, Q3_K, the IQ types) are dequantised as the file is read.

On the way from the file to the model a weight goes through key renames and the layout
converter, which cut and join fused layers by rows (Flux's qkv, linear1): `QuantizedTensor` does
those on the raw rows, answers `.shape` with the weight's own, and dequantises for anything else.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# block type -> bytes a block takes (32 values; the K-quants' super-blocks hold 256)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _f16(raw: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as float32 [blocks, 1]."""
    return raw[:, start:start + 2].contiguous().view(torch.float16).float()


def _shifted(q: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """Each byte of q [blocks, groups, n] shifted by each of `shifts` and masked:
    [blocks, groups * len(shifts), n], the shifts' results after one another."""
    by = torch.tensor(shifts, dtype=torch.uint8, device=q.device).reshape(1, 1, -1, 1)
    return ((q.unsqueeze(2) >> by) & mask).reshape(q.shape[0], -1, q.shape[-1])


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: the low halves are values 0-15, the high halves 16-31."""
    return _shifted(qs.unsqueeze(1), [0, 4], 0x0F).flatten(1)


def _high_bits(raw: torch.Tensor, start: int) -> torch.Tensor:
    """The fifth bit of each of the 32 values, from the little-endian 32-bit field at `start`."""
    return _shifted(raw[:, start:start + 4].unsqueeze(-1), list(range(8)), 0x01).flatten(1)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 8 six-bit scales and minimums packed in 12 bytes -> two [blocks, 8, 1]."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float().unsqueeze(-1), mn.float().unsqueeze(-1)


def _k_quant(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """A K-quant's super-blocks of 256 values -> [blocks, 256] float32."""
    n = blocks.shape[0]
    if qtype == "Q6_K":
        low = _shifted(blocks[:, :128].reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)
        high = _shifted(blocks[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6], 0x03)
        q = (low | (high << 4)).float() - 32
        scales = blocks[:, 192:208].contiguous().view(torch.int8).float() * _f16(blocks, 208)
        return (scales.unsqueeze(-1) * q.reshape(n, 16, 16)).reshape(n, 256)
    sc, mn = _k_scales(blocks[:, 4:16])
    scale, offset = _f16(blocks, 0).unsqueeze(-1) * sc, _f16(blocks, 2).unsqueeze(-1) * mn
    if qtype == "Q4_K":
        q = _shifted(blocks[:, 16:].reshape(n, 4, 32), [0, 4], 0x0F)
    else:  # Q5_K: 32 bytes of fifth bits, a bit per group of 32, then the low nibbles
        high = _shifted(blocks[:, 16:48].reshape(n, 1, 32), list(range(8)), 0x01)
        q = _shifted(blocks[:, 48:].reshape(n, 4, 32), [0, 4], 0x0F) | (high << 4)
    return (scale * q.float() - offset).reshape(n, 256)


def dequantize(raw: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw blocks (uint8 [rows, blocks * bytes]) -> values [rows, blocks * 32] in `dtype`."""
    rows = raw.shape[0]
    blocks = raw.reshape(-1, BLOCK_BYTES[qtype])
    if qtype == "Q8_0":
        values = blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks, 0)
    elif qtype == "Q4_0":
        values = (_nibbles(blocks[:, 2:]).float() - 8) * _f16(blocks, 0)
    elif qtype == "Q4_1":
        values = _nibbles(blocks[:, 4:]).float() * _f16(blocks, 0) + _f16(blocks, 2)
    elif qtype == "Q5_0":
        q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks, 2) << 4)
        values = (q.float() - 16) * _f16(blocks, 0)
    elif qtype == "Q5_1":
        q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks, 4) << 4)
        values = q.float() * _f16(blocks, 0) + _f16(blocks, 2)
    elif qtype.endswith("_K"):
        values = _k_quant(blocks, qtype)
    else:
        raise ValueError(f"GGUF block type {qtype} is not kept quantised")
    return values.reshape(rows, -1).to(dtype)


class QuantizedTensor(torch.Tensor):
    """A quantised 2-D weight on its way into a model: the raw blocks (uint8 [rows, bytes]) with
    the block type; `.shape` is the weight's [rows, columns]. Row cuts and joins (split, chunk, cat
    and row slices) stay quantised, `.to(device)` moves it, anything else sees the float values."""

    qtype: str
    columns: int

    @staticmethod
    def wrap(raw: torch.Tensor, qtype: str, columns: int) -> QuantizedTensor:
        out = raw.as_subclass(QuantizedTensor)
        out.qtype, out.columns = qtype, columns
        return out

    def raw(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return torch.Size((self.raw().shape[0], self.columns))

    def size(self, dim: int | None = None):  # type: ignore[override]
        return self.shape if dim is None else self.shape[dim]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.raw(), self.qtype, dtype)

    @classmethod
    def __torch_function__(cls, func: Any, types_: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handled = _ROW_OPS.get(func)
        if handled is not None:
            result = handled(*args, **kwargs)
            if result is not NotImplemented:
                return result
        with torch._C.DisableTorchFunctionSubclass():
            return func(*_plain(args), **_plain(kwargs))


def _plain(value: Any) -> Any:
    """`value` with every QuantizedTensor in it dequantised (float32)."""
    if isinstance(value, QuantizedTensor):
        return value.dequantized()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _like(source: QuantizedTensor, raw: torch.Tensor) -> QuantizedTensor:
    return QuantizedTensor.wrap(raw, source.qtype, source.columns)


def _split(t: QuantizedTensor, sizes: Any, dim: int = 0) -> Any:
    if dim not in (0, -2):
        return NotImplemented
    return tuple(_like(t, part) for part in t.raw().split(sizes, dim=0))


def _chunk(t: QuantizedTensor, chunks: int, dim: int = 0) -> Any:
    if dim not in (0, -2):
        return NotImplemented
    return tuple(_like(t, part) for part in t.raw().chunk(chunks, dim=0))


def _cat(tensors: Any, dim: int = 0, **_: Any) -> Any:
    tensors = list(tensors)
    if dim not in (0, -2) or not all(isinstance(t, QuantizedTensor) for t in tensors) or \
            len({(t.qtype, t.columns) for t in tensors}) != 1:
        return NotImplemented
    return _like(tensors[0], torch.cat([t.raw() for t in tensors], dim=0))


def _getitem(t: QuantizedTensor, index: Any) -> Any:
    rows = index[0] if isinstance(index, tuple) and len(index) == 1 else index
    if not isinstance(rows, slice) or (rows.step or 1) != 1:
        return NotImplemented
    return _like(t, t.raw()[rows])


def _to(t: QuantizedTensor, *args: Any, **kwargs: Any) -> Any:
    dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
    if dtype is not None and dtype != torch.uint8:
        return NotImplemented  # a cast: the float values
    device = kwargs.get("device") or next((a for a in args if isinstance(a, (torch.device, str))), None)
    return _like(t, t.raw().to(device=device, copy=bool(kwargs.get("copy")))) if device is not None else t


def _same(t: QuantizedTensor, *_: Any, **__: Any) -> QuantizedTensor:
    return t


_ROW_OPS: dict[Any, Any] = {
    torch.split: _split, torch.Tensor.split: _split, torch.chunk: _chunk, torch.Tensor.chunk: _chunk,
    torch.cat: _cat, torch.concat: _cat, torch.Tensor.__getitem__: _getitem, torch.Tensor.to: _to,
    torch.Tensor.contiguous: _same, torch.Tensor.detach: _same,
}


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(x.dtype)
    out = F.linear(x, dequantize(self.qweight, self.qtype, x.dtype), bias)
    for down, up, scale in self.lora_factors:  # LoRAs of this job, low-rank (webui.networks.lora)
        out = out + F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype)) * scale
    return out


def keep_quantized(layer: nn.Linear, weight: QuantizedTensor, device: torch.device) -> None:
    """Make `layer` (built on the meta device) hold `weight`'s blocks and dequantise them per call.
    A LoRA cannot be merged into blocks: its factors go to `layer.lora_factors` for the job."""
    del layer.weight
    layer.register_buffer("qweight", weight.raw().to(device), persistent=False)
    layer.qtype = weight.qtype
    layer.lora_factors = []
    layer.forward = types.MethodType(_forward, layer)


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "qweight", None), torch.Tensor) and hasattr(layer, "qtype")
