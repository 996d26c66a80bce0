"""The extra-networks panel: LoRA and embedding cards that insert their tag into the prompt."""

from __future__ import annotations

import gradio as gr
from PIL import Image, UnidentifiedImageError

from webui.app import Engine
from webui.networks.registry import NetworkFile

THUMB = 192


def _card(file: NetworkFile) -> tuple[Image.Image, str]:
    image = None
    if file.preview:
        try:
            with Image.open(file.preview) as im:
                image = im.convert("RGB")
                image.thumbnail((THUMB, THUMB))
        except (UnidentifiedImageError, OSError):
            image = None
    return image or Image.new("RGB", (THUMB, THUMB), (60, 60, 70)), file.name


def insert_tag(prompt: str, tag: str) -> str:
    prompt = prompt or ""
    if tag in prompt:
        return prompt
    return f"{prompt.rstrip()}, {tag}" if prompt.strip() else tag


def build_extra_networks(engine: Engine, prompt: gr.Textbox, prefix: str = "txt2img") -> None:
    with gr.Accordion("Extra networks", open=False, elem_id=f"{prefix}_extra_networks"):
        with gr.Tabs():
            with gr.Tab("Lora"):
                loras = gr.Gallery([_card(f) for f in engine.networks.loras()], show_label=False,
                                   columns=6, height=260, allow_preview=False, elem_id=f"{prefix}_lora_cards")
            with gr.Tab("Textual Inversion"):
                embeddings = gr.Gallery([_card(f) for f in engine.networks.embeddings()], show_label=False,
                                        columns=6, height=260, allow_preview=False, elem_id=f"{prefix}_embedding_cards")
        refresh = gr.Button("Refresh", size="sm", elem_id=f"{prefix}_extra_networks_refresh")

    def pick_lora(text: str, evt: gr.SelectData) -> str:
        files = engine.networks.loras()
        return insert_tag(text, f"<lora:{files[evt.index].name}:1>") if evt.index < len(files) else text

    def pick_embedding(text: str, evt: gr.SelectData) -> str:
        files = engine.networks.embeddings()
        return insert_tag(text, files[evt.index].stem) if evt.index < len(files) else text

    loras.select(pick_lora, inputs=[prompt], outputs=[prompt], api_visibility="private")
    embeddings.select(pick_embedding, inputs=[prompt], outputs=[prompt], api_visibility="private")

    def refresh_cards() -> tuple[list, list]:
        engine.networks.refresh()
        return [_card(f) for f in engine.networks.loras()], [_card(f) for f in engine.networks.embeddings()]

    refresh.click(refresh_cards, outputs=[loras, embeddings], api_visibility="private")
