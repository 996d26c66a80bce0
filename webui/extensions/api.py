"""The extension API: the one module an extension imports. Everything here is covered by the
stability promise (see docs/extensions.md): within a major `API_VERSION`, names and fields are
only ever added, never removed or changed in meaning.

An extension is a module (or package) with functions marked `@hookimpl`, named after the hooks
in `webui.extensions.hookspecs`. Each hook receives keyword arguments; an implementation may
accept any subset of them, so adding an argument later never breaks it. Hooks get a per-job
stage object, never the app: they read and change that object, and their changes to the model
go through `DenoiserStage.patch`, which is undone when the job ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel

API_VERSION = "1.2"  # 1.1: combining guidance, model inputs, nested generations; 1.2: attention processors, sigma_next, X/Y/Z axes, Guidance.parts, detectors
PROJECT = "webui"

hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)


class JobRejected(ValueError):
    """Raise from a hook to fail the job with this message (shown to the user as it is; the HTTP
    API answers 422)."""


@dataclass
class PromptStage:
    """The prompts of one batch, after styles, before they are parsed and encoded.

    `prompts` / `negative_prompts` hold one text per image (they may differ per image: rewrite
    entry i with seed `seeds[i]`). Extra-network tags (`<lora:name:1>`) are still in the text;
    `extra_networks` lists them as parsed from the first prompt (kind, name, params), for reading.
    `infotext` collects `Key: value` pairs written into every image's parameters."""

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    extra_networks: list[tuple[str, str, tuple[str, ...]]]
    args: Any = None  # this extension's validated UI/API values (its args model), or None
    settings: Any = None  # this extension's Settings section (its settings model), or None
    infotext: dict[str, Any] = field(default_factory=dict)
    batch_index: int = 0
    request: Any = None  # the GenerationRequest (read-only)
    data_dir: Any = None  # pathlib.Path of the data folder: relative paths in settings start here
    job_id: str = ""  # since 1.1: the same for every stage of one job
    scratch: dict[str, Any] = field(default_factory=dict)  # since 1.1: this extension's, for this job


Denoiser = Callable[[Any, Any], Any]  # (x, sigma) -> denoised


@dataclass
class Guidance:
    """What combining guidance works on, for one image at one model call (tensors [C, H, W] of
    denoised estimates): `cond` the conditional prediction (the prompt's AND parts already
    weighted), `uncond` the unconditional one (the negative prompt), `scale` the CFG scale, `x` the
    noisy latents and `sigma` the noise level of this call. `cfg()` is the usual combination."""

    cond: Any
    uncond: Any
    scale: float
    x: Any
    sigma: Any
    # since 1.2: each AND sub-prompt's own prediction and weight, in the prompt's order (`cond` is
    # `uncond + sum(w * (p - uncond))` over them); regional prompting weights them by area
    parts: list[tuple[Any, float]] = field(default_factory=list)

    def cfg(self) -> Any:
        """`uncond + scale * (cond - uncond)`: what the denoiser returns when nobody changes it."""
        return self.uncond + self.scale * (self.cond - self.uncond)


@dataclass
class ModelCall:
    """One call of the denoising model, just before it runs (since 1.1): add keyword arguments the
    diffusers UNet takes to `kwargs` -- `down_block_additional_residuals` and
    `mid_block_additional_residual` (ControlNet, T2I-Adapter), `cross_attention_kwargs` -- for
    this call. `x` is the scaled model input [rows, C, H, W] (the first `C` channels are the
    latents), `context` the text conditioning per row; row `i` belongs to image `row_image[i]`,
    and `uncond_rows` lists the rows of the negative prompt (None without guidance)."""

    x: Any
    timestep: Any
    sigma: Any
    context: Any
    step: int  # 1-based over the request's steps
    row_image: list[int]
    uncond_rows: list[int] | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    added_cond_kwargs: Any = None  # since 1.2: SDXL's pooled text and size conditioning; a model input may extend it


