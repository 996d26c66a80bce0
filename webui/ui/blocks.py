"""The page: all tabs in one gr.Blocks."""

from __future__ import annotations

import gradio as gr

from webui.app import Engine
from webui.ui.pnginfo import build_pnginfo_tab
from webui.ui.txt2img import build_txt2img_tab


def build_ui(engine: Engine) -> gr.Blocks:
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as demo:
        with gr.Tabs() as tabs:
            txt2img = build_txt2img_tab(engine, demo)
            build_pnginfo_tab(engine, tabs, txt2img)
    return demo
