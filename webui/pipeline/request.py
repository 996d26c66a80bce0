"""`GenerationRequest`: the one validated description of a generation, shared by the page,
the command line and the HTTP API. Field names follow the A1111 API (compat-facts §6)."""

from __future__ import annotations

import base64
import binascii
import io
from enum import IntEnum
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from webui.images import open_untrusted
from webui.samplers.table import find_sampler, resolve, split_sampler_name

MAX_SEED = 2**32 - 1


MAX_OUTPAINT = 2048


class ResizeMode(IntEnum):
    """How an init image is brought to the request's size (A1111's numbers and labels)."""

    JUST_RESIZE = 0
    CROP_AND_RESIZE = 1
    RESIZE_AND_FILL = 2
    LATENT_UPSCALE = 3  # resized as latents, after encoding at the image's own size

    @property
    def label(self) -> str:
        return ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")[self]


class MaskedContent(IntEnum):
    """What the masked area starts from when inpainting (A1111's `inpainting_fill`)."""

    FILL = 0  # the surrounding colours, blurred in
    ORIGINAL = 1
    LATENT_NOISE = 2
    LATENT_NOTHING = 3

    @property
    def label(self) -> str:
        return ("fill", "original", "latent noise", "latent nothing")[self]


def labelled(enum: type[IntEnum]) -> str:
    """`0 just resize, 1 crop and resize, ...`: an enum's numbers and labels, for help texts."""
    return ", ".join(f"{m.value} {m.label}" for m in enum)  # type: ignore[attr-defined]


def decode_image(value: Any) -> Image.Image:
    """A PIL image, or base64 text (a `data:image/...;base64,` prefix allowed)."""
    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a base64-encoded image")
    if value.startswith(("http://", "https://")):
        raise ValueError("images are not fetched from URLs (a server must not fetch into its own network); "
                         "send the image as base64")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    return open_untrusted(raw)


