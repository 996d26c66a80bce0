"""The img2img tab: an init image, or an image with a mask drawn (or uploaded) for inpainting."""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from webui.app import Engine
from webui.images import check_pixels
from webui.models.errors import ModelError
from webui.pipeline.batch import FolderBatch
from webui.pipeline.init_image import Outpaint
from webui.pipeline.request import MaskedContent, ResizeMode
from webui.ui.controlnet import controlnet_section
from webui.ui.generation import Panel, extension_sections, output_area, prompt_area, sampling_controls, wire
from webui.ui.jobs import JobBoard
from webui.ui.messages import user_error
from webui.ui.scripts import script_section

RESIZE_MODES = [m.label for m in ResizeMode]
MASKED_CONTENT = [m.label for m in MaskedContent]
SOURCES = ("img2img", "sketch", "inpaint", "inpaint_upload", "batch")
FOLDERS_REFUSED = ("Batch from a folder reads and writes folders on the server, so it is off while the server "
                   "listens beyond this computer (--listen) or shares a public link (--share).")
OUTPAINT_SIDES = ("left", "top", "right", "bottom")


def editor_mask(value: dict | None) -> tuple[Image.Image | None, Image.Image | None]:
    """(background, mask) from an ImageEditor value: the mask is wherever any layer was painted."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"]
    painted = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    mask = Image.fromarray((painted * 255).astype(np.uint8)) if painted is not None and painted.any() else None
    return background, mask


def prepare(given: dict[str, Any], allow_folders: bool = True) -> dict[str, Any]:
    """Tab-specific values -> request fields (plus `batch_folder` for the Batch source)."""
    fields = dict(given)
    source = fields.pop("source", "img2img")
    folders = [str(fields.pop(f"batch_{k}_dir", "") or "").strip() for k in ("input", "output", "mask")]
    image, editor = fields.pop("init_image", None), fields.pop("inpaint_editor", None)
    sketch = fields.pop("sketch", None)
    upload_image, upload_mask = fields.pop("inpaint_image", None), fields.pop("inpaint_mask", None)
    for what, value in (("image", image), ("image", upload_image), ("mask", upload_mask),
                        ("image", (editor or {}).get("background")), ("sketch", (sketch or {}).get("composite"))):
        if isinstance(value, Image.Image):
            check_pixels(value, what)  # before any work on it
    mask = None
    if source == "sketch":
        image = sketch.get("composite") if sketch else None
    elif source == "inpaint":
        image, mask = editor_mask(editor)
        if image is not None and mask is None:
            raise ValueError("Draw the area to repaint on the image first.")
    elif source == "inpaint_upload":
        image, mask = upload_image, upload_mask
        if image is not None and mask is None:
            raise ValueError("Upload a mask too (white = repaint).")
    if source == "batch":
        if not allow_folders:
            raise ValueError(FOLDERS_REFUSED)
        if not folders[0]:
            raise ValueError("Type the input folder of the batch first.")
        from pathlib import Path

        fields["batch_folder"] = FolderBatch(*(Path(f) if f else None for f in folders))
        fields["batch_folder"].check()
        image = Image.new("RGB", (8, 8))  # each file of the folder replaces it
    if image is None:
        raise ValueError("Put an image in the img2img tab first.")
    outpaint = Outpaint(*(int(fields.pop(f"outpaint_{side}", 0) or 0) for side in OUTPAINT_SIDES))
    if outpaint.active:  # the engine grows the canvas; the new border (and any drawn mask) is repainted
        fields["outpaint"] = outpaint.sizes()
    fields["init_images"] = (image,)
    fields["mask"] = mask
    fields["resize_mode"] = RESIZE_MODES.index(fields.get("resize_mode") or RESIZE_MODES[0])
    fields["inpainting_fill"] = MASKED_CONTENT.index(fields.get("inpainting_fill") or MaskedContent.ORIGINAL.label)
    fields["inpainting_mask_invert"] = int(fields.get("inpainting_mask_invert") == "Inpaint not masked")
    fields["inpaint_full_res"] = fields.get("inpaint_full_res") == "Only masked"
    return fields


def build_img2img_tab(engine: Engine, board: JobBoard, checkpoint: gr.Dropdown, modules: gr.Dropdown) -> Panel:
    panel = Panel("img2img")
    panel.add("checkpoint", checkpoint)
    panel.add("modules", modules)
    with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
        prompt_area(engine, panel)
        with gr.Row():
            interrogate_clip = gr.Button("Interrogate CLIP", size="sm", elem_id="img2img_interrogate_clip")
            interrogate = gr.Button("Interrogate tagger", size="sm", elem_id="img2img_interrogate_tagger")
        source = panel.add("source", gr.Textbox("img2img", visible=False, elem_id="img2img_source"))
        with gr.Row():
            with gr.Column():
                with gr.Tabs(elem_id="img2img_sources"):
                    with gr.Tab("img2img", elem_id="img2img_img2img_tab") as t0:
                        panel.add("init_image", gr.Image(label="Image", type="pil", sources=["upload", "clipboard"],
                                                         elem_id="img2img_image", height=360))
                    with gr.Tab("Sketch", elem_id="img2img_sketch_tab") as t_sketch:
                        panel.add("sketch", gr.ImageEditor(
                            label="Sketch", type="pil", sources=["upload", "clipboard"], layers=False,
                            brush=gr.Brush(colors=["#000000", "#ffffff", "#e03030", "#30a030", "#3050e0"]),
                            elem_id="img2img_sketch", height=360,
                        ))
                    with gr.Tab("Inpaint", elem_id="img2img_inpaint_tab") as t1:
                        panel.add("inpaint_editor", gr.ImageEditor(
                            label="Image and mask", type="pil", sources=["upload", "clipboard"], layers=False,
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="img2img_inpaint",
                            height=360,
                        ))
                    with gr.Tab("Inpaint upload", elem_id="img2img_inpaint_upload_tab") as t2:
                        with gr.Row():
                            panel.add("inpaint_image", gr.Image(label="Image", type="pil", elem_id="img2img_inpaint_image"))
                            panel.add("inpaint_mask", gr.Image(label="Mask (white = repaint)", type="pil",
                                                               image_mode="L", elem_id="img2img_inpaint_mask"))
                    with gr.Tab("Batch", elem_id="img2img_batch_tab") as t3:
                        gr.Markdown("Every image in the input folder goes through these settings. With an output "
                                    "folder, results keep their source's name; a mask folder gives each image the "
                                    "mask of the same name.")
                        panel.add("batch_input_dir", gr.Textbox(label="Input folder", elem_id="img2img_batch_input"))
                        panel.add("batch_output_dir", gr.Textbox(label="Output folder (empty: outputs/)",
                                                                 elem_id="img2img_batch_output"))
                        panel.add("batch_mask_dir", gr.Textbox(label="Mask folder (optional)",
                                                               elem_id="img2img_batch_mask"))
                for tab, name in zip((t0, t_sketch, t1, t2, t3), SOURCES):
                    tab.select(lambda name=name: name, outputs=[source], api_visibility="private", queue=False)
                panel.add("resize_mode", gr.Radio(RESIZE_MODES, value=RESIZE_MODES[0], label="Resize mode",
                                                  elem_id="img2img_resize_mode"))
                panel.add("denoising_strength", gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                                                          elem_id="img2img_denoising_strength"))
                with gr.Accordion("Inpainting", open=True, elem_id="img2img_inpaint_settings"):
                    with gr.Row():
                        panel.add("mask_blur", gr.Slider(0, 64, value=4, step=1, label="Mask blur",
                                                         elem_id="img2img_mask_blur"))
                        panel.add("inpainting_mask_invert", gr.Radio(["Inpaint masked", "Inpaint not masked"],
                                                                     value="Inpaint masked", label="Mask mode",
                                                                     elem_id="img2img_mask_mode"))
                    panel.add("inpainting_fill", gr.Radio(MASKED_CONTENT, value=MaskedContent.ORIGINAL.label,
                                                          label="Masked content",
                                                          elem_id="img2img_inpainting_fill"))
                    with gr.Row():
                        panel.add("inpaint_full_res", gr.Radio(["Whole picture", "Only masked"], value="Whole picture",
                                                               label="Inpaint area", elem_id="img2img_inpaint_full_res"))
                        panel.add("inpaint_full_res_padding", gr.Slider(0, 256, value=32, step=4,
                                                                        label="Only masked padding, pixels",
                                                                        elem_id="img2img_inpaint_padding"))
                with gr.Accordion("Outpaint", open=False, elem_id="img2img_outpaint"):
                    gr.Markdown("Pixels to add on each side. The image grows to that size (width and height "
                                "follow) and the new border is painted; pick Masked content \"fill\" or "
                                "\"latent noise\" and a denoising strength near 1.")
                    with gr.Row():
                        for side in OUTPAINT_SIDES:
                            panel.add(f"outpaint_{side}", gr.Slider(0, 512, value=0, step=8, label=side.capitalize(),
                                                                   elem_id=f"img2img_outpaint_{side}"))
                sampling_controls(panel, engine.registry.titles(), engine.settings.get(),
                                  engine.extension_sampler_names())
                extension_sections(engine, panel, "img2img")
                controlnet_section(engine, panel, "img2img")
                script_section(engine, panel, "img2img")
            with gr.Column():
                output_area(panel)
    def tag(image: Any) -> str:
        """The init image's booru tags from the first tagger in models/interrogators."""
        if image is None:
            raise user_error("Put an image in the img2img tab first.")
        try:
            return engine.taggers.interrogate(image).caption
        except ModelError as err:
            raise user_error(str(err)) from None

    interrogate.click(tag, inputs=[panel["init_image"]], outputs=[panel["prompt"]], api_name="interrogate_tagger")

    def caption(image: Any) -> str:
        """The init image's BLIP caption with the style terms CLIP ranks closest."""
        if image is None:
            raise user_error("Put an image in the img2img tab first.")
        if missing := engine.clip_interrogator.missing():
            raise user_error(missing)
        try:
            return engine.clip_interrogator.interrogate(image)
        except ModelError as err:
            raise user_error(str(err)) from None

    interrogate_clip.click(caption, inputs=[panel["init_image"]], outputs=[panel["prompt"]],
                           api_name="interrogate_clip")
    allow = not (engine.config.listen or engine.config.share)
    wire(engine, board, panel, "img2img", [panel.generate.click, panel["prompt"].submit],
         prepare=lambda given: prepare(given, allow_folders=allow))
    return panel
