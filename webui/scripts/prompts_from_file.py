"""Prompts from file or textbox: one generation per line. A plain line is a prompt (put before
or after the page's prompt); a line starting with `--` sets fields, as in A1111:

    --prompt "a red cube" --negative_prompt "blurry" --steps 10 --seed 5 --width 640

Options: prompt, negative_prompt, styles, seed, subseed, subseed_strength, seed_resize_from_w,
seed_resize_from_h, sampler_name (sampler_index), scheduler, batch_size, n_iter, steps,
cfg_scale, width, height, tiling, denoising_strength, clip_skip, sd_model (checkpoint),
do_not_save_samples. Output folders are not taken from a line (a line must not choose where the
server writes)."""

from __future__ import annotations

import random
import shlex
from typing import Any, Literal

from pydantic import BaseModel, Field

from webui.pipeline.request import MAX_SEED, GenerationRequest
from webui.pipeline.state import GenerationResult
from webui.scripts.base import Script, ScriptContext, ScriptEnv, combine

MAX_LINES = 1000
_TYPES: dict[str, tuple[str, type]] = {  # option -> (request field, type)
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "styles": ("styles", list),
    "seed": ("seed", int), "subseed": ("subseed", int), "subseed_strength": ("subseed_strength", float),
    "seed_resize_from_w": ("seed_resize_from_w", int), "seed_resize_from_h": ("seed_resize_from_h", int),
    "sampler_name": ("sampler_name", str), "sampler_index": ("sampler_name", str), "scheduler": ("scheduler", str),
    "batch_size": ("batch_size", int), "n_iter": ("n_iter", int), "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float), "width": ("width", int), "height": ("height", int), "tiling": ("tiling", bool),
    "denoising_strength": ("denoising_strength", float), "clip_skip": ("clip_skip", int),
    "sd_model": ("checkpoint", str), "do_not_save_samples": ("save_images", bool),
}
_REFUSED = frozenset({"outpath_samples", "outpath_grids"})
_IGNORED = frozenset({"prompt_for_display", "do_not_save_grid", "restore_faces"})


class PromptsArgs(BaseModel):
    checkbox_iterate: bool = False  # "Iterate seed every line"
    checkbox_iterate_batch: bool = False  # "Use same random seed for all lines"
    prompt_position: Literal["start", "end"] = "start"  # where a plain line goes beside the page's prompt
    prompt_txt: str = Field("", max_length=1_000_000)


def parse_line(line: str) -> dict[str, Any]:
    """A `--key value ...` line as request fields (ValueError naming the bad option)."""
    try:
        tokens = shlex.split(line)
    except ValueError as err:
        raise ValueError(f"cannot read the quotes: {err}") from None
    fields: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if not key.startswith("--"):
            raise ValueError(f"expected an option like --steps, got {key!r}")
        name = key[2:]
        if name in _REFUSED:
            raise ValueError(f"--{name} is not accepted (output folders are set in Settings)")
        value_tokens = []
        i += 1
        while i < len(tokens) and not tokens[i].startswith("--"):
            value_tokens.append(tokens[i])
            i += 1
        if name in _IGNORED:
            continue
        if name not in _TYPES:
            raise ValueError(f"unknown option --{name} (known: {', '.join('--' + k for k in _TYPES)})")
        field, kind = _TYPES[name]
        text = " ".join(value_tokens)
        if kind is bool:
            value: Any = text.strip().lower() not in ("false", "0", "no", "off") if text else True
            if name == "do_not_save_samples":
                value = not value
        elif kind is list:
            value = tuple(value_tokens)
        else:
            try:
                value = kind(text)
            except ValueError:
                raise ValueError(f"--{name}: {text!r} is not a {kind.__name__}") from None
        fields[field] = value
    return fields


class PromptsFromFile(Script):
    title = "Prompts from file or textbox"
    args_model = PromptsArgs
    positional = tuple(PromptsArgs.model_fields)

    def plan(self, request: GenerationRequest, args: PromptsArgs, env: ScriptEnv) -> list[GenerationRequest]:
        lines = [line.strip() for line in args.prompt_txt.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{self.title}: no prompts given (one per line)")
        if len(lines) > MAX_LINES:
            raise ValueError(f"{self.title}: at most {MAX_LINES} lines")
        seed = request.seed if request.seed != -1 else random.randint(0, MAX_SEED)
        if request.seed == -1 and not args.checkbox_iterate_batch:
            seed = -1  # each line its own random seed
        out = []
        for n, line in enumerate(lines, 1):
            if line.startswith("--"):
                try:
                    fields = parse_line(line)
                except ValueError as err:
                    raise ValueError(f"{self.title}, line {n}: {err}") from None
            else:
                joined = [line, request.prompt] if args.prompt_position == "start" else [request.prompt, line]
                fields = {"prompt": " ".join(p for p in joined if p)}
            if "seed" not in fields:
                fields["seed"] = seed if seed == -1 or not args.checkbox_iterate else seed + n - 1
            fields.update(script_name="", script_args=[])
            try:
                out.append(request.derive(**fields))
            except ValueError as err:
                raise ValueError(f"{self.title}, line {n}: {err}") from None
        return out

    def run(self, ctx: ScriptContext, request: GenerationRequest, args: PromptsArgs,
            env: ScriptEnv) -> GenerationResult:
        planned = self.plan(request, args, env)
        results = ctx.generate_all(planned)
        out = combine(results)
        out.interrupted = out.interrupted or len(results) < len(planned)
        return out
