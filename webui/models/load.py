"""Turn a single-file checkpoint into runnable diffusers / transformers modules, offline.

Modules are built on the meta device (no random initialisation of weights that are about to
be overwritten) and take the file's tensors with `assign=True`. The reader has already cast each
tensor to the dtype it runs in, straight out of the file mapping (`webui.models.readers`), so the
peak stays near one copy of the weights. In medvram / lowvram the weights stay on the offload
device and the runtime's `MemoryManager` is attached to the components.
"""

from __future__ import annotations

import gc
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)

from webui.models.detect import UNET_PREFIX, VAE_PREFIX, Detected, detect, vae_config_from_shapes
from webui.models.errors import ModelError
from webui.models.families import FamilySpec, TextEncoderSpec
from webui.models.modules import ModuleChoice, check_fits
from webui.models.readers import StateDict, read_state_dict
from webui.models.registry import SAFETENSORS_SUFFIXES
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.attention import apply_attention
from webui.runtime.compile import compile_unet, to_channels_last
from webui.runtime.devices import Runtime

log = logging.getLogger(__name__)

Prediction = Literal["epsilon", "v", "flow"]


@dataclass
class TextEncoder:
    spec: TextEncoderSpec
    model: CLIPTextModel | CLIPTextModelWithProjection | T5EncoderModel
    tokenizer: PreTrainedTokenizerBase


