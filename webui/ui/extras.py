"""The Extras tab: upscale an image with a resampler or an upscaler model."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from webui import extras
from webui.app import Engine
from webui.models.errors import ModelError
from webui.ui.img2img import FOLDERS_REFUSED
from webui.ui.messages import user_error

BUILTIN = ["Lanczos", "Nearest"]


def _how(name: str, how: str, scale: float, w: float, h: float, gfpgan: float = 0.0, codeformer: float = 0.0,
         weight: float = 0.5) -> extras.Upscale:
    faces = {"gfpgan_visibility": float(gfpgan or 0), "codeformer_visibility": float(codeformer or 0),
             "codeformer_weight": float(weight if weight is not None else 0.5)}
    if how == "Scale to":
        return extras.Upscale(name, scale=None, size=(int(w), int(h)), **faces)
    return extras.Upscale(name, scale=float(scale), **faces)


def build_extras_tab(engine: Engine) -> tuple[gr.Image, gr.Dropdown, gr.Markdown]:
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
                with gr.Row():  # faces are restored after upscaling, GFPGAN first, as A1111 does
                    gfpgan = gr.Slider(0, 1, value=0, step=0.05, label="GFPGAN visibility",
                                       elem_id="extras_gfpgan_visibility")
                    codeformer = gr.Slider(0, 1, value=0, step=0.05, label="CodeFormer visibility",
                                           elem_id="extras_codeformer_visibility")
                    weight = gr.Slider(0, 1, value=0.5, step=0.05, label="CodeFormer weight (0 = strongest)",
                                       elem_id="extras_codeformer_weight")
            with gr.Column():
                result = gr.Image(label="Result", type="pil", format="png", elem_id="extras_result", height=360)
                info = gr.Textbox(label="Result", interactive=False, elem_id="extras_info")
                note = gr.Markdown("", elem_id="extras_note")  # why some upscalers cannot load, if so

    def upscale(image: Image.Image | None, name: str, how: str, scale: float, w: float, h: float,
                gfpgan_v: float, codeformer_v: float, cf_weight: float):
        if image is None:
            raise user_error("Put an image in the Extras tab first.")
        try:
            result = extras.run(engine, [image], _how(name, how, scale, w, h, gfpgan_v, codeformer_v, cf_weight),
                                save=True)
        except (ModelError, ValueError, RuntimeError) as e:
            raise user_error(str(e)) from None
        out, path = result.images[0], result.paths[0]
        return out, f"{out.width}x{out.height}, saved as {path.name}"

    run.click(upscale, inputs=[source, upscaler, mode, factor, width, height, gfpgan, codeformer, weight],
              outputs=[result, info],
              api_name="extras_upscale", concurrency_id="extras", concurrency_limit=1)

    def upscale_folder(src: str | None, dst: str | None, name: str, how: str, scale: float, w: float, h: float,
                       gfpgan_v: float, codeformer_v: float, cf_weight: float):
        if engine.config.listen or engine.config.share:
            raise user_error(FOLDERS_REFUSED)
        if not (src or "").strip() or not (dst or "").strip():
            raise user_error("Type the input and the output folder first.")
        try:
            written = extras.run_folder(engine, Path(src.strip()), Path(dst.strip()),
                                        _how(name, how, scale, w, h, gfpgan_v, codeformer_v, cf_weight))
        except (ModelError, ValueError, RuntimeError) as e:
            raise user_error(str(e)) from None
        last = Image.open(written[-1]) if written else None
        return last, f"{len(written)} image(s) written to {dst.strip()}"

    run_folder.click(upscale_folder, inputs=[input_dir, output_dir, upscaler, mode, factor, width, height, gfpgan,
                                             codeformer, weight],
                     outputs=[result, info], api_name="extras_upscale_folder", concurrency_id="extras")
    return source, upscaler, note
