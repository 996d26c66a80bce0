"""The extra-networks panel: LoRA and embedding cards that insert their tag into the prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def empty_hint(kind: str, folder: Path, suffixes: str, files: list[NetworkFile]) -> dict[str, Any]:
    """What an empty tab says instead of showing a blank box: where its files go."""
    text = f"No {kind} files yet. Put {suffixes} files in `{folder.resolve()}` and press **Refresh**."
    return {"value": text, "visible": not files}


def build_extra_networks(engine: Engine, prompt: gr.Textbox, prefix: str = "txt2img") -> None:
    nets = engine.networks

    def hints() -> tuple[Any, Any]:
        return (empty_hint("LoRA", nets.lora_dir, "`.safetensors`", nets.loras()),
                empty_hint("embedding", nets.embeddings_dir, "`.safetensors`, `.pt` or `.bin`", nets.embeddings()))

    lora_hint, embedding_hint = hints()
    with gr.Accordion("Extra networks", open=False, elem_id=f"{prefix}_extra_networks"):
        with gr.Tabs():
            with gr.Tab("Lora"):
                lora_empty = gr.Markdown(**lora_hint, elem_id=f"{prefix}_lora_empty")
                loras = gr.Gallery([_card(f) for f in nets.loras()], show_label=False, interactive=False,
                                   visible=bool(nets.loras()),
                                   columns=6, height=260, allow_preview=False, elem_id=f"{prefix}_lora_cards")
            with gr.Tab("Textual Inversion"):
                embeddings_empty = gr.Markdown(**embedding_hint, elem_id=f"{prefix}_embedding_empty")
                embeddings = gr.Gallery([_card(f) for f in nets.embeddings()], show_label=False, interactive=False,
                                        visible=bool(nets.embeddings()),
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

    def refresh_cards() -> tuple[Any, ...]:
        nets.refresh()
        cards = [[_card(f) for f in nets.loras()], [_card(f) for f in nets.embeddings()]]
        return (*(gr.update(value=c, visible=bool(c)) for c in cards), *(gr.update(**hint) for hint in hints()))

    refresh.click(refresh_cards, outputs=[loras, embeddings, lora_empty, embeddings_empty], api_visibility="private")