@dataclass
class ModelBundle:
    """Everything a generation needs from one checkpoint."""

    name: str  # checkpoint name as listed (relative path with extension)
    model_name: str  # name without extension, as written to infotext
    sha256: str | None
    family: FamilySpec
    variant: str
    prediction: Prediction
    unet: UNet2DConditionModel  # or, for SD3, its MMDiT behind the same call (webui.models.mmdit)
    vae: AutoencoderKL
    vae_name: str | None  # None = the checkpoint's own VAE
    text_encoders: list[TextEncoder]
    alphas_cumprod: torch.Tensor  # float32, CPU
    runtime: Runtime
    zero_terminal_snr: bool = False  # the schedule was rescaled to zero terminal SNR (the file's `ztsnr` key)
    # the parts read from files of their own (VAE first, then text encoders): infotext's Module n
    module_names: list[str] = field(default_factory=list)

    @property
    def hash10(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def distilled_guidance(self) -> bool:
        """The model takes a guidance scale as an input (Flux dev's guidance embedder)."""
        return bool(getattr(self.unet.config, "guidance_embeds", False))

    def modules(self) -> list[torch.nn.Module]:
        """Every module holding weights: text encoders, UNet, VAE."""
        return [te.model for te in self.text_encoders] + [self.unet, self.vae]


def load_bundle(
    path: Path,
    *,
    runtime: Runtime,
    tokenizers: TokenizerFactory,
    name: str | None = None,
    sha256: str | None = None,
    vae_path: Path | None = None,
    prediction: Prediction | None = None,
    text_encoder_dirs: list[Path] | None = None,
    vae_dir: Path | None = None,
    chosen: ModuleChoice | None = None,
) -> ModelBundle:
    """Read `path`, detect its family and build the modules on `runtime.device`.

    `prediction` overrides what the file says; otherwise v-prediction is chosen when the file
    carries a `v_pred` key. A checkpoint without the text encoders its family needs (SD3.5 as
    Stability ships it, Flux) takes them from `text_encoder_dirs`, and one without a VAE its family's
    from `vae_dir` (Flux: `ae.safetensors`); the files `chosen` (the page's "VAE / Text encoder")
    replace the checkpoint's own parts and `vae_path`. Parts read from files of their own are the
    bundle's `module_names`. Raises `ModelError` with a one-line reason naming the file.
    """
    path = Path(path)
    # a GGUF file is a transformer alone, its tensors dequantised to float32: straight to the runtime's dtype
    select = _floats_to(runtime.dtype) if path.suffix.lower() == ".gguf" else _runtime_dtypes(runtime)
    sd = read_state_dict(path, select, runtime.weights_device, keep_quantized=runtime.float8_packed)
    chosen = chosen or ModuleChoice()
    vae_path = chosen.vae or vae_path
    modules = _add_separate_text_encoders(sd, path, text_encoder_dirs or [], runtime, chosen)
    found = detect(sd, path)
    try:
        alphas = _alphas_cumprod(sd, found.family)
        text_encoders = [
            TextEncoder(spec, _build_text_encoder(sd, spec, cfg, runtime), tokenizers.get(spec.pad_token))
            for spec, cfg in zip(found.family.text_encoders, found.text_configs) if cfg is not None
        ]
        build = {"mmdit": _build_mmdit, "flux": _build_flux}.get(found.family.denoiser, _build_unet)
        unet = build(sd, found, runtime)
        vae = _build_vae(sd, VAE_PREFIX, found.vae_config, runtime) if found.vae_config and vae_path is None else None
    except ModelError:
        sd.clear()
        gc.collect()  # half-built modules and the traceback may hold weights in cycles
        raise
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        sd.clear()
        gc.collect()
        raise ModelError(f"could not build the model from its weights: {str(e).splitlines()[0]}", path) from None
    sd.clear()  # what no module took (e.g. a VAE replaced by vae_path) goes now, by reference count
    separate_vae = chosen.vae
    if vae is None and vae_path is None and vae_dir is not None:
        vae_path = separate_vae = family_vae(vae_dir, found.family)
    if separate_vae is not None:  # a part of its own, as the text encoders: recorded as a module
        modules.insert(0, separate_vae.stem)
    if vae is None:
        if vae_path is None:
            hint = "".join(f" ({found.family.name.capitalize()}'s is {n}.safetensors)" for n in found.family.vae_names[:1])
            raise ModelError(f"the checkpoint has no VAE; put one in models/VAE/{hint} or choose one", path)
        vae = load_vae(vae_path, found.family, runtime)
    bundle = ModelBundle(
        name=name or path.name,
        model_name=Path(name or path.name).with_suffix("").as_posix(),
        sha256=sha256,
        family=found.family,
        variant=found.variant,
        prediction="flow" if found.family.flow else prediction or ("v" if found.v_pred_key else "epsilon"),
        unet=unet,
        vae=vae,
        vae_name=Path(vae_path).name if vae_path else None,
        text_encoders=text_encoders,
        alphas_cumprod=rescale_zero_terminal_snr(alphas) if found.ztsnr_key else alphas,
        runtime=runtime,
        zero_terminal_snr=found.ztsnr_key,
        module_names=modules,
    )
    if found.ztsnr_key:
        log.info("%s: zero terminal SNR schedule (the file's ztsnr key), %s-prediction", bundle.name, bundle.prediction)
    if runtime.memory is not None:  # medvram / lowvram: weights wait on the offload device
        runtime.memory.attach_bundle(bundle)
    return bundle


def _add_separate_text_encoders(sd: StateDict, path: Path, dirs: list[Path], runtime: Runtime,
                                chosen: ModuleChoice) -> list[str]:
    """For an SD3 or Flux transformer without its text encoders: read them from their own files
    into `sd` under the prefixes a complete file has; a file `chosen` for a role ("VAE / Text
    encoder") takes the place of the checkpoint's own. The names of the files used (no suffix)."""
    from webui.models.detect import family_of
    from webui.models.text_encoders import FILE_NAMES, find_text_encoder, role_of

    family = family_of(sd)
    if family is None:
        return []
    check_fits(chosen, family)
    if family.denoiser == "unet":
        return []
    files = dict(chosen.text_encoders)
    used, missing = [], []
    for spec in family.text_encoders:
        role = role_of(spec.prefix)
        if role in files:
            for key in [k for k in sd if k.startswith(spec.prefix)]:
                del sd[key]
        elif any(k.startswith(spec.prefix) for k in sd):
            continue
        found = files.get(role) or find_text_encoder(dirs, role)
        if found is None:
            if not spec.optional:
                missing.append(FILE_NAMES[role])
            continue
        for key, tensor in read_state_dict(found, _floats_to(runtime.dtype), runtime.weights_device).items():
            sd[spec.prefix + key] = tensor
        used.append(found.stem)
    if missing:
        where = dirs[0] if dirs else Path("models/text_encoder")
        optional = [FILE_NAMES[role_of(s.prefix)] for s in family.text_encoders if s.optional]
        also = f" (and optionally {', '.join(optional)})" if optional else ""
        raise ModelError(f"this {family.label} checkpoint has no text encoders in it: put {' and '.join(missing)}"
                         f"{also} in {where}", path)
    return used


def _floats_to(dtype: torch.dtype):
    """A reader's dtype choice: floating-point tensors (float8 ones too) in `dtype`, others as stored."""
    return lambda _key, stored: dtype if stored.is_floating_point else stored


def family_vae(folder: Path, family: FamilySpec) -> Path | None:
    """A 16-channel family's VAE in `folder` by the names users have: the family's `vae_names`
    (Flux's `ae`), else a name starting with the family's (`flux_vae`, `sd3_vae`, ...)."""
    if family.latent_channels != 16 or not folder.is_dir():
        return None
    names = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SAFETENSORS_SUFFIXES)
    return next((p for p in names if p.stem.lower() in family.vae_names), None) or \
        next((p for p in names if p.stem.lower().startswith(family.name)), None)


