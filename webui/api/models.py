"""Request and response bodies of the HTTP API.

A generation body *is* a `GenerationRequest` (a subclass adding the A1111 envelope: send_images,
override_settings, alwayson_scripts, ...), so the API and the engine share one definition.
A1111's values are read with A1111's meaning first (`webui.api.a1111`: nulls, sentinels, fields
without an effect here); unknown fields are accepted and reported back in `info.notes`. Sizes
that are not multiples of 8 are rounded, and said so. Defaults that A1111's API has and its page
does not (inpainting: fill, only the masked area, no padding) are the API's defaults here too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from webui.api.a1111 import drop_nulls, generation_fields
from webui.pipeline.request import GenerationRequest, ImageInput, MaskedContent

# override_settings keys that map onto request fields (others are reported as ignored)
OVERRIDE_FIELDS = {
    "sd_model_checkpoint": "checkpoint",
    "CLIP_stop_at_last_layers": "clip_skip",
    "eta_ancestral": "eta",
    "eta_ddim": "eta",
    "s_churn": "s_churn",
    "s_noise": "s_noise",
    "sd_refiner_checkpoint": "refiner_checkpoint",
    "token_merging_ratio": "token_merging_ratio",
    "token_merging_ratio_hr": "token_merging_ratio_hr",
    "token_merging_ratio_img2img": "token_merging_ratio_img2img",
    "deepcache_interval": "deepcache_interval",
    "sd_noise_schedule": "noise_schedule",
    "deepcache_branch": "deepcache_branch",
    "face_restoration": "restore_faces",
    "face_restoration_model": "face_restoration_model",
    "code_former_weight": "code_former_weight",
}

# override_settings keys that choose VAE / text-encoder files (the request's `modules`): A1111's
# `sd_vae` (a name, "Automatic" or "None") and Forge's `forge_additional_modules` (a list of paths)
MODULE_OVERRIDES = ("sd_vae", "forge_additional_modules")


def _module_names(key: str, value: Any) -> tuple[str, ...]:
    """The file names an override names; "Automatic", "None" (A1111's sd_vae) and null choose none."""
    values = [v for v in (value if isinstance(value, list) else [value]) if v is not None]
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"override_settings.{key}: file names (got {value!r})")
    names = [v.replace("\\", "/").rsplit("/", 1)[-1] if key == "forge_additional_modules" else v for v in values]
    return tuple(n for n in names if n.strip() and n not in ("Automatic", "None"))


