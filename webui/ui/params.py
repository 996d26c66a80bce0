"""Infotext -> values for the txt2img controls (paste button, PNG Info's "Send to txt2img")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from webui.app import Engine
from webui.controlnet.units import units_from_infotext
from webui.infotext import infotext_to_fields, parse_infotext
from webui.models.errors import ModelError
from webui.models.registry import match_name
from webui.prompts.styles import extract_styles


@dataclass(frozen=True)
class Pasted:
    fields: dict[str, object]  # GenerationRequest-style names
    model_name: str | None  # the infotext's `Model`, tried when its hash is not known here
    controls: dict[str, object] = field(default_factory=dict)  # ControlNet units' values, as `cn_<n>_<field>`


def fields_from_text(text: str) -> Pasted | None:
    """None when the text has no parameter line (then it is just a prompt)."""
    params = parse_infotext(text)
    if len(params) <= 2:  # only Prompt and Negative prompt
        return None
    controls = {f"cn_{n}_{name}": value for n, unit in units_from_infotext(params).items()
                for name, value in unit.items()}
    return Pasted(infotext_to_fields(params), params.get("Model"), controls)


def fillable_names(panel: Any) -> list[str]:
    """The controls infotext can fill in `panel`, in the order `updates_for_fields` answers."""
    units = sorted(k for k, (_, name) in panel.control_fields.items() if name != "image")
    return [n for n in FILLABLE if n in panel.inputs] + units


def checkpoint_choice(engine: Engine, query: str | None) -> str | None:
    """The present title of the checkpoint `query` names (title, name, hash), if there is one."""
    if not query:
        return None
    try:
        return engine.registry.find(query).title
    except ModelError:
        return None


# The controls infotext can fill, by request field name (a tab fills those it has).
FILLABLE = ("checkpoint", "modules", "prompt", "negative_prompt", "styles", "sampler_name", "scheduler", "steps",
            "width", "height", "cfg_scale", "distilled_cfg_scale", "seed", "clip_skip", "subseed", "subseed_strength",
            "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
            "denoising_strength", "refiner_checkpoint", "refiner_switch_at", "eta", "s_churn", "s_noise", "shift",
            "tiling", "restore_faces")


def updates_for_fields(engine: Engine, pasted: Pasted, current_checkpoint: str | None, panel) -> list[Any]:
    """Updates for `panel`'s controls named in FILLABLE, in that order; fields the infotext
    lacks stay as they are."""
    f = dict(pasted.fields)
    keep = gr.update()
    if "checkpoint" in f or pasted.model_name:
        wanted = [q for q in (f.pop("checkpoint", None), pasted.model_name) if q]
        title = next((t for t in (checkpoint_choice(engine, str(q)) for q in wanted) if t), None)
        if title:
            f["checkpoint"] = title
        else:
            gr.Warning(f"Model {wanted[-1]!r} is not in the models folder; keeping {current_checkpoint!r}.")
    if "modules" in f:  # infotext names them without suffix (`Module 1: ae`); the selector lists files
        listed = engine.module_names()
        found = {name: match_name(name, listed) for name in f["modules"]}
        if missing := [name for name, n in found.items() if n is None]:
            gr.Warning(f"Not in models/VAE or models/text_encoder, so not chosen: {', '.join(missing)}")
        f["modules"] = [n for n in found.values() if n]
    if "refiner_checkpoint" in f:
        f["refiner_checkpoint"] = checkpoint_choice(engine, str(f["refiner_checkpoint"])) or "None"
    if "prompt" in f or "negative_prompt" in f:
        prompt, negative, styles = extract_styles(str(f.get("prompt", "")), str(f.get("negative_prompt", "")),
                                                  engine.styles.list())
        f.update(prompt=prompt, negative_prompt=negative)
        if styles:
            f["styles"] = styles
    f.update(pasted.controls)
    return [gr.update(value=f[name]) if name in f else keep for name in fillable_names(panel)]