def _runtime_dtypes(runtime: Runtime, vae_only: bool = False):
    """Read module weights straight into the dtype they run in; skip what no module uses (EMA)."""
    modules = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.")

    def select(key: str, dtype: torch.dtype) -> torch.dtype | None:
        if key.startswith("model_ema."):
            return None
        if not dtype.is_floating_point:
            return dtype
        if vae_only or key.startswith(VAE_PREFIX):
            return runtime.vae_dtype
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and key.startswith(UNET_PREFIX):
            return dtype  # float8 weights stay packed until the module is built (SD3 / Flux keep them so)
        return runtime.dtype if key.startswith(modules) else dtype

    return select


def load_vae(path: Path, family: FamilySpec, runtime: Runtime) -> AutoencoderKL:
    """A standalone VAE file in LDM layout, bare or under `first_stage_model.`."""
    sd = read_state_dict(path, _runtime_dtypes(runtime, vae_only=True), runtime.weights_device)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in sd) else ""
    if f"{prefix}decoder.conv_in.weight" not in sd:
        raise ModelError("not a VAE in the original layout (no 'decoder.conv_in.weight')", path)
    try:
        config = vae_config_from_shapes(sd, prefix, family, path)
        if config["latent_channels"] != family.latent_channels:
            raise ModelError(f"a VAE for {config['latent_channels']}-channel latents; {family.label} models use "
                             f"{family.latent_channels} channels (choose a VAE made for {family.label})", path)
        return _build_vae(sd, prefix, config, runtime)
    except ModelError:
        raise
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelError(f"could not build the VAE: {str(e).splitlines()[0]}", path) from None


# --- components ----------------------------------------------------------------------------


def _take(sd: StateDict, prefix: str, strip: bool) -> StateDict:
    """Remove the tensors under `prefix` from `sd` (so their memory moves, not copies)."""
    keys = [k for k in sd if k.startswith(prefix)]
    return {(k[len(prefix) :] if strip else k): sd.pop(k) for k in keys}


def _finish(module: torch.nn.Module, weights: StateDict, runtime: Runtime, dtype: torch.dtype,
            keep_packed: bool = False) -> torch.nn.Module:
    return load_meta_module(module, weights, runtime.weights_device, dtype, keep_packed)


