"""A ControlNet unit, with the field names and values the A1111 extension's API documents:
`enabled, module, model, weight, image, resize_mode, processor_res, threshold_a, threshold_b,
guidance_start, guidance_end, pixel_perfect, control_mode` (modes by name or number), and
`union_control_type` for the SDXL union models."""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import IntEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from webui.pipeline.request import ImageInput, ResizeMode

MAX_UNITS = 10  # the most the Settings' unit count may be (control_net_unit_count, default 3)
RESIZE_LABELS = ("Just Resize", "Crop and Resize", "Resize and Fill")  # the extension's words
# A union model's control types, in the order of its task embeddings (xinsir's ProMax has all
# eight, the first union model the first six); the extension's names. "Unknown": from the preprocessor.
UNION_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint")
UNKNOWN = "Unknown"
# the type a preprocessor's picture is, by the start of its name
_UNION_BY_MODULE = (("openpose", "OpenPose"), ("dw_openpose", "OpenPose"), ("depth", "Depth"),
                    ("softedge", "Soft Edge"),
                    ("hed", "Soft Edge"), ("pidi", "Soft Edge"), ("scribble", "Soft Edge"), ("threshold", "Soft Edge"),
                    ("canny", "Hard Edge"), ("lineart", "Hard Edge"), ("mlsd", "Hard Edge"), ("invert", "Hard Edge"),
                    ("normal", "Normal Map"), ("seg", "Segmentation"), ("tile", "Tile"), ("blur", "Tile"),
                    ("inpaint", "Inpaint"))


class ControlMode(IntEnum):
    BALANCED = 0
    PROMPT = 1  # "My prompt is more important"
    CONTROL = 2  # "ControlNet is more important"

    @property
    def label(self) -> str:
        return ("Balanced", "My prompt is more important", "ControlNet is more important")[self]


_RESIZE_NAMES = {"just resize": 0, "envelope (outer fit)": 2, "scale to fit (inner fit)": 1, "crop and resize": 1,
                 "resize and fill": 2, "inner fit": 1, "outer fit": 2}


def _by_name(value: Any, names: dict[str, int], what: str) -> Any:
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        key = value.strip().lower()
        if key not in names:
            raise ValueError(f"unknown {what} {value!r} (one of: {', '.join(names)})")
        return names[key]
    return value


NO_MASK = "the inpaint preprocessor needs a mask (paint one in img2img's inpaint, or give the unit's image a mask)"


