"""The page: the checkpoint selector above all tabs, then the tabs."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from webui.app import Engine
from webui.models.detect import ModelControls
from webui.models.errors import ModelError
from webui.samplers.table import sampler_names
from webui.ui.extensions_tab import build_extensions_tab
from webui.ui.extras import build_extras_tab
from webui.ui.img2img import build_img2img_tab
from webui.ui.jobs import JobBoard
from webui.ui.messages import models_help, user_error
from webui.ui.params import checkpoint_choice
from webui.ui.pnginfo import build_pnginfo_tab
from webui.ui.settings import build_settings_tab
from webui.ui.txt2img import build_txt2img_tab

# Page styles Gradio's defaults get wrong for us: table headers break between words, never inside one.
PAGE_CSS = """
#extensions_table th, #extensions_table th * { word-break: keep-all !important; overflow-wrap: normal !important;
  hyphens: none !important; }
"""


MODEL_FIELDS = ("distilled_cfg_scale", "shift")


def build_ui(engine: Engine) -> gr.Blocks:
    board = JobBoard(engine)
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as demo:
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
            # files that take the place of the checkpoint's VAE / text encoders (or complete a Flux or
            # SD3.5 file that lacks them); empty: automatic
            modules = gr.Dropdown(
                label="VAE / Text encoder",
                choices=engine.module_names(),
                value=[],
                multiselect=True,
                elem_id="modules",
                scale=3,
            )
            refresh = gr.Button("🔄 Refresh", elem_id="refresh_checkpoints", scale=1, min_width=80)
        with gr.Tabs() as tabs:
            txt2img = build_txt2img_tab(engine, board, checkpoint, modules, ["Lanczos", "Nearest"])
            img2img = build_img2img_tab(engine, board, checkpoint, modules)
            extras_image, extras_upscaler, extras_note = build_extras_tab(engine)
            build_pnginfo_tab(engine, tabs, {"txt2img": txt2img, "img2img": img2img})
            extension_tabs(engine)
            build_settings_tab(engine.settings, engine.describe_runtime)
            build_extensions_tab(engine.extensions, engine.config)
        targets = {"img2img": (img2img["init_image"], "img2img"), "inpaint": (img2img["inpaint_editor"], "img2img"),
                   "extras": (extras_image, "extras")}
        for panel in (txt2img, img2img):
            send_buttons(panel, tabs, targets)

        def refresh_models(current: str | None) -> tuple[dict, str]:
            engine.registry.refresh(compute_hashes=True)
            engine.networks.refresh()
            return gr.update(choices=engine.registry.titles(), value=_current_or_default(engine, current)), models_help(engine)

        def refresh_modules(chosen: list[str] | None) -> dict:
            names = engine.module_names()
            return gr.update(choices=names, value=[c for c in chosen or [] if c in names])

        # the modules after the registry's refresh: its VAE list is theirs
        refresh.click(refresh_models, inputs=[checkpoint], outputs=[checkpoint, help_box],
                      api_name="refresh_checkpoints").then(refresh_modules, inputs=[modules], outputs=[modules],
                                                           api_visibility="private")

        def on_load(current: str | None) -> tuple[dict, str, dict, dict, str]:
            # hashes computed in the background since start-up now show in the titles; the
            # upscaler list needs the model side, which is not imported before the page is served
            problem = engine.upscaler_problem()
            return (gr.update(choices=engine.registry.titles(), value=_current_or_default(engine, current)),
                    models_help(engine), gr.update(choices=["Latent", *engine.upscaler_names()]),
                    gr.update(choices=engine.upscaler_names()), f"⚠ {problem}" if problem else "")

        demo.load(on_load, inputs=[checkpoint],
                  outputs=[checkpoint, help_box, txt2img["hr_upscaler"], extras_upscaler, extras_note],
                  api_visibility="private")

        # controls only some models take (Flux's distilled guidance, a flow model's shift) are shown for
        # those; a flow model's sampler list is the samplers it can use
        panels = (txt2img, img2img)
        model_only = [panel[name] for panel in panels for name in MODEL_FIELDS] + [p["sampler_name"] for p in panels]
        extension_samplers = engine.extension_sampler_names()

        def model_controls(current: str | None, *chosen: str, on_load: bool = False) -> list[dict]:
            controls = engine.model_controls(current)
            if on_load and controls == ModelControls():  # the page is built for such a model: nothing to change
                return [gr.update() for _ in model_only]
            samplers = [*(controls.samplers or sampler_names()), *extension_samplers]
            shown = [gr.update(visible=name in controls.fields) for _ in panels for name in MODEL_FIELDS]
            # a sampler value is sent only when it must change: one sent back could undo a choice made meanwhile
            return shown + [gr.update(choices=samplers, **({} if value in samplers else {"value": samplers[0]}))
                            for value in chosen]

        inputs = [checkpoint, *(p["sampler_name"] for p in panels)]
        checkpoint.change(model_controls, inputs=inputs, outputs=model_only, api_visibility="private", queue=False)
        demo.load(lambda *values: model_controls(*values, on_load=True), inputs=inputs, outputs=model_only,
                  api_visibility="private", queue=False)
    return demo


def extension_tabs(engine: Engine) -> None:
    """Tabs that extensions contribute (`UiSection(tabs=("tab",))`)."""
    for e in engine.extensions.sections("tab"):
        with gr.Tab(e.ui.title, elem_id=f"tab_ext_{e.name}"):
            try:
                e.ui.build()
            except Exception as err:  # noqa: BLE001  a broken tab must not break the page
                gr.Markdown(f"This extension's tab failed to build: {type(err).__name__}: {err}")


def send_buttons(panel, tabs: gr.Tabs, targets: dict) -> None:
    """"Send to img2img / inpaint / extras" under a tab's gallery: the selected (or first) image."""
    selected = gr.State(0)
    panel.gallery.select(_index, None, selected, api_visibility="private")
    for name, (target, tab) in targets.items():

        def send(gallery, index, name=name, tab=tab):
            if not gallery:
                raise user_error("Generate an image first.")
            item = gallery[min(index or 0, len(gallery) - 1)]
            path = item[0] if isinstance(item, (list, tuple)) else item.get("image", item)
            path = getattr(path, "path", None) or (path.get("path") if isinstance(path, dict) else path)
            image = Image.open(path)
            image.load()
            value = {"background": image, "layers": [], "composite": image} if name == "inpaint" else image
            return value, gr.Tabs(selected=tab)

        panel.send[name].click(send, inputs=[panel.gallery, selected], outputs=[target, tabs], api_visibility="private")


def _index(evt: gr.SelectData) -> int:
    return evt.index


def _current_or_default(engine: Engine, current: str | None) -> str | None:
    return checkpoint_choice(engine, current) or _default_title(engine)


def _default_title(engine: Engine) -> str | None:
    try:
        return engine.resolve_checkpoint(None).title
    except ModelError:
        return None
