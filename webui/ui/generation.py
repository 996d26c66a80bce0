"""Controls shared by the txt2img and img2img tabs, and the handler that turns their values
into a `GenerationRequest`. Each control is registered under its request field name, so the
handler needs no positional bookkeeping and API callers can pass keywords."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
from pydantic import ValidationError

from webui.app import Engine
from webui.models.errors import ModelError
from webui.pipeline.request import GenerationRequest, validation_message
from webui.samplers.table import SCHEDULES, sampler_names
from webui.settings import Settings
from webui.ui.jobs import JobBoard, run_streaming, session_of
from webui.ui.messages import user_error


@dataclass
class Panel:
    """The controls of one tab, by request field name, plus its outputs and buttons."""

    prefix: str
    inputs: dict[str, gr.components.Component] = field(default_factory=dict)
    gallery: gr.Gallery | None = None
    info: gr.Textbox | None = None
    generate: gr.Button | None = None
    interrupt: gr.Button | None = None
    skip: gr.Button | None = None
    send: dict[str, gr.Button] = field(default_factory=dict)  # "Send to img2img / inpaint / extras"
    ext_fields: dict[str, tuple[str, str]] = field(default_factory=dict)  # control name -> (extension, field)
    script_fields: dict[str, tuple[str, str]] = field(default_factory=dict)  # control name -> (script title, field)
    control_fields: dict[str, tuple[int, str]] = field(default_factory=dict)  # control name -> (ControlNet unit, field)
    seed_buttons: dict[str, gr.Button] = field(default_factory=dict)  # "random" / "reuse" beside the seed
    few_step: gr.Button | None = None  # fills the recommended settings of a few-step model (LCM, Turbo, ...)
    few_step_note: gr.Markdown | None = None

    def add(self, name: str, component: gr.components.Component) -> gr.components.Component:
        self.inputs[name] = component
        return component

    def __getitem__(self, name: str) -> gr.components.Component:
        return self.inputs[name]


# "Sampler parameters": request field -> label; an empty box means the sampler's default
OPTIONAL_NUMBERS = {"eta": "Eta", "s_churn": "Sigma churn", "s_noise": "Sigma noise", "shift": "Shift"}


def sampling_controls(panel: Panel, titles: list[str], defaults: Settings | None = None,
                      extra_samplers: list[str] | None = None) -> None:
    """Sampler, size, batch, seed and variation, refiner (`titles`: the checkpoints to offer;
    `defaults`: the Settings holding the initial sampler, steps, size and CFG)."""
    p = panel.prefix
    d = defaults or Settings()
    samplers = [*sampler_names(), *(extra_samplers or [])]
    with gr.Row():
        panel.add("sampler_name", gr.Dropdown(label="Sampling method", choices=samplers, value=d.default_sampler,
                                              elem_id=f"{p}_sampler", allow_custom_value=True))
        panel.add("scheduler", gr.Dropdown(label="Schedule type", choices=list(SCHEDULES), value=d.default_scheduler,
                                           elem_id=f"{p}_scheduler", allow_custom_value=True))
        panel.add("steps", gr.Slider(1, 150, value=d.default_steps, step=1, label="Sampling steps", elem_id=f"{p}_steps"))
        panel.few_step = gr.Button("⚡", elem_id=f"{p}_few_step", size="sm", min_width=40, scale=0)
    panel.few_step_note = gr.Markdown("", elem_id=f"{p}_few_step_note")
    with gr.Row():
        panel.add("width", gr.Slider(64, 2048, value=d.default_width, step=8, label="Width", elem_id=f"{p}_width"))
        panel.add("height", gr.Slider(64, 2048, value=d.default_height, step=8, label="Height", elem_id=f"{p}_height"))
    with gr.Row():
        panel.add("batch_size", gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{p}_batch_size"))
        panel.add("n_iter", gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{p}_batch_count"))
        panel.add("cfg_scale", gr.Slider(1, 30, value=d.default_cfg_scale, step=0.5, label="CFG Scale", elem_id=f"{p}_cfg_scale"))
        panel.add("distilled_cfg_scale", gr.Slider(0, 30, value=3.5, step=0.5, label="Distilled CFG Scale",
                                                   info="Flux dev (set CFG Scale to 1 for it)", visible=False,
                                                   elem_id=f"{p}_distilled_cfg_scale"))
    with gr.Row():
        panel.add("seed", gr.Number(value=-1, label="Seed", precision=0, elem_id=f"{p}_seed", scale=3))
        panel.seed_buttons["random"] = gr.Button("🎲", elem_id=f"{p}_random_seed", size="sm", min_width=40, scale=0)
        panel.seed_buttons["reuse"] = gr.Button("♻", elem_id=f"{p}_reuse_seed", size="sm", min_width=40, scale=0)
        panel.add("clip_skip", gr.Slider(1, 12, value=1, step=1, label="Clip skip", elem_id=f"{p}_clip_skip"))
        panel.add("tiling", gr.Checkbox(False, label="Tiling", elem_id=f"{p}_tiling"))
        panel.add("restore_faces", gr.Checkbox(d.face_restoration, label="Restore faces", elem_id=f"{p}_restore_faces"))
    with gr.Accordion("Variation seed", open=False, elem_id=f"{p}_variation"):
        with gr.Row():
            panel.add("subseed", gr.Number(value=-1, label="Variation seed", precision=0, elem_id=f"{p}_subseed"))
            panel.add("subseed_strength", gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                                    elem_id=f"{p}_subseed_strength"))
        with gr.Row():
            panel.add("seed_resize_from_w", gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width",
                                                      elem_id=f"{p}_seed_resize_from_w"))
            panel.add("seed_resize_from_h", gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height",
                                                      elem_id=f"{p}_seed_resize_from_h"))
    with gr.Accordion("Refiner", open=False, elem_id=f"{p}_refiner"):
        with gr.Row():
            panel.add("refiner_checkpoint", gr.Dropdown(
                ["None", *titles], value="None", label="Checkpoint", elem_id=f"{p}_refiner_checkpoint",
                allow_custom_value=True,
            ))
            panel.add("refiner_switch_at", gr.Slider(0.01, 1, value=0.8, step=0.01, label="Switch at",
                                                     elem_id=f"{p}_refiner_switch_at"))
    with gr.Accordion("Sampler parameters", open=False, elem_id=f"{p}_sampler_options"):
        gr.Markdown("Empty: the sampler's default. Eta applies to ancestral samplers and DDIM; churn and "
                    "noise to Euler, Heun and DPM2; shift to flow-matching models (SD3: 3).")
        # text boxes, not number boxes: an emptied number box sends 0, which would silently turn
        # Euler a's noise off (eta 0, sigma noise 0) for whoever merely opened this accordion
        with gr.Row():
            for name, label in OPTIONAL_NUMBERS.items():  # Shift: shown for flow models (ui.blocks)
                panel.add(name, gr.Textbox("", label=label, placeholder="default", visible=name != "shift",
                                           elem_id=f"{p}_{name}"))


_NOT_FEW_STEP = ("Neither the checkpoint nor a LoRA in the prompt is a few-step model (LCM, Lightning, "
                 "Hyper-SD, Turbo) by its metadata or file name: the settings stay as they are.")


def wire_few_step(engine: Engine, panel: Panel) -> None:
    """The ⚡ button: the sampler, schedule, steps and CFG a few-step checkpoint or LoRA (LCM,
    Lightning, Hyper-SD, Turbo) is made for, and a line saying what was recognised and how."""
    assert panel.few_step is not None and panel.few_step_note is not None

    def fill(checkpoint: str | None, prompt: str | None) -> list[Any]:
        try:
            found = engine.few_step(checkpoint, prompt or "")
        except ModelError as e:
            raise user_error(str(e)) from None
        if found is None:
            return [gr.update()] * 4 + [_NOT_FEW_STEP]
        return [found.sampler_name, found.scheduler, found.steps, found.cfg_scale, found.describe()]

    panel.few_step.click(fill, inputs=[panel["checkpoint"], panel["prompt"]],
                         outputs=[panel["sampler_name"], panel["scheduler"], panel["steps"], panel["cfg_scale"],
                                  panel.few_step_note], api_visibility="private")


def extension_sections(engine: Engine, panel: Panel, tab: str) -> None:
    """One accordion per extension that contributes to this tab; its controls are registered as
    `ext_<n>_<field>` and their values reach the extension by field name."""
    for n, e in enumerate(engine.extensions.sections(tab)):
        with gr.Accordion(e.ui.title, open=False, elem_id=f"{panel.prefix}_ext_{e.name}"):
            try:
                controls = e.ui.build() or {}
            except Exception as err:  # noqa: BLE001  a broken section must not break the page
                gr.Markdown(f"This extension's controls failed to build: {type(err).__name__}: {err}")
                continue
        for name, control in controls.items():
            key = f"ext_{n}_{name}"
            panel.add(key, control)
            panel.ext_fields[key] = (e.name, name)


def output_area(panel: Panel) -> None:
    p = panel.prefix
    with gr.Row():
        panel.generate = gr.Button("Generate", variant="primary", elem_id=f"{p}_generate", scale=3)
        panel.interrupt = gr.Button("Interrupt", elem_id=f"{p}_interrupt", scale=1)
        panel.skip = gr.Button("Skip", elem_id=f"{p}_skip", scale=1)
    # an output: no upload area ("Drop Media Here") in it
    panel.gallery = gr.Gallery(label="Output", elem_id=f"{p}_gallery", columns=2, height=512, interactive=False)
    panel.info = gr.Textbox(label="Generation parameters", lines=4, interactive=False, elem_id=f"{p}_info")
    with gr.Row():
        for name in ("img2img", "inpaint", "extras"):
            panel.send[name] = gr.Button(f"Send to {name}", size="sm", elem_id=f"{p}_send_to_{name}")



def _to_request(values: dict[str, Any], fixed: dict[str, Any],
                ext_fields: dict[str, tuple[str, str]] | None = None,
                script_fields: dict[str, tuple[str, str]] | None = None,
                control_fields: dict[str, tuple[int, str]] | None = None) -> GenerationRequest:
    data = {k: v for k, v in values.items() if v is not None}
    if control_fields:
        from webui.ui.controlnet import control_units

        data["controlnet"] = control_units(data, control_fields)
    if script_fields is not None:
        chosen = data.get("script_name") or ""
        chosen = "" if chosen == "None" else chosen
        values_of = {key: data.pop(key, None) for key in script_fields}
        data["script_name"] = chosen
        data["script_args"] = {name: values_of[key] for key, (title, name) in script_fields.items()
                               if title == chosen and values_of[key] is not None}
    extensions: dict[str, dict[str, Any]] = {}
    for key, (ext_name, field_name) in (ext_fields or {}).items():
        if key in data:
            extensions.setdefault(ext_name, {})[field_name] = data.pop(key)
    if extensions:
        data["extensions"] = extensions
    for key in ("steps", "width", "height", "batch_size", "n_iter", "seed", "subseed", "clip_skip",
                "seed_resize_from_w", "seed_resize_from_h", "hr_resize_x", "hr_resize_y", "hr_second_pass_steps",
                "mask_blur", "inpaint_full_res_padding"):
        if key in data:
            data[key] = int(data[key])
    for key in OPTIONAL_NUMBERS:  # text boxes: empty is the default, else a number (validated by the request)
        text = str(data.get(key, "")).strip()
        if not text:
            data.pop(key, None)
            continue
        try:
            data[key] = float(text)
        except ValueError:
            raise ValueError(f"{key}: {text!r} is not a number (leave it empty for the default)") from None
    data["styles"] = tuple(data.get("styles") or ())
    data["checkpoint"] = data.get("checkpoint") or None
    data["modules"] = tuple(data.get("modules") or ())
    if data.get("refiner_checkpoint") in ("", "None"):
        data["refiner_checkpoint"] = None
    data.update(fixed)
    return GenerationRequest(**data)


def make_handler(
    engine: Engine,
    board: JobBoard,
    names: list[str],
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    defaults: dict[str, Any] | None = None,
    ext_fields: dict[str, tuple[str, str]] | None = None,
    script_fields: dict[str, tuple[str, str]] | None = None,
    control_fields: dict[str, tuple[int, str]] | None = None,
) -> Callable[..., Any]:
    """A streaming handler taking the controls named `names` (in that order, as keywords for
    API callers, who may leave out any: `defaults` holds the controls' initial values);
    `prepare` turns tab-specific values (an editor's layers) into request fields."""

    n = len(names)

    def handler(*args: Any):
        # Gradio passes the controls' values, then the request and the progress tracker it
        # injects for the last two parameters of the signature below.
        given = dict(zip(names, args[:n]))
        request = args[n] if len(args) > n else None
        progress = args[n + 1] if len(args) > n + 1 else gr.Progress()
        try:
            fields = prepare(given) if prepare else given
            folder = fields.pop("batch_folder", None)
            job = _to_request(fields, {}, ext_fields, script_fields, control_fields)
            engine.check(job)  # what the API and the CLI check too, with the same messages
            if unknown := engine.extensions.unknown_args(job.extensions):
                gr.Warning(f"Ignored (no such argument): {', '.join(unknown)}")
        except ValidationError as e:
            raise user_error(validation_message(e)) from None
        except (ValueError, ModelError) as e:
            raise user_error(str(e)) from None
        yield from run_streaming(board, job, session_of(request), progress, folder)

    defaults = defaults or {}
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults.get(n)) for n in names]
    params += [
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request),
        inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()),
    ]
    handler.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return handler


