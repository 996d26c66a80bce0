"""Infotext -> values for the txt2img controls (paste button, PNG Info's "Send to txt2img")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from webui.app import Engine
from webui.infotext import infotext_to_fields, parse_infotext
from webui.models.errors import ModelError
from webui.prompts.styles import extract_styles


@dataclass(frozen=True)
class Pasted:
    fields: dict[str, object]  # GenerationRequest-style names
    model_name: str | None  # the infotext's `Model`, tried when its hash is not known here


def fields_from_text(text: str) -> Pasted | None:
    """None when the text has no parameter line (then it is just a prompt)."""
    params = parse_infotext(text)
    if len(params) <= 2:  # only Prompt and Negative prompt
        return None
    return Pasted(infotext_to_fields(params), params.get("Model"))


def checkpoint_choice(engine: Engine, query: str | None) -> str | None:
    """The present title of the checkpoint `query` names (title, name, hash), if there is one."""
    if not query:
        return None
    try:
        return engine.registry.find(query).title
    except ModelError:
        return None


def updates_for_fields(engine: Engine, pasted: Pasted, current_checkpoint: str | None) -> list[Any]:
    """Updates in `Txt2ImgControls.fillable()` order; fields the infotext lacks stay as they are."""
    f = pasted.fields
    keep = gr.update()

    def value(key: str) -> Any:
        return gr.update(value=f[key]) if key in f else keep

    ckpt = keep
    wanted = [str(f["checkpoint"])] if "checkpoint" in f else []
    wanted += [pasted.model_name] if pasted.model_name else []
    if wanted:
        title = next((t for t in (checkpoint_choice(engine, q) for q in wanted) if t), None)
        if title:
            ckpt = gr.update(value=title)
        else:
            gr.Warning(f"Model {wanted[-1]!r} is not in the models folder; keeping {current_checkpoint!r}.")
    prompt, negative, styles = str(f.get("prompt", "")), str(f.get("negative_prompt", "")), []
    if "prompt" in f or "negative_prompt" in f:
        prompt, negative, styles = extract_styles(prompt, negative, engine.styles.list())
    return [
        ckpt,
        gr.update(value=prompt) if "prompt" in f else keep,
        gr.update(value=negative) if "negative_prompt" in f else keep,
        gr.update(value=styles) if styles else keep,
        value("sampler_name"),
        value("scheduler"),
        value("steps"),
        value("width"),
        value("height"),
        value("cfg_scale"),
        value("seed"),
        value("clip_skip"),
    ]
