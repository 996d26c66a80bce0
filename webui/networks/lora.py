"""LoRA files: reading them, matching them to a loaded model, and merging them for one job.

`load_lora` reads a file (safetensors, or a pickle read weights-only) into `LoraWeights`: the
low-rank pairs it holds, each with the component (UNet / text encoder 1 / 2) and the "flat"
name of the layer it patches (see `lora_names`). `resolve` finds those layers in a
`ModelBundle`. `apply_loras` merges `W += weight * alpha / rank * up @ down` into the weights
in place and, on leaving the `with` block (also on an exception), copies the saved originals
back, so the bundle is bit-for-bit what it was.

SD3 and Flux LoRAs name the transformer's layers in the original layouts (kohya
`lora_unet_double_blocks_0_img_attn_qkv`, `diffusion_model.single_blocks.0.linear1`) or in diffusers'
(`transformer.transformer_blocks.0.attn.to_q`); see `webui.networks.transformer_names`.

Handled: kohya/sd-scripts (`lora_unet_*`, `lora_te_*`, `lora_te1_*`, `lora_te2_*`, `lora_te3_*` with
`.lora_down.weight` / `.lora_up.weight` / `.alpha`; UNet names in diffusers or LDM form; the text
encoders in the model's order, so Flux's T5 is te2 and SD3's te3), LyCORIS LoCon (the same keys on
convolutions, 1x1 or 3x3), diffusers/peft (`unet.*`, `text_encoder.*`, `text_encoder_2.*`,
`text_encoder_3.*` with `.lora_A.weight` / `.lora_B.weight`,
`.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.*`, attention-processor names).
Other LyCORIS kinds (LoHa, LoKr, Tucker `lora_mid`, DoRA `dora_scale`, full `diff`) are
recognised and reported as unsupported rather than applied wrongly.

Merging mutates the shared bundle: callers must run one job at a time per bundle.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from webui.models.errors import ModelError
from webui.models.load import ModelBundle
from webui.models.readers import read_state_dict
from webui.networks.lora_names import diffusers_target, text_table, unet_table
from webui.networks.transformer_names import Target, transformer_table
from webui.runtime.gguf import is_quantized

log = logging.getLogger(__name__)

Component = Literal["unet", "te1", "te2", "te3"]
# the model's text encoders in order: SD1/2 CLIP; SDXL CLIP-L, CLIP-G; SD3 CLIP-L, CLIP-G, T5; Flux CLIP-L, T5
_COMPONENT_INDEX = {"te1": 0, "te2": 1, "te3": 2}

# "<base>.<suffix>" -> role; checked in order (longest first where they overlap)
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down_proc"),  # attention processors: `to_q_lora.down.weight`
    ("_lora.up.weight", "up_proc"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = re.compile(
    r"\.(hada_\w+|lokr_\w+|lora_mid\.weight|dora_scale|diff|diff_b|bias_indices|bias_values|bias_size|"
    r"oft_\w+|w_norm|b_norm|scale|on_input|lora_magnitude_vector(\.\w+)?)$"
)
_KOHYA_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
)
_DIFFUSERS_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("unet.", "unet"),
    ("transformer.", "unet"),  # SD3 / Flux in diffusers' names
    ("diffusion_model.", "unet"),  # SD3 / Flux in the original names (ComfyUI's form, ai-toolkit)
    ("base_model.model.", "unet"),  # a peft adapter saved straight from a UNet
    ("text_encoder_2.", "te2"),
    ("text_encoder_3.", "te3"),
    ("text_encoder.", "te1"),
)
_BARE_UNET = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One low-rank pair: `delta = alpha / rank * up @ down` for the layer `target`."""

    key: str  # the name in the file, without its suffix (for messages)
    component: Component
    target: str  # flat layer name (`.` -> `_`), see `lora_names`
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None  # None: no alpha stored, scale 1

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """`alpha / rank * up @ down` in float32 on `device`, shaped like the patched weight."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down).mul_(self.scale).reshape(shape)

    def delta_numel(self) -> int:
        return int(self.up.shape[0]) * int(self.down[0].numel())


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """The contents of one LoRA file, independent of any model."""

    name: str  # file stem
    path: Path
    modules: list[LoraModule]
    unsupported: list[str] = field(default_factory=list)  # keys of kinds we do not apply


@dataclass(frozen=True, eq=False)
class Patch:
    """A LoRA pair matched to a real layer of a bundle."""

    lora: LoraModule
    module_name: str  # e.g. "unet.down_blocks.0.attentions.0.proj_in", "text_encoders[1].text_projection"
    module: nn.Module  # nn.Linear or nn.Conv2d

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


@dataclass(frozen=True, eq=False)
class Resolution:
    """What of one LoRA fits a bundle."""

    lora: LoraWeights
    patches: list[Patch]
    unmatched: list[str]  # keys naming no layer of this model
    wrong_shape: list[str]  # keys whose layer exists with another shape

    def warnings(self) -> list[str]:
        out = []
        if self.unmatched:
            out.append(f"{self.lora.name}: {len(self.unmatched)} layer(s) not in this model, e.g. {self.unmatched[0]}")
        if self.wrong_shape:
            out.append(f"{self.lora.name}: {len(self.wrong_shape)} layer(s) of another shape, e.g. {self.wrong_shape[0]}")
        if self.lora.unsupported:
            out.append(
                f"{self.lora.name}: {len(self.lora.unsupported)} key(s) of an unsupported LyCORIS/DoRA kind skipped, "
                f"e.g. {self.lora.unsupported[0]}"
            )
        return out


# --- reading --------------------------------------------------------------------------------


def load_lora(path: Path) -> LoraWeights:
    """Read a LoRA file. Raises `ModelError` naming the file when it is unreadable or no LoRA."""
    path = Path(path)
    sd = read_state_dict(path)
    return parse_lora(sd, path)


def parse_lora(sd: dict[str, torch.Tensor], path: Path) -> LoraWeights:
    """Group the tensors of a LoRA file into `LoraModule`s (see the module docstring)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unsupported: list[str] = []
    unsupported_bases: set[str] = set()
    unknown: list[str] = []
    for key, tensor in sd.items():
        for suffix, role in _SUFFIXES:
            if key.endswith(suffix):
                base = key[: -len(suffix)]
                if role.endswith("_proc"):
                    base, role = base + "_lora", role.removesuffix("_proc")
                groups.setdefault(base, {})[role] = tensor
                break
        else:
            m = _UNSUPPORTED.search(key)
            if m:
                unsupported.append(key)
                unsupported_bases.add(key[: m.start()])
            else:
                unknown.append(key)
    modules: list[LoraModule] = []
    for base, parts in groups.items():
        if base in unsupported_bases:
            continue  # LoHa/LoKr (only an alpha here) or DoRA (a magnitude we cannot honour): skip the layer
        if "down" not in parts or "up" not in parts:
            unknown.append(base + (".lora_up.weight missing" if "down" in parts else ".lora_down.weight missing"))
            continue
        modules.append(_module(base, parts, path))
    if not modules:
        if unsupported:
            raise ModelError(
                "this LyCORIS/DoRA kind is not supported (only LoRA and LoCon are); "
                f"e.g. key {unsupported[0]!r}",
                path,
            )
        sample = ", ".join(list(sd)[:3]) or "none"
        raise ModelError(
            "not a LoRA in a known layout (expected kohya 'lora_unet_…/lora_te_….lora_down.weight' or "
            f"diffusers/peft 'unet.….lora_A.weight'); keys found: {sample}",
            path,
        )
    if unknown:
        log.warning("%s: %d key(s) of no known LoRA kind ignored, e.g. %s", path.name, len(unknown), unknown[0])
    return LoraWeights(name=path.stem, path=path, modules=modules, unsupported=unsupported)


