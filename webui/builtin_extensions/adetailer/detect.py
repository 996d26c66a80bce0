"""YOLO-style ONNX detectors (Ultralytics YOLOv8/v11 exports) run with onnxruntime.

Input: one RGB image letterboxed to the model's square input, values 0-1, NCHW. Output 0:
[1, 4 + classes (+ 32 mask coefficients), anchors] with boxes as centre x, centre y, width,
height in input pixels; a second output [1, 32, h, w] of mask prototypes means a segmentation
model. Boxes above the confidence pass non-maximum suppression and go back to image pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from webui.extensions.api import Detection, JobRejected

IOU = 0.45
HOW_TO_EXPORT = ("Ultralytics .pt files are Python pickles, which this app does not load (a pickle can run "
                 "code). Export the model to ONNX once -- `pip install ultralytics`, then "
                 "`yolo export model={name} format=onnx` -- and put the .onnx file in {folder}.")


def find_model(folder: Path, name: str) -> Path:
    """The ONNX file for `name` (`face_yolov8n.pt` also finds `face_yolov8n.onnx`)."""
    stem = Path(name).stem
    path = folder / f"{stem}.onnx"
    if path.is_file():
        return path
    if Path(name).suffix.lower() in (".pt", ".pth"):
        raise JobRejected(f"ADetailer: detector {name!r}: " + HOW_TO_EXPORT.format(name=name, folder=folder))
    found = ", ".join(sorted(p.name for p in folder.glob("*.onnx"))) if folder.is_dir() else ""
    raise JobRejected(f"ADetailer: no detector {name!r} in {folder} (found: {found or 'none'})")


def _nms(boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    order = list(np.argsort(-scores))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = []
        for j in order:
            x0, y0 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            x1, y1 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
            union = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]) + \
                (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]) - inter
            if union <= 0 or inter / union < IOU:
                rest.append(j)
        order = rest
    return keep


class OnnxDetector:
    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime  # optional dependency: the `detailer` extra
        except ImportError:
            raise JobRejected("ADetailer: ONNX detectors need onnxruntime: pip install 'sd-webui[detailer]' "
                              "(or pip install onnxruntime)") from None
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001  onnxruntime raises its own types for a bad file
            raise JobRejected(f"ADetailer: {path.name} is not a usable ONNX model: {err}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = [d if isinstance(d, int) else 640 for d in inp.shape]
        self.size = (shape[3], shape[2])  # (width, height)

    def detect(self, image: Image.Image, confidence: float) -> list[Detection]:
        w, h = self.size
        scale = min(w / image.width, h / image.height)
        nw, nh = round(image.width * scale), round(image.height * scale)
        left, top = (w - nw) // 2, (h - nh) // 2
        canvas = Image.new("RGB", (w, h), (114, 114, 114))
        canvas.paste(image.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR), (left, top))
        x = (np.asarray(canvas, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]
        outputs = self.session.run(None, {self.input_name: x})
        pred = outputs[0][0]
        protos = outputs[1][0] if len(outputs) > 1 and outputs[1].ndim == 4 else None
        n_mask = protos.shape[0] if protos is not None else 0
        if pred.shape[0] > pred.shape[1] and pred.shape[0] >= 256:  # [anchors, channels]: many anchors, few channels
            pred = pred.T
        classes = pred.shape[0] - 4 - n_mask
        scores = pred[4:4 + classes].max(axis=0)
        chosen = np.nonzero(scores >= confidence)[0]
        if len(chosen) == 0:
            return []
        cx, cy, bw, bh = pred[0, chosen], pred[1, chosen], pred[2, chosen], pred[3, chosen]
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        found = []
        for k in _nms(boxes, scores[chosen]):
            box = boxes[k]
            mask = None
            if protos is not None:
                coeffs = pred[4 + classes:, chosen[k]]
                m = 1 / (1 + np.exp(-np.tensordot(coeffs, protos, axes=1)))  # [mh, mw] over the input
                full = Image.fromarray((m * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
                crop = full.crop((left, top, left + nw, top + nh)).resize(image.size, Image.Resampling.BILINEAR)
                inside = Image.new("L", image.size, 0)
                img_box = [(box[0] - left) / scale, (box[1] - top) / scale, (box[2] - left) / scale,
                           (box[3] - top) / scale]
                inside.paste(255, tuple(round(v) for v in img_box))
                mask = Image.fromarray(np.minimum(np.asarray(crop) >= 128, np.asarray(inside) > 0).astype(np.uint8) * 255)
            x0, y0 = (box[0] - left) / scale, (box[1] - top) / scale
            x1, y1 = (box[2] - left) / scale, (box[3] - top) / scale
            found.append(Detection((max(0.0, float(x0)), max(0.0, float(y0)), min(float(image.width), float(x1)),
                                    min(float(image.height), float(y1))), float(scores[chosen[k]]), mask))
        return found