def load_meta_module(module: torch.nn.Module, weights: StateDict, device: torch.device,
                     dtype: torch.dtype, keep_packed: bool = False) -> torch.nn.Module:
    """Load `weights` into a module built on the meta device, casting tensor by tensor onto
    `device`; the non-persistent `position_ids` buffers that files do not hold are made here (a
    meta buffer left behind would be read as garbage). With `keep_packed`, 2-D float8 weights stay
    float8 and GGUF-quantised linear weights stay quantised, their layers computing in `dtype`
    (webui.runtime.float8, webui.runtime.gguf). ModelError when the weights do not fit."""
    from webui.runtime.float8 import FLOAT8, compute_float8_linears
    from webui.runtime.gguf import QuantizedTensor, keep_quantized

    quantized: dict[str, QuantizedTensor] = {}
    for k in list(weights):
        tensor = weights.pop(k)
        if isinstance(tensor, QuantizedTensor):
            layer = module.get_submodule(k.rsplit(".", 1)[0]) if "." in k else None
            if keep_packed and k.endswith(".weight") and isinstance(layer, torch.nn.Linear):
                quantized[k] = tensor
                continue
            tensor = tensor.dequantized()
        packed = keep_packed and tensor.dtype in FLOAT8 and tensor.ndim == 2 and k.endswith(".weight")
        weights[k] = tensor.to(device=device) if packed else tensor.to(device=device, dtype=dtype)
    result = module.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids") and k not in quantized]
    if missing or result.unexpected_keys:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise ModelError(f"weights do not fit the detected {type(module).__name__}: {detail}")
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:  # non-persistent buffers are not in files
            if not name.endswith("position_ids"):
                raise ModelError(f"{type(module).__name__} buffer {name} has no value")
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer(
                "position_ids", torch.arange(buf.shape[-1], device=device).expand((1, -1)), persistent=False
            )
    if keep_packed and (n := compute_float8_linears(module)):
        log.info("%s: %d linear layers keep their float8 weights, computed in %s", type(module).__name__, n,
                 str(dtype).removeprefix("torch."))
    for k, tensor in quantized.items():
        keep_quantized(module.get_submodule(k.rsplit(".", 1)[0]), tensor, device)
    if quantized:
        log.info("%s: %d linear layers keep their GGUF blocks, computed in %s", type(module).__name__,
                 len(quantized), str(dtype).removeprefix("torch."))
    return module.eval().requires_grad_(False)


def _build_unet(sd: StateDict, found: Detected, runtime: Runtime) -> UNet2DConditionModel:
    weights = convert_ldm_unet_checkpoint(_take(sd, UNET_PREFIX, strip=False), found.unet_config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(found.unet_config)
    _finish(unet, weights, runtime, runtime.dtype)
    apply_attention(unet, runtime.attention)
    if runtime.channels_last:
        to_channels_last(unet)
    if runtime.compiles:
        compile_unet(unet)
    return unet


def _build_mmdit(sd: StateDict, found: Detected, runtime: Runtime) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from webui.models.mmdit import MMDiTDenoiser

    weights = convert_sd3_transformer_checkpoint_to_diffusers(_take(sd, UNET_PREFIX, strip=True))
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(found.unet_config)
    _finish(transformer, weights, runtime, runtime.dtype, keep_packed=runtime.float8_packed)  # attention: SDPA already
    return MMDiTDenoiser(transformer).eval()


def _build_flux(sd: StateDict, found: Detected, runtime: Runtime) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from webui.models.mmdit import FluxDenoiser

    raw = _take(sd, UNET_PREFIX, strip=True)
    width = found.unet_config["attention_head_dim"] * found.unet_config["num_attention_heads"]
    split = {}
    if width != 3072:
        # diffusers' converter splits each single block's linear1 into q, k, v and the MLP at Flux.1's
        # full width; for another width (tests' tiny models) the split is made here from the shapes
        # and the converter gets stand-ins on the meta device (no memory) of the size it expects.
        for i in range(found.unet_config["num_single_layers"]):
            for kind in ("weight", "bias"):
                key = f"single_blocks.{i}.linear1.{kind}"
                split[(i, kind)] = raw[key].split((width, width, width, raw[key].shape[0] - 3 * width))
                raw[key] = torch.empty((3 * 3072 + 4 * 3072, *raw[key].shape[1:]), device="meta")
    weights = convert_flux_transformer_checkpoint_to_diffusers(raw)
    for (i, kind), (q, k, v, mlp) in split.items():
        b = f"single_transformer_blocks.{i}."
        weights.update({f"{b}attn.to_q.{kind}": q, f"{b}attn.to_k.{kind}": k, f"{b}attn.to_v.{kind}": v,
                        f"{b}proj_mlp.{kind}": mlp})
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(found.unet_config)
    _finish(transformer, weights, runtime, runtime.dtype, keep_packed=runtime.float8_packed)
    return FluxDenoiser(transformer).eval()


def _build_vae(sd: StateDict, prefix: str, config: dict[str, Any] | None, runtime: Runtime) -> AutoencoderKL:
    assert config is not None
    weights = convert_ldm_vae_checkpoint(_take(sd, prefix, strip=True), config)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    _finish(vae, weights, runtime, runtime.vae_dtype)
    apply_attention(vae, runtime.attention)
    if runtime.channels_last:
        to_channels_last(vae)
    return vae


def _build_text_encoder(
    sd: StateDict, spec: TextEncoderSpec, config: dict[str, Any], runtime: Runtime
) -> CLIPTextModel | CLIPTextModelWithProjection | T5EncoderModel:
    raw = _take(sd, spec.prefix, strip=True)
    if spec.kind == "t5":
        return _build_t5(raw, config, runtime)
    weights = _convert_clip(raw) if spec.kind == "clip" else _convert_openclip(raw, config["hidden_size"], spec.pooled)
    cls = CLIPTextModelWithProjection if spec.pooled and spec.projected else CLIPTextModel
    if cls is CLIPTextModel:
        weights.pop("text_projection.weight", None)  # a CLIP-L file made for SD3 carries one Flux does not use
    cfg = CLIPTextConfig(**config)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = cls(cfg)
    if "text_model.embeddings.token_embedding.weight" not in model.state_dict():
        # transformers 5's CLIPTextModel is the text transformer itself, without the wrapper level
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return _finish(model, weights, runtime, runtime.dtype)


def _build_t5(raw: StateDict, config: dict[str, Any], runtime: Runtime) -> T5EncoderModel:
    """T5's encoder in HF layout. Its token embedding is one tensor under two names (`shared`,
    `encoder.embed_tokens`); files carry either or both, and it is loaded once, then tied."""
    shared = raw.pop("shared.weight", None)
    embed = raw.pop("encoder.embed_tokens.weight", None)
    raw["shared.weight"] = shared if shared is not None else embed
    cfg = T5Config(**config)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    model.encoder.embed_tokens = torch.nn.Identity()  # no second copy to load: tied below
    # T5 overflows in float16 (its feed-forward outputs pass 65504): bfloat16 where the rest is float16
    _finish(model, raw, runtime, torch.bfloat16 if runtime.dtype == torch.float16 else runtime.dtype)
    model.encoder.embed_tokens = model.shared
    return model


def _convert_clip(raw: StateDict) -> StateDict:
    """HF CLIP keys, possibly without the `text_model.` level very old checkpoints lack (SD3's
    CLIPs keep their `text_projection` beside it)."""
    out = {}
    for k, v in raw.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k] = v
    return out


