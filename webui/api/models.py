"""Request and response bodies of the HTTP API.

A generation body *is* a `GenerationRequest` (a subclass adding the A1111 envelope: send_images,
override_settings, alwayson_scripts, ...), so the API and the engine share one definition.
Unknown fields are accepted and reported back in `info.notes`, as A1111 clients send fields we
do not have (restore_faces, do_not_save_grid, ...). Sizes that are not multiples of 8 are
rounded, and said so.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from webui.pipeline.request import GenerationRequest, ImageInput

# override_settings keys that map onto request fields (others are reported as ignored)
OVERRIDE_FIELDS = {
    "sd_model_checkpoint": "checkpoint",
    "CLIP_stop_at_last_layers": "clip_skip",
    "eta_ancestral": "eta",
    "eta_ddim": "eta",
    "s_churn": "s_churn",
    "s_noise": "s_noise",
    "sd_refiner_checkpoint": "refiner_checkpoint",
}


class GenerationBody(GenerationRequest):
    """txt2img / img2img body: every `GenerationRequest` field plus the A1111 envelope."""

    model_config = ConfigDict(frozen=True, extra="allow", arbitrary_types_allowed=True)

    save_images: bool = False  # A1111's API default: results are returned, not written
    send_images: bool = True
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True  # always true here: overrides are per request
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    sampler_index: str | None = None  # legacy name of sampler_name
    include_init_images: bool = False
    notes: SkipJsonSchema[tuple[str, ...]] = ()  # what was adjusted or ignored (filled by the validator)

    @model_validator(mode="before")
    @classmethod
    def _adjust(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        notes: list[str] = []
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
            fields["extensions"] = {**self.alwayson_scripts, **self.extensions}
        ignored_overrides = []
        for key, value in self.override_settings.items():
            if key in OVERRIDE_FIELDS:
                fields[OVERRIDE_FIELDS[key]] = value
            else:
                ignored_overrides.append(key)
        if ignored_overrides:
            notes.append(f"override_settings ignored (not supported): {', '.join(sorted(ignored_overrides))}")
        if self.model_extra:
            notes.append(f"fields ignored (not supported): {', '.join(sorted(self.model_extra))}")
        if self.script_name:
            notes.append(f"script {self.script_name!r} ignored: scripts are not supported, extensions use "
                         "alwayson_scripts")
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
    progress: float = 0.0
    eta_relative: float = 0.0
    step: int = 0
    steps: int = 0
    current_image: str | None = None
    error: str | None = None
    result: GenerationResponse | None = None


class ExtrasSingleImageBody(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore")

    image: ImageInput
    resize_mode: Literal[0, 1] = 0  # 0: scale by upscaling_resize, 1: to upscaling_resize_w x _h
    upscaling_resize: float = Field(2.0, gt=0, le=16)
    upscaling_resize_w: int = Field(512, ge=1, le=16384)
    upscaling_resize_h: int = Field(512, ge=1, le=16384)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    show_extras_results: bool = True


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str


class PngInfoBody(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    image: ImageInput


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]