def encode_image(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


ImageInput = Annotated[
    Image.Image,
    BeforeValidator(decode_image),
    PlainSerializer(encode_image, return_type=str),
    WithJsonSchema({"type": "string", "description": "base64 image; a data: URL prefix is allowed"}),
]


class GenerationRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    prompt: str = ""
    negative_prompt: str = ""
    styles: tuple[str, ...] = ()  # names from styles.csv, applied to prompt and negative in order
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    subseed: int = Field(-1, ge=-1, le=MAX_SEED)  # variation seed
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_w: int = Field(0, ge=0, le=4096)  # 0: off
    seed_resize_from_h: int = Field(0, ge=0, le=4096)
    width: int = Field(512, ge=64, le=4096)
    height: int = Field(512, ge=64, le=4096)
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    batch_size: int = Field(1, ge=1, le=16)
    n_iter: int = Field(1, ge=1, le=100)
    clip_skip: int = Field(1, ge=1, le=12)
    tiling: bool = False
    # face restoration after decoding (webui.faces); None: the Settings' choice
    restore_faces: bool | None = None
    face_restoration_model: Literal["CodeFormer", "GFPGAN"] | None = None
    code_former_weight: float | None = Field(None, ge=0.0, le=1.0)
    # sampler options, passed to the samplers that take them (None: the sampler's default)
    eta: float | None = Field(None, ge=0.0, le=10.0)
    s_churn: float | None = Field(None, ge=0.0, le=100.0)
    s_tmin: float | None = Field(None, ge=0.0)
    s_tmax: float | None = Field(None, ge=0.0)
    s_noise: float | None = Field(None, ge=0.0, le=10.0)
    checkpoint: str | None = None  # title, name or hash; None = the server's current model
    # "VAE / Text encoder": files from models/VAE and the text-encoder folders that take the place
    # of the checkpoint's own (or complete it); empty: automatic (webui.models.modules)
    modules: tuple[str, ...] = ()
    # a second model (sharing the latent space) takes over for the last part of the steps
    refiner_checkpoint: str | None = None
    refiner_switch_at: float = Field(0.8, ge=0.0, le=1.0)  # fraction of the steps run by the first model
    save_images: bool = True
    # extension values by extension name (validated by each extension's args model at run time);
    # the HTTP API's `alwayson_scripts` arrive here
    extensions: dict[str, Any] = Field(default_factory=dict)

    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1.0, le=8.0)
    hr_resize_x: int = Field(0, ge=0, le=8192)  # 0: use hr_scale
    hr_resize_y: int = Field(0, ge=0, le=8192)
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = Field(0, ge=0, le=150)  # 0: same as steps
    hr_prompt: str = ""  # empty: the first pass's prompt
    hr_negative_prompt: str = ""
    hr_sampler_name: str = ""  # empty: the first pass's sampler
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)  # img2img, and the hires pass

    # img2img and inpainting
    init_images: tuple[ImageInput, ...] = ()
    resize_mode: ResizeMode = ResizeMode.JUST_RESIZE
    mask: ImageInput | None = None
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: MaskedContent = MaskedContent.ORIGINAL
    inpaint_full_res: bool = False  # True: only the masked area, at full resolution
    inpaint_full_res_padding: int = Field(32, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    # outpainting: pixels added left, top, right, bottom; the canvas (and the output size) grows to
    # the init image plus these, rounded up to multiples of 8, and width/height are not used
    outpaint: tuple[int, int, int, int] | None = None

    # token merging (ToMe) for this request; None: the Settings' ratio
    token_merging_ratio: float | None = Field(None, ge=0.0, le=0.9)
    token_merging_ratio_hr: float | None = Field(None, ge=0.0, le=0.9)
    token_merging_ratio_img2img: float | None = Field(None, ge=0.0, le=0.9)  # img2img, when the first is None
    # step caching (DeepCache, webui.pipeline.stepcache): the whole model every `interval` calls
    # (0 or 1: off); `branch`: how much is recomputed on the others; None: the Settings' values
    noise_schedule: Literal["Default", "Zero Terminal SNR"] | None = None  # None: the Settings' (sd_noise_schedule)
    # a flow model's (SD3's) schedule shift; None: the family's (3.0). Not used by other models.
    shift: float | None = Field(None, gt=0.0, le=100.0)
    # Flux dev's guidance-distilled scale (an input of the model; real CFG is `cfg_scale`, 1 = off)
    distilled_cfg_scale: float = Field(3.5, ge=0.0, le=30.0)
    deepcache_interval: int | None = Field(None, ge=0, le=20)
    deepcache_branch: int | None = Field(None, ge=0, le=6)
    # ControlNet units (A1111 extension's fields; the API's alwayson_scripts "controlnet" args)
    controlnet: tuple[ControlUnit, ...] = ()
    # a script (the Script dropdown, A1111's `script_name`) runs this request as its template;
    # its arguments: A1111's positional list, or a dict by name (see webui.scripts)
    script_name: str = ""
    script_args: list[Any] | dict[str, Any] = Field(default_factory=list)

    @property
    def is_img2img(self) -> bool:
        return bool(self.init_images)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v}; try {v - v % 8} or {v + 8 - v % 8})")
        return v

    @model_validator(mode="after")
    def _known_sampler(self) -> "GenerationRequest":
        # A name that is not built in may be an extension's sampler: the engine, which knows the
        # loaded extensions, checks it when the job starts (and the HTTP API before queuing).
        spec = find_sampler(self.sampler_name)
        if spec is not None or find_sampler(split_sampler_name(self.sampler_name)[0]) is not None:
            spec, schedule = resolve(self.sampler_name, self.scheduler)
            if (spec.name, schedule) != (self.sampler_name, self.scheduler):
                # normalise legacy combined names ("Euler a Karras") into sampler + schedule
                object.__setattr__(self, "sampler_name", spec.name)
                object.__setattr__(self, "scheduler", schedule)
        else:
            resolve("Euler", self.scheduler)  # the schedule type must still be known
        if self.mask is not None and not self.init_images:
            raise ValueError("a mask needs an init image")
        if self.outpaint is not None:
            if not all(0 <= n <= MAX_OUTPAINT for n in self.outpaint):
                raise ValueError(f"outpaint: four sizes from 0 to {MAX_OUTPAINT} pixels (left, top, right, bottom)")
            if len(self.init_images) != 1:
                raise ValueError("outpaint: needs exactly one init image")
        return self

    def derive(self, **changes: Any) -> GenerationRequest:
        """This request with `changes`, validated again (a script's cells, a nested generation);
        the images are carried over as they are, not encoded and decoded. ValueError with
        `validation_message`'s text."""
        fields = self.model_dump(exclude={"init_images", "mask"})
        fields.update(init_images=self.init_images, mask=self.mask)
        try:
            return GenerationRequest.model_validate({**fields, **changes})
        except ValidationError as err:
            raise ValueError(validation_message(err)) from None

    def total_steps(self) -> int:
        """Sampling steps the whole request takes (for progress): img2img and the hires pass run
        the last `denoising_strength` of theirs."""
        per_batch = denoise_steps(self.steps, self.denoising_strength) if self.is_img2img else self.steps
        if self.enable_hr and not self.is_img2img:
            per_batch += denoise_steps(self.hr_second_pass_steps or self.steps, self.denoising_strength)
        return per_batch * self.n_iter

    def without_inputs(self) -> "GenerationRequest":
        """This request without its decoded images (what a finished job keeps)."""
        return self.model_copy(update={"init_images": (), "mask": None})

    def hires_size(self) -> tuple[int, int] | None:
        """(width, height) the hires pass renders at, or None without one. hr_resize_x/y win over
        hr_scale; one of them alone keeps the aspect ratio; multiples of 8 (rounded down)."""
        if not self.enable_hr or self.is_img2img:
            return None
        if self.hr_resize_x or self.hr_resize_y:
            w = self.hr_resize_x or round(self.width * self.hr_resize_y / self.height)
            h = self.hr_resize_y or round(self.height * self.hr_resize_x / self.width)
        else:
            w, h = round(self.width * self.hr_scale), round(self.height * self.hr_scale)
        return w // 8 * 8, h // 8 * 8

    def canvas_size(self) -> tuple[int, int]:
        """(width, height) of the images this request makes (before any hires pass)."""
        if not self.outpaint or not any(self.outpaint):
            return self.width, self.height
        left, top, right, bottom = self.outpaint
        w, h = self.init_images[0].size
        return -(-(w + left + right) // 8) * 8, -(-(h + top + bottom) // 8) * 8


    @field_validator("controlnet")
    @classmethod
    def _unit_count(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        from webui.controlnet.units import MAX_UNITS

        active = [u for u in v if u.active]
        if len(active) > MAX_UNITS or len(v) > 16:
            raise ValueError(f"at most {MAX_UNITS} enabled ControlNet units (got {len(active)} of {len(v)})")
        return v


def denoise_steps(steps: int, strength: float) -> int:
    """img2img runs the last int(strength * steps) steps of a `steps`-step schedule."""
    return int(min(strength, 0.999) * steps)


def validation_message(error: ValidationError) -> str:
    """One clause per bad field: `steps: Input should be greater than or equal to 1`."""
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e.get("loc", ())) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}".replace("Value error, ", ""))
    return "; ".join(parts)


from webui.controlnet.units import ControlUnit  # noqa: E402  (it uses ImageInput and ResizeMode above)

GenerationRequest.model_rebuild()