_OPENCLIP_BLOCK = [
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
]


def _convert_openclip(raw: StateDict, hidden: int, with_projection: bool) -> StateDict:
    """OpenCLIP text tower keys -> transformers CLIPTextModel(WithProjection) keys.

    Keeps every layer (SD2 uses the penultimate one at run time rather than dropping the last).
    """
    out: StateDict = {
        "text_model.embeddings.token_embedding.weight": raw["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": raw["positional_embedding"],
        "text_model.final_layer_norm.weight": raw["ln_final.weight"],
        "text_model.final_layer_norm.bias": raw["ln_final.bias"],
    }
    if with_projection:
        out["text_projection.weight"] = raw["text_projection"].T.contiguous()
    block = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
    for k, v in raw.items():
        m = block.match(k)
        if not m:
            continue
        layer, rest = m.groups()
        base = f"text_model.encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{base}self_attn.{name}.{kind}"] = v[i * hidden : (i + 1) * hidden]
            continue
        for old, new in _OPENCLIP_BLOCK:
            if rest.startswith(old):
                out[base + new + rest[len(old) :]] = v
                break
    return out


# The last alpha-bar A1111 1.10 and Forge give a zero-terminal-SNR schedule instead of 0: the last
# sigma stays finite (about 4519), so the samplers' first step can be taken.
ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule shifted and scaled so that the last step is pure noise (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1), its last value
    then set to ZTSNR_LAST_ALPHA_BAR."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    out = (root**2).to(torch.float32)
    out[-1] = ZTSNR_LAST_ALPHA_BAR
    return out


def _alphas_cumprod(sd: StateDict, family: FamilySpec) -> torch.Tensor:
    """The training noise schedule: the file's own buffer if present, else the family's betas."""
    stored = sd.get("alphas_cumprod")
    if stored is not None and stored.numel() == family.num_train_timesteps:
        return stored.detach().to("cpu", torch.float32).clone()
    betas = torch.linspace(family.beta_start**0.5, family.beta_end**0.5, family.num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
