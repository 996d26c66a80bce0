"""Running a network over an image in overlapping tiles, blended with linear ramps at the seams.

Each tile's output is weighted by a ramp that rises across the overlap at every edge that lies
inside the image (edges on the image border keep full weight), and the weighted outputs are
summed and divided by the summed weights, so seams fade over the overlap instead of showing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from webui.upscale.arch import Network


class Cancelled(Exception):
    """Raised between tiles when the caller's `cancel()` answers True."""


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `length`, neighbours sharing >= `overlap`."""
    if tile <= 0 or length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(n: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    w = torch.ones(n)
    if overlap > 0:
        rise = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if lead:
            w[:overlap] = torch.minimum(w[:overlap], rise)
        if trail:
            w[n - overlap:] = torch.minimum(w[n - overlap:], rise.flip(0))
    return w


def tile_weight(height: int, width: int, overlap: int, *, top: bool, bottom: bool, left: bool,
                right: bool) -> torch.Tensor:
    """(height, width) blending weight of one tile: ramps across `overlap` on the edges that have
    a neighbour (True), full weight elsewhere."""
    return _ramp(height, overlap, top, bottom)[:, None] * _ramp(width, overlap, left, right)[None, :]


def run_network(net: Network, x: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) float in [0, 1] on the net's device/dtype -> (1, C, h*s, w*s) float32 on CPU,
    padding to the net's required multiple and cropping the result back."""
    h, w = x.shape[-2:]
    m = net.multiple
    pad_h, pad_w = (-h) % m, (-w) % m
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    with torch.inference_mode():
        y = net.module(x)
        s = net.scale
        return y[..., : h * s, : w * s].float().cpu()


def upscale_tensor(
    net: Network,
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    device: torch.device,
    dtype: torch.dtype,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """(1, C, H, W) float32 in [0, 1] on CPU -> (1, C, H*s, W*s) float32 in [0, 1] on CPU."""
    with torch.inference_mode():
        return _upscale_tensor(net, x, tile, overlap, device, dtype, cancel, progress)


def _upscale_tensor(net, x, tile, overlap, device, dtype, cancel, progress) -> torch.Tensor:
    _, c, h, w = x.shape
    s = net.scale
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    total = len(ys) * len(xs)
    if total == 1:
        if cancel is not None and cancel():
            raise Cancelled()
        out = run_network(net, x.to(device=device, dtype=dtype))
        if progress is not None:
            progress(1, 1)
        return out.clamp_(0, 1)
    out = torch.zeros(1, c, h * s, w * s)
    weight = torch.zeros(1, 1, h * s, w * s)
    th, tw = min(tile, h), min(tile, w)
    done = 0
    for y0 in ys:
        for x0 in xs:
            if cancel is not None and cancel():
                raise Cancelled()
            piece = x[..., y0:y0 + th, x0:x0 + tw].to(device=device, dtype=dtype)
            result = run_network(net, piece)
            mask = tile_weight(th * s, tw * s, overlap * s, top=y0 > 0, bottom=y0 + th < h, left=x0 > 0,
                               right=x0 + tw < w)[None, None]
            oy, ox = y0 * s, x0 * s
            out[..., oy:oy + th * s, ox:ox + tw * s] += result * mask
            weight[..., oy:oy + th * s, ox:ox + tw * s] += mask
            done += 1
            if progress is not None:
                progress(done, total)
    return out.div_(weight).clamp_(0, 1)
