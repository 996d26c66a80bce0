"""Anti-burn: average the last few denoised estimates into the final image. A worked example of
the `step_end` hook with per-job `scratch` and `infotext` (extension API 1.1).

What it does: a sampler's denoised estimate (its guess of the clean image) changes little over
the last steps, but each step can add over-sharpened, "burnt" detail. Averaging the estimates of
the last N steps keeps what they agree on. Each sampling pass (the first pass, a hires pass) is
averaged on its own.

How it plugs in: `step_end` runs after every step with the step number, the current latents `x`
and the denoised estimate. The extension keeps the last N estimates in `stage.scratch` (its own
dict for this job, so nothing is shared between jobs) and, at the pass's last step, replaces the
latents the sampler returns with their mean (`stage.replace`). It only does so when that step
ends at noise level zero (`stage.sigma_next == 0`, API 1.2: the latents are then the clean
image); a pass that hands noisy latents over to a refiner is left alone. Off (0, the default): nothing is kept or replaced and no
infotext field is written. From the HTTP API: `alwayson_scripts: {"anti-burn": {"args": [3]}}`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from webui.extensions.api import StepStage, UiSection, hookimpl

TITLE = "Anti-burn"
INFOTEXT_KEY = "Anti-burn"


class AntiBurnArgs(BaseModel):
    average_last: int = Field(0, ge=0, le=20, title="Average the last steps",
                              description="How many of the last steps' denoised estimates make the image (0: off).")


def _build() -> dict:
    import gradio as gr  # only the page needs gradio

    field = AntiBurnArgs.model_fields["average_last"]
    return {"average_last": gr.Slider(0, 20, value=field.default, step=1, label=field.title,
                                      info=field.description)}


@hookimpl
def ui_contribution() -> UiSection:
    return UiSection(title=TITLE, build=_build, args_model=AntiBurnArgs)


@hookimpl
def step_end(stage: StepStage) -> None:
    n = stage.args.average_last if stage.args is not None else 0
    if n < 2:  # 0 is off; the mean of one estimate is the estimate
        return
    if stage.step == 1:
        stage.scratch["kept"] = []  # a new pass begins
    kept = stage.scratch.setdefault("kept", [])
    if stage.step > stage.steps - n:
        kept.append(stage.denoised.clone())
    if stage.step == stage.steps and len(kept) > 1 and stage.sigma_next is not None and float(stage.sigma_next) == 0:
        stage.replace(torch.stack(kept).mean(dim=0))
        stage.infotext[INFOTEXT_KEY] = len(kept)
