"""The hooks an extension can implement, one function each, in the order a job meets them.

Implement a hook by defining a function of the same name marked `@hookimpl` (from
`webui.extensions.api`), taking any subset of the arguments listed here by name. The docstrings
below are the reference documentation (docs/extensions.md is generated from them).
"""

from __future__ import annotations

from typing import Any

from webui.extensions.api import (
    DenoiserStage,
    Detector,
    ExtensionSampler,
    ImageStage,
    JobInfo,
    PromptStage,
    SavedImage,
    SettingsRegistry,
    StepStage,
    UiSection,
    XyzAxis,
    hookspec,
)


class Hooks:
    # --- start-up -----------------------------------------------------------------------------

    @hookspec
    def register_settings(self, settings: SettingsRegistry) -> None:
        """Start-up. Declare this extension's section of the Settings tab:
        `settings.add(MySettings)` with a pydantic model whose fields all have defaults. The
        current values reach every hook of this extension as `stage.settings`. A hook that
        raises here disables the extension (the reason shows in the Extensions tab)."""

    @hookspec
    def app_started(self, app: Any) -> None:
        """Start-up, once the server runs. `app` is the FastAPI application (add routes under
        `/extensions/<your name>/`). Raising disables the extension."""

    @hookspec
    def ui_contribution(self) -> UiSection | None:
        """Page build. Return a `UiSection` (an accordion under txt2img/img2img or a tab of its
        own) whose input values reach this extension's hooks as `stage.args`, validated into
        `UiSection.args_model`. The same values come through the HTTP API in
        `alwayson_scripts`."""

    @hookspec
    def extension_status(self, settings: Any, data_dir: Any) -> str | None:
        """Whenever the Extensions tab or `/sdapi/v1/extensions` lists extensions: a short line
        about this extension's state beyond "loaded" (e.g. "inactive: no weights in
        models/safety_checker"), or None. `settings` is this extension's Settings section,
        `data_dir` the data folder (pathlib.Path). Keep it cheap: no model loading here."""

    @hookspec
    def samplers(self) -> list[ExtensionSampler] | None:
        """Start-up. Extra samplers to list beside the built-in ones (page, `/sdapi/v1/samplers`,
        requests' `sampler_name`, the Settings default sampler). A name that is already taken is
        refused with a reason."""

    @hookspec
    def detectors(self) -> list[Detector] | None:
        """Start-up (since 1.2). Detectors (faces, hands, ...) the detailer can use by name, beside
        the ONNX files in models/detailer; they reach image stages as `ImageStage.detectors`."""

    @hookspec
    def xyz_axes(self) -> list[XyzAxis] | None:
        """Start-up (since 1.2). Axes to add to the X/Y/Z plot script, after the built-in ones
        (a label that is already taken is refused with a reason)."""

    # --- models -------------------------------------------------------------------------------

    @hookspec
    def model_loaded(self, model: Any) -> None:
        """After a checkpoint is loaded. `model` has `.unet`, `.vae`, `.text_encoders`,
        `.family.name` ("sd1", "sd2", "sdxl", "sdxl_refiner") and `.model_name`. Read only:
        per-job changes belong in `setup_denoiser`."""

    # --- a job --------------------------------------------------------------------------------

    @hookspec(firstresult=True)
    def generate(self, job: JobInfo) -> Any:
        """Around a whole job: implement it as a wrapper (`@hookimpl(wrapper=True)`, then
        `result = yield` and `return result`) to time a job, hold a resource, or clean up. The
        built-in implementation runs the job; do not implement it without `wrapper=True`."""

    @hookspec
    def process_prompt(self, stage: PromptStage) -> None:
        """Each batch, after styles are applied and before the prompts are parsed: rewrite
        `stage.prompts[i]` / `stage.negative_prompts[i]` (one per image, seed `stage.seeds[i]`),
        read the parsed `stage.extra_networks`, add `stage.infotext` fields. Raise
        `JobRejected("why")` to refuse the job with that message."""

    @hookspec
    def setup_denoiser(self, stage: DenoiserStage) -> None:
        """Each sampling pass (the first pass, the hires pass, after a refiner switch): wrap
        `stage.denoiser`, or change the model with `stage.patch(obj, "attr", value)`, which is
        undone when the job ends. Add `stage.infotext` fields to record what you did."""

    @hookspec
    def step_end(self, stage: StepStage) -> None:
        """After each sampling step: read `stage.denoised` / `stage.x`; `stage.replace(latents)`
        replaces the latents the next step starts from."""

    @hookspec
    def postprocess_image(self, stage: ImageStage) -> None:
        """Each decoded image, before it is saved: assign `stage.image` to replace it, add
        `stage.infotext` fields (written into this image's parameters)."""

    @hookspec
    def image_saved(self, saved: SavedImage) -> None:
        """After an image file is written: `saved.path`, `saved.image`, `saved.infotext`."""
