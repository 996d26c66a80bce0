"""The PNG Info tab: drop an image, read its generation parameters, send them to txt2img."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from webui.app import Engine
from webui.images import open_untrusted, read_infotext
from webui.infotext import as_written, parse_infotext
from webui.ui.generation import Panel
from webui.ui.messages import user_error
from webui.ui.params import fields_from_text, updates_for_fields
from webui.ui.txt2img import fillable


def read_parameters(path: str | None) -> tuple[str, str]:
    """(raw infotext, an HTML table of its fields) for an image file."""
    if not path:
        return "", ""
    try:
        text = read_infotext(open_untrusted(Path(path)))
    except ValueError as e:
        return "", f"<p>{html.escape(str(e))}</p>"
    if not text:
        return "", "<p>This image carries no generation parameters.</p>"
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in as_written(parse_infotext(text)).items()
    )
    return text, f"<table class='pnginfo'>{rows}</table>"


def build_pnginfo_tab(engine: Engine, tabs: gr.Tabs, panels: dict[str, Panel]) -> None:
    with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
        with gr.Row():
            with gr.Column():
                # filepath + no image_mode: Gradio hands over the uploaded file untouched, metadata included
                image = gr.Image(label="Source", type="filepath", image_mode=None, sources=["upload"],
                                 elem_id="pnginfo_image")
            with gr.Column():
                raw = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo_text")
                table = gr.HTML(elem_id="pnginfo_table")
                with gr.Row():
                    buttons = {name: gr.Button(f"Send to {name}", elem_id=f"pnginfo_send_{name}") for name in panels}

    image.change(read_parameters, inputs=[image], outputs=[raw, table], api_name="png_info")

    for name, panel in panels.items():
        def send(text: str | None, current: str | None, panel: Panel = panel, name: str = name) -> list[Any]:
            pasted = fields_from_text(text or "")
            if pasted is None:
                raise user_error("No generation parameters to send.")
            return [gr.Tabs(selected=name), *updates_for_fields(engine, pasted, current, panel)]

        buttons[name].click(send, inputs=[raw, panel["checkpoint"]], outputs=[tabs, *fillable(panel)],
                            api_visibility="private")
