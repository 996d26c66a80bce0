"""The ControlNet accordion under txt2img and img2img: one tab per unit (image, preprocessor,
model, weight, step range, modes, a union model's control type), a preview of the preprocessed
image (shown with "Allow preview"). The controls are registered as `cn_<unit>_<field>`;
`ui.generation` makes them the request's `controlnet` units."""

from __future__ import annotations

from typing import Any

import gradio as gr

from webui.app import Engine
from webui.controlnet import preprocess
from webui.controlnet.units import RESIZE_LABELS, UNION_TYPES, UNKNOWN, ControlMode
from webui.ui.generation import Panel
from webui.ui.messages import user_error

NONE = "None"


def controlnet_section(engine: Engine, panel: Panel, tab: str) -> None:
    p = panel.prefix

    def add(n: int, name: str, control: gr.components.Component) -> gr.components.Component:
        key = f"cn_{n}_{name}"
        panel.add(key, control)
        panel.control_fields[key] = (n, name)
        return control

    with gr.Accordion("ControlNet", open=False, elem_id=f"{p}_controlnet"), gr.Tabs():
        for n in range(engine.settings.get().control_net_unit_count):
            with gr.Tab(f"Unit {n}", elem_id=f"{p}_controlnet_unit_{n}"):
                with gr.Row():
                    image = add(n, "image", gr.Image(label="Control image (empty on img2img: the init image)",
                                                     type="pil", sources=["upload", "clipboard"],
                                                     elem_id=f"{p}_cn_{n}_image", height=256))
                    preview = gr.Image(label="Preprocessor preview", type="pil", interactive=False, visible=False,
                                       elem_id=f"{p}_cn_{n}_preview", height=256)
                with gr.Row():
                    add(n, "enabled", gr.Checkbox(False, label="Enable", elem_id=f"{p}_cn_{n}_enabled"))
                    allow = gr.Checkbox(False, label="Allow preview", elem_id=f"{p}_cn_{n}_allow_preview")
                    add(n, "pixel_perfect", gr.Checkbox(False, label="Pixel perfect", elem_id=f"{p}_cn_{n}_pixel_perfect"))
                with gr.Row():
                    module = add(n, "module", gr.Dropdown(preprocess.names(), value="none",
                                                          label="Preprocessor", elem_id=f"{p}_cn_{n}_module"))
                    model = add(n, "model", gr.Dropdown([NONE, *engine.controlnets.titles()], value=NONE, label="Model",
                                                        elem_id=f"{p}_cn_{n}_model", allow_custom_value=True))
                    refresh = gr.Button("🔄", size="sm", min_width=40, scale=0, elem_id=f"{p}_cn_{n}_refresh")
                    show = gr.Button("Preview", size="sm", scale=0, visible=False,
                                     elem_id=f"{p}_cn_{n}_preview_button")
                with gr.Row():
                    add(n, "weight", gr.Slider(0, 2, value=1, step=0.05, label="Control weight", elem_id=f"{p}_cn_{n}_weight"))
                    add(n, "guidance_start", gr.Slider(0, 1, value=0, step=0.01, label="Starting control step",
                                                       elem_id=f"{p}_cn_{n}_guidance_start"))
                    add(n, "guidance_end", gr.Slider(0, 1, value=1, step=0.01, label="Ending control step",
                                                     elem_id=f"{p}_cn_{n}_guidance_end"))
                with gr.Row():
                    res = add(n, "processor_res", gr.Slider(64, 2048, value=512, step=8, label="Preprocessor resolution",
                                                            elem_id=f"{p}_cn_{n}_processor_res"))
                    a = add(n, "threshold_a", gr.Slider(-1, 255, value=-1, step=1, label="Threshold A (-1: default)",
                                                        elem_id=f"{p}_cn_{n}_threshold_a"))
                    b = add(n, "threshold_b", gr.Slider(-1, 255, value=-1, step=1, label="Threshold B (-1: default)",
                                                        elem_id=f"{p}_cn_{n}_threshold_b"))
                add(n, "control_mode", gr.Radio([m.label for m in ControlMode], value=ControlMode.BALANCED.label,
                                                label="Control mode", elem_id=f"{p}_cn_{n}_control_mode"))
                add(n, "resize_mode", gr.Radio(list(RESIZE_LABELS), value=RESIZE_LABELS[1], label="Resize mode",
                                               elem_id=f"{p}_cn_{n}_resize_mode"))
                add(n, "union_control_type", gr.Dropdown(
                    [UNKNOWN, *UNION_TYPES], value=UNKNOWN, elem_id=f"{p}_cn_{n}_union_control_type",
                    label="Control type, for union models (Unknown: the preprocessor's)"))
            refresh.click(lambda: gr.update(choices=[NONE, *engine.controlnets.titles()]), outputs=[model],
                          api_visibility="private", queue=False)
            show.click(lambda *args: _preview(engine, *args), inputs=[image, module, res, a, b], outputs=[preview],
                       api_visibility="private")
            allow.change(lambda on: (gr.update(visible=on), gr.update(visible=on)), inputs=[allow],
                         outputs=[preview, show], api_visibility="private", queue=False)


def _preview(engine: Engine, image: Any, module: str, resolution: float, a: float, b: float) -> Any:
    if image is None:
        raise user_error("Upload a control image first.")
    try:
        return engine.preprocess(module, [image], int(resolution), a, b)[0]
    except ValueError as err:
        raise user_error(str(err)) from None


def control_units(data: dict[str, Any], control_fields: dict[str, tuple[int, str]]) -> list[dict[str, Any]]:
    """Move the units' control values out of `data`: one dict per unit, in order."""
    units: dict[int, dict[str, Any]] = {}
    for key, (n, name) in control_fields.items():
        value = data.pop(key, None)
        if value is not None:
            units.setdefault(n, {})[name] = value
    return [units[n] for n in sorted(units) if units[n].get("enabled")]
