"""User-facing texts shared by the tabs."""

from __future__ import annotations

import gradio as gr

from webui.app import Engine


def user_error(message: str) -> gr.Error:
    """An error the page shows to its user (bad input, no checkpoint yet, ...): said in the page,
    not printed as a traceback in the console. Unexpected failures are logged where they happen."""
    return gr.Error(message, print_exception=False)


def models_help(engine: Engine) -> str:
    if engine.registry.checkpoints():
        return ""
    return (
        "### No checkpoints yet\n"
        f"Put a Stable Diffusion checkpoint (`.safetensors` or `.ckpt`; SD 1.x, SD 2.x or SDXL) in "
        f"`{engine.registry.ckpt_dir.resolve()}` (sub-folders are fine), then press **🔄 Refresh**. "
        f"Optional VAEs go in `{engine.registry.vae_dir.resolve()}`."
    )

