"""The `openpose` preprocessor: people's body keypoints, drawn as the OpenPose ControlNets were
trained to read them, from the body network users have (`body_pose_model.pth`, the file the
A1111 ControlNet extension downloads; CMU's 18-keypoint COCO model).

Three steps, each a function here:

- `maps`: the network (VGG-19's first ten layers, then six stages of two branches: part
  affinity fields and keypoint heatmaps) on the picture scaled to 184 px high (half of its
  368-px training box), padded to a multiple of 8; its maps enlarged back to the picture.
- `people`: keypoints are the peaks of each smoothed heatmap; every pair of keypoint candidates
  that a limb could join is scored by the affinity field along the segment between them; limbs
  are taken best first, and limbs that share keypoints make people. People with fewer than 4
  keypoints or a low mean score are dropped.
- `draw`: on black, each limb an ellipse in its colour at 60 % brightness, each keypoint a disc
  in its full colour.

The keypoint order, limb pairs, field channels and colours below are the trained model's and the
ControlNets' conventions (data, not choices).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import nn

# 1-based keypoint pairs: nose 1, neck 2, right shoulder 3, elbow 4, wrist 5, left shoulder 6,
# elbow 7, wrist 8, right hip 9, knee 10, ankle 11, left hip 12, knee 13, ankle 14, eyes 15/16, ears 17/18
LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18))
# each limb's (x, y) affinity channels among the network's 38
FIELDS = ((12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
          (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27))
COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
KEYPOINTS = 18
DRAWN_LIMBS = 17  # the last two (shoulder-ear) join people up but are not drawn
BOX, STRIDE, SCALE = 368, 8, 0.5
PEAK, FIELD = 0.1, 0.05  # a heatmap peak's least value; an affinity sample's least value along a limb
SAMPLES = 10  # affinity samples along a candidate limb

_VGG = (("conv1_1", 3, 64), ("conv1_2", 64, 64), None, ("conv2_1", 64, 128), ("conv2_2", 128, 128), None,
        ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256), None,
        ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3_CPM", 512, 256), ("conv4_4_CPM", 256, 128))


class BodyPose(nn.Module):
    """CMU's body network under the weight file's names (`conv1_1.weight`, `conv5_1_CPM_L1.weight`,
    `Mconv1_stage2_L2.weight`, ...): returns (affinity fields [B, 38, h, w], heatmaps [B, 19, h, w])
    at an eighth of the input's size."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone: list[str | None] = []
        for layer in _VGG:
            if layer is not None:
                self.add_module(layer[0], nn.Conv2d(layer[1], layer[2], 3, padding=1))
            self.backbone.append(layer and layer[0])
        self.stages: list[list[list[str]]] = []  # per stage, per branch (fields, heatmaps): layer names
        for stage in range(1, 7):
            branches = []
            for branch, out in ((1, 38), (2, 19)):
                if stage == 1:
                    shapes = [(f"conv5_{i}_CPM_L{branch}", 128, 128, 3) for i in (1, 2, 3)]
                    shapes += [(f"conv5_4_CPM_L{branch}", 128, 512, 1), (f"conv5_5_CPM_L{branch}", 512, out, 1)]
                else:
                    shapes = [(f"Mconv{i}_stage{stage}_L{branch}", 185 if i == 1 else 128, 128, 7) for i in range(1, 6)]
                    shapes += [(f"Mconv6_stage{stage}_L{branch}", 128, 128, 1), (f"Mconv7_stage{stage}_L{branch}", 128,
                                                                                   out, 1)]
                for name, cin, cout, k in shapes:
                    self.add_module(name, nn.Conv2d(cin, cout, k, padding=k // 2))
                branches.append([s[0] for s in shapes])
            self.stages.append(branches)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name in self.backbone:
            x = nn.functional.max_pool2d(x, 2) if name is None else torch.relu(getattr(self, name)(x))
        features, h = x, x
        for stage, branches in enumerate(self.stages, 1):
            outs = []
            for branch, names in enumerate(branches, 1):
                y = h
                for i, name in enumerate(names):
                    y = getattr(self, name)(y)
                    # every layer but a branch's last is followed by a ReLU; the published model also
                    # keeps it after the last stage's heatmap layer, and its weights were made with it
                    if i < len(names) - 1 or (stage == 6 and branch == 2):
                        y = torch.relu(y)
                outs.append(y)
            h = torch.cat([*outs, features], dim=1)
        return outs[0], outs[1]


def maps(net: BodyPose, rgb: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps [H, W, 19], affinity fields [H, W, 38]) of an RGB uint8 picture, at its size."""
    import cv2

    height, width = rgb.shape[:2]
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # the network reads BGR
    factor = SCALE * BOX / height
    scaled = cv2.resize(bgr, (0, 0), fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
    h, w = scaled.shape[:2]
    padded = np.full((-(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE, 3), 128, dtype=np.uint8)
    padded[:h, :w] = scaled
    x = torch.from_numpy(padded.astype(np.float32) / 256.0 - 0.5).permute(2, 0, 1)[None].to(device)
    with torch.no_grad():
        fields, heat = net(x)

    def back(out: torch.Tensor) -> np.ndarray:
        array = out[0].permute(1, 2, 0).float().cpu().numpy()
        array = cv2.resize(array, (0, 0), fx=STRIDE, fy=STRIDE, interpolation=cv2.INTER_CUBIC)[:h, :w]
        return cv2.resize(array, (width, height), interpolation=cv2.INTER_CUBIC)

    return back(heat), back(fields)


def _peaks(heat: np.ndarray) -> list[list[tuple[int, int, float, int]]]:
    """Per keypoint, its candidates (x, y, score, id): local maxima of the smoothed heatmap above PEAK,
    scored by the raw heatmap; ids count over all keypoints."""
    found, count = [], 0
    for part in range(KEYPOINTS):
        raw = heat[:, :, part]
        smooth = ndimage.gaussian_filter(raw, sigma=3)
        padded = np.pad(smooth, 1)
        top = ((smooth >= padded[:-2, 1:-1]) & (smooth >= padded[2:, 1:-1]) & (smooth >= padded[1:-1, :-2])
               & (smooth >= padded[1:-1, 2:]) & (smooth > PEAK))
        ys, xs = np.nonzero(top)
        found.append([(int(x), int(y), float(raw[y, x]), count + i) for i, (x, y) in enumerate(zip(xs, ys))])
        count += len(xs)
    return found


def _limbs(peaks: list[list[tuple[int, int, float, int]]], fields: np.ndarray) -> list[np.ndarray | None]:
    """Per limb, the connections taken: rows (id A, id B, score, index A, index B), best first,
    each candidate used once; None where either end has no candidate."""
    height = fields.shape[0]
    out: list[np.ndarray | None] = []
    for (a, b), (fx, fy) in zip(LIMBS, FIELDS):
        starts, ends = peaks[a - 1], peaks[b - 1]
        if not starts or not ends:
            out.append(None)
            continue
        scored = []
        for i, start in enumerate(starts):
            for j, end in enumerate(ends):
                dx, dy = end[0] - start[0], end[1] - start[1]
                norm = math.hypot(dx, dy)
                if norm == 0:
                    continue
                xs = np.rint(np.linspace(start[0], end[0], SAMPLES)).astype(int)
                ys = np.rint(np.linspace(start[1], end[1], SAMPLES)).astype(int)
                along = fields[ys, xs, fx] * dx / norm + fields[ys, xs, fy] * dy / norm
                score = float(along.mean()) + min(0.5 * height / norm - 1, 0)  # long limbs cost
                if np.count_nonzero(along > FIELD) > 0.8 * SAMPLES and score > 0:
                    scored.append((i, j, score))
        taken = np.zeros((0, 5))
        for i, j, score in sorted(scored, key=lambda c: c[2], reverse=True):
            if i not in taken[:, 3] and j not in taken[:, 4]:
                taken = np.vstack([taken, [starts[i][3], ends[j][3], score, i, j]])
                if len(taken) >= min(len(starts), len(ends)):
                    break
        out.append(taken)
    return out


def people(heat: np.ndarray, fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(candidates [N, 4]: x, y, score, id; people [P, 20]: each keypoint's candidate id or -1, then
    the total score and the keypoint count) from the network's maps at the picture's size."""
    peaks = _peaks(heat)
    candidates = np.array([c for part in peaks for c in part], dtype=np.float64).reshape(-1, 4)
    rows = np.zeros((0, KEYPOINTS + 2))
    for k, connections in enumerate(_limbs(peaks, fields)):
        if connections is None:
            continue
        a, b = LIMBS[k][0] - 1, LIMBS[k][1] - 1
        for id_a, id_b, score, _, _ in connections:
            holding = [n for n in range(len(rows)) if rows[n][a] == id_a or rows[n][b] == id_b][:2]
            if len(holding) == 2:
                first, second = holding
                shared = ((rows[first][:-2] >= 0) & (rows[second][:-2] >= 0)).any()
                if not shared:  # two parts of one person, joined by this limb
                    rows[first][:-2] += rows[second][:-2] + 1
                    rows[first][-2:] += rows[second][-2:]
                    rows[first][-2] += score
                    rows = np.delete(rows, second, axis=0)
                    continue
                holding = [first]
            if len(holding) == 1:
                row = rows[holding[0]]
                if row[b] != id_b:
                    row[b] = id_b
                    row[-1] += 1
                    row[-2] += candidates[int(id_b), 2] + score
            elif k < DRAWN_LIMBS:  # a new person from this limb
                row = -np.ones(KEYPOINTS + 2)
                row[a], row[b] = id_a, id_b
                row[-1] = 2
                row[-2] = candidates[int(id_a), 2] + candidates[int(id_b), 2] + score
                rows = np.vstack([rows, row])
    keep = [n for n in range(len(rows)) if rows[n][-1] >= 4 and rows[n][-2] / rows[n][-1] >= 0.4]
    return candidates, rows[keep]


def draw(candidates: np.ndarray, rows: np.ndarray, height: int, width: int) -> np.ndarray:
    """The pose picture (RGB uint8, H x W): limbs, then keypoints, on black."""
    import cv2

    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for k in range(DRAWN_LIMBS):
        for row in rows:
            ids = row[[LIMBS[k][0] - 1, LIMBS[k][1] - 1]]
            if (ids < 0).any():
                continue
            (x0, y0), (x1, y1) = candidates[ids.astype(int), :2]
            length = math.hypot(x1 - x0, y1 - y0)
            angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
            polygon = cv2.ellipse2Poly((int((x0 + x1) / 2), int((y0 + y1) / 2)), (int(length / 2), 4), int(angle),
                                       0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, COLOURS[k])
    canvas = (canvas * 0.6).astype(np.uint8)
    for part in range(KEYPOINTS):
        for row in rows:
            if row[part] >= 0:
                x, y = candidates[int(row[part]), :2]
                cv2.circle(canvas, (int(x), int(y)), 4, COLOURS[part], thickness=-1)
    return canvas


def pose(net: BodyPose, rgb: np.ndarray, device: torch.device) -> np.ndarray:
    """The pose picture of an RGB uint8 picture, at its size."""
    heat, fields = maps(net, rgb, device)
    candidates, rows = people(heat, fields)
    return draw(candidates, rows, *rgb.shape[:2])
