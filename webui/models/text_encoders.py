"""Text encoders in files of their own, for checkpoints that do not carry them (Stability's
`sd3.5_medium.safetensors` and `sd3.5_large.safetensors` hold only the MMDiT and the VAE).

Users keep them as ComfyUI and Forge do: `clip_l.safetensors`, `clip_g.safetensors`,
`t5xxl_fp16.safetensors` (or `t5xxl_fp8_e4m3fn.safetensors`) in `models/text_encoder/` (also read:
`models/text_encoders/`, `models/clip/`), each in transformers' key layout. A role's file is the
one whose name starts with the role; a 16-bit T5 is preferred to a float8 one.
"""

from __future__ import annotations

from pathlib import Path

from webui.models.registry import SAFETENSORS_SUFFIXES

FOLDERS = ("text_encoder", "text_encoders", "clip")
ROLES = ("clip_l", "clip_g", "t5xxl")
FILE_NAMES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}


def text_encoder_dirs(models_path: Path) -> list[Path]:
    return [models_path / name for name in FOLDERS]


def find_text_encoder(dirs: list[Path], role: str) -> Path | None:
    """The file for `role` ("clip_l", "clip_g", "t5xxl") in the first folder that has one."""
    for folder in dirs:
        if not folder.is_dir():
            continue
        found = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SAFETENSORS_SUFFIXES
                        and p.name.lower().startswith(role)),
                       key=lambda p: ("fp8" in p.name.lower(), p.name.lower()))
        if found:
            return found[0]
    return None


def role_of(prefix: str) -> str:
    """The role a family's text-encoder key prefix stands for (`text_encoders.clip_l.transformer.`)."""
    return next(role for role in ROLES if f".{role}." in prefix)
