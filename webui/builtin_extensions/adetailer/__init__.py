"""Detailer, ADetailer-style: after each image, find faces (hands, people) with a detector and
repaint each one at full resolution -- its own prompt, denoising strength, steps, CFG, sampler --
so small faces come out as sharp as large ones. A worked example of `ImageStage.generate` (a
nested generation through the engine) and of detectors (the `detectors` hook, API 1.2).

Detectors: YOLO-style ONNX files in models/detailer (`face_yolov8n.onnx`; the `detailer` extra
installs onnxruntime), or any an extension registers by name. Ultralytics `.pt` files are
pickles, which are refused with how to export them to ONNX.

Over the HTTP API it takes ADetailer's own shape, under ADetailer's name:
`alwayson_scripts: {"ADetailer": {"args": [true, false, {"ad_model": "face_yolov8n.onnx",
"ad_prompt": "a detailed face", "ad_denoising_strength": 0.4}, {...}]}}` -- enable, skip img2img,
then one dict per detector pass (two here). It writes ADetailer's infotext keys (`ADetailer model`,
`ADetailer confidence`, ...; ` 2nd` for the second pass).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from webui.extensions.api import ImageStage, JobRejected, UiSection, hookimpl

from .detect import OnnxDetector, find_model

TITLE = "ADetailer"
VERSION = "webui-1.0"
NONE = "None"


class DetailerUnit(BaseModel):
    """One detector pass; the field names are ADetailer's (its other keys are accepted and unused)."""

    model_config = ConfigDict(extra="allow")

    ad_tab_enable: bool = True
    ad_model: str = NONE
    ad_prompt: str = ""
    ad_negative_prompt: str = ""
    ad_confidence: float = Field(0.3, ge=0.0, le=1.0)
    ad_mask_k_largest: int = Field(0, ge=0, le=100)  # 0: every detection
    ad_dilate_erode: int = Field(4, ge=-128, le=128)
    ad_mask_blur: int = Field(4, ge=0, le=64)
    ad_denoising_strength: float = Field(0.4, ge=0.0, le=1.0)
    ad_inpaint_only_masked: bool = True
    ad_inpaint_only_masked_padding: int = Field(32, ge=0, le=256)
    ad_use_steps: bool = False
    ad_steps: int = Field(28, ge=1, le=150)
    ad_use_cfg_scale: bool = False
    ad_cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    ad_use_sampler: bool = False
    ad_sampler: str = "DPM++ 2M"

    @property
    def active(self) -> bool:
        return self.ad_tab_enable and self.ad_model not in ("", NONE)


PAGE_FIELDS = ("ad_model", "ad_prompt", "ad_negative_prompt", "ad_confidence", "ad_denoising_strength")


class DetailerArgs(BaseModel):
    ad_enable: bool = False
    skip_img2img: bool = False
    unit1: DetailerUnit = Field(default_factory=DetailerUnit)
    unit2: DetailerUnit = Field(default_factory=DetailerUnit)
    # the page's form: the first pass's main fields, flat (the API sends them inside unit1)
    ad_model: str | None = None
    ad_prompt: str | None = None
    ad_negative_prompt: str | None = None
    ad_confidence: float | None = Field(None, ge=0.0, le=1.0)
    ad_denoising_strength: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _page_form(self) -> DetailerArgs:
        given = {k: getattr(self, k) for k in PAGE_FIELDS if getattr(self, k) is not None}
        if given.get("ad_model"):
            self.unit1 = self.unit1.model_copy(update=given)
        return self

    @model_validator(mode="before")
    @classmethod
    def _older_shape(cls, data: Any) -> Any:
        """Older clients send only the units (`[{...}, {...}]`): enabled, img2img not skipped."""
        if isinstance(data, dict) and isinstance(data.get("ad_enable"), dict):
            units = [data.get(k) for k in ("ad_enable", "skip_img2img", "unit1") if isinstance(data.get(k), dict)]
            return {"ad_enable": True, **{f"unit{i + 1}": u for i, u in enumerate(units[:2])}}
        return data


def _detector(stage: ImageStage, name: str) -> Any:
    """A registered detector, or the ONNX file (its session made once per job, in scratch)."""
    if name in stage.detectors:
        return stage.detectors[name]
    sessions = stage.scratch.setdefault("detectors", {})
    if name not in sessions:
        sessions[name] = OnnxDetector(find_model(Path(stage.data_dir) / "models" / "detailer", name))
    return sessions[name]


def region_mask(size: tuple[int, int], detection: Any, dilate: int) -> Image.Image:
    """White where the detection is (its mask, else its box), grown (or shrunk) by `dilate` px."""
    if detection.mask is not None:
        mask = detection.mask.convert("L").resize(size)
    else:
        mask = Image.new("L", size, 0)
        mask.paste(255, tuple(round(v) for v in detection.box))
    if dilate:
        size_px = 2 * abs(dilate) + 1
        mask = mask.filter(ImageFilter.MaxFilter(size_px) if dilate > 0 else ImageFilter.MinFilter(size_px))
    return mask


