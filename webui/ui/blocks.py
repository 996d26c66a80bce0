"""The page: all tabs in one gr.Blocks."""

from __future__ import annotations

import gradio as gr

from webui.app import Engine
from webui.ui.txt2img import build_txt2img_tab


def build_ui(engine: Engine) -> gr.Blocks:
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as demo:
        with gr.Tabs():
            build_txt2img_tab(engine, demo)
    return demo