def _module(base: str, parts: dict[str, torch.Tensor], path: Path) -> LoraModule:
    component, target = _target(base)
    down, up = parts["down"], parts["up"]
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.flatten(1).shape[1] != down.shape[0]:
        raise ModelError(f"malformed LoRA pair {base!r}: down {tuple(down.shape)}, up {tuple(up.shape)}", path)
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise ModelError(f"LoRA pair {base!r} has a {tuple(up.shape[2:])} up-convolution (unsupported)", path)
    alpha = parts.get("alpha")
    return LoraModule(
        key=base,
        component=component,
        target=target,
        down=down,
        up=up,
        alpha=float(alpha.float().reshape(-1)[0]) if alpha is not None and alpha.numel() else None,
    )


def _target(base: str) -> tuple[Component, str]:
    for prefix, component in _KOHYA_PREFIXES:
        if base.startswith(prefix):
            rest = base[len(prefix) :]
            if component != "unet" and not rest.startswith(("text_model_", "text_projection")):
                rest = "text_model_" + rest
            return component, rest
    for prefix, component in _DIFFUSERS_PREFIXES:
        if base.startswith(prefix):
            return component, diffusers_target(base[len(prefix) :], text=component != "unet")
    if base.startswith(_BARE_UNET):
        return "unet", diffusers_target(base, text=False)
    return "unet", "?" + base  # matches nothing; reported as unmatched


# --- matching ---------------------------------------------------------------------------------


def _tables(bundle: ModelBundle) -> dict[Component, tuple[str, nn.Module, dict[str, Target]]]:
    denoiser = unet_table(bundle.unet) if bundle.family.denoiser == "unet" else transformer_table(bundle.unet)
    tables: dict[Component, tuple[str, nn.Module, dict[str, Target]]] = {"unet": ("unet", bundle.unet, denoiser)}
    for component, index in _COMPONENT_INDEX.items():
        if index < len(bundle.text_encoders):
            model = bundle.text_encoders[index].model
            tables[component] = (f"text_encoders[{index}]", model, text_table(model))
    return tables


