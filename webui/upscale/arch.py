"""Super-resolution network architectures, built from a state dict's key names and shapes.

Written from the published descriptions (no code copied):

- RRDBNet (ESRGAN, Wang et al. 2018; Real-ESRGAN, Wang et al. 2021): a 3x3 conv, N residual-in-
  residual dense blocks (each three 5-conv dense blocks, residuals scaled by 0.2), a 3x3 conv
  whose output is added to the first conv's, then 2x nearest-neighbour upsampling + 3x3 conv +
  LeakyReLU(0.2) per factor of two, a 3x3 "HR" conv and the output conv. Real-ESRGAN x2 / x1
  models run the same 4x net on a pixel-unshuffled input (2x2 / 4x4 pixels folded into channels).
- SRVGGNetCompact (Real-ESRGAN's small "realesr-general" / "animevideo" models): conv + PReLU
  pairs, a last conv to out_channels * scale^2, pixel shuffle, plus the nearest-upscaled input.

Two key layouts of RRDBNet occur in the wild and are both accepted:

- the original ESRGAN one, a flat `nn.Sequential`: `model.0` (first conv),
  `model.1.sub.<i>.RDB<k>.conv<j>.0` (blocks), `model.1.sub.<N>` (body conv), then per upsampling
  step `model.<3+3i>`, then `model.<2+3n>` (HR conv) and `model.<4+3n>` (output conv);
- the BasicSR / Real-ESRGAN one: `conv_first`, `body.<i>.rdb<k>.conv<j>`, `conv_body`,
  `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`.

Scale, block count, feature and growth channels are read from the keys and shapes; nothing is
guessed from the file name. Anything else is a `ModelError` that says what was found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from webui.models.errors import ModelError

StateDict = dict[str, torch.Tensor]

_WRAPPERS = ("params_ema.", "params.", "state_dict.", "model_ema.", "module.")
_OLD_BLOCK = re.compile(r"^model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_NEW_BLOCK = re.compile(r"^body\.(\d+)\.rdb[123]\.conv[1-5]\.(weight|bias)$")
_NEW_UP = re.compile(r"^conv_up(\d+)\.weight$")
_VGG = re.compile(r"^body\.(\d+)\.(weight|bias)$")


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int, num_grow: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow, num_grow, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow, num_grow, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow, num_grow, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """Upscales by `2**num_up / unshuffle` (x4 for the usual two upsampling steps)."""

    def __init__(self, in_ch: int = 3, out_ch: int = 3, num_feat: int = 64, num_block: int = 23,
                 num_grow: int = 32, num_up: int = 2, unshuffle: int = 1) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.image_channels = in_ch
        self.conv_first = nn.Conv2d(in_ch * unshuffle * unshuffle, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        for i in range(1, num_up + 1):
            self.add_module(f"conv_up{i}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
        self.num_up = num_up
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.num_up + 1):
            up = getattr(self, f"conv_up{i}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class SRVGGNetCompact(nn.Module):
    def __init__(self, in_ch: int = 3, out_ch: int = 3, num_feat: int = 64, num_conv: int = 16, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.image_channels = in_ch
        layers: list[nn.Module] = [nn.Conv2d(in_ch, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, out_ch * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.scale) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


@dataclass(frozen=True)
class Network:
    """A built network: `module` maps (1, channels, h, w) in [0, 1] to (1, channels, h*scale, w*scale).

    `multiple`: input sides must be multiples of it (pixel-unshuffle); the runner pads."""

    module: nn.Module
    scale: int
    channels: int
    multiple: int
    arch: str  # the architecture's name ("ESRGAN", "SwinIR", ...), for messages and the UI
    half: bool = True  # whether it may run in float16; else it runs in float32
    bfloat16: bool = True  # likewise for bfloat16

    def dtype_for(self, wanted: torch.dtype) -> torch.dtype:
        """`wanted`, or float32 where the architecture does not support it."""
        if (wanted == torch.float16 and not self.half) or (wanted == torch.bfloat16 and not self.bfloat16):
            return torch.float32
        return wanted


def strip_wrappers(sd: StateDict) -> StateDict:
    """Drop a `params_ema.` / `params.` / `module.` ... prefix shared by every key (the EMA copy
    wins when both are present)."""
    for prefix in _WRAPPERS:
        if sd and any(k.startswith(prefix) for k in sd):
            inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if prefix == "params_ema." or len(inner) == len(sd):
                return strip_wrappers(inner)
    return sd


def build_network(sd: StateDict, path: Path | None = None) -> Network:
    """The network `sd` holds, with its weights loaded (on CPU, in the dtype of `sd`)."""
    sd = strip_wrappers(sd)
    if "model.0.weight" in sd:
        sd, arch = convert_esrgan(sd, path), "ESRGAN"
    elif "conv_first.weight" in sd:
        arch = "RealESRGAN"
    elif "body.0.weight" in sd and "body.1.weight" in sd and sd["body.1.weight"].ndim == 1:
        return _build_vgg(sd, path)
    else:
        sample = ", ".join(sorted(sd)[:4]) or "no tensors"
        raise ModelError(
            "not a supported upscaler: expected ESRGAN / Real-ESRGAN (RRDBNet) or SRVGGNetCompact "
            f"weights, found keys such as {sample}",
            path,
        )
    return _build_rrdb(sd, arch, path)


def convert_esrgan(sd: StateDict, path: Path | None = None) -> StateDict:
    """Old ESRGAN `model.N...` keys -> the BasicSR names `RRDBNet` uses."""
    blocks = {int(m.group(1)) for k in sd if (m := _OLD_BLOCK.match(k))}
    num_block = len(blocks)
    if not num_block or blocks != set(range(num_block)):
        raise ModelError("ESRGAN weights without a complete run of RRDB blocks (model.1.sub.N.RDB1...)", path)
    tops = sorted({int(m.group(1)) for k in sd if (m := _OLD_TOP.match(k))} - {0})
    # after the body: per upsampling step (nearest, conv, lrelu) = 3 modules, then HR conv, lrelu, last conv
    num_up = len(tops) - 2
    expected = [3 + 3 * i for i in range(max(num_up, 0))] + [2 + 3 * num_up, 4 + 3 * num_up]
    if num_up < 0 or tops != expected:
        raise ModelError(
            f"ESRGAN weights with an unexpected tail (convolutions at model.{tops}); "
            "only the standard RRDBNet layout is supported",
            path,
        )
    names = {0: "conv_first", tops[-2]: "conv_hr", tops[-1]: "conv_last"}
    names.update({3 + 3 * i: f"conv_up{i + 1}" for i in range(num_up)})
    out: StateDict = {}
    for key, value in sd.items():
        if m := _OLD_BLOCK.match(key):
            i, k, j, kind = m.groups()
            out[f"body.{i}.rdb{k}.conv{j}.{kind}"] = value
        elif m := _OLD_TOP.match(key):
            out[f"{names[int(m.group(1))]}.{m.group(2)}"] = value
        elif m := re.match(rf"^model\.1\.sub\.{num_block}\.(weight|bias)$", key):
            out[f"conv_body.{m.group(1)}"] = value
        else:
            raise ModelError(f"ESRGAN weights with an unexpected key {key!r}", path)
    return out


def _shape(sd: StateDict, key: str, path: Path | None) -> torch.Size:
    if key not in sd:
        raise ModelError(f"incomplete upscaler weights: {key!r} is missing", path)
    return sd[key].shape


def _build_rrdb(sd: StateDict, arch: str, path: Path | None) -> Network:
    num_feat, first_in = _shape(sd, "conv_first.weight", path)[:2]
    out_ch = _shape(sd, "conv_last.weight", path)[0]
    num_grow = _shape(sd, "body.0.rdb1.conv1.weight", path)[0]
    blocks = {int(m.group(1)) for k in sd if (m := _NEW_BLOCK.match(k))}
    num_block = len(blocks)
    if blocks != set(range(num_block)):
        raise ModelError("RRDBNet weights with a gap in the body.N blocks", path)
    num_up = len({m.group(1) for k in sd if (m := _NEW_UP.match(k))})
    unshuffle = {out_ch: 1, 4 * out_ch: 2, 16 * out_ch: 4}.get(first_in)
    if unshuffle is None or out_ch not in (1, 3):
        raise ModelError(f"RRDBNet with {first_in} input and {out_ch} output channels is not supported", path)
    if 2**num_up < unshuffle:
        raise ModelError(f"RRDBNet that shrinks the image ({num_up} upsampling steps, unshuffle {unshuffle})", path)
    scale = 2**num_up // unshuffle
    with torch.device("meta"):
        module = RRDBNet(out_ch, out_ch, num_feat, num_block, num_grow, num_up, unshuffle)
    _load(module, sd, path)
    return Network(module, scale, out_ch, unshuffle, arch)


def _build_vgg(sd: StateDict, path: Path | None) -> Network:
    indices = sorted({int(m.group(1)) for k in sd if (m := _VGG.match(k))})
    last = indices[-1]
    if last % 2 or last < 2 or indices != list(range(last + 1)):
        raise ModelError("SRVGGNetCompact weights with an unexpected layer sequence", path)
    num_feat, in_ch = sd["body.0.weight"].shape[:2]
    last_out = sd[f"body.{last}.weight"].shape[0]
    scale = round((last_out / in_ch) ** 0.5)
    if in_ch not in (1, 3) or scale < 1 or in_ch * scale * scale != last_out:
        raise ModelError(f"SRVGGNetCompact with {in_ch} channels and {last_out} outputs is not supported", path)
    with torch.device("meta"):
        module = SRVGGNetCompact(in_ch, in_ch, num_feat, (last - 2) // 2, scale)
    _load(module, sd, path)
    return Network(module, scale, in_ch, 1, "SRVGGNetCompact")


def _load(module: nn.Module, sd: StateDict, path: Path | None) -> None:
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ModelError(f"weights do not fit the detected architecture: {detail[:300]}", path) from None
    module.eval().requires_grad_(False)