def wire(engine: Engine, board: JobBoard, panel: Panel, api_name: str, triggers: list[Any],
         prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    names = list(panel.inputs)
    defaults = {n: getattr(c, "value", None) for n, c in panel.inputs.items()}
    handler = make_handler(engine, board, names, prepare, defaults, panel.ext_fields, panel.script_fields,
                           panel.control_fields)
    gr.on(triggers=triggers, fn=handler, inputs=list(panel.inputs.values()),
          outputs=[panel.gallery, panel.info], api_name=api_name, concurrency_id="generate",
          show_progress_on=[panel.gallery])  # one progress bar, over the images

    def interrupt(request: gr.Request) -> None:
        if not board.interrupt(session_of(request)):
            gr.Info("Nothing of yours is running.")

    def skip(request: gr.Request) -> None:
        board.skip(session_of(request))

    panel.interrupt.click(interrupt, api_visibility="private", queue=False)
    if panel.seed_buttons:
        panel.seed_buttons["random"].click(lambda: -1, outputs=[panel["seed"]], api_visibility="private", queue=False)
        panel.seed_buttons["reuse"].click(last_seed, inputs=[panel.info], outputs=[panel["seed"]],
                                          api_visibility="private", queue=False)
    panel.skip.click(skip, api_visibility="private", queue=False)
    if panel.few_step is not None:
        wire_few_step(engine, panel)


def last_seed(info: str | None) -> int:
    """The seed of the first image shown (its parameters are in the info box)."""
    from webui.infotext import parse_infotext

    seed = parse_infotext((info or "").split("\n\n")[0]).get("Seed", "")
    if not seed.isdigit():
        raise user_error("Generate an image first: its seed is reused.")
    return int(seed)


def prompt_area(engine: Engine, panel: Panel) -> None:
    """Prompt, negative prompt (each with a token counter), styles and their saving."""
    from webui.prompts.styles import Style
    from webui.ui.extra_networks import build_extra_networks

    p = panel.prefix
    with gr.Row():
        with gr.Column(scale=3):
            prompt = panel.add("prompt", gr.Textbox("", label="Prompt", lines=3, elem_id=f"{p}_prompt"))
            prompt_count = gr.HTML("0/75", elem_id=f"{p}_token_counter")
            negative = panel.add("negative_prompt", gr.Textbox("", label="Negative prompt", lines=2,
                                                               elem_id=f"{p}_neg_prompt"))
            negative_count = gr.HTML("0/75", elem_id=f"{p}_negative_token_counter")
        with gr.Column(scale=1):
            styles = panel.add("styles", gr.Dropdown(
                label="Styles", choices=style_names(engine), value=[], multiselect=True, elem_id=f"{p}_styles",
                allow_custom_value=True,  # the engine checks names against styles.csv
            ))
            with gr.Row():
                style_name = gr.Textbox(placeholder="new style name", show_label=False, elem_id=f"{p}_style_name",
                                        scale=2)
                save_style = gr.Button("Save style", elem_id=f"{p}_save_style", size="sm", scale=1)
    build_extra_networks(engine, prompt, p)

    def count(text: str | None) -> str:
        used, available = engine.count_tokens(text or "")
        return f"{used}/{available}"

    for box, counter in ((prompt, prompt_count), (negative, negative_count)):
        box.change(count, inputs=[box], outputs=[counter], api_visibility="private", queue=False,
                   show_progress="hidden", trigger_mode="always_last")

    def save_current_style(name: str | None, prompt_text: str | None, negative_text: str | None) -> tuple[dict, str]:
        name = (name or "").strip()
        if not name:
            raise user_error("Type a name for the style first.")
        engine.styles.save(Style(name, prompt_text or "", negative_text or ""))
        gr.Info(f"Style {name!r} saved.")
        return gr.update(choices=style_names(engine)), ""

    save_style.click(save_current_style, inputs=[style_name, prompt, negative], outputs=[styles, style_name],
                     api_visibility="private")


def style_names(engine: Engine) -> list[str]:
    return [s.name for s in engine.styles.list()]