def resolve(lora: LoraWeights, bundle: ModelBundle) -> Resolution:
    """Match every pair of `lora` to a layer of `bundle`. Raises `ModelError` naming the file
    when nothing matches (a LoRA for another model family); partial misses are returned."""
    tables = _tables(bundle)
    patches: list[Patch] = []
    unmatched: list[str] = []
    wrong_shape: list[str] = []
    for m in lora.modules:
        found = tables.get(m.component)
        path = found[2].get(m.target) if found else None
        if found is None or path is None:
            unmatched.append(m.key)
            continue
        owner, root, _ = found
        # a layer diffusers splits (a transformer's fused qkv): the delta's rows go to each part
        parts = [(path, m)] if isinstance(path, str) else [
            (part, replace(m, key=f"{m.key}[{a}:{b}]", up=m.up[a:b])) for part, a, b in path]
        if not isinstance(path, str) and path[-1][2] != m.up.shape[0]:
            wrong_shape.append(m.key)
            continue
        fits = [(part, piece, root.get_submodule(part)) for part, piece in parts]
        if any(_weight_shape(mod).numel() != piece.delta_numel() or _weight_shape(mod)[0] != piece.up.shape[0]
               for _, piece, mod in fits):
            wrong_shape.append(m.key)
            continue
        patches += [Patch(lora=piece, module_name=f"{owner}.{part}", module=mod) for part, piece, mod in fits]
    if not patches:
        what = "fit the layer shapes of" if wrong_shape and not unmatched else "match a layer of"
        raise ModelError(
            f"none of its {len(lora.modules)} LoRA layers {what} this {bundle.family.label} model "
            f"(made for another model family?); e.g. {(unmatched or wrong_shape)[0]!r}",
            lora.path,
        )
    return Resolution(lora=lora, patches=patches, unmatched=unmatched, wrong_shape=wrong_shape)


def _weight_shape(module: nn.Module) -> torch.Size:
    """The weight's shape; a GGUF layer kept quantised has its blocks instead (webui.runtime.gguf)."""
    if is_quantized(module):
        return torch.Size((module.out_features, module.in_features))
    return module.weight.shape


# --- merging ----------------------------------------------------------------------------------


@contextmanager
def apply_loras(bundle: ModelBundle, loras: list[tuple[LoraWeights, float]]) -> Iterator[list[Resolution]]:
    """Merge `loras` (each with its multiplier) into `bundle`'s weights for the `with` block.

    Everything is resolved before any weight changes. Each touched weight is first copied to
    the CPU; the merge sums all deltas for that weight in float32 on its device and rounds once
    to its dtype. On exit, normal or by exception, the copies are written back with `copy_`,
    so the weights are bit-identical to before and stay the same tensor objects. Yields the
    resolutions (for warnings and infotext). Not re-entrant across threads for one bundle.
    """
    active = [(lora, float(w)) for lora, w in loras if float(w) != 0.0]
    resolutions = [resolve(lora, bundle) for lora, _ in active]
    by_weight: dict[int, tuple[torch.Tensor, list[tuple[Patch, float]]]] = {}
    # GGUF layers kept quantised get the factors for the job, not a merged weight (webui.runtime.gguf)
    factors: list[tuple[nn.Module, tuple[torch.Tensor, torch.Tensor, float]]] = []
    for resolution, (_, multiplier) in zip(resolutions, active):
        for patch in resolution.patches:
            if is_quantized(patch.module):
                factors.append((patch.module, (patch.lora.down.flatten(1), patch.lora.up.flatten(1),
                                               patch.lora.scale * multiplier)))
            else:
                by_weight.setdefault(id(patch.weight), (patch.weight, []))[1].append((patch, multiplier))
    backups: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for weight, items in by_weight.values():
                backups.append((weight, weight.detach().to("cpu", copy=True)))
                total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                for patch, multiplier in items:
                    total.add_(patch.lora.delta(weight.shape, weight.device), alpha=multiplier)
                weight.copy_(weight.float() + total)  # one rounding to the weight's dtype
            for module, (down, up, scale) in factors:
                device = module.qweight.device
                module.lora_factors.append((down.to(device), up.to(device), scale))
        for r in resolutions:
            for message in r.warnings():
                log.warning("%s", message)
        yield resolutions
    finally:
        with torch.no_grad():
            for weight, original in reversed(backups):
                weight.copy_(original)
        for module, _ in factors:
            module.lora_factors.clear()


class LoraCache:
    """Parsed LoRA files by path, read again when the file changes; the `size` most recent kept."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: dict[Path, tuple[int, LoraWeights]] = {}  # path -> (mtime_ns, weights)

    def get(self, path: Path) -> LoraWeights:
        stamp = path.stat().st_mtime_ns
        hit = self._items.get(path)
        if hit and hit[0] == stamp:
            return hit[1]
        weights = load_lora(path)
        if len(self._items) >= self.size:
            self._items.pop(next(iter(self._items)))
        self._items[path] = (stamp, weights)
        return weights
