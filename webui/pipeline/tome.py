"""Token merging (ToMe for Stable Diffusion, Bolya & Hoffman 2023), the method behind A1111's
"Token merging ratio" setting: in the self-attention of the highest-resolution transformer
blocks, the most similar tokens are merged before attention and copied back after it, so
attention works on fewer tokens.

As the paper's SD version does: tokens are split into destinations (one per 2x2 cell of the
latent grid, here always its top-left token, so the same seed gives the same image) and sources
(the rest); each source finds its most similar destination (cosine similarity); the `ratio` of
all tokens whose match is best are averaged into their destination; after attention each merged
token takes its destination's output. Only self-attention (`attn1`) at the full latent
resolution is merged -- what A1111's default applies.

Installed per sampling run as attention processors wrapping the ones in use, and removed after
it; the UNet is never modified otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

Merge = Callable[[torch.Tensor], torch.Tensor]


def bipartite_merge(x: torch.Tensor, w: int, h: int, ratio: float) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens `x` [B, N, C] on an h x w grid (N == h * w)."""
    b, n, _ = x.shape
    r = int(n * ratio)
    hs, ws = h // 2, w // 2
    if r <= 0 or hs == 0 or ws == 0:
        return (lambda t: t), (lambda t: t)
    grid = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    grid[: hs * 2 : 2, : ws * 2 : 2] = True  # the destination of each 2x2 cell
    flat = grid.flatten()
    dst_idx = flat.nonzero().squeeze(1)
    src_idx = (~flat).nonzero().squeeze(1)
    r = min(r, src_idx.numel())
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)  # [B, S, D]
        best, best_dst = scores.max(dim=-1)  # each source's best destination
        order = best.argsort(dim=-1, descending=True)
        merged_src = order[:, :r]  # positions within src_idx
        kept_src = order[:, r:]
        merged_dst = best_dst.gather(1, merged_src)

    def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))

    src_pos = src_idx[None].expand(b, -1)
    kept_pos, merged_pos = src_pos.gather(1, kept_src), src_pos.gather(1, merged_src)

    def merge(t: torch.Tensor) -> torch.Tensor:
        dst = take(t, dst_idx[None].expand(b, -1)).float()
        counts = torch.ones(b, dst.shape[1], 1, device=t.device)
        dst = dst.scatter_add(1, merged_dst[..., None].expand(-1, -1, t.shape[-1]), take(t, merged_pos).float())
        counts = counts.scatter_add(1, merged_dst[..., None], torch.ones(b, r, 1, device=t.device))
        return torch.cat([take(t, kept_pos), (dst / counts).to(t.dtype)], dim=1)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        kept, dst = t[:, : kept_pos.shape[1]], t[:, kept_pos.shape[1]:]
        out = torch.empty(b, n, t.shape[-1], device=t.device, dtype=t.dtype)
        out.scatter_(1, dst_idx[None, :, None].expand(b, -1, t.shape[-1]), dst)
        out.scatter_(1, kept_pos[..., None].expand(-1, -1, t.shape[-1]), kept)
        out.scatter_(1, merged_pos[..., None].expand(-1, -1, t.shape[-1]), take(dst, merged_dst))
        return out

    return merge, unmerge


class TokenMerging:
    """An attention processor: merges before `inner` runs self-attention at full resolution."""

    def __init__(self, inner: Any, ratio: float, size: tuple[int, int]) -> None:
        self.inner, self.ratio, self.size = inner, ratio, size  # size: the latent grid (w, h)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, **kwargs: Any) -> torch.Tensor:
        w, h = self.size
        if encoder_hidden_states is not None or hidden_states.ndim != 3 or hidden_states.shape[1] != w * h:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        merge, unmerge = bipartite_merge(hidden_states, w, h, self.ratio)
        return unmerge(self.inner(attn, merge(hidden_states), None, attention_mask, **kwargs))


@contextlib.contextmanager
def token_merging(unet: Any, ratio: float, latent_size: tuple[int, int]) -> Iterator[None]:
    """ToMe on `unet`'s self-attention layers while the block runs (nothing when ratio is 0);
    the processors in use before come back after it."""
    if ratio <= 0:
        yield
        return
    before = unet.attn_processors
    unet.set_attn_processor({name: TokenMerging(p, ratio, latent_size) if ".attn1." in name else p
                             for name, p in before.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(before)
