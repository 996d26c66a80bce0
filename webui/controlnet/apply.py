"""A job's ControlNet units, prepared once, and the per-call model input that adds their
residuals (the denoiser's `model_inputs` seam).

Per unit and model call: the control image at the pass's size (the hires pass gets its own),
the ControlNet run on the same input rows as the UNet, its residuals scaled by the unit's weight,
only while the step is inside [guidance_start, guidance_end]. Control modes as the A1111
extension has them: "My prompt is more important" scales the residuals down towards the shallow
layers (0.825 per layer); "ControlNet is more important" does that too and leaves the negative
prompt's rows without control, so guidance pushes towards the control.

The tile model's colour fix (`tile_colorfix`, `tile_colorfix+sharp`): inside the unit's step
range, every row's denoised estimate keeps its detail but takes its colours, the estimate
box-blurred over threshold A latent pixels (scaled with the pass's size), from the control image's
own latents blurred alike. "+sharp" also blurs the negative prompt's estimate by threshold B %,
so that guidance pushes away from blur.

A T2I-Adapter unit runs its adapter once per pass size and adds the feature maps inside the
UNet's down blocks on every call in its step range (`down_intrablock_additional_residuals`),
with the same weight, step range and control modes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetUnionModel, T2IAdapter
from PIL import Image

from webui.controlnet import ip_adapter, preprocess
from webui.controlnet.models import ControlNetLibrary
from webui.controlnet.units import NO_MASK, UNION_TYPES, ControlMode, ControlUnit
from webui.models.errors import ModelError
from webui.models.load import ModelBundle
from webui.pipeline.init_image import resize_image
from webui.pipeline.latents import encode
from webui.pipeline.request import GenerationRequest

log = logging.getLogger(__name__)
SOFT = 0.825  # per layer, from the deepest residual up


@dataclass
class PreparedUnit:
    index: int
    unit: ControlUnit
    image: Image.Image  # preprocessed, before it is fitted to a pass's size
    title: str
    thresholds: tuple[float, float]
    mask: Image.Image | None = None  # the inpaint preprocessor's: these pixels become -1 in the control image
    tensors: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    features: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)  # a T2I-Adapter's, per size
    union: int | None = None  # a union model's control type (its index)

    def fitted(self, size: tuple[int, int]) -> Image.Image:
        """The control image fitted to (W, H) with the unit's resize mode (RGB)."""
        return resize_image(self.image, int(self.unit.resize_mode), *size).convert("RGB")

    def control(self, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[1, 3, H, W] in 0-1: the control image fitted to (W, H)."""
        if size not in self.tensors:
            array = np.asarray(self.fitted(size), dtype=np.float32) / 255.0
            if self.mask is not None:  # the inpaint ControlNet reads -1 as "to be painted"
                mask = np.asarray(resize_image(self.mask, int(self.unit.resize_mode), *size).convert("L"))
                array[mask > 127] = -1.0
            self.tensors[size] = torch.from_numpy(array).permute(2, 0, 1)[None].to(device=device, dtype=dtype)
        return self.tensors[size]


def prepare(request: GenerationRequest, library: ControlNetLibrary, bundle: ModelBundle) -> list[PreparedUnit]:
    """The request's active units with their control images made, their models loaded for
    `bundle` (ValueError/ModelError for a unit that cannot run: no image, an unknown
    preprocessor or model, a model for another family)."""
    out = []
    for i, unit in enumerate(request.controlnet):
        if not unit.active:
            continue
        try:
            net = library.load(unit.model, bundle)
        except ModelError as err:
            raise ModelError(f"ControlNet unit {i}: {err}") from None
        union = _union_index(i, unit, net)
        source = unit.image if unit.image is not None else (request.init_images[0] if request.init_images else None)
        if source is None:
            raise ValueError(f"ControlNet unit {i}: no image (give one, or use img2img, whose image it then takes)")
        w, h = request.canvas_size()
        resolution = min(w, h) if unit.pixel_perfect else unit.processor_res
        default_a, default_b = preprocess.defaults(unit.module)
        a = unit.threshold_a if unit.threshold_a != -1 else default_a
        b = unit.threshold_b if unit.threshold_b != -1 else default_b
        image = preprocess.run(unit.module, source, resolution, a, b, library.annotators, str(bundle.runtime.device))
        mask = None
        if preprocess.is_inpaint(unit.module) and (mask := unit.inpaint_mask(request.mask)) is None:
            raise ValueError(f"ControlNet unit {i}: {NO_MASK}")
        out.append(PreparedUnit(i, unit, image, library.find(unit.model).title(library.hashes), (a, b), mask,
                                union=union))
    return out


def _union_index(i: int, unit: ControlUnit, net: Any) -> int | None:
    """For a union model, the index of the unit's control type (ValueError when it has none or the
    model lacks it); None for another model."""
    if not isinstance(net, ControlNetUnionModel):
        return None
    kinds = UNION_TYPES[:net.config.num_control_type]
    chosen = unit.union_type()
    if chosen is None:
        raise ValueError(f"ControlNet unit {i}: {unit.model} is a union model; choose its control type "
                         f"(union_control_type: {', '.join(kinds)}), the preprocessor {unit.module!r} does not say")
    if chosen not in kinds:
        raise ValueError(f"ControlNet unit {i}: {unit.model} knows {len(kinds)} control types ({', '.join(kinds)}), "
                         f"not {chosen!r}")
    return kinds.index(chosen)


def infotext(units: list[PreparedUnit]) -> dict[str, str]:
    return {f"ControlNet {u.index}": u.unit.infotext(u.title, u.thresholds, u.union is not None) for u in units}


def load_units(units: list[PreparedUnit], library: ControlNetLibrary,
               bundle: ModelBundle) -> list[tuple[PreparedUnit, Any]]:
    """Each unit with its model loaded for `bundle`; a unit whose model does not fit it (a refiner
    of another family) is skipped there, and logged."""
    loaded = []
    for u in units:
        try:
            loaded.append((u, library.load(u.unit.model, bundle)))
        except ModelError as err:
            log.warning("ControlNet unit %d skipped on %s: %s", u.index, bundle.model_name, err)
    return loaded


def model_input(loaded: list[tuple[PreparedUnit, Any]], bundle: ModelBundle, size: tuple[int, int],
                steps: int) -> Callable[[Any], None] | None:
    """The `model_inputs` entry of the ControlNets and T2I-Adapters among `loaded` (see
    `load_units`) for one sampling run of `steps` steps at `size` on `bundle`; None without any."""
    models = [(u, net) for u, net in loaded if not isinstance(net, ip_adapter.IPAdapterModel)]
    if not models:
        return None
    channels = bundle.family.latent_channels
    device, dtype = bundle.runtime.device, bundle.runtime.dtype

    def add(call: Any) -> None:
        fraction = (call.step - 1) / max(steps, 1)
        rows = call.x.shape[0]
        down_sum: list[torch.Tensor] | None = None
        mid_sum: torch.Tensor | None = None
        intra_sum: list[torch.Tensor] | None = None
        for u, net in models:
            if not u.unit.guidance_start <= fraction <= u.unit.guidance_end:
                continue
            if isinstance(net, T2IAdapter):
                feats = [f * u.unit.weight for f in adapter_features(u, net, size, call.x.shape[-2:], device, dtype)]
                feats = _shaped(u.unit.control_mode, call.uncond_rows, [f.expand(rows, -1, -1, -1) for f in feats])
                intra_sum = feats if intra_sum is None else [a + b for a, b in zip(intra_sum, feats)]
                continue
            hint = u.control(size, device, dtype).expand(rows, -1, -1, -1)
            kind: dict[str, Any] = {"controlnet_cond": hint, "conditioning_scale": u.unit.weight}
            if u.union is not None:  # one hint, its type as a one-hot row per input row and as an index
                chosen = torch.zeros(rows, net.config.num_control_type, device=device)
                chosen[:, u.union] = 1
                kind = {"controlnet_cond": [hint], "control_type": chosen, "control_type_idx": [u.union],
                        "conditioning_scale": [u.unit.weight]}
            down, mid = net(call.x[:, :channels], call.timestep, encoder_hidden_states=call.context,
                            added_cond_kwargs=call.added_cond_kwargs, return_dict=False, **kind)
            residuals = _shaped(u.unit.control_mode, call.uncond_rows, [*down, mid])
            if down_sum is None:
                down_sum, mid_sum = residuals[:-1], residuals[-1]
            else:
                down_sum = [a + b for a, b in zip(down_sum, residuals[:-1])]
                mid_sum = mid_sum + residuals[-1]
        if intra_sum is not None:  # the UNet pops these as it goes: a new list every call
            given_intra = call.kwargs.get("down_intrablock_additional_residuals")
            call.kwargs["down_intrablock_additional_residuals"] = (
                intra_sum if given_intra is None else [a + b for a, b in zip(given_intra, intra_sum)])
        if down_sum is None:
            return
        given = call.kwargs.get("down_block_additional_residuals")
        call.kwargs["down_block_additional_residuals"] = tuple(
            down_sum if given is None else [a + b for a, b in zip(given, down_sum)])
        given_mid = call.kwargs.get("mid_block_additional_residual")
        call.kwargs["mid_block_additional_residual"] = mid_sum if given_mid is None else given_mid + mid_sum

    return add


def box_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The mean over a (2r+1)² window, edges repeated outwards."""
    padded = torch.nn.functional.pad(x, (radius,) * 4, mode="replicate")
    return torch.nn.functional.avg_pool2d(padded, 2 * radius + 1, stride=1)


