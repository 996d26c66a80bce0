"""The txt2img tab: controls, the Generate event, paste of infotext, styles, token counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
from pydantic import ValidationError

from webui.app import Engine
from webui.models.errors import ModelError
from webui.pipeline.progress import Progress
from webui.pipeline.request import GenerationRequest, validation_message
from webui.prompts.styles import Style
from webui.samplers.table import SCHEDULES, sampler_names
from webui.ui.extra_networks import build_extra_networks
from webui.ui.messages import models_help
from webui.ui.params import checkpoint_choice, fields_from_text, updates_for_fields


@dataclass
class Txt2ImgControls:
    """The components other tabs fill in (PNG Info's "Send to txt2img")."""

    checkpoint: gr.Dropdown
    prompt: gr.Textbox
    negative: gr.Textbox
    styles: gr.Dropdown
    sampler: gr.Dropdown
    scheduler: gr.Dropdown
    steps: gr.Slider
    width: gr.Slider
    height: gr.Slider
    batch_size: gr.Slider
    cfg: gr.Slider
    seed: gr.Number
    clip_skip: gr.Slider

    def fillable(self) -> list[gr.components.Component]:
        """The order `ui.params.updates_for_fields` returns its updates in."""
        return [self.checkpoint, self.prompt, self.negative, self.styles, self.sampler, self.scheduler,
                self.steps, self.width, self.height, self.cfg, self.seed, self.clip_skip]


def build_txt2img_tab(engine: Engine, demo: gr.Blocks) -> Txt2ImgControls:
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
                prompt = gr.Textbox("", label="Prompt", lines=3, elem_id="txt2img_prompt")
                prompt_count = gr.HTML("0/75", elem_id="txt2img_token_counter")
                negative = gr.Textbox("", label="Negative prompt", lines=2, elem_id="txt2img_neg_prompt")
                negative_count = gr.HTML("0/75", elem_id="txt2img_negative_token_counter")
            with gr.Column(scale=1):
                generate = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
                paste = gr.Button("↙ Read parameters from prompt", elem_id="txt2img_paste", size="sm")
                styles = gr.Dropdown(
                    label="Styles", choices=_style_names(engine), value=[], multiselect=True, elem_id="txt2img_styles",
                    allow_custom_value=True,  # the engine checks names against styles.csv
                )
                with gr.Row():
                    style_name = gr.Textbox(placeholder="new style name", show_label=False, elem_id="txt2img_style_name", scale=2)
                    save_style = gr.Button("Save style", elem_id="txt2img_save_style", size="sm", scale=1)
        build_extra_networks(engine, prompt)
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    sampler = gr.Dropdown(label="Sampling method", choices=sampler_names(), value="Euler a",
                                          elem_id="txt2img_sampler", allow_custom_value=True)
                    scheduler = gr.Dropdown(label="Schedule type", choices=list(SCHEDULES), value="Automatic",
                                            elem_id="txt2img_scheduler", allow_custom_value=True)
                    steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="txt2img_steps")
                with gr.Row():
                    width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width")
                    height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height")
                with gr.Row():
                    batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="txt2img_batch_size")
                    cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
                with gr.Row():
                    seed = gr.Number(value=-1, label="Seed", precision=0, elem_id="txt2img_seed")
                    clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip", elem_id="txt2img_clip_skip")
            with gr.Column():
                gallery = gr.Gallery(label="Output", elem_id="txt2img_gallery", columns=2, height=512)
                info = gr.Textbox(label="Generation parameters", lines=4, interactive=False, elem_id="txt2img_info")

    controls = Txt2ImgControls(checkpoint, prompt, negative, styles, sampler, scheduler, steps, width, height,
                               batch_size, cfg, seed, clip_skip)

    gr.on(
        triggers=[generate.click, prompt.submit],
        fn=make_generate(engine),
        inputs=[checkpoint, prompt, negative, styles, sampler, scheduler, steps, width, height, batch_size, cfg,
                seed, clip_skip],
        outputs=[gallery, info],
        api_name="txt2img",
        concurrency_id="generate",
    )

    def count(text: str | None) -> str:
        used, available = engine.count_tokens(text or "")
        return f"{used}/{available}"

    for box, counter in ((prompt, prompt_count), (negative, negative_count)):
        box.change(count, inputs=[box], outputs=[counter], api_visibility="private", queue=False,
                   show_progress="hidden", trigger_mode="always_last")

    def paste_parameters(text: str | None, current: str | None) -> list[Any]:
        fields = fields_from_text(text or "")
        if fields is None:
            raise gr.Error("The prompt box holds no generation parameters to read.")
        return updates_for_fields(engine, fields, current)

    paste.click(paste_parameters, inputs=[prompt, checkpoint], outputs=controls.fillable(), api_visibility="private")

    def save_current_style(name: str | None, prompt_text: str | None, negative_text: str | None) -> tuple[dict, str]:
        name = (name or "").strip()
        if not name:
            raise gr.Error("Type a name for the style first.")
        engine.styles.save(Style(name, prompt_text or "", negative_text or ""))
        gr.Info(f"Style {name!r} saved.")
        return gr.update(choices=_style_names(engine)), ""

    save_style.click(save_current_style, inputs=[style_name, prompt, negative], outputs=[styles, style_name],
                     api_visibility="private")

    def refresh_models(current: str | None) -> tuple[dict, str]:
        engine.registry.refresh(compute_hashes=True)
        engine.networks.refresh()
        return gr.update(choices=engine.registry.titles(), value=_current_or_default(engine, current)), models_help(engine)

    refresh.click(refresh_models, inputs=[checkpoint], outputs=[checkpoint, help_box], api_name="refresh_checkpoints")

    def on_load(current: str | None) -> tuple[dict, str, dict]:
        # hashes computed in the background since start-up now show in the titles
        return (gr.update(choices=engine.registry.titles(), value=_current_or_default(engine, current)),
                models_help(engine), gr.update(choices=_style_names(engine)))

    demo.load(on_load, inputs=[checkpoint], outputs=[checkpoint, help_box, styles], api_visibility="private")
    return controls


