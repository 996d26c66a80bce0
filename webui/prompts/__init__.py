"""Prompt text handling (the A1111 prompt language, styles) and encoding."""

# Only the pure-text parts are imported here: `webui.prompts.encode` needs torch and is
# imported by whoever encodes.
from webui.prompts.parser import (
    ExtraNetworkTag,
    extract_extra_networks,
    lora_weight,
    parse_attention,
    prompt_schedule,
    split_and,
)

__all__ = [
    "ExtraNetworkTag",
    "extract_extra_networks",
    "lora_weight",
    "parse_attention",
    "prompt_schedule",
    "split_and",
]
