"""The txt2img tab: prompt area, sampling controls, hires fix, and pasting infotext."""

from __future__ import annotations

import gradio as gr

from webui.app import Engine
from webui.samplers.table import sampler_names
from webui.ui.controlnet import controlnet_section
from webui.ui.generation import Panel, extension_sections, output_area, prompt_area, sampling_controls, wire
from webui.ui.jobs import JobBoard
from webui.ui.messages import user_error
from webui.ui.params import fields_from_text, updates_for_fields
from webui.ui.scripts import script_section


def build_txt2img_tab(engine: Engine, board: JobBoard, checkpoint: gr.Dropdown, modules: gr.Dropdown,
                      upscalers: list[str]) -> Panel:
    panel = Panel("txt2img")
    panel.add("checkpoint", checkpoint)
    panel.add("modules", modules)
    with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
        prompt_area(engine, panel)
        paste = gr.Button("↙ Read parameters from prompt", elem_id="txt2img_paste", size="sm")
        with gr.Row():
            with gr.Column():
                sampling_controls(panel, engine.registry.titles(), engine.settings.get(),
                                  engine.extension_sampler_names())
                extension_sections(engine, panel, "txt2img")
                with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hires"):
                    panel.add("enable_hr", gr.Checkbox(False, label="Enable", elem_id="txt2img_enable_hr"))
                    with gr.Row():
                        panel.add("hr_upscaler", gr.Dropdown(["Latent", *upscalers], value="Latent", label="Upscaler",
                                                             elem_id="txt2img_hr_upscaler", allow_custom_value=True))
                        panel.add("hr_second_pass_steps", gr.Slider(0, 150, value=0, step=1, label="Hires steps",
                                                                    elem_id="txt2img_hires_steps"))
                        panel.add("denoising_strength", gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                                                  elem_id="txt2img_denoising_strength"))
                    with gr.Row():
                        panel.add("hr_scale", gr.Slider(1, 4, value=2, step=0.05, label="Upscale by",
                                                        elem_id="txt2img_hr_scale"))
                        panel.add("hr_resize_x", gr.Slider(0, 4096, value=0, step=8, label="Resize width to",
                                                           elem_id="txt2img_hr_resize_x"))
                        panel.add("hr_resize_y", gr.Slider(0, 4096, value=0, step=8, label="Resize height to",
                                                           elem_id="txt2img_hr_resize_y"))
                    panel.add("hr_sampler_name", gr.Dropdown(["", *sampler_names()], value="",
                                                             label="Hires sampling method (empty: the same)",
                                                             elem_id="txt2img_hr_sampler", allow_custom_value=True))
                    panel.add("hr_prompt", gr.Textbox("", label="Hires prompt", lines=1, elem_id="txt2img_hr_prompt"))
                    panel.add("hr_negative_prompt", gr.Textbox("", label="Hires negative prompt", lines=1,
                                                               elem_id="txt2img_hr_neg_prompt"))
                controlnet_section(engine, panel, "txt2img")
                script_section(engine, panel, "txt2img")
            with gr.Column():
                output_area(panel)
    wire(engine, board, panel, "txt2img", [panel.generate.click, panel["prompt"].submit])

    def paste_parameters(text: str | None, current: str | None) -> list:
        pasted = fields_from_text(text or "")
        if pasted is None:
            raise user_error("The prompt box holds no generation parameters to read.")
        return updates_for_fields(engine, pasted, current, panel)

    paste.click(paste_parameters, inputs=[panel["prompt"], checkpoint], outputs=fillable(panel),
                api_visibility="private")
    return panel


def fillable(panel: Panel) -> list[gr.components.Component]:
    """The controls `ui.params.updates_for_fields` returns updates for, in its order."""
    from webui.ui.params import fillable_names

    return [panel[name] for name in fillable_names(panel)]
