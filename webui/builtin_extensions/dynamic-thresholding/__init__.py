"""Dynamic thresholding: high CFG scales without burnt, oversaturated images. A worked example of
the *sampler* stage (wrapping the denoiser for one job) with a UI section and infotext fields.

What it does -- Imagen's dynamic thresholding (Saharia et al. 2022, §2.3), adapted to latents.
At every step the sampler asks the denoiser for an estimate of the clean latents (x0). A large
CFG scale pushes that estimate far outside the range real images occupy, and the errors add up
over the steps into burnt colours. Imagen fixes this on the estimate: take s, the p-th percentile
of |x0|; when s is larger than the data range, clamp x0 to [-s, s] and scale it back into the
range. Imagen's data are pixels in [-1, 1]. Stable Diffusion's are latents, scaled (by the VAE's
scaling factor) to about unit variance, with a mean of their own per channel. So, per image and
per latent channel (as the sd-dynamic-thresholding extension does):

    m = mean(x0);  d = x0 - m;  s = max(T, quantile(|d|, p))
    x0 <- m + clamp(d, -s, s) * T / s

where T is the `threshold` (in latent units: about standard deviations, the same for SD1, SD2
and SDXL) and p the `percentile`. An estimate already within +-T of its channel mean keeps its
values, except its outliers beyond T (the top 1 - p), which are clipped to T.

Dynamic thresholding needs only the guided estimate, so it wraps the denoiser as a black box
`(x, sigma) -> guided x0`. CFG rescale, which needs the conditional and unconditional predictions
apart, uses the combining-guidance seam instead: see the `cfg-rescale` extension.

How it plugs in -- the parts an extension author copies:

1. `ui_contribution` returns a `UiSection`: an args model (pydantic, every field defaulted) and a
   `build()` that creates Gradio components inside the page's accordion and returns them keyed by
   the model's field names. Gradio is imported inside `build()` only, so the extension loads
   without it (headless, tests). The validated values arrive as `stage.args`; from the HTTP API
   as `alwayson_scripts: {"dynamic-thresholding": {"args": [true, 3.0, 0.995]}}` (positional, in
   field order) or `{"args": {"enabled": true, ...}}`; with no values, the model's defaults.
2. `setup_denoiser` gets a `DenoiserStage` for each sampling pass (first pass, hires pass,
   refiner): assign a new callable to `stage.denoiser` that calls the old one. It lives as long as
   the pass, so nothing outlives the job and there is nothing to undo. (Changes to the *model*
   would go through `stage.patch`, which the app undoes after the job.)
3. Off by default: when `enabled` is false the hook returns at once -- the denoiser is untouched,
   the pixels are exactly those without the extension, and no infotext field is written. When on,
   `stage.infotext` records the values so the infotext says how the image was made.

Inpainting: the built-in denoiser has already put the init latents back outside the mask when
the wrapper sees its estimate; the sampler puts them back again at the end, so the kept area
stays exact.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from webui.extensions.api import DenoiserStage, UiSection, hookimpl

TITLE = "Dynamic thresholding"
THRESHOLD_RANGE = (0.5, 10.0)  # shared by the args model (validation) and the slider (the page)
PERCENTILE_RANGE = (0.5, 1.0)


class ThresholdArgs(BaseModel):
    enabled: bool = Field(False, title="Enable dynamic thresholding")
    threshold: float = Field(3.0, ge=THRESHOLD_RANGE[0], le=THRESHOLD_RANGE[1], title="Threshold",
                             description="The range the estimate is scaled into, in latent standard deviations "
                                         "around each channel's mean. Lower: stronger effect.")
    percentile: float = Field(0.995, ge=PERCENTILE_RANGE[0], le=PERCENTILE_RANGE[1], title="Percentile",
                              description="Which percentile of the estimate's magnitude must fit the range "
                                          "(Imagen: 0.995).")


def dynamic_threshold(x0: torch.Tensor, threshold: float, percentile: float) -> torch.Tensor:
    """The thresholded estimate, per image and channel (`x0` is [batch, channels, ...])."""
    flat = x0.reshape(x0.shape[0], x0.shape[1], -1).float()
    mean = flat.mean(dim=2, keepdim=True)
    centered = flat - mean
    s = torch.quantile(centered.abs(), percentile, dim=2, keepdim=True).clamp(min=threshold)
    out = centered.clamp(-s, s) * (threshold / s) + mean
    return out.reshape(x0.shape).to(x0.dtype)


# --- the hooks ---------------------------------------------------------------------------------

def _build() -> dict:
    import gradio as gr  # only the page needs gradio

    fields = ThresholdArgs.model_fields
    with gr.Row():
        enabled = gr.Checkbox(value=fields["enabled"].default, label=fields["enabled"].title)
    with gr.Row():
        threshold = gr.Slider(*THRESHOLD_RANGE, value=fields["threshold"].default, step=0.1,
                              label=fields["threshold"].title, info=fields["threshold"].description)
        percentile = gr.Slider(*PERCENTILE_RANGE, value=fields["percentile"].default, step=0.001,
                               label=fields["percentile"].title, info=fields["percentile"].description)
    return {"enabled": enabled, "threshold": threshold, "percentile": percentile}


@hookimpl
def ui_contribution() -> UiSection:
    return UiSection(title=TITLE, build=_build, args_model=ThresholdArgs)


@hookimpl
def setup_denoiser(stage: DenoiserStage) -> None:
    args = stage.args
    if args is None or not args.enabled:
        return
    inner = stage.denoiser
    threshold, percentile = float(args.threshold), float(args.percentile)

    def thresholded(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return dynamic_threshold(inner(x, sigma), threshold, percentile)

    stage.denoiser = thresholded
    stage.infotext[TITLE] = f"{threshold:g}"
    stage.infotext[f"{TITLE} percentile"] = f"{percentile:g}"
