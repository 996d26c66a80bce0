"""TAESD live previews: the Tiny AutoEncoder decoder (madebyollin/taesd, MIT), finding its
weights in `models/VAE-approx/`, loading them safely, and decoding latents to preview images.

Owns: the decoder architecture (laid out so the released `taesd_decoder.*` / `taesdxl_decoder.*`
files load with strict=True: a flat `nn.Sequential`, keys `1.weight`, `3.conv.0.weight`, ...),
`find_taesd`, `load_taesd` and `TaesdPreviewer`. The decoder takes latents as the UNet sees them
(already multiplied by the VAE's scaling factor) and gives RGB in about [0, 1] at 8x the size.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from webui.models.errors import ModelError

TAESD_FOLDER = "VAE-approx"
LATENT_CHANNELS = 4
WIDTH = 64


def _conv3(cin: int, cout: int, *, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=bias)


class _SoftClamp(nn.Module):
    """Squash latents smoothly into (-3, 3): 3 * tanh(x / 3). No weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _ResBlock(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + x); keys `conv.0`, `conv.2`, `conv.4` (no skip weights)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3(width, width), nn.ReLU(), _conv3(width, width), nn.ReLU(), _conv3(width, width)
        )
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TAESDDecoder(nn.Sequential):
    """Latents [B, 4, h, w] (UNet scale) -> RGB [B, 3, 8h, 8w], roughly in [0, 1].

    Index layout (what the released state dicts are keyed by): 0 clamp, 1 conv in, 2 relu,
    then three stages of (3 blocks, 2x upsample, bias-free conv) at 3-7, 8-12, 13-17,
    then a block at 18 and the conv to RGB at 19.
    """

    def __init__(self, latent_channels: int = LATENT_CHANNELS, width: int = WIDTH) -> None:
        layers: list[nn.Module] = [_SoftClamp(), _conv3(latent_channels, width), nn.ReLU()]
        for _ in range(3):
            layers += [_ResBlock(width) for _ in range(3)]
            layers += [nn.Upsample(scale_factor=2), _conv3(width, width, bias=False)]
        layers += [_ResBlock(width), _conv3(width, 3)]
        super().__init__(*layers)


def find_taesd(models_path: Path, stem: str) -> Path | None:
    """The TAESD decoder file `stem` (a family's `taesd_stem`) under `models_path/VAE-approx/`,
    `.safetensors` preferred over `.pth`; None when there is none."""
    folder = Path(models_path) / TAESD_FOLDER
    for suffix in (".safetensors", ".pth"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _read(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError("file not found", path) from None
    except pickle.UnpicklingError:  # weights_only met something other than tensors and containers
        raise ModelError(
            "refused to load: the pickle holds objects other than plain weights (it may contain code; "
            "nothing in it was run). Use the .safetensors release instead",
            path,
        ) from None
    except Exception as e:  # noqa: BLE001  safetensors, zip and unpickler errors differ by version
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"not a readable TAESD decoder (truncated or corrupt): {first}", path) from None
    tensors_only = isinstance(sd, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    )
    if not tensors_only:
        raise ModelError("not a TAESD decoder: expected a flat dict of tensors", path)
    return sd


def load_taesd(path: Path, device: torch.device | str, dtype: torch.dtype) -> TAESDDecoder:
    """Build the decoder from a `.safetensors` or `.pth` file (weights only, strict keys and
    shapes), in eval mode on `device` / `dtype`. Any failure is a one-line `ModelError`."""
    path = Path(path)
    sd = _read(path)
    decoder = TAESDDecoder()
    expected = decoder.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelError(f"not a TAESD decoder (keys do not match the released layout: {detail})", path)
    for key, tensor in expected.items():
        if sd[key].shape != tensor.shape:
            raise ModelError(
                f"not a TAESD decoder: {key!r} has shape {tuple(sd[key].shape)}, expected {tuple(tensor.shape)}", path
            )
    decoder.load_state_dict(sd, strict=True)
    return decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


class TaesdPreviewer:
    """Callable turning a batch of UNet-scale latents into RGB preview images (8x the latent size)."""

    def __init__(self, decoder: TAESDDecoder) -> None:
        self.decoder = decoder

    def __call__(self, latents: torch.Tensor) -> list[Image.Image]:
        param = next(self.decoder.parameters())
        with torch.inference_mode():
            rgb = self.decoder(latents.detach().to(device=param.device, dtype=param.dtype))
            pixels = (rgb.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]
