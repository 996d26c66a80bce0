"""The "VAE / Text encoder" choice: files of their own that take the place of a checkpoint's VAE or
text encoders for one job (Forge's additional modules; A1111's `sd_vae`).

Choices are file names as listed from `models/VAE/` (the registry's list, as of its last refresh)
and the text-encoder folders (`webui.models.text_encoders`). What a file holds is read from its header: a VAE
(`decoder.conv_in.weight`, bare or under `first_stage_model.`), CLIP-L or CLIP-G in transformers'
layout (`text_model.` or bare, told apart by size), or T5-XXL (`encoder.block.`). A pickled file in
`models/VAE/` is taken for a VAE (its header cannot be read without loading it).

Only the transformer families (SD3, Flux) take text encoders from files of their own; a VAE fits
any family whose latent channels it has (loading says so otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from webui.models.errors import ModelError
from webui.models.families import FamilySpec
from webui.models.readers import safetensors_shapes
from webui.models.registry import SAFETENSORS_SUFFIXES, match_name, scan_folder
from webui.models.text_encoders import role_of

PARTS = ("vae", "clip_l", "clip_g", "t5xxl")


class ModuleNotFound(ModelError):
    """A chosen name that no file in the folders has (the API answers 404, as for a checkpoint)."""


@dataclass(frozen=True)
class ModuleChoice:
    """The parts chosen for a job: a VAE and text encoders by role; hashable (a model cache key)."""

    vae: Path | None = None
    text_encoders: tuple[tuple[str, Path], ...] = ()  # (role, file), roles as in `text_encoders.ROLES`

    def __bool__(self) -> bool:
        return self.vae is not None or bool(self.text_encoders)


def part_of(path: Path, in_vae_folder: bool = False) -> str | None:
    """"vae", "clip_l", "clip_g" or "t5xxl" for what `path` holds; None when it is none of them."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return "vae" if in_vae_folder else None
    shapes = safetensors_shapes(path)
    if "decoder.conv_in.weight" in shapes or "first_stage_model.decoder.conv_in.weight" in shapes:
        return "vae"
    for root in ("text_model.", ""):  # transformers' CLIPTextModel, or its text_model alone
        if (embedding := shapes.get(root + "embeddings.token_embedding.weight")) is not None:
            # ViT-bigG: width 1280 and 32 layers; ViT-L: 768 and 12 (fine-tunes keep the shapes)
            layers = {k[len(root):].split(".")[2] for k in shapes if k.startswith(root + "encoder.layers.")}
            return "clip_g" if embedding[-1] >= 1024 or len(layers) > 16 else "clip_l"
    if any(k.startswith("encoder.block.") for k in shapes):
        return "t5xxl"
    return None


def available(vae_files: list[tuple[str, Path]], text_encoder_dirs: list[Path]) -> list[tuple[str, Path]]:
    """(name, file) of what the page offers: every VAE file, then every text-encoder file (of two
    files of the same name, the first)."""
    first = dict(vae_files)
    for folder in text_encoder_dirs:
        for name, path in scan_folder(folder, SAFETENSORS_SUFFIXES):
            first.setdefault(name, path)
    return list(first.items())


def resolve(names: list[str] | tuple[str, ...], vae_files: list[tuple[str, Path]],
            text_encoder_dirs: list[Path]) -> ModuleChoice:
    """The parts `names` choose; ModelError naming the file for one not found, not a VAE or text
    encoder, or a second file for the same part."""
    files = dict(available(vae_files, text_encoder_dirs))
    vaes = {path for _, path in vae_files}
    chosen: dict[str, Path] = {}
    for name in names:
        listed = match_name(name, list(files))
        if listed is None:
            known = ", ".join(list(files)[:12]) or "none; put VAEs in models/VAE, text encoders in models/text_encoder"
            raise ModuleNotFound(f"VAE / text encoder {name!r} not found (available: {known})")
        path = files[listed]
        part = part_of(path, in_vae_folder=path in vaes)
        if part is None:
            raise ModelError("neither a VAE nor a CLIP-L, CLIP-G or T5-XXL text encoder in transformers' layout", path)
        if part in chosen and chosen[part] != path:
            raise ModelError(f"two files chosen for the {part_label(part)}: {chosen[part].name} and {path.name}")
        chosen[part] = path
    return ModuleChoice(chosen.get("vae"), tuple((p, chosen[p]) for p in PARTS[1:] if p in chosen))


def check_fits(choice: ModuleChoice, family: FamilySpec) -> None:
    """ModelError when a chosen text encoder is one the family does not take from a file of its own."""
    roles = [role_of(s.prefix) for s in family.text_encoders] if family.denoiser != "unet" else []
    for role, path in choice.text_encoders:
        if role not in roles:
            takes = f"takes {', '.join(part_label(r) for r in roles)}" if roles else \
                "takes its text encoders from the checkpoint itself"
            raise ModelError(f"{path.name} is a {part_label(role)}, and a {family.label} model {takes}: "
                             "remove it from 'VAE / Text encoder'")


def part_label(part: str) -> str:
    return {"vae": "VAE", "clip_l": "CLIP-L text encoder", "clip_g": "CLIP-G text encoder",
            "t5xxl": "T5-XXL text encoder"}[part]
