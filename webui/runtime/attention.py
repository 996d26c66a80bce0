"""Attention backends for the UNet and the VAE: which one runs, and installing it.

Owns the backend names, `pick_attention` (the backend asked for + the device -> the backend that
will run, with a message saying why when that is not the one asked for), `apply_attention`
(installs a backend on loaded modules through diffusers' attention-processor seam,
`set_attn_processor`; no library class is patched) and `ChunkedAttnProcessor`, the "sliced"
backend.

Backends:
- "sdpa": PyTorch `scaled_dot_product_attention` (diffusers' `AttnProcessor2_0`), the default.
- "xformers": xformers' memory-efficient attention (diffusers' `XFormersAttnProcessor`); used
  only on CUDA, after `import xformers.ops` works and a tiny call succeeds. Any failure falls
  back to SDPA with a message, never a crash.
- "sliced": attention computed a block of queries at a time, so the score matrix held at once
  is bounded (`max_bytes`), for memory-limited devices (CPU, MPS, small GPUs).

diffusers' newer attention dispatcher (`ModelMixin.set_attention_backend`) only reaches
processors that call `dispatch_attention_fn`; the UNet2DConditionModel / AutoencoderKL
`Attention` layers run `AttnProcessor2_0`, which calls SDPA itself, so the processor seam is the
one that changes what these models run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "xformers", "sliced")
REQUESTS = ("auto", *BACKENDS)
_DESCRIPTION = {
    "sdpa": "PyTorch SDPA",
    "xformers": "xformers memory-efficient attention",
    "sliced": "sliced attention (query blocks)",
}


def import_xformers() -> ModuleType:
    """`xformers.ops`, when xformers imports and diffusers sees it (its processor needs that)."""
    import xformers.ops  # optional dependency (the `xformers` extra, CUDA only)
    from diffusers.utils import is_xformers_available

    if not is_xformers_available():
        raise ImportError("diffusers does not see the installed xformers")
    return xformers.ops


def probe_xformers(ops: ModuleType, device: torch.device) -> None:
    """Tiny attention calls on `device` in float16 and float32 (a float32 VAE uses the same
    processor); raises when this xformers build cannot run there."""
    for dtype in (torch.float16, torch.float32):
        q = torch.randn((1, 2, 40), device=device, dtype=dtype)
        out = ops.memory_efficient_attention(q, q, q)
        if not torch.isfinite(out).all():  # also waits for the kernel, so launch errors surface here
            raise RuntimeError(f"non-finite result in {str(dtype).removeprefix('torch.')}")


def _why(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def pick_attention(
    requested: str,
    device: torch.device,
    *,
    import_ops: Callable[[], ModuleType] = import_xformers,
    probe: Callable[[ModuleType, torch.device], None] = probe_xformers,
) -> tuple[str, str]:
    """(backend, message) for `requested` ("auto", "sdpa", "xformers", "sliced") on `device`.

    "auto" is xformers on CUDA when it imports and passes `probe`, SDPA otherwise. The message
    names the backend and, when it is not the one asked for, why. `import_ops` and `probe` are
    parameters so a test can stand in for an xformers build or a CUDA device it does not have.
    """
    if requested not in REQUESTS:
        raise ValueError(f"unknown attention backend {requested!r}; choose from {', '.join(REQUESTS)}")
    if requested in ("sdpa", "sliced"):
        return requested, _DESCRIPTION[requested]
    asked = "xformers requested but " if requested == "xformers" else "xformers "
    if device.type != "cuda":
        if requested == "auto":
            return "sdpa", _DESCRIPTION["sdpa"]
        return "sdpa", f"{asked}the device is {device.type} (xformers runs on CUDA only): using PyTorch SDPA"
    try:
        ops = import_ops()
    except Exception as e:  # a broken build fails in many ways (ImportError, OSError, RuntimeError)
        return "sdpa", f"{asked}not importable ({_why(e)}): using PyTorch SDPA"
    try:
        probe(ops, device)
    except Exception as e:  # e.g. NotImplementedError "No operator found", CUDA errors
        return "sdpa", f"{asked}failed a test call on {device} ({_why(e)}): using PyTorch SDPA"
    return "xformers", _DESCRIPTION["xformers"]


class ChunkedAttnProcessor:
    """SDPA over blocks of queries: each block attends to every key, so the result is the same
    as one SDPA call while the scores held at once are at most `max_bytes` (or `query_chunk`
    queries). Mirrors diffusers' `AttnProcessor2_0` around the attention itself."""

    def __init__(self, max_bytes: int = 128 << 20, query_chunk: int | None = None) -> None:
        if query_chunk is not None and query_chunk < 1:
            raise ValueError("query_chunk must be at least 1")
        self.max_bytes = max_bytes
        self.query_chunk = query_chunk

    def chunk_size(self, query: torch.Tensor, key_tokens: int) -> int:
        """Queries per block for `query` shaped [batch, heads, tokens, head_dim]."""
        if self.query_chunk is not None:
            return self.query_chunk
        per_query = query.shape[0] * query.shape[1] * key_tokens * query.element_size()
        return max(1, self.max_bytes // per_query)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        tokens = query.shape[2]
        step = self.chunk_size(query, key.shape[2])
        out = query.new_empty((batch_size, attn.heads, tokens, value.shape[-1]))
        for start in range(0, tokens, step):
            stop = min(start + step, tokens)
            mask = attention_mask
            if mask is not None and mask.shape[2] > 1:
                mask = mask[:, :, start:stop]
            out[:, :, start:stop] = F.scaled_dot_product_attention(
                query[:, :, start:stop], key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )

        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def make_processor(backend: str, *, query_chunk: int | None = None) -> Any:
    """A fresh diffusers attention processor for `backend` (stateless: one serves every layer)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    if backend == "sdpa":
        return AttnProcessor2_0()
    if backend == "xformers":
        return XFormersAttnProcessor()
    if backend == "sliced":
        return ChunkedAttnProcessor(query_chunk=query_chunk)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")


def _ours(processor: Any) -> bool:
    """Processors a backend may replace; anything else (an extension's, IP-Adapter's) stays."""
    from diffusers.models.attention_processor import (
        AttnProcessor,
        AttnProcessor2_0,
        SlicedAttnProcessor,
        XFormersAttnProcessor,
    )

    return isinstance(processor, (AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor, XFormersAttnProcessor,
                                  ChunkedAttnProcessor))


def _modules(target: Any) -> list[Any]:
    if hasattr(target, "unet") and hasattr(target, "vae"):  # a ModelBundle
        return [target.unet, target.vae]
    if hasattr(target, "set_attn_processor"):
        return [target]
    return list(target)


def apply_attention(target: Any, backend: str, *, query_chunk: int | None = None) -> int:
    """Install `backend` on every attention layer of `target`: a ModelBundle (its UNet and VAE),
    one diffusers model, or an iterable of them. Returns how many layers were set.

    `query_chunk` fixes the block size of the "sliced" backend (default: sized by memory).
    """
    processor = make_processor(backend, query_chunk=query_chunk)
    count = 0
    for model in _modules(target):
        current = model.attn_processors
        if not current:
            continue
        chosen = {name: processor if _ours(p) else p for name, p in current.items()}
        count += sum(1 for p in chosen.values() if p is processor)
        model.set_attn_processor(chosen)
    log.debug("attention backend %s on %d layers", backend, count)
    return count


def attention_backend_of(models: Iterable[Any]) -> set[str]:
    """The backend names the attention layers of `models` run (for tests and diagnostics)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    names = {AttnProcessor2_0: "sdpa", XFormersAttnProcessor: "xformers", ChunkedAttnProcessor: "sliced"}
    return {names.get(type(p), type(p).__name__) for m in models for p in m.attn_processors.values()}
