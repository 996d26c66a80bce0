"""Finding faces for restoration, with nothing to download: RetinaFace when the user has its
weights in `models/facedetect/` (`webui.faces.retinaface`), else OpenCV's frontal-face Haar
cascade, which `opencv-python-headless` ships inside its wheel.

A detector is any callable `image -> list[Box]`; the restorer takes one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
FaceDetector = Callable[[Image.Image], list[Box]]


class HaarFaces:
    """OpenCV's `haarcascade_frontalface_default.xml`, loaded on first use. Boxes come largest first;
    faces smaller than `min_side` pixels are ignored (nothing to restore at that size)."""

    def __init__(self, min_side: int = 32) -> None:
        self.min_side = min_side
        self._lock = threading.Lock()
        self._cascade: Any = None

    def _load(self) -> Any:
        import cv2  # a declared dependency; imported here because it takes a moment

        with self._lock:
            if self._cascade is None:
                cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
                if cascade.empty():
                    raise RuntimeError("OpenCV's frontal-face cascade could not be read from its wheel")
                self._cascade = cascade
            return self._cascade

    def __call__(self, image: Image.Image) -> list[Box]:
        import cv2

        gray = cv2.equalizeHist(np.asarray(image.convert("L")))
        found = self._load().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                              minSize=(self.min_side, self.min_side))
        boxes = [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h in (found if len(found) else [])]
        return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


class FolderFaces:
    """RetinaFace when `folder` holds its weights (looked for at each call, so a file put there
    later counts), else `fallback` (OpenCV's cascade)."""

    def __init__(self, folder: Path, fallback: FaceDetector) -> None:
        self.folder = Path(folder)
        self.fallback = fallback
        self._retina: Any = None

    def detector(self) -> FaceDetector:
        from webui.faces import retinaface  # torch: only once the file is there

        path = self.folder / retinaface.FILE
        if not path.is_file():
            return self.fallback
        if self._retina is None or self._retina.path != path:
            self._retina = retinaface.RetinaFaces(path)
        return self._retina

    def __call__(self, image: Image.Image) -> list[Box]:
        return self.detector()(image)