@dataclass
class DenoiserStage:
    """Where the sampler is set up, per sampling pass. Wrap `denoiser` (a callable
    `(x, sigma) -> denoised`) by assigning a new callable; change the model only through `patch`
    (restored after the job, whatever happens). Append to `model_inputs` to give the model more
    inputs at each call (see `ModelCall`). Set `combine` (a callable `Guidance -> tensor`) to
    change how the conditional and unconditional predictions are combined (CFG rescale, say);
    to compose with an extension before you, call the `combine` you found (or `Guidance.cfg`).
    Replace the model's attention processors with `set_attn_processor` (IP-Adapter does)."""

    denoiser: Denoiser
    unet: Any  # the diffusers UNet of this job (read it; change it only through `patch`)
    cfg_scale: float
    sampler_name: str
    steps: int
    args: Any = None
    settings: Any = None
    infotext: dict[str, Any] = field(default_factory=dict)
    request: Any = None
    combine: Callable[[Guidance], Any] | None = None  # since 1.1; None: Guidance.cfg
    # since 1.1: called before each model call of this pass, in order, to add model inputs
    model_inputs: list[Callable[[ModelCall], None]] = field(default_factory=list)
    job_id: str = ""  # since 1.1
    scratch: dict[str, Any] = field(default_factory=dict)  # since 1.1: this extension's, for this job
    _patch: Callable[[Any, str, Any], None] | None = None
    _set_processors: Callable[[Any], None] | None = None

    def patch(self, obj: Any, attribute: str, value: Any) -> None:
        """Set `obj.attribute = value` for this job only; the old value comes back afterwards."""
        if self._patch is None:
            raise RuntimeError("patch is only available while the job runs")
        self._patch(obj, attribute, value)

    def set_attn_processor(self, processor: Any) -> None:
        """Since 1.2: give the UNet's attention layers `processor` (one diffusers attention
        processor for every layer, or a dict by layer name as `unet.attn_processors` lists them)
        for this job only; the processors the app chose (SDPA, xformers, sliced) come back after.
        Read `unet.attn_processors` first to wrap the current ones rather than replace them."""
        if self._set_processors is None:
            raise RuntimeError("set_attn_processor is only available while the job runs")
        self._set_processors(processor)


@dataclass
class StepStage:
    """After each sampling step: `x` the latents the next step starts from (assign a tensor of
    the same shape to replace them), `denoised` the current estimate of the clean latents.
    `infotext` pairs are written into every image of the job (since 1.1); `scratch` keeps what this
    extension counts across the steps of the job."""

    step: int  # 1-based over this sampling pass
    steps: int
    sigma: Any
    denoised: Any
    x: Any
    args: Any = None
    settings: Any = None
    replaced: bool = False
    request: Any = None  # since 1.1
    job_id: str = ""  # since 1.1
    scratch: dict[str, Any] = field(default_factory=dict)  # since 1.1: this extension's, for this job
    infotext: dict[str, Any] = field(default_factory=dict)  # since 1.1
    # since 1.2: the noise level the next step starts from; 0 after a pass's last step when it
    # ends at the clean image (a pass handing over to a refiner ends above 0); None where a
    # sampler that does not step along the schedule (adaptive, restart) cannot say
    sigma_next: Any = None

    def replace(self, latents: Any) -> None:
        """Make `latents` (same shape as `x`) the latents the next step starts from."""
        self.x, self.replaced = latents, True


@dataclass
class ImageStage:
    """Each decoded image before it is saved: replace `image` to change it; add to `infotext`
    (`Key: value` pairs written into this image's parameters)."""

    image: Any  # PIL.Image.Image
    index: int  # index of the image in the job
    seed: int
    prompt: str
    data_dir: Any = None  # pathlib.Path of the data folder: relative paths in settings start here
    args: Any = None
    settings: Any = None
    infotext: dict[str, Any] = field(default_factory=dict)
    request: Any = None
    job_id: str = ""  # since 1.1
    scratch: dict[str, Any] = field(default_factory=dict)  # since 1.1: this extension's, for this job
    # since 1.1: a nested generation through the engine, from inside this job (a detailer pass on
    # a region): `generate(**fields)` runs this job's request with those fields changed (say
    # init_images, mask, denoising_strength, prompt) on the same model, saves nothing, runs no
    # extension hooks (so a hook cannot call itself without end), and returns an object with
    # `images` and `infotexts`
    generate: Callable[..., Any] | None = None
    detectors: dict[str, Detector] = field(default_factory=dict)  # since 1.2: the `detectors` hook's, by name


