"""Generation parameters as text (A1111's "infotext"), in both directions.

    <prompt>
    Negative prompt: <negative>            (omitted when empty)
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, ...

A value holding `,` `:` or a newline is written as a JSON string. The last line counts as
parameters only when it has at least 3 `Key: value` pairs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# A1111's field order; fields not listed keep their insertion order after these.
FIELD_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
    "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Denoising strength", "Clip skip",
)
_PAIR = re.compile(r'\s*([\w][\w \-/+()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """`params` values of None are left out; `Version` is always written last."""
    ordered = [k for k in FIELD_ORDER if k in params] + [k for k in params if k not in FIELD_ORDER and k != "Version"]
    if "Version" in params:
        ordered.append("Version")
    line = ", ".join(f"{k}: {_quote(params[k])}" for k in ordered if params[k] is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def parse_infotext(text: str) -> dict[str, str]:
    """Keys `Prompt`, `Negative prompt` and every parameter (`Size` also as `Size-1`/`Size-2`)."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if lines:
        pairs = _PAIR.findall(lines[-1])
        if len(pairs) >= 3:
            lines.pop()
            for key, value in pairs:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    try:
                        value = json.loads(value)
                    except ValueError:
                        pass
                params[key.strip()] = value
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    out = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    out.update(params)
    size = params.get("Size", "")
    if re.fullmatch(r"\d+x\d+", size):
        out["Size-1"], out["Size-2"] = size.split("x")
    return out
