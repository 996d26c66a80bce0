"""The Extras tab: upscale an image with a resampler or an upscaler model."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from webui.app import Engine
from webui.images import check_pixels, dated_dir, read_infotext, save_image
from webui.models.errors import ModelError
from webui.ui.img2img import FOLDERS_REFUSED
from webui.ui.messages import user_error

BUILTIN = ["Lanczos", "Nearest"]


def build_extras_tab(engine: Engine) -> tuple[gr.Image, gr.Dropdown]:
    with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
        with gr.Row():
            with gr.Column():
                with gr.Tabs():
                    with gr.Tab("Single image", elem_id="extras_single_tab"):
                        source = gr.Image(label="Source", type="pil", image_mode=None,
                                          sources=["upload", "clipboard"], elem_id="extras_image", height=360)
                        run = gr.Button("Upscale", variant="primary", elem_id="extras_generate")
                    with gr.Tab("Batch from folder", elem_id="extras_batch_tab"):
                        input_dir = gr.Textbox(label="Input folder", elem_id="extras_batch_input")
                        output_dir = gr.Textbox(label="Output folder", elem_id="extras_batch_output")
                        run_folder = gr.Button("Upscale folder", variant="primary", elem_id="extras_batch_generate")
                upscaler = gr.Dropdown(BUILTIN, value="Lanczos", label="Upscaler", elem_id="extras_upscaler",
                                       allow_custom_value=True)
                with gr.Row():
                    mode = gr.Radio(["Scale by", "Scale to"], value="Scale by", label="Resize", elem_id="extras_mode")
                    factor = gr.Slider(1, 8, value=2, step=0.05, label="Scale by", elem_id="extras_scale")
                with gr.Row():
                    width = gr.Slider(64, 8192, value=1024, step=8, label="Width", elem_id="extras_width")
                    height = gr.Slider(64, 8192, value=1024, step=8, label="Height", elem_id="extras_height")
            with gr.Column():
                result = gr.Image(label="Result", type="pil", format="png", elem_id="extras_result", height=360)
                info = gr.Textbox(label="Result", interactive=False, elem_id="extras_info")

    def upscale(image: Image.Image | None, name: str, how: str, scale: float, w: float, h: float):
        if image is None:
            raise user_error("Put an image in the Extras tab first.")
        size = (int(w), int(h)) if how == "Scale to" else None
        try:
            check_pixels(image)
            out = engine.upscalers.upscale(image, name, scale=None if size else float(scale), size=size,
                                           device=engine.runtime.device)
        except (ModelError, ValueError) as e:
            raise user_error(str(e)) from None
        source_text = read_infotext(image) or ""
        note = f"Postprocess upscaler: {name}, Postprocess upscale to: {out.width}x{out.height}"
        text = f"{source_text}\n{note}".strip() if source_text else note
        path = save_image(out, dated_dir(engine.config.outputs_path, "extras"), 0, text)
        return out, f"{out.width}x{out.height}, saved as {path.name}"

    run.click(upscale, inputs=[source, upscaler, mode, factor, width, height], outputs=[result, info],
              api_name="extras_upscale", concurrency_id="extras", concurrency_limit=1)

    def upscale_folder(src: str | None, dst: str | None, name: str, how: str, scale: float, w: float, h: float):
        if engine.config.listen or engine.config.share:
            raise user_error(FOLDERS_REFUSED)
        if not (src or "").strip() or not (dst or "").strip():
            raise user_error("Type the input and the output folder first.")
        options = {"size": (int(w), int(h))} if how == "Scale to" else {"scale": float(scale)}
        try:
            written = engine.upscalers.upscale_folder(Path(src.strip()), Path(dst.strip()), name,
                                                      device=engine.runtime.device, **options)
        except (ModelError, ValueError) as e:
            raise user_error(str(e)) from None
        last = Image.open(written[-1]) if written else None
        return last, f"{len(written)} image(s) written to {dst.strip()}"

    run_folder.click(upscale_folder, inputs=[input_dir, output_dir, upscaler, mode, factor, width, height],
                     outputs=[result, info], api_name="extras_upscale_folder", concurrency_id="extras")
    return source, upscaler
