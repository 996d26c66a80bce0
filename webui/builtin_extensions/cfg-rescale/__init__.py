"""CFG rescale: high CFG scales without overexposed, washed-out images. A worked example of the
*combining guidance* seam (`DenoiserStage.combine`, extension API 1.1).

What it does -- Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
§3.4. Classifier-free guidance g = u + s (c - u) moves the prediction further than the conditional
prediction c ever goes; its spread (standard deviation) grows with the scale s, and the images
come out too bright and too saturated, most of all with v-prediction and zero-terminal-SNR
models. The fix rescales g to c's spread, then mixes with the plain result by phi:

    g' = g * std(c) / std(g);   result = phi * g' + (1 - phi) * g

per image, over channels and pixels. The paper works on the model's v-prediction; the denoiser
gives denoised estimates (x0), so each prediction is carried into v-space first,
v = (x / (sigma^2 + 1) - x0) * sqrt(sigma^2 + 1) / sigma, rescaled there, and brought back. That
map is affine, so with phi = 0 the result is plain CFG.

How it plugs in: `setup_denoiser` sets `stage.combine`, a function the built-in denoiser calls for
each image with a `Guidance` (cond, uncond, scale, x, sigma). It composes: the combination found
there (another extension's) is used as g instead of `Guidance.cfg()`. Off (phi = 0, the default):
nothing is set, the pixels are exactly those without the extension, no infotext field is written.
From the HTTP API: `alwayson_scripts: {"cfg-rescale": {"args": [0.7]}}`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from webui.extensions.api import DenoiserStage, Guidance, UiSection, hookimpl

TITLE = "CFG Rescale"
INFOTEXT_KEY = "CFG Rescale φ"  # the key A1111's CFG rescale writes


class RescaleArgs(BaseModel):
    phi: float = Field(0.0, ge=0.0, le=1.0, title="CFG Rescale φ",
                       description="How much of the rescaled prediction to use: 0 off, 0.7 the paper's choice.")


def rescaled(guided: torch.Tensor, g: Guidance, phi: float) -> torch.Tensor:
    """`guided` (a denoised estimate made from `g`) rescaled to the conditional prediction's spread."""
    sigma = g.sigma.clamp(min=1e-6) if isinstance(g.sigma, torch.Tensor) else max(float(g.sigma), 1e-6)
    a = (sigma**2 + 1) ** 0.5
    base = g.x / (sigma**2 + 1)

    def to_v(x0: torch.Tensor) -> torch.Tensor:
        return (base - x0) * a / sigma

    v_cond, v_guided = to_v(g.cond), to_v(guided)
    v_rescaled = v_guided * (v_cond.std() / v_guided.std().clamp(min=1e-12))
    v = phi * v_rescaled + (1.0 - phi) * v_guided
    return base - v * sigma / a


def _build() -> dict:
    import gradio as gr  # only the page needs gradio

    field = RescaleArgs.model_fields["phi"]
    return {"phi": gr.Slider(0.0, 1.0, value=field.default, step=0.05, label=field.title, info=field.description)}


@hookimpl
def ui_contribution() -> UiSection:
    return UiSection(title=TITLE, build=_build, args_model=RescaleArgs)


@hookimpl
def setup_denoiser(stage: DenoiserStage) -> None:
    args = stage.args
    if args is None or args.phi <= 0:
        return
    phi = float(args.phi)
    before = stage.combine  # another extension's combination, if any

    def combine(g: Guidance) -> torch.Tensor:
        return rescaled(before(g) if before is not None else g.cfg(), g, phi)

    stage.combine = combine
    stage.infotext[INFOTEXT_KEY] = f"{phi:g}"
