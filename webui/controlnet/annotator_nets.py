"""The small networks of two weight-needing preprocessors, written from the layout of the weight
files users have (the ones the A1111 ControlNet extension downloads into its annotator folder):

- HED soft edges (`ControlNetHED.pth`): five VGG-style stages of 3x3 convolutions, each giving a
  one-channel side output; the edge map is the sigmoid of their mean at the image's size.
  Keys: `norm` (the input's mean, in 0-255), `block{1..5}.convs.{i}.*`, `block{1..5}.projection.*`.
- Line art (`sk_model.pth` realistic, `sk_model2.pth` coarse): an image-to-image generator (a
  7x7 stem, two stride-2 downsamplings, residual blocks, two transposed-convolution upsamplings,
  a 7x7 head with a sigmoid; instance norm throughout). Keys: `model0.1.*`, `model1.{0,3}.*`,
  `model2.{i}.conv_block.{1,5}.*`, `model3.{0,3}.*`, `model4.1.*`.

Both run in float32 on 0-255 (HED) or 0-1 (line art) RGB and return a uint8 map (white = edge/line).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HED(nn.Module):
    STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for i, (cin, cout, layers) in enumerate(self.STAGES, 1):
            setattr(self, f"block{i}", _Stage(cin, cout, layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, sides = x - self.norm, []
        for i in range(1, len(self.STAGES) + 1):
            h, side = getattr(self, f"block{i}")(h, pool=i > 1)
            sides.append(side)
        return sides


def hed_edges(net: HED, rgb: np.ndarray, device: torch.device) -> np.ndarray:
    x = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None].to(device)
    with torch.no_grad():
        sides = [F.interpolate(s, size=rgb.shape[:2], mode="bilinear", align_corners=False) for s in net(x)]
        edge = torch.sigmoid(torch.cat(sides, dim=1).mean(dim=1))[0]
    return (edge * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineArt(nn.Module):
    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), nn.InstanceNorm2d(64), nn.ReLU(inplace=True))
        self.model1 = nn.Sequential(
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.InstanceNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.InstanceNorm2d(256), nn.ReLU(inplace=True))
        self.model2 = nn.Sequential(*[_Residual(256) for _ in range(blocks)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(128),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(64),
            nn.ReLU(inplace=True))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def lineart_lines(net: LineArt, rgb: np.ndarray, device: torch.device) -> np.ndarray:
    """White lines on black (the line art ControlNet's input): the generator draws black on white."""
    h, w = rgb.shape[:2]
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(device)
    pad_h, pad_w = -h % 4, -w % 4  # two stride-2 steps down and back up: sides that are multiples of 4
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    with torch.no_grad():
        drawing = net(x)[0, 0, :h, :w]
    return (255.0 - drawing * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()


def residual_blocks(state: dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[1] for k in state if k.startswith("model2.")})