def colour_fix(loaded: list[tuple[PreparedUnit, Any]], bundle: ModelBundle, size: tuple[int, int], steps: int,
               base_width: int) -> Callable[[torch.Tensor, Any], torch.Tensor] | None:
    """The denoiser's correction for the colour-fixing tile units among `loaded` in a sampling run
    of `steps` steps at `size` (`base_width`: the first pass's width, where threshold A is in
    latent pixels); None without one."""
    fixes = []
    for u, _ in loaded:
        if not preprocess.is_colour_fix(u.unit.module):
            continue
        radius = max(1, round(u.thresholds[0] * size[0] / max(base_width, 1)))
        key = ("colour", size, radius, bundle.model_name)
        if key not in u.features:
            u.features[key] = [box_blur(encode(bundle, [u.fitted(size)]), radius)]
        sharp = u.thresholds[1] / 100 if u.unit.module.strip().lower().endswith("+sharp") else 0.0
        fixes.append((u.unit, u.features[key][0], radius, sharp))
    if not fixes:
        return None

    def correct(denoised: torch.Tensor, call: Any) -> torch.Tensor:
        fraction = (call.step - 1) / max(steps, 1)
        for unit, colours, radius, sharp in fixes:
            if not unit.guidance_start <= fraction <= unit.guidance_end:
                continue
            if colours.shape[-2:] != denoised.shape[-2:]:
                colours = torch.nn.functional.interpolate(colours, size=denoised.shape[-2:], mode="bilinear")
            denoised = denoised - box_blur(denoised, radius) + colours.to(denoised)
            if sharp and call.uncond_rows:
                rows = torch.tensor(call.uncond_rows, device=denoised.device)
                denoised = denoised.index_copy(0, rows, torch.lerp(denoised[rows], box_blur(denoised[rows], radius),
                                                                   sharp))
        return denoised

    return correct


