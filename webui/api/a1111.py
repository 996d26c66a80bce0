"""What A1111's API values mean, turned into ours before validation.

Clients of A1111's API send every field of its request models: JSON `null` for an optional field
("use the default"), A1111's own defaults and sentinels (`-1` for off, `""`, "Use same checkpoint"),
and fields we have no feature for. This module owns that translation, so the request models stay
strict about what is really wrong (a negative step count, an unknown sampler) and every route reads
A1111's bodies the same way. Facts about A1111's fields are from its v1.10 API (compat-facts §6).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from webui.infotext import infotext_to_fields, parse_infotext

# Fields A1111 takes that change nothing here at their default value; any other value is reported
# in the response's `info.notes` as not supported (with what happens instead).
_NO_EFFECT_AT = {
    "do_not_save_samples": (False, True),  # A1111 derives both from save_images, whatever is sent
    "do_not_save_grid": (False, True),
    "disable_extra_networks": (False,),
    "s_min_uncond": (0, 0.0),
    "firstphase_width": (0,),
    "firstphase_height": (0,),
    "hr_checkpoint_name": ("", "Use same checkpoint"),
    "hr_scheduler": ("", "Use same scheduler", "Automatic", "automatic"),
    "initial_noise_multiplier": (1, 1.0),
    "mask_round": (True, False),  # our masks are blurred, then used as they are
    "image_cfg_scale": (),  # instruct-pix2pix only; ignored silently (clients send 1.5)
    "override_settings_restore_afterwards": (True, False),  # overrides are per request here
    "comments": (),
    "force_task_id": (),
    "firstpass_image": (),
    "latent_mask": (),
    "upscale_first": (False, True),
    "mask_blur_x": (),  # read below
    "mask_blur_y": (),
}
_SILENT = {"image_cfg_scale", "comments", "force_task_id", "mask_blur_x", "mask_blur_y",
           "override_settings_restore_afterwards", "do_not_save_samples", "do_not_save_grid", "mask_round",
           "upscale_first"}
_WHY = {
    "hr_checkpoint_name": "the hires pass uses the first pass's checkpoint",
    "hr_scheduler": "the hires pass uses the first pass's schedule type",
    "disable_extra_networks": "extra-network tags in the prompt are applied",
}


def drop_nulls(data: Any) -> Any:
    """A1111 reads JSON `null` in any optional field as "the default": so do we, by leaving it out."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if v is not None}


def generation_fields(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A txt2img/img2img body in A1111's terms -> fields in ours, and notes on what was ignored.
    `data` has no nulls (see `drop_nulls`)."""
    data = dict(data)
    notes: list[str] = []
    if text := data.pop("infotext", ""):
        # A1111: the pasted parameters fill every field the body does not set itself
        for key, value in infotext_to_fields(parse_infotext(str(text))).items():
            data.setdefault(key, value)
    for key in ("seed_resize_from_w", "seed_resize_from_h"):
        if data.get(key) == -1:  # A1111's "off"
            data[key] = 0
    if data.get("s_tmax") == 0:  # A1111: 0 means no upper bound
        del data["s_tmax"]
    for key in ("refiner_checkpoint",):
        if str(data.get(key, "x")).strip().lower() in ("", "none"):
            data.pop(key)
    if data.get("hr_sampler_name") in ("Use same sampler", ""):
        data.pop("hr_sampler_name")
    for key in ("sampler_name", "scheduler", "script_name"):
        if data.get(key) == "":
            data.pop(key)
    if "mask_blur" not in data and ("mask_blur_x" in data or "mask_blur_y" in data):
        blur = [data.get("mask_blur_x", 4), data.get("mask_blur_y", 4)]
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in blur):
            raise ValueError("mask_blur_x, mask_blur_y: numbers of pixels")
        data["mask_blur"] = int(max(blur))  # one blur radius here: the larger of A1111's two
    if data.get("refiner_switch_at") == 0 and "refiner_checkpoint" not in data:
        data.pop("refiner_switch_at")
    for key, harmless in _NO_EFFECT_AT.items():
        if key not in data:
            continue
        value = data.pop(key)
        if key not in _SILENT and value not in harmless:
            why = _WHY.get(key, "not supported")
            notes.append(f"{key}={value!r} ignored ({why})")
    return data, notes


@cache
def _option_defaults() -> dict[str, Any]:
    return json.loads(resources.files("webui.api").joinpath("a1111_options.json").read_text(encoding="utf-8"))


def option_defaults() -> dict[str, Any]:
    """Every option key A1111's `/options` has, with A1111's default (a copy)."""
    return dict(_option_defaults())