class ControlUnit(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)

    enabled: bool = True
    module: str = "none"  # the preprocessor
    model: str = "None"
    weight: float = Field(1.0, ge=0.0, le=2.0)
    image: ImageInput | None = None  # None: img2img's init image
    mask: ImageInput | None = None  # white = repaint, for the inpaint preprocessor (None: img2img's inpaint mask)
    resize_mode: ResizeMode = ResizeMode.CROP_AND_RESIZE
    processor_res: int = Field(512, ge=64, le=2048)
    threshold_a: float = -1  # -1: the preprocessor's own default (canny: 100 and 200)
    threshold_b: float = -1
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    pixel_perfect: bool = False
    control_mode: ControlMode = ControlMode.BALANCED
    union_control_type: str = UNKNOWN

    @model_validator(mode="before")
    @classmethod
    def _a1111_values(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None}
        image = data.get("image")
        if isinstance(image, dict):  # {"image": ..., "mask": ...}
            data["image"] = image.get("image")
            if image.get("mask") not in ("", None) and "mask" not in data:
                data["mask"] = image["mask"]
        if data.get("mask") in ("", None):
            data.pop("mask", None)
        if data.get("image") in ("", None):
            data.pop("image", None)
        if "input_image" in data and "image" not in data:  # the extension's older name
            data["image"] = data.pop("input_image")
        if "resize_mode" in data:
            data["resize_mode"] = _by_name(data["resize_mode"], _RESIZE_NAMES, "resize_mode")
        if "control_mode" in data:
            names = {m.label.lower(): int(m) for m in ControlMode} | {"balanced": 0}
            data["control_mode"] = _by_name(data["control_mode"], names, "control_mode")
        if data.get("processor_res") == -1:  # the extension's "default"
            data.pop("processor_res")
        return data

    @field_validator("union_control_type")
    @classmethod
    def _union_name(cls, v: str) -> str:
        for name in (*UNION_TYPES, UNKNOWN):
            if v.strip().lower() == name.lower():
                return name
        raise ValueError(f"unknown union_control_type {v!r} (one of: {', '.join((*UNION_TYPES, UNKNOWN))})")

    def union_type(self) -> str | None:
        """The control type a union model gets: the chosen one, else the preprocessor's; None when
        neither says."""
        if self.union_control_type != UNKNOWN:
            return self.union_control_type
        module = self.module.strip().lower()
        return next((t for prefix, t in _UNION_BY_MODULE if module.startswith(prefix)), None)

    @field_validator("resize_mode")
    @classmethod
    def _no_latent(cls, v: ResizeMode) -> ResizeMode:
        if v == ResizeMode.LATENT_UPSCALE:
            raise ValueError("resize_mode: 0 (just resize), 1 (crop and resize) or 2 (resize and fill)")
        return v

    @model_validator(mode="after")
    def _range(self) -> ControlUnit:
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start {self.guidance_start} is after guidance_end {self.guidance_end}")
        return self

    def inpaint_mask(self, request_mask: Any) -> Any:
        """The inpaint preprocessor's mask: the unit's own, else img2img's inpaint mask when the unit
        takes the init image; None when there is none."""
        if self.mask is not None:
            return self.mask
        return request_mask if self.image is None else None

    @property
    def active(self) -> bool:
        return self.enabled and self.model not in ("", "None", "none") and self.weight > 0

    def infotext(self, model_title: str, thresholds: tuple[float, float], union: bool = False) -> str:
        """The value of `ControlNet N: "..."`, the extension's fields in its order (`thresholds`:
        those used, after -1 became the preprocessor's default); a union model's control type when
        it was chosen (`union`: the model is one)."""
        return (f"Module: {self.module}, Model: {model_title}, Weight: {self.weight:g}, "
                f"Resize Mode: {RESIZE_LABELS[self.resize_mode]}, Processor Res: {self.processor_res}, "
                f"Threshold A: {thresholds[0]:g}, Threshold B: {thresholds[1]:g}, "
                f"Guidance Start: {self.guidance_start:g}, Guidance End: {self.guidance_end:g}, "
                f"Pixel Perfect: {self.pixel_perfect}, Control Mode: {self.control_mode.label}"
                + (f", Union Control Type: {self.union_control_type}"
                   if union and self.union_control_type != UNKNOWN else ""))


_FLOATS = (("Weight", "weight"), ("Threshold A", "threshold_a"), ("Threshold B", "threshold_b"),
           ("Guidance Start", "guidance_start"), ("Guidance End", "guidance_end"))


def units_from_infotext(params: Mapping[str, str]) -> dict[int, dict[str, Any]]:
    """The units an infotext records (`ControlNet N: "Module: canny, Model: ..., Weight: 1, ..."`),
    as page values by field: the inverse of `ControlUnit.infotext`, for filling the page (the
    control image is not in an infotext). Entries that do not parse are skipped."""
    units: dict[int, dict[str, Any]] = {}
    for key, text in params.items():
        m = re.fullmatch(r"ControlNet (\d+)", key)
        if m is None or int(m.group(1)) >= MAX_UNITS:
            continue
        parts = dict(part.split(": ", 1) for part in text.strip().strip('"').split(", ") if ": " in part)
        if "Module" not in parts:
            continue
        unit: dict[str, Any] = {"enabled": True, "module": parts["Module"]}
        if parts.get("Model"):
            unit["model"] = parts["Model"]
        try:
            for label, name in _FLOATS:
                if label in parts:
                    unit[name] = float(parts[label])
            if "Processor Res" in parts:
                unit["processor_res"] = int(float(parts["Processor Res"]))
        except ValueError:
            continue
        if parts.get("Resize Mode") in RESIZE_LABELS:
            unit["resize_mode"] = parts["Resize Mode"]
        if parts.get("Control Mode") in [m.label for m in ControlMode]:
            unit["control_mode"] = parts["Control Mode"]
        if parts.get("Union Control Type") in UNION_TYPES:
            unit["union_control_type"] = parts["Union Control Type"]
        if "Pixel Perfect" in parts:
            unit["pixel_perfect"] = parts["Pixel Perfect"] == "True"
        units[int(m.group(1))] = unit
    return units
