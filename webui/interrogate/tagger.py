"""WD14-style taggers (SmilingWolf's ONNX exports) from `models/interrogators/`: either a folder
`<name>/` holding `model.onnx` and `selected_tags.csv` (the layout those repositories have), or
`<name>.onnx` with `<name>.csv` beside it.

The model takes one image, square-padded with white and resized to its input size, as BGR
values 0-255 in NHWC; it returns one probability per row of the CSV (`tag_id,name,category,
count`; category 9 is a rating, 4 a character, 0 a general tag). The caption is the general
tags at or above `threshold` and the characters at or above `character_threshold`, most
confident first, with underscores as spaces and parentheses escaped for the prompt parser.
"""

from __future__ import annotations

import csv
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from webui.models.errors import ModelError

RATING, GENERAL, CHARACTER = 9, 0, 4
KAOMOJI = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})


@dataclass(frozen=True)
class TaggerFiles:
    name: str
    model: Path
    tags: Path


@dataclass(frozen=True)
class Tags:
    caption: str
    ratings: dict[str, float]
    tags: dict[str, float]  # every kept tag (general and character) with its confidence


def find_taggers(folder: Path) -> list[TaggerFiles]:
    if not folder.is_dir():
        return []
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / "model.onnx").is_file() and (sub / "selected_tags.csv").is_file():
            found.append(TaggerFiles(sub.name, sub / "model.onnx", sub / "selected_tags.csv"))
    for onnx in sorted(folder.glob("*.onnx")):
        if onnx.with_suffix(".csv").is_file():
            found.append(TaggerFiles(onnx.stem, onnx, onnx.with_suffix(".csv")))
    return found


def _prompt_tag(name: str) -> str:
    text = name if name in KAOMOJI else name.replace("_", " ")
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


class Tagger:
    def __init__(self, files: TaggerFiles) -> None:
        try:
            import onnxruntime  # optional dependency: the `interrogate` extra
        except ImportError:
            raise ModelError("taggers need onnxruntime: pip install 'sd-webui[interrogate]' (or pip install "
                             "onnxruntime)") from None
        try:
            self.session = onnxruntime.InferenceSession(str(files.model), providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001  onnxruntime raises its own types for a bad file
            raise ModelError(f"tagger {files.name}: {files.model.name} is not a usable ONNX model: {err}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = inp.shape[1] if isinstance(inp.shape[1], int) else 448
        with files.tags.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or "name" not in rows[0] or "category" not in rows[0]:
            raise ModelError(f"tagger {files.name}: {files.tags.name} lacks the name and category columns")
        self.names = [r["name"] for r in rows]
        self.categories = [int(r["category"]) for r in rows]

    def __call__(self, image: Image.Image, threshold: float = 0.35, character_threshold: float = 0.85,
                 exclude: tuple[str, ...] = ()) -> Tags:
        rgb = image.convert("RGBA")
        side = max(rgb.size)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        square = canvas.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        x = np.asarray(square, dtype=np.float32)[:, :, ::-1][None].copy()  # BGR, NHWC
        probs = self.session.run(None, {self.input_name: x})[0][0]
        if len(probs) != len(self.names):
            raise ModelError(f"tagger gives {len(probs)} scores but its CSV lists {len(self.names)} tags")
        skip = {e.strip().replace(" ", "_") for e in exclude}
        ratings, kept = {}, {}
        for name, category, p in zip(self.names, self.categories, probs.tolist()):
            if category == RATING:
                ratings[name] = p
            elif name not in skip and p >= (character_threshold if category == CHARACTER else threshold):
                kept[name] = p
        ordered = sorted(kept.items(), key=lambda kv: -kv[1])
        return Tags(", ".join(_prompt_tag(n) for n, _ in ordered), ratings, dict(ordered))


class Taggers:
    """The taggers in `folder`, each loaded once on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._loaded: dict[str, Tagger] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return [t.name for t in find_taggers(self.folder)]

    def get(self, name: str | None = None) -> Tagger:
        """The tagger called `name` (any case), or the first one; ModelError naming the folder."""
        found = find_taggers(self.folder)
        if not found:
            raise ModelError(f"no tagger in {self.folder}: put a WD14 tagger there (a folder with model.onnx and "
                             "selected_tags.csv)")
        files = found[0] if name is None else next((t for t in found if t.name.lower() == name.lower()), None)
        if files is None:
            raise ModelError(f"no tagger {name!r} (available: {', '.join(t.name for t in found)})")
        with self._lock:
            if files.name not in self._loaded:
                self._loaded[files.name] = Tagger(files)
            return self._loaded[files.name]

    def interrogate(self, image: Image.Image, name: str | None = None, **options: Any) -> Tags:
        return self.get(name)(image, **options)
