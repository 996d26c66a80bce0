"""Generation parameters as text (A1111's "infotext"), in both directions.

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>     (omitted when empty)
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, ...

A value holding `,` `:` or a newline is written as a JSON string. The last line counts as
parameters only when it has at least 3 `Key: value` pairs.

`parse_infotext` gives strings, keyed as written; `infotext_to_fields` turns those into
`GenerationRequest`/API field names with typed values ("Send to txt2img", paste).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from webui.samplers.table import split_sampler_name  # noqa: F401  (infotext's sampler field is split with it)

# A1111's field order; fields not listed keep their insertion order after these.
FIELD_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
    "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Denoising strength", "Clip skip",
)

NEGATIVE_PREFIX = "Negative prompt:"

# One `Key: value` pair. A pair starts at the beginning of the line or right after a comma, so
# text such as `masterpiece, (best quality:1.2), (sharp:1.1)` at the end of a prompt is not
# mistaken for parameters (every line A1111 writes has that shape, so nothing it writes is lost).
# Keys: a word character, then anything but `,` `:` `"` (`Hires upscale`, `ADetailer model 2nd`,
# `Hypertile U-Net`, `Module (1)`). Values: a JSON string, or anything up to the next comma.
_PAIR = re.compile(r'(?:^|(?<=,))\s*(\w[^,:"\n]*?)\s*:\s*("(?:\\.|[^\\"])*"|[^,]*)(?=,|$)')
_SIZE = re.compile(r"(\d+)x(\d+)")


def _quote(value: Any) -> str:
    """JSON-quote a value the parser could not otherwise read back unchanged."""
    text = str(value)
    if any(c in text for c in ",:\n\r") or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """`params` values of None are left out; `Version` is always written last.

    Keys are written as given; they should not hold `:` `,` or a newline.
    """
    ordered = [k for k in FIELD_ORDER if k in params] + [k for k in params if k not in FIELD_ORDER and k != "Version"]
    if "Version" in params:
        ordered.append("Version")
    line = ", ".join(f"{k}: {_quote(params[k])}" for k in ordered if params[k] is not None)
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def add_fields(infotext: str, fields: Mapping[str, Any]) -> str:
    """`infotext` with `fields` added to (or replacing those of) its parameter line."""
    parsed = parse_infotext(infotext)
    prompt, negative = parsed.pop("Prompt"), parsed.pop("Negative prompt")
    return format_infotext(prompt, negative, {**as_written(parsed), **fields})


def _parse_params(line: str) -> dict[str, str] | None:
    """The pairs of a parameter line, or None when it holds fewer than 3."""
    pairs = _PAIR.findall(line.strip())
    if len(pairs) < 3:
        return None
    params: dict[str, str] = {}
    for key, raw in pairs:
        key, raw = key.strip(), raw.strip()
        value = _unquote(raw)
        params[key] = value
        # `Size: 512x768` -> Size-1/Size-2, and likewise `Hires resize` and any other WxH value
        # (A1111 does the same); the original key is kept as well.
        if m := _SIZE.fullmatch(value):
            params[f"{key}-1"], params[f"{key}-2"] = m.group(1), m.group(2)
    return params


def generation_infotext(r: Any, *, prompt: str, negative_prompt: str, seed: int, subseed: int, model: Any,
                        refiner: Any = None, hires_size: tuple[int, int] | None = None,
                        sampler_takes_eta: bool = False, lora_hashes: str | None = None,
                        ti_hashes: str | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """The infotext of one generated image: `r` its GenerationRequest, `model` / `refiner` the
    loaded models (`model_name`, `hash10`, `vae_name`), the rest what the run decided. Keys in
    A1111's order and spelling (compat-facts §5); `extra` (extensions' fields) before `Version`."""
    from webui import __version__

    variation = r.subseed_strength > 0
    hires = r.enable_hr and not r.is_img2img
    resized = bool(r.hr_resize_x or r.hr_resize_y)
    masked_area = r.mask is not None and r.inpaint_full_res
    params = {
        "Steps": r.steps,
        "Sampler": r.sampler_name,
        "Schedule type": r.scheduler,
        "CFG scale": f"{r.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{r.width}x{r.height}",
        "Model hash": model.hash10,
        "Model": model.model_name,
        "VAE": model.vae_name.rsplit(".", 1)[0] if model.vae_name else None,
        # separate text-encoder files, as Forge writes them
        **{f"Module {i}": name for i, name in enumerate(getattr(model, "module_names", ()), start=1)},
        "Variation seed": subseed if variation else None,
        "Variation seed strength": f"{r.subseed_strength:g}" if variation else None,
        "Seed resize from": f"{r.seed_resize_from_w}x{r.seed_resize_from_h}" if r.seed_resize_from_w else None,
        "Denoising strength": f"{r.denoising_strength:g}" if (r.is_img2img or hires) else None,
        "Clip skip": r.clip_skip if r.clip_skip > 1 else None,
        "Mask blur": r.mask_blur if r.mask is not None else None,
        "Inpaint area": "Only masked" if masked_area else None,
        "Masked area padding": r.inpaint_full_res_padding if masked_area else None,
        "Tiling": True if r.tiling else None,
        "Refiner": (f"{refiner.model_name} [{refiner.hash10}]" if refiner.hash10 else refiner.model_name)
                   if refiner else None,
        "Refiner switch at": f"{r.refiner_switch_at:g}" if refiner else None,
        "Eta": f"{r.eta:g}" if r.eta is not None and sampler_takes_eta else None,
        "Sigma churn": f"{r.s_churn:g}" if r.s_churn else None,
        "Sigma noise": f"{r.s_noise:g}" if r.s_noise is not None and r.s_noise != 1.0 else None,
        "Hires upscale": f"{r.hr_scale:g}" if hires and not resized else None,
        "Hires resize": f"{hires_size[0]}x{hires_size[1]}" if hires and hires_size and resized else None,
        "Hires steps": r.hr_second_pass_steps if hires and r.hr_second_pass_steps else None,
        "Hires upscaler": r.hr_upscaler if hires else None,
        "Hires prompt": r.hr_prompt if hires and r.hr_prompt else None,
        "Hires negative prompt": r.hr_negative_prompt if hires and r.hr_negative_prompt else None,
        "Hires sampler": r.hr_sampler_name if hires and r.hr_sampler_name else None,
        "Lora hashes": lora_hashes,
        "TI hashes": ti_hashes,
        **(extra or {}),
        "Version": f"v{__version__}",
    }
    return format_infotext(prompt, negative_prompt, params)


def as_written(params: dict[str, str]) -> dict[str, str]:
    """`params` without the `Key-1`/`Key-2` halves derived from a `WxH` value: the fields as the
    infotext writes them (what a person reading it should see)."""
    derived = {f"{k}-{i}" for k, v in params.items() if _SIZE.fullmatch(v) for i in (1, 2)}
    return {k: v for k, v in params.items() if k not in derived}


def parse_infotext(text: str) -> dict[str, str]:
    """Keys `Prompt`, `Negative prompt` (always present, "" when absent) and every parameter,
    all values strings. A `WxH` value such as `Size` is also given as `Size-1`/`Size-2`.
    Windows line ends (pasted text) count as newlines."""
    lines = text.replace("\r\n", "\n").strip().split("\n")
    params = None if lines[-1].startswith(NEGATIVE_PREFIX) else _parse_params(lines[-1])
    if params is not None:
        lines.pop()
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if not in_negative and line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):]
            line = line[1:] if line.startswith(" ") else line
        (negative_lines if in_negative else prompt_lines).append(line)
    out = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    if params:
        params.pop("Prompt", None)
        params.pop("Negative prompt", None)
        out.update(params)
    return out


# --- parsed infotext -> request fields ---------------------------------------------------------

def _int(text: str) -> int | None:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _float(text: str) -> float | None:
    try:
        number = float(text.strip())
    except ValueError:
        return None
    return number if number == number and number not in (float("inf"), float("-inf")) else None


def _size(params: Mapping[str, str], key: str) -> tuple[int, int] | None:
    if (m := _SIZE.fullmatch(params.get(key, "").strip())) is not None:
        return int(m.group(1)), int(m.group(2))
    w, h = _int(params.get(f"{key}-1", "")), _int(params.get(f"{key}-2", ""))
    return (w, h) if w is not None and h is not None else None


def infotext_to_fields(params: Mapping[str, str]) -> dict[str, object]:
    """Map `parse_infotext` output to request field names with typed values.

    Only fields the infotext holds are returned (a value that does not parse as the right type
    is skipped), except two defaults that apply whenever there is a parameter line, because
    A1111 leaves these out when they hold their default: `clip_skip` 1 and, when a sampler is
    named, `scheduler` "Automatic". Styles are left to the caller.
    """
    out: dict[str, object] = {}
    has_params = any(k not in ("Prompt", "Negative prompt") for k in params)

    if "Prompt" in params:
        out["prompt"] = params["Prompt"]
    if "Negative prompt" in params:
        out["negative_prompt"] = params["Negative prompt"]

    def put(field: str, key: str, convert: Any) -> None:
        if key in params and (value := convert(params[key])) is not None:
            out[field] = value

    put("steps", "Steps", _int)
    put("cfg_scale", "CFG scale", _float)
    put("seed", "Seed", _int)
    put("subseed", "Variation seed", _int)
    put("subseed_strength", "Variation seed strength", _float)
    put("denoising_strength", "Denoising strength", _float)
    put("token_merging_ratio", "Token merging ratio", _float)
    put("token_merging_ratio_hr", "Token merging ratio hr", _float)
    put("deepcache_interval", "DeepCache interval", _int)
    put("noise_schedule", "Noise Schedule", str)
    put("shift", "Shift", _float)
    put("distilled_cfg_scale", "Distilled CFG Scale", _float)
    put("deepcache_branch", "DeepCache branch", _int)
    if params.get("Face restoration", "").strip() in ("CodeFormer", "GFPGAN"):
        out["restore_faces"] = True
        out["face_restoration_model"] = params["Face restoration"].strip()

    # sampler and schedule: "Schedule type" wins over a schedule folded into the sampler name
    sampler = params.get("Sampler", "").strip()
    schedule = params.get("Schedule type", "").strip()
    if sampler:
        base, folded = split_sampler_name(sampler)
        out["sampler_name"] = base
        out["scheduler"] = schedule or folded or "Automatic"
    elif schedule:
        out["scheduler"] = schedule

    if (size := _size(params, "Size")) is not None:
        out["width"], out["height"] = size

    if "Clip skip" in params:
        put("clip_skip", "Clip skip", _int)
    elif has_params:
        out["clip_skip"] = 1

    checkpoint = params.get("Model hash", "").strip() or params.get("Model", "").strip()
    if checkpoint:
        out["checkpoint"] = checkpoint
    refiner = params.get("Refiner", "").strip()
    if refiner:  # "name [hash10]": the hash finds the file even if it was renamed
        m = re.fullmatch(r"(.*?)\s*\[([0-9a-fA-F]{8,10})\]", refiner)
        out["refiner_checkpoint"] = m.group(2) if m else refiner
        put("refiner_switch_at", "Refiner switch at", _float)
    # the "VAE / Text encoder" choice (Forge's additional modules); `VAE` alone is not restored, as in A1111
    modules = [params[k].strip() for k in sorted((k for k in params if re.fullmatch(r"Module \d+", k)),
                                                key=lambda k: int(k.split()[1])) if params[k].strip()]
    if modules:
        out["modules"] = tuple(modules)
    put("eta", "Eta", _float)
    put("s_churn", "Sigma churn", _float)
    put("s_noise", "Sigma noise", _float)
    if params.get("Tiling", "").strip().lower() == "true":
        out["tiling"] = True

    # hires fix
    if any(k.startswith("Hires ") for k in params):
        out["enable_hr"] = True
        put("hr_scale", "Hires upscale", _float)
        put("hr_second_pass_steps", "Hires steps", _int)
        if params.get("Hires upscaler", "").strip():
            out["hr_upscaler"] = params["Hires upscaler"].strip()
        if (resize := _size(params, "Hires resize")) is not None:
            out["hr_resize_x"], out["hr_resize_y"] = resize
    elif (first := _size(params, "First pass size")) is not None and size is not None:
        # pre-1.0 A1111 hires fix: `Size` was the final size, `First pass size` the first pass
        out["enable_hr"] = True
        if first != (0, 0):
            out["width"], out["height"] = first
            out["hr_resize_x"], out["hr_resize_y"] = size
    return out
