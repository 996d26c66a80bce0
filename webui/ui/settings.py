"""The Settings tab: one control per field of `Settings` and of each registered extension
section, generated from the models (see `webui.settings.describe`); Apply and Reload.

The tab only renders and forwards: validation, saving and applying live belong to the
`SettingsStore`. Controls are filled from the store when the page loads, so a page opened after
a change shows it. Extension sections must be registered before the page is built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr
from pydantic import BaseModel

from webui.settings import FieldSpec, Settings, SettingsStore, describe
from webui.ui.messages import user_error

Control = gr.components.Component


def _control(spec: FieldSpec, value: Any, elem_id: str, extra_choices: Sequence[str] = ()) -> Control:
    common: dict[str, Any] = {"label": spec.title, "info": spec.description or None, "elem_id": elem_id}
    if spec.kind == "choice":
        return gr.Dropdown(choices=[*spec.choices, *extra_choices], value=value, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind in ("int", "float"):
        step = spec.step or (1 if spec.kind == "int" else 0.01)
        if spec.minimum is not None and spec.maximum is not None:
            return gr.Slider(spec.minimum, spec.maximum, value=value, step=step, **common)
        return gr.Number(value=value, precision=0 if spec.kind == "int" else None, minimum=spec.minimum,
                         maximum=spec.maximum, step=step, **common)
    if spec.kind == "json":
        return gr.Textbox(value=_to_text(value), lines=2, **common)
    return gr.Textbox(value=value, **common)


def _to_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _from_ui(spec: FieldSpec, value: Any, where: str) -> Any:
    if spec.kind == "json" and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"{where}: not valid JSON") from None
    if spec.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _to_ui(spec: FieldSpec, value: Any) -> Any:
    return _to_text(value) if spec.kind == "json" else value


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_").lower() or "section"


def build_settings_tab(store: SettingsStore, runtime: Callable[[], str] | None = None) -> None:
    """The "Settings" tab; call inside the page's `gr.Tabs()`. `runtime` describes the device,
    precision, attention backend and memory mode the flags chose (shown read-only)."""
    settings_specs = describe(Settings)
    section_specs = {name: describe(model, default_section=name) for name, model in store.sections().items()}
    # (section or None for Settings, spec) in the order of `controls`
    fields: list[tuple[str | None, FieldSpec]] = []
    controls: list[Control] = []

    with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
        with gr.Row():
            apply = gr.Button("Apply settings", variant="primary", elem_id="settings_apply", scale=3)
            reload = gr.Button("Reload", elem_id="settings_reload", scale=1)
        result = gr.Markdown(elem_id="settings_result")
        runtime_info = gr.Markdown(elem_id="settings_runtime")

        current = store.get()
        by_section: dict[str, list[FieldSpec]] = {}
        for spec in settings_specs:
            by_section.setdefault(spec.section, []).append(spec)
        for title, specs in by_section.items():
            with gr.Group(elem_id=f"settings_group_{_slug(title)}"):
                gr.Markdown(f"### {title}")
                for spec in specs:
                    fields.append((None, spec))
                    controls.append(_control(spec, _to_ui(spec, getattr(current, spec.name)), f"setting_{spec.name}",
                                             store.extra_choices(spec.name)))

        for name, specs in section_specs.items():
            values = store.section(name)
            with gr.Accordion(name, open=False, elem_id=f"settings_section_{_slug(name)}"):
                for spec in specs:
                    fields.append((name, spec))
                    controls.append(_control(spec, _to_ui(spec, getattr(values, spec.name)),
                                             f"setting_{_slug(name)}_{spec.name}"))

    def stored_values() -> list[Any]:
        settings = store.get()
        sections: dict[str, BaseModel] = {name: store.section(name) for name in section_specs}
        return [_to_ui(spec, getattr(settings if section is None else sections[section], spec.name))
                for section, spec in fields]

    def apply_settings(*values: Any) -> list[Any]:
        try:
            changes, section_changes = _split(fields, values)
            _, notes = store.update(changes, section_changes)
        except ValueError as e:
            raise user_error(str(e)) from None
        message = "Settings saved." + "".join(f"\n- {note}" for note in notes if note != "No changes.")
        if notes == ["No changes."]:
            message = "No changes."
        gr.Info(message.replace("\n- ", " · "))
        return [*stored_values(), message]

    def reload_settings() -> list[Any]:
        return [*stored_values(), "Reloaded from the settings file."]

    outputs = [*controls, result]
    apply.click(apply_settings, inputs=controls, outputs=outputs, api_visibility="private")
    reload.click(reload_settings, outputs=outputs, api_visibility="private", queue=False)
    # the page is built once: fill the controls from the store each time a page is opened
    gr.on(triggers=None, fn=stored_values, outputs=controls, api_visibility="private", queue=False,
          show_progress="hidden")
    if runtime is not None:
        gr.on(triggers=None, fn=lambda: runtime_markdown(runtime()), outputs=runtime_info, api_visibility="private",
              show_progress="hidden")


def runtime_markdown(text: str) -> str:
    """The runtime line, or with several workers a list of one line a worker."""
    lines = text.splitlines()
    if len(lines) == 1:
        return f"**Runtime** (set by start-up flags): {text}"
    return "**Runtime** (set by start-up flags), one worker a line:\n\n" + "\n".join(f"- {line}" for line in lines)


def _split(fields: Sequence[tuple[str | None, FieldSpec]],
           values: Sequence[Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The UI values as (Settings changes, {section: changes})."""
    changes: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for (section, spec), value in zip(fields, values, strict=True):
        target = changes if section is None else sections.setdefault(section, {})
        target[spec.name] = _from_ui(spec, value, spec.name if section is None else f"{section}.{spec.name}")
    return changes, sections
