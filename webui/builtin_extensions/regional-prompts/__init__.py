"""Regional prompts: `a castle AND a knight AND a dragon` with the knight on the left and the
dragon on the right. A worked example of combining guidance with `Guidance.parts` (API 1.2).

What it does: classifier-free guidance with AND sub-prompts adds each part's pull,
`uncond + scale * sum_j w_j * (p_j - uncond)`. Here each part's pull is multiplied by its region
mask first, `uncond + scale * sum_j m_j * w_j * (p_j - uncond)`, so a part only steers its own
area (Latent Couple's idea). With every mask all ones this is plain AND; a part whose mask is
all zeros is as if it were not there.

Regions: the parts after the first (or all parts, without "first part is the whole image") get
the canvas split into columns or rows in the given ratios (`1,2,1`: a wide middle), or one mask
each (white = its region; API: base64 images in `masks`). From the HTTP API:
`alwayson_scripts: {"regional-prompts": {"args": {"enabled": true, "ratios": "1,1"}}}`.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, Field

from webui.extensions.api import DenoiserStage, Guidance, JobRejected, UiSection, hookimpl

TITLE = "Regional prompts"


class RegionArgs(BaseModel):
    enabled: bool = Field(False, title="Enable")
    direction: Literal["columns", "rows"] = Field("columns", title="Split into",
                                                  description="Regions side by side (columns) or stacked (rows).")
    ratios: str = Field("1,1", title="Region sizes", description="Relative sizes, one per region: 1,2,1.")
    common_first: bool = Field(True, title="First part is the whole image",
                               description="The first AND part guides everywhere; the regions take the rest.")
    masks: list[str] = Field(default_factory=list, title="Masks",
                             description="API: one base64 image per region (white = the region), instead of sizes.")


def split_masks(direction: str, ratios: list[float], height: int, width: int) -> list[torch.Tensor]:
    """One [height, width] 0/1 mask per region, splitting the canvas in the given ratios."""
    length = width if direction == "columns" else height
    edges = [round(length * sum(ratios[:i]) / sum(ratios)) for i in range(len(ratios) + 1)]
    masks = []
    for a, b in itertools.pairwise(edges):
        m = torch.zeros(height, width)
        if direction == "columns":
            m[:, a:b] = 1
        else:
            m[a:b, :] = 1
        masks.append(m)
    return masks


def decode_masks(masks: list[str], height: int, width: int) -> list[torch.Tensor]:
    out = []
    for i, text in enumerate(masks):
        try:
            raw = base64.b64decode(text.split(",", 1)[-1], validate=True)
            image = Image.open(io.BytesIO(raw)).convert("L")
        except (binascii.Error, ValueError, OSError):
            raise JobRejected(f"{TITLE}: mask {i + 1} is not a base64 image") from None
        small = image.resize((width, height), Image.Resampling.BILINEAR)
        out.append(torch.tensor(list(small.getdata()), dtype=torch.float32).reshape(height, width) / 255.0)
    return out


def _parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.replace(":", ",").split(",") if r.strip()]
    except ValueError:
        raise JobRejected(f"{TITLE}: region sizes are numbers separated by commas, got {text!r}") from None
    if not ratios or any(r <= 0 for r in ratios):
        raise JobRejected(f"{TITLE}: region sizes must be positive, got {text!r}")
    return ratios


def regional(g: Guidance, masks: list[torch.Tensor]) -> torch.Tensor:
    """`uncond + scale * sum_j m_j * w_j * (p_j - uncond)` (a missing mask: everywhere)."""
    pull = torch.zeros_like(g.uncond)
    for j, (prediction, weight) in enumerate(g.parts):
        m = masks[j].to(g.uncond.device, g.uncond.dtype) if j < len(masks) and masks[j] is not None else 1.0
        pull = pull + m * weight * (prediction - g.uncond)
    return g.uncond + g.scale * pull


def _build() -> dict:
    import gradio as gr  # only the page needs gradio

    f = RegionArgs.model_fields
    return {
        "enabled": gr.Checkbox(False, label=f["enabled"].title),
        "direction": gr.Radio(["columns", "rows"], value="columns", label=f["direction"].title,
                              info=f["direction"].description),
        "ratios": gr.Textbox("1,1", label=f["ratios"].title, info=f["ratios"].description),
        "common_first": gr.Checkbox(True, label=f["common_first"].title, info=f["common_first"].description),
    }


@hookimpl
def ui_contribution() -> UiSection:
    return UiSection(title=TITLE, build=_build, args_model=RegionArgs)


@hookimpl
def setup_denoiser(stage: DenoiserStage) -> None:
    args = stage.args
    if args is None or not args.enabled:
        return
    r = stage.request
    height, width = r.height // 8, r.width // 8  # latent size of the first pass
    first = 1 if args.common_first else 0
    regions = decode_masks(args.masks, height, width) if args.masks else \
        split_masks(args.direction, _parse_ratios(args.ratios), height, width)
    masks: list[torch.Tensor | None] = [None] * first + list(regions)

    def combine(g: Guidance) -> torch.Tensor:
        if len(g.parts) != len(masks):
            raise JobRejected(f"{TITLE}: the prompt has {len(g.parts)} AND parts; {len(masks)} are needed "
                              f"({'a whole-image part and ' if first else ''}{len(regions)} regions)")
        h, w = g.uncond.shape[-2:]
        sized = [m if m is None or m.shape == (h, w) else
                 torch.nn.functional.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0] for m in masks]
        return regional(g, sized)

    stage.combine = combine
    stage.infotext["Regional prompts"] = "masks" if args.masks else f"{args.direction} {args.ratios}"
