"""The txt2img tab."""

from __future__ import annotations

from typing import Any

import gradio as gr
from pydantic import ValidationError

from webui.app import Engine
from webui.models.errors import ModelError
from webui.pipeline.request import GenerationRequest, validation_message
from webui.pipeline.progress import Progress
from webui.samplers.table import sampler_names
from webui.ui.messages import models_help


def build_txt2img_tab(engine: Engine, demo: gr.Blocks) -> None:
    with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
        help_box = gr.Markdown(models_help(engine), elem_id="models_help")
        with gr.Row():
            checkpoint = gr.Dropdown(
                label="Stable Diffusion checkpoint",
                choices=engine.registry.titles(),
                value=_default_title(engine),
                elem_id="checkpoint",
                allow_custom_value=True,  # API callers may name a checkpoint by name or hash
                scale=4,
            )
            refresh = gr.Button("🔄 Refresh", elem_id="refresh_checkpoints", scale=1, min_width=80)
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="txt2img_prompt")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="txt2img_neg_prompt")
            generate = gr.Button("Generate", variant="primary", elem_id="txt2img_generate", scale=1)
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    sampler = gr.Dropdown(label="Sampling method", choices=sampler_names(), value="Euler a", elem_id="txt2img_sampler", allow_custom_value=True)
                    steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="txt2img_steps")
                with gr.Row():
                    width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width")
                    height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height")
                with gr.Row():
                    batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="txt2img_batch_size")
                    cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
                seed = gr.Number(value=-1, label="Seed", precision=0, elem_id="txt2img_seed")
            with gr.Column():
                gallery = gr.Gallery(label="Output", elem_id="txt2img_gallery", columns=2, height=512)
                info = gr.Textbox(label="Generation parameters", lines=4, interactive=False, elem_id="txt2img_info")

        def run(ckpt, prompt_text, negative_text, sampler_name, n_steps, w, h, batch, cfg_scale, seed_value,
                progress=gr.Progress()) -> tuple[list[Any], str]:
            try:
                request = GenerationRequest(
                    checkpoint=ckpt or None,
                    prompt=prompt_text or "",
                    negative_prompt=negative_text or "",
                    sampler_name=sampler_name,
                    steps=int(n_steps),
                    width=int(w),
                    height=int(h),
                    batch_size=int(batch),
                    cfg_scale=float(cfg_scale),
                    seed=int(seed_value if seed_value is not None else -1),
                )
            except ValidationError as e:
                raise gr.Error(validation_message(e)) from None

            def report(p: Progress) -> None:
                progress(p.fraction, desc=f"Step {p.step}/{p.total_steps}")

            try:
                result = engine.runner.generate(request, progress=report)
            except ModelError as e:
                raise gr.Error(str(e)) from None
            images = [str(p) for p in result.paths] if result.paths else result.images
            return images, "\n\n".join(result.infotexts)

        gr.on(
            triggers=[generate.click, prompt.submit],
            fn=run,
            inputs=[checkpoint, prompt, negative, sampler, steps, width, height, batch_size, cfg, seed],
            outputs=[gallery, info],
            api_name="txt2img",
            concurrency_id="generate",
        )

        def refresh_models(current: str | None) -> tuple[dict, str]:
            engine.registry.refresh(compute_hashes=True)
            titles = engine.registry.titles()
            value = current if current in titles else _match(engine, current) or _default_title(engine)
            return gr.update(choices=titles, value=value), models_help(engine)

        refresh.click(refresh_models, inputs=[checkpoint], outputs=[checkpoint, help_box], api_name="refresh_checkpoints")

        def on_load(current: str | None) -> tuple[dict, str]:
            titles = engine.registry.titles()  # hashes computed in the background since start-up
            value = current if current in titles else _match(engine, current) or _default_title(engine)
            return gr.update(choices=titles, value=value), models_help(engine)

        demo.load(on_load, inputs=[checkpoint], outputs=[checkpoint, help_box], api_visibility="private")


def _match(engine: Engine, current: str | None) -> str | None:
    """The present title of the checkpoint `current` named (its hash may have appeared since)."""
    if not current:
        return None
    try:
        return engine.registry.find(current).title
    except ModelError:
        return None


def _default_title(engine: Engine) -> str | None:
    try:
        return engine.resolve_checkpoint(None).title
    except ModelError:
        return None
