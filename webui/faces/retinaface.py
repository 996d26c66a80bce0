"""RetinaFace (ResNet-50), the face detector GFPGAN and CodeFormer users have from facexlib:
`detection_Resnet50_Final.pth` in `models/facedetect/`, read weights-only, never downloaded.

The network under that file's names: a ResNet-50 (`body.*`, torchvision's layout, its last three
stages used), a feature pyramid (`fpn.*`), a context module per level (`ssh1..3.*`) and per level
1x1 heads giving, for two anchors per position, face / not-face (`ClassHead`), a box (`BboxHead`)
and five landmarks (`LandmarkHead`). Boxes are decoded against the anchors (sizes 16/32, 64/128,
256/512 px at strides 8, 16, 32; variances 0.1 and 0.2), kept above a face score of 0.8 and
thinned by non-maximum suppression at 0.4 overlap, as facexlib does. The picture is read as BGR
minus the training mean, scaled up so that its shorter side is at least 640 px.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from webui.faces.detect import Box

FILE = "detection_Resnet50_Final.pth"
MEAN_BGR = (104.0, 117.0, 123.0)
ANCHORS = ((16, 32), (64, 128), (256, 512))  # per level, in pixels
STRIDES = (8, 16, 32)
VARIANCE = (0.1, 0.2)
SCORE, OVERLAP, SHORT_SIDE = 0.8, 0.4, 640


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())  # the ResNet-50 model's leaky slope is 0 (its pyramid is wider than 64)
    return nn.Sequential(*layers)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))
                           if stride != 1 or cin != width * 4 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _ResNet50(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin = 64
        for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
            setattr(self, f"layer{i}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer1(x)
        out = []
        for name in ("layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out.append(x)
        return out


class _Context(nn.Module):
    """SSH: 3x3, 5x5 and 7x7 receptive fields side by side (the larger from stacked 3x3s)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv3X3 = _conv_bn(width, width // 2, relu=False)
        self.conv5X5_1 = _conv_bn(width, width // 4)
        self.conv5X5_2 = _conv_bn(width // 4, width // 4, relu=False)
        self.conv7X7_2 = _conv_bn(width // 4, width // 4)
        self.conv7x7_3 = _conv_bn(width // 4, width // 4, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        five = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(five), self.conv7x7_3(self.conv7X7_2(five))], 1))


class _Pyramid(nn.Module):
    def __init__(self, widths: tuple[int, ...], width: int) -> None:
        super().__init__()
        for i, cin in enumerate(widths, 1):
            setattr(self, f"output{i}", _conv_bn(cin, width, k=1))
        self.merge1, self.merge2 = _conv_bn(width, width), _conv_bn(width, width)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        one, two, three = self.output1(x[0]), self.output2(x[1]), self.output3(x[2])
        two = self.merge2(two + F.interpolate(three, size=two.shape[-2:], mode="nearest"))
        one = self.merge1(one + F.interpolate(two, size=one.shape[-2:], mode="nearest"))
        return [one, two, three]


class _Head(nn.Module):
    def __init__(self, width: int, per_anchor: int) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(width, 2 * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, positions x 2 anchors, per_anchor]
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """Returns (boxes [B, N, 4], face scores [B, N], landmarks [B, N, 10]) as offsets to the anchors."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.body = _ResNet50()
        self.fpn = _Pyramid((512, 1024, 2048), width)
        self.ssh1, self.ssh2, self.ssh3 = _Context(width), _Context(width), _Context(width)
        self.ClassHead = nn.ModuleList(_Head(width, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(width, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(width, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), self.fpn(self.body(x)))]
        boxes = torch.cat([h(f) for h, f in zip(self.BboxHead, levels)], 1)
        scores = torch.cat([h(f) for h, f in zip(self.ClassHead, levels)], 1).softmax(-1)[..., 1]
        marks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, levels)], 1)
        return boxes, scores, marks


def anchors(height: int, width: int) -> torch.Tensor:
    """[N, 4] (cx, cy, w, h) as fractions of the picture, in the heads' order: level, row, column, size."""
    out = []
    for sizes, stride in zip(ANCHORS, STRIDES):
        rows, columns = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
        centres = torch.stack([(xs + 0.5) * stride / width, (ys + 0.5) * stride / height], -1)  # [rows, cols, 2]
        extents = torch.tensor([[s / width, s / height] for s in sizes])  # [sizes, 2]
        level = torch.cat([centres[:, :, None].expand(rows, columns, len(sizes), 2),
                           extents.expand(rows, columns, len(sizes), 2)], -1)
        out.append(level.reshape(-1, 4))
    return torch.cat(out).float()


def faces(offsets: torch.Tensor, scores: torch.Tensor, priors: torch.Tensor, height: int, width: int,
          threshold: float = SCORE) -> np.ndarray:
    """[K, 5] boxes (x0, y0, x1, y1, score) in pixels, best first, from one picture's head outputs."""
    centre = priors[:, :2] + offsets[:, :2] * VARIANCE[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(offsets[:, 2:] * VARIANCE[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1) * torch.tensor([width, height, width, height])
    keep = scores > threshold
    found = torch.cat([boxes[keep], scores[keep, None]], 1).numpy()
    found = found[np.argsort(-found[:, 4], kind="stable")]
    return found[_suppressed(found, OVERLAP)]


def _suppressed(boxes: np.ndarray, overlap: float) -> list[int]:
    """Greedy non-maximum suppression of score-sorted boxes (areas counted in whole pixels, +1)."""
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    order, kept = list(range(len(boxes))), []
    while order:
        best, rest = order[0], np.array(order[1:], dtype=int)
        kept.append(best)
        if not len(rest):
            break
        w = np.maximum(0.0, np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]) + 1)
        h = np.maximum(0.0, np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]) + 1)
        shared = w * h / (area[best] + area[rest] - w * h)
        order = [int(i) for i in rest[shared <= overlap]]
    return kept


class RetinaFaces:
    """A face detector (`image -> boxes`, largest first) on the user's RetinaFace weights."""

    def __init__(self, path: Path, device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._net: RetinaFace | None = None

    def _load(self) -> RetinaFace:
        from webui.models.errors import ModelError
        from webui.models.readers import read_state_dict

        with self._lock:
            if self._net is None:
                try:
                    state = read_state_dict(self.path)
                except (OSError, ValueError, ModelError) as err:
                    raise ValueError(f"face detector {self.path.name}: cannot read it: {err}") from None
                net = RetinaFace()
                try:
                    net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
                except RuntimeError as err:
                    raise ValueError(f"face detector {self.path.name} is not RetinaFace ResNet-50 "
                                     f"({str(err).splitlines()[0]})") from None
                self._net = net.to(self.device).eval()
            return self._net

    def __call__(self, image: Image.Image) -> list[Box]:
        import cv2

        net = self._load()
        rgb = np.asarray(image.convert("RGB"))
        scale = max(1.0, SHORT_SIDE / min(rgb.shape[:2]))
        if scale > 1:
            rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                             interpolation=cv2.INTER_LINEAR)
        bgr = rgb[:, :, ::-1].astype(np.float32) - np.array(MEAN_BGR, dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(bgr)).permute(2, 0, 1)[None].to(self.device)
        with torch.no_grad():
            offsets, scores, _ = net(x)
        h, w = rgb.shape[:2]
        found = faces(offsets[0].float().cpu(), scores[0].float().cpu(), anchors(h, w), h, w)
        width, height = image.size
        boxes = [(max(0, round(x0 / scale)), max(0, round(y0 / scale)), min(width, round(x1 / scale)),
                  min(height, round(y1 / scale))) for x0, y0, x1, y1, _ in found]
        boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]  # inside the picture
        return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