class GenerationBody(GenerationRequest):
    """txt2img / img2img body: every `GenerationRequest` field plus the A1111 envelope."""

    model_config = ConfigDict(frozen=True, extra="allow", arbitrary_types_allowed=True)

    save_images: bool = False  # A1111's API default: results are returned, not written
    send_images: bool = True
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True  # always true here: overrides are per request
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    sampler_index: str | None = None  # legacy name of sampler_name
    include_init_images: bool = False
    # A1111's API defaults for inpainting (its page, like ours, starts from "original", whole picture, 32)
    inpainting_fill: MaskedContent = MaskedContent.FILL
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    notes: SkipJsonSchema[tuple[str, ...]] = ()  # what was adjusted or ignored (filled by the validator)
    # A1111's fields that have no field here, as sent: echoed back in `parameters`, as A1111 echoes them
    a1111_echo: SkipJsonSchema[dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _adjust(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        echo = {k: v for k, v in data.items() if k not in cls.model_fields}
        data, notes = generation_fields(drop_nulls(data))
        data["a1111_echo"] = echo
        for key in ("width", "height"):
            v = data.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 8:
                data[key] = max(8, round(v / 8) * 8)
                notes.append(f"{key} {v} rounded to {data[key]} (sizes are multiples of 8)")
        if data.get("sampler_index") and not data.get("sampler_name"):
            data["sampler_name"] = data["sampler_index"]
        data["notes"] = tuple(notes)
        return data

    def to_request(self, envelope_notes: list[str] | None = None) -> tuple[GenerationRequest, list[str]]:
        """The engine's request (override_settings applied to this request only) and the notes."""
        notes = list(self.notes) + (envelope_notes or [])
        fields = {name: getattr(self, name) for name in GenerationRequest.model_fields}
        if self.alwayson_scripts:  # A1111's shape {name: {"args": [...]}}; names are extension names
            scripts = dict(self.alwayson_scripts)
            for key in [k for k in scripts if k.lower() == "controlnet"]:  # the ControlNet extension's units
                units = scripts.pop(key)
                fields["controlnet"] = units.get("args", []) if isinstance(units, dict) else units
            if scripts:
                fields["extensions"] = {**scripts, **self.extensions}
        ignored_overrides = []
        for key, value in self.override_settings.items():
            if key in OVERRIDE_FIELDS:
                fields[OVERRIDE_FIELDS[key]] = value
            elif key in MODULE_OVERRIDES:
                fields["modules"] = (*fields["modules"], *_module_names(key, value))
            else:
                ignored_overrides.append(key)
        if ignored_overrides:
            notes.append(f"override_settings ignored (not supported): {', '.join(sorted(ignored_overrides))}")
        if self.model_extra:
            notes.append(f"fields ignored (not supported): {', '.join(sorted(self.model_extra))}")
        return GenerationRequest.model_validate(fields), notes


class JobBody(GenerationBody):
    type: Literal["txt2img", "img2img"] = "txt2img"


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNG, no data: prefix")
    parameters: dict[str, Any]
    info: str = Field(description="JSON text: seeds, infotexts, model, notes")


class ProgressState(BaseModel):
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    job_timestamp: str = ""
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class JobStatus(BaseModel):
    id: str
    type: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    position: int = Field(description="0 once running or finished; else 1 + the jobs ahead")
    worker: str | None = Field(None, description="the worker (device) running or that ran it: cuda:1, cpu/0")
    progress: float = 0.0
    eta_relative: float = 0.0
    step: int = 0
    steps: int = 0
    current_image: str | None = None
    error: str | None = None
    result: GenerationResponse | None = None


class ExtrasOptions(BaseModel):
    """A1111's `ExtrasBaseRequest`: how to upscale, then restore faces."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="allow")

    resize_mode: Literal[0, 1] = 0  # 0: scale by upscaling_resize, 1: to upscaling_resize_w x _h
    upscaling_resize: float = Field(2.0, gt=0, le=16)
    upscaling_resize_w: int = Field(512, ge=1, le=16384)
    upscaling_resize_h: int = Field(512, ge=1, le=16384)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"  # blended over upscaler_1's result by extras_upscaler_2_visibility
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0)
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_weight: float = Field(0.5, ge=0.0, le=1.0)
    show_extras_results: bool = True
    notes: SkipJsonSchema[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _a1111(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data, notes = generation_fields(drop_nulls(data))
        return {**data, "notes": tuple(notes)}


class ExtrasSingleImageBody(ExtrasOptions):
    image: ImageInput


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str


class BatchImage(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore")

    data: ImageInput
    name: str = ""


class ExtrasBatchImagesBody(ExtrasOptions):
    imageList: list[BatchImage] = Field(min_length=1, max_length=64)  # noqa: N815 -- A1111's field name


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class InterrogateBody(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore")

    image: ImageInput
    model: str = "clip"
    # the Tagger extension's options, for a tagger model
    threshold: float = Field(0.35, ge=0.0, le=1.0)
    character_threshold: float = Field(0.85, ge=0.0, le=1.0)
    exclude_tags: str = ""

    @model_validator(mode="before")
    @classmethod
    def _a1111(cls, data: Any) -> Any:
        return drop_nulls(data)


class PngInfoBody(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore")

    image: ImageInput | None = None  # A1111 answers an empty image with empty info

    @model_validator(mode="before")
    @classmethod
    def _a1111(cls, data: Any) -> Any:
        data = drop_nulls(data)
        if isinstance(data, dict) and isinstance(data.get("image"), str) and not data["image"].strip():
            data = {k: v for k, v in data.items() if k != "image"}
        return data


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]
