"""The Script dropdown under txt2img and img2img: "None" or a built-in script, and the chosen
script's controls (built from its arguments model; only the chosen one's are shown). Their
values travel as `script_<n>_<field>` controls; `ui.generation` makes them the request's
`script_args`."""

from __future__ import annotations

from typing import Any

import gradio as gr

from webui.app import Engine
from webui.settings import describe
from webui.ui.generation import Panel

NONE = "None"


def _control(spec: Any, value: Any, choices: list[str] | None, elem_id: str) -> gr.components.Component | None:
    label = spec.title if spec.title and spec.title != spec.name else spec.name.replace("_", " ").capitalize()
    if choices is not None:
        return gr.Dropdown(choices, value=value if value in choices else choices[0], label=label, elem_id=elem_id,
                           allow_custom_value=True)
    if spec.kind == "bool":
        return gr.Checkbox(bool(value), label=label, elem_id=elem_id)
    if spec.kind == "choice":
        return gr.Radio(list(spec.choices), value=value, label=label, elem_id=elem_id)
    if spec.kind in ("int", "float") and spec.minimum is not None and spec.maximum is not None:
        step = spec.step or (1 if spec.kind == "int" else 0.05)
        return gr.Slider(spec.minimum, spec.maximum, value=value, step=step, label=label, elem_id=elem_id)
    if spec.kind in ("int", "float"):
        return gr.Number(value, label=label, precision=0 if spec.kind == "int" else None, elem_id=elem_id)
    if spec.kind == "str":
        lines = 6 if spec.name.endswith("_txt") else 1
        return gr.Textbox(value or "", label=label, lines=lines, elem_id=elem_id)
    return None  # a structured argument: API only


def script_section(engine: Engine, panel: Panel, tab: str) -> None:
    """The dropdown (registered as `script_name`) and one hidden group of controls per script."""
    from webui.scripts import all_scripts

    scripts = [s for s in all_scripts() if tab in s.tabs]
    env = engine.script_env()
    p = panel.prefix
    with gr.Accordion("Script", open=False, elem_id=f"{p}_script_section"):
        chooser = panel.add("script_name", gr.Dropdown([NONE, *(s.title for s in scripts)], value=NONE,
                                                       label="Script", elem_id=f"{p}_script"))
        groups = []
        for n, script in enumerate(scripts):
            defaults = script.args_model()
            choices = script.choices(tab, env)
            with gr.Group(visible=False, elem_id=f"{p}_script_{n}") as group:
                for spec in describe(script.args_model):
                    if spec.name in script.hidden:
                        continue
                    control = _control(spec, getattr(defaults, spec.name), choices.get(spec.name),
                                       f"{p}_script_{n}_{spec.name}")
                    if control is not None:
                        key = f"script_{n}_{spec.name}"
                        panel.add(key, control)
                        panel.script_fields[key] = (script.title, spec.name)
            groups.append(group)

    def show(title: str | None) -> list[Any]:
        return [gr.update(visible=script.title == title) for script in scripts]

    chooser.change(show, inputs=[chooser], outputs=groups, api_visibility="private", queue=False)