@dataclass
class SavedImage:
    path: Any  # pathlib.Path
    image: Any
    infotext: str


@dataclass
class JobInfo:
    """What a `generate` wrapper sees of the job it wraps."""

    request: Any
    kind: str  # "txt2img" or "img2img"
    id: str = ""  # since 1.1: the job_id its stages see
    _run: Callable[[], Any] | None = field(default=None, repr=False)  # the job itself (internal)


@dataclass
class SamplerStep:
    """What a sampler passes to its `callback` after each step (the built-in samplers do too)."""

    step: int  # 0-based index of the step just finished
    total: int
    x: Any  # the latents after this step
    sigma: Any
    denoised: Any


@dataclass(frozen=True)
class ExtensionSampler:
    """A sampler an extension adds (returned by the `samplers` hook), listed and chosen by `name`
    like the built-in ones. `fn(denoiser, x, sigmas, *, noise, callback, **options)`: loop over
    `sigmas`, call `denoiser(x, sigma)` for the denoised estimate, `noise(x)` for seeded fresh
    noise, and `callback(SamplerStep(...))` once per step; return the final latents.
    `options` names the request fields it accepts (eta, s_churn, s_noise, s_tmin, s_tmax)."""

    name: str
    fn: Callable[..., Any]
    options: tuple[str, ...] = ()
    stochastic: bool = False


@dataclass(frozen=True)
class XyzAxis:
    """An axis an extension adds to the X/Y/Z plot (returned by the `xyz_axes` hook; since 1.2),
    listed after the built-in ones under `label`. `kind` is int, float or str: values are parsed
    with A1111's syntax for it (lists, `1-5`, `1-5 (+2)`, `1-10 [5]`). `apply(fields, value)`
    changes the request's fields (a dict, `GenerationRequest`'s names) for a cell -- usually this
    extension's own values, `fields["extensions"]["<name>"] = {...}`."""

    label: str
    kind: type
    apply: Callable[[dict[str, Any], Any], None]


@dataclass(frozen=True)
class Detection:
    """One thing a detector found: `box` (left, top, right, bottom) in the image's pixels, its
    `confidence` (0-1), and a PIL "L" `mask` of the image's size when the model segments."""

    box: tuple[float, float, float, float]
    confidence: float
    mask: Any = None


@dataclass(frozen=True)
class Detector:
    """A detector an extension adds (returned by the `detectors` hook; since 1.2), chosen by
    `name` like the ONNX files in models/detailer: `detect(image, confidence)` returns the
    `Detection`s in a PIL image at or above that confidence."""

    name: str
    detect: Callable[[Any, float], list[Detection]]


@dataclass
class UiSection:
    """A section an extension adds to the page. `build()` is called inside a Gradio context
    (an accordion under txt2img/img2img, or a new tab) and returns its input components by
    name; those names are the fields of `args_model`, which validates the values before they
    reach the hooks as `args`. The same values come through the HTTP API in
    `alwayson_scripts: {"<extension name>": {"args": {...} or [...]}}`."""

    title: str
    build: Callable[[], dict[str, Any]]
    args_model: type[BaseModel] | None = None
    tabs: tuple[str, ...] = ("txt2img", "img2img")  # or ("tab",) for a tab of its own


class SettingsRegistry:
    """Given to `register_settings`: `add(model)` declares this extension's section of the
    Settings tab (a pydantic model whose fields all have defaults). Its current values reach
    every hook of the extension as the stage's `settings`."""

    def __init__(self, add: Callable[[type[BaseModel]], None]) -> None:
        self._add = add

    def add(self, model: type[BaseModel]) -> None:
        """Declare `model` (a pydantic model, all fields with defaults) as this extension's settings."""
        self._add(model)


__all__ = [
    "API_VERSION", "DenoiserStage", "ExtensionSampler", "Guidance", "ModelCall", "SamplerStep", "ImageStage", "JobInfo", "JobRejected", "PromptStage",
    "SavedImage", "SettingsRegistry", "StepStage", "UiSection", "XyzAxis", "hookimpl", "Detection",
    "Detector",
]