def ip_adapter_run(loaded: list[tuple[PreparedUnit, Any]], library: ControlNetLibrary, bundle: ModelBundle,
                   steps: int) -> tuple[Any, Callable[[Any], None]] | None:
    """For a sampling run with IP-Adapters among `loaded`: (a context manager that installs them on
    `bundle`'s UNet for the run, the per-call model input giving each row each unit's image
    embeddings); None without one. Several units (several images, the same adapter or others) each
    add their own branch to the cross-attention, with their own weight and step range."""
    found = [(u, net) for u, net in loaded if isinstance(net, ip_adapter.IPAdapterModel)]
    if not found:
        return None
    embeds = []
    for u, adapter in found:
        key = ("ip", adapter.name, str(bundle.runtime.device))
        if key not in u.features:
            encoder = library.clip_vision.encoder_for(adapter, bundle.runtime.device)
            u.features[key] = list(ip_adapter.embeddings(adapter, encoder, u.image))
        embeds.append([e.to(dtype=bundle.runtime.dtype) for e in u.features[key]])
    adapters = [adapter for _, adapter in found]
    layers = ip_adapter.joined(adapters)

    def add(call: Any) -> None:
        fraction = (call.step - 1) / max(steps, 1)
        ip_adapter.set_scales(layers, [u.unit.weight if u.unit.guidance_start <= fraction <= u.unit.guidance_end
                                       else 0.0 for u, _ in found])
        per_unit = []
        for positive, negative in embeds:
            rows = positive.expand(len(call.row_image), *positive.shape[1:]).clone()
            if call.uncond_rows:
                rows[call.uncond_rows] = negative
            per_unit.append(rows)
        call.added_cond_kwargs = {**(call.added_cond_kwargs or {}), "image_embeds": per_unit}

    return ip_adapter.installed(bundle.unet, adapters, layers), add


def _shaped(mode: ControlMode, uncond_rows: Any, residuals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Residuals (shallow to deep) as the control mode wants them: scaled down towards the shallow
    layers unless balanced; without the negative prompt's rows when ControlNet is more important."""
    if mode != ControlMode.BALANCED:
        n = len(residuals)
        residuals = [r * SOFT ** (n - 1 - i) for i, r in enumerate(residuals)]
    if mode == ControlMode.CONTROL and uncond_rows:
        keep = torch.ones(residuals[0].shape[0], 1, 1, 1, device=residuals[0].device, dtype=residuals[0].dtype)
        keep[uncond_rows] = 0
        residuals = [r * keep for r in residuals]
    return residuals


def adapter_features(u: PreparedUnit, net: torch.nn.Module, size: tuple[int, int], latent: tuple[int, int],
                     device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """A T2I-Adapter's feature maps for the unit's control image at `size`, made once: one per UNet
    level, at that level's size for a latent of `latent` (H, W). The adapter halves sizes by
    pooling and the UNet by strided convolutions, which round differently at odd sizes: the
    maps are resized to the UNet's where they differ."""
    key = (size, tuple(latent))
    if key not in u.features:
        hint = u.control(size, device, dtype)
        if net.config.in_channels == 1:  # sketch adapters read one grey channel
            hint = hint.mean(dim=1, keepdim=True)
        with torch.no_grad():
            feats = net(hint)
        out = []
        for f in feats:  # the UNet level a map is for: how many halvings below the latent it is
            halvings = round(math.log2(max(1.0, size[1] / 8 / f.shape[-2])))
            h, w = int(latent[0]), int(latent[1])
            for _ in range(halvings):
                h, w = -(-h // 2), -(-w // 2)
            if tuple(f.shape[-2:]) != (h, w):
                f = torch.nn.functional.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            out.append(f)
        u.features[key] = out
    return u.features[key]