def _infotext(unit: DetailerUnit, suffix: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ADetailer model": unit.ad_model, "ADetailer confidence": unit.ad_confidence,
        "ADetailer dilate erode": unit.ad_dilate_erode, "ADetailer mask blur": unit.ad_mask_blur,
        "ADetailer denoising strength": unit.ad_denoising_strength,
        "ADetailer inpaint only masked": unit.ad_inpaint_only_masked,
        "ADetailer inpaint padding": unit.ad_inpaint_only_masked_padding,
    }
    optional = (  # (written when, key, value): ADetailer leaves these out at their defaults
        (unit.ad_prompt, "ADetailer prompt", unit.ad_prompt),
        (unit.ad_negative_prompt, "ADetailer negative prompt", unit.ad_negative_prompt),
        (unit.ad_mask_k_largest, "ADetailer mask only top k largest", unit.ad_mask_k_largest),
        (unit.ad_use_steps, "ADetailer steps", unit.ad_steps),
        (unit.ad_use_cfg_scale, "ADetailer CFG scale", unit.ad_cfg_scale),
        (unit.ad_use_sampler, "ADetailer sampler", unit.ad_sampler),
    )
    fields.update({key: value for used, key, value in optional if used})
    return {f"{k}{suffix}": v for k, v in fields.items()}


def detail(stage: ImageStage, unit: DetailerUnit, image: Image.Image) -> tuple[Image.Image, int]:
    """`image` with every detection of `unit`'s detector repainted; and how many there were."""
    detections = _detector(stage, unit.ad_model).detect(image, unit.ad_confidence)
    detections = sorted(detections, key=lambda d: (d.box[2] - d.box[0]) * (d.box[3] - d.box[1]), reverse=True)
    if unit.ad_mask_k_largest:
        detections = detections[: unit.ad_mask_k_largest]
    r = stage.request
    for detection in detections:
        mask = region_mask(image.size, detection, unit.ad_dilate_erode)
        if mask.getbbox() is None:
            continue
        fields: dict[str, Any] = {
            "init_images": (image,), "mask": mask, "denoising_strength": unit.ad_denoising_strength,
            "inpaint_full_res": unit.ad_inpaint_only_masked,
            "inpaint_full_res_padding": unit.ad_inpaint_only_masked_padding, "mask_blur": unit.ad_mask_blur,
            "inpainting_fill": 1, "resize_mode": 0, "prompt": unit.ad_prompt or stage.prompt,
            "negative_prompt": unit.ad_negative_prompt or r.negative_prompt,
        }
        if not unit.ad_inpaint_only_masked:  # the whole image is repainted at its own size
            fields["width"], fields["height"] = image.width // 8 * 8, image.height // 8 * 8
        if unit.ad_use_steps:
            fields["steps"] = unit.ad_steps
        if unit.ad_use_cfg_scale:
            fields["cfg_scale"] = unit.ad_cfg_scale
        if unit.ad_use_sampler:
            fields["sampler_name"] = unit.ad_sampler
        assert stage.generate is not None
        try:
            result = stage.generate(**fields)
        except ValueError as err:  # a nested request the engine refused (a bad sampler name, say)
            raise JobRejected(f"{TITLE}: {err}") from None
        if result.images:
            image = result.images[0].resize(image.size) if result.images[0].size != image.size else result.images[0]
    return image, len(detections)


def _build() -> dict:
    import gradio as gr  # only the page needs gradio

    unit = DetailerUnit()
    return {
        "ad_enable": gr.Checkbox(False, label="Enable ADetailer"),
        "skip_img2img": gr.Checkbox(False, label="Skip on img2img"),
        "ad_model": gr.Textbox("face_yolov8n.onnx", label="Detector", info="An .onnx file in models/detailer"),
        "ad_prompt": gr.Textbox("", label="Prompt", info="Empty: the image's prompt"),
        "ad_negative_prompt": gr.Textbox("", label="Negative prompt", info="Empty: the image's"),
        "ad_confidence": gr.Slider(0, 1, value=unit.ad_confidence, step=0.01, label="Detection confidence"),
        "ad_denoising_strength": gr.Slider(0, 1, value=unit.ad_denoising_strength, step=0.01,
                                           label="Inpaint denoising strength"),
    }


@hookimpl
def ui_contribution() -> UiSection:
    return UiSection(title=TITLE, build=_build, args_model=DetailerArgs, tabs=("txt2img", "img2img"))


@hookimpl
def postprocess_image(stage: ImageStage) -> None:
    args = stage.args
    if args is None or not args.ad_enable or (args.skip_img2img and stage.request.is_img2img):
        return
    image = stage.image
    for unit, suffix in ((args.unit1, ""), (args.unit2, " 2nd")):
        if not unit.active:
            continue
        image, _ = detail(stage, unit, image)
        stage.infotext.update(_infotext(unit, suffix))
    stage.image = image
    stage.infotext["ADetailer version"] = VERSION
