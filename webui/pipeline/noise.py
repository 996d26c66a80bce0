"""Initial noise that a seed reproduces on any device, with variation seeds.

Each image draws from a CPU generator seeded with its seed; the sampler's later noise
continues from the same generator. A variation seed's noise is blended in by spherical
interpolation (strength 0: the seed's noise exactly, 1: the variation seed's exactly).
"Resize seed from" makes the noise of another size and pastes it centred, so a seed keeps
its composition when the size changes.
"""

from __future__ import annotations

import torch


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    if t <= 0.0:
        return low
    if t >= 1.0:
        return high
    low_n, high_n = low / low.norm(), high / high.norm()
    dot = (low_n * high_n).sum().clamp(-1.0, 1.0)
    if dot.abs() > 0.9995:
        return low * (1.0 - t) + high * t
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return torch.sin((1.0 - t) * omega) / so * low + torch.sin(t * omega) / so * high


def image_noise(
    seed: int,
    shape: tuple[int, int, int],
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    resize_from: tuple[int, int] | None = None,  # latent (h, w) the seed's noise is made at
) -> tuple[torch.Tensor, torch.Generator]:
    """(noise [1, C, H, W] on the CPU, the seed's generator for the sampler's later noise)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    c, h, w = shape
    src_shape = (1, c, *resize_from) if resize_from else (1, c, h, w)
    noise = torch.randn(src_shape, generator=generator)
    if subseed is not None and subseed_strength > 0:
        sub = torch.randn(src_shape, generator=torch.Generator("cpu").manual_seed(subseed))
        noise = slerp(subseed_strength, noise, sub)
    if resize_from and resize_from != (h, w):
        target = torch.randn((1, c, h, w), generator=torch.Generator("cpu").manual_seed(seed))
        sh, sw = resize_from
        dy, dx = (h - sh) // 2, (w - sw) // 2  # centre the source in the target
        ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
        ch, cw = min(h - ty, sh - sy), min(w - tx, sw - sx)
        target[:, :, ty : ty + ch, tx : tx + cw] = noise[:, :, sy : sy + ch, sx : sx + cw]
        noise = target
    return noise, generator