def make_generate(engine: Engine):
    """The Generate handler. Its parameter names are the API's: gradio_client callers may pass
    them as keywords, e.g. `client.predict(prompt="a cat", steps=20, api_name="/txt2img")`."""

    def txt2img(checkpoint, prompt, negative_prompt, styles, sampler_name, scheduler, steps, width, height,
                batch_size, cfg_scale, seed, clip_skip, progress=gr.Progress()) -> tuple[list[Any], str]:
        try:
            request = GenerationRequest(
                checkpoint=checkpoint or None,
                prompt=prompt or "",
                negative_prompt=negative_prompt or "",
                styles=tuple(styles or ()),
                sampler_name=sampler_name,
                scheduler=scheduler or "Automatic",
                steps=int(steps),
                width=int(width),
                height=int(height),
                batch_size=int(batch_size),
                cfg_scale=float(cfg_scale),
                seed=int(seed if seed is not None else -1),
                clip_skip=int(clip_skip or 1),
            )
        except ValidationError as e:
            raise gr.Error(validation_message(e)) from None

        def report(p: Progress) -> None:
            progress(p.fraction, desc=f"Step {p.step}/{p.total_steps}")

        try:
            result = engine.runner.generate(request, progress=report)
        except (ModelError, ValueError) as e:
            raise gr.Error(str(e)) from None
        images = [str(p) for p in result.paths] if result.paths else result.images
        return images, "\n\n".join(result.infotexts)

    return txt2img


def _style_names(engine: Engine) -> list[str]:
    return [s.name for s in engine.styles.list()]


def _current_or_default(engine: Engine, current: str | None) -> str | None:
    return checkpoint_choice(engine, current) or _default_title(engine)


def _default_title(engine: Engine) -> str | None:
    try:
        return engine.resolve_checkpoint(None).title
    except ModelError:
        return None
