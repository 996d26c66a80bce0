"""Write random-weight Stable Diffusion checkpoints in the original single-file (LDM) layout.

Tiny ones (a few MB) for tests, or full-size SD1.5-architecture ones for benchmarks:

    python -m webui.testing.make_checkpoint --family sd1 OUT.safetensors
    python -m webui.testing.make_checkpoint --family sd1 --full-size --dtype float16 OUT.safetensors

`--family sdxl-refiner --full-size` gives the SDXL refiner architecture (2.3B UNet, bigG text
encoder); the tests build that one only on the meta device, to check detection from shapes.
`--family sdxl-vpred-ztsnr` is SDXL with the `v_pred` and `ztsnr` marker keys (NoobAI-XL v-pred).

The transformer families, their parts where users keep them (OUT in a `models/Stable-diffusion/`
folder: the VAE and text encoders go to `../VAE/` and `../text_encoder/`; see make_sd3, make_flux):

    python -m webui.testing.make_checkpoint --family sd3 models/Stable-diffusion/sd35.safetensors
    python -m webui.testing.make_checkpoint --family sd3-split models/Stable-diffusion/sd35.safetensors
    python -m webui.testing.make_checkpoint --family flux models/Stable-diffusion/flux1-dev.safetensors
    python -m webui.testing.make_checkpoint --family flux --gguf Q8_0 models/Stable-diffusion/flux1-dev.gguf
    python -m webui.testing.make_checkpoint --family flux --fp8 models/Stable-diffusion/flux1-dev-fp8.safetensors

ControlNet-side models fitting the tiny checkpoints (OUT in a `models/ControlNet/` folder; the
IP-Adapter's tiny CLIP vision model goes to `../clip_vision/`; see make_controlnet):

    python -m webui.testing.make_checkpoint --family controlnet-sd1 models/ControlNet/control_sd15_canny.safetensors
    python -m webui.testing.make_checkpoint --family controlnet-sdxl models/ControlNet/control_sdxl_canny.safetensors
    python -m webui.testing.make_checkpoint --family t2i-adapter-sd1 models/ControlNet/t2iadapter_canny_sd15v2.pth
    python -m webui.testing.make_checkpoint --family ip-adapter-sd1 models/ControlNet/ip-adapter_sd15.safetensors

The modules are built with diffusers / transformers and their keys mapped back to the names
the CompVis code used, so loading them exercises the same conversion as a downloaded file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

FAMILIES = ("sd1", "sd2", "sdxl", "sd1-inpaint", "sdxl-refiner")
TRANSFORMER_FAMILIES = ("sd3", "sd3-split", "flux", "flux-schnell")  # written by make_sd3 / make_flux
CONTROL_FAMILIES = ("controlnet-sd1", "controlnet-sdxl", "t2i-adapter-sd1", "ip-adapter-sd1")  # make_controlnet
FULL_SIZE = ("sd1", "sdxl", "sdxl-refiner")
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1)
FULL_SD1_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
FULL_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)
# Tiny refiner bigG: projection narrower than the hidden width, so a mix-up of the two shows.
TINY_BIGG_WIDTH = 48  # the tiny SDXL's second text encoder (its context and pooled width)
TINY_REFINER_TEXT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1)
TINY_REFINER_PROJECTION = 40


def _text_config(size: dict, hidden_act: str, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim or size["hidden_size"],
        **size,
    )


def _refiner_unet(full: bool, context: int, pooled: int) -> UNet2DConditionModel:
    """The SDXL refiner's UNet: attention only in the middle levels, the middle block as deep as
    they are (while the last level has none), 5 time ids (size, crop, aesthetic score)."""
    if full:  # stabilityai/stable-diffusion-xl-refiner-1.0
        channels, layers, depth, time_dim, heads = (384, 768, 1536, 1536), 2, 4, 256, [6, 12, 24, 24]
    else:
        channels, layers, depth, time_dim, heads = (32, 64, 64), 1, 2, 8, [1, 1, 1]
    inner = ("CrossAttnDownBlock2D",) * (len(channels) - 2)
    return UNet2DConditionModel(
        sample_size=128 if full else 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", *inner, "DownBlock2D"),
        up_block_types=("UpBlock2D", *("CrossAttnUpBlock2D",) * len(inner), "UpBlock2D"),
        cross_attention_dim=context,
        attention_head_dim=heads,
        use_linear_projection=True,
        transformer_layers_per_block=depth,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 5 * time_dim,
        norm_num_groups=32,
    )


def _sdxl_base_unet(context: int, pooled: int) -> UNet2DConditionModel:
    """stabilityai/stable-diffusion-xl-base-1.0's UNet (2.6B): no attention at the first level,
    2 and 10 transformer layers below, 6 time ids (original size, crop, target size)."""
    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=context,
        attention_head_dim=[5, 10, 20],
        use_linear_projection=True,
        transformer_layers_per_block=[1, 2, 10],
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=pooled + 6 * 256,
        norm_num_groups=32,
    )


def _unet(family: str, full: bool, context: int, pooled: int = 0) -> UNet2DConditionModel:
    if family == "sdxl-refiner":
        return _refiner_unet(full, context, pooled)
    if full and family == "sdxl":
        return _sdxl_base_unet(context, pooled)
    if full:  # SD1.5 architecture
        return UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=context,
            attention_head_dim=8,
        )
    kw: dict = {}
    if family == "sdxl":
        down, up = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
        kw = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=pooled + 6 * 8,
            transformer_layers_per_block=(1, 2),
        )
    else:
        down, up = ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")
    linear = family in ("sd2", "sdxl")
    heads = 8 if family.startswith("sd1") else [1, 1]
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if family == "sd1-inpaint" else 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=context,
        attention_head_dim=heads,
        use_linear_projection=linear,
        norm_num_groups=32,
        **kw,
    )


def _vae(full: bool) -> AutoencoderKL:
    channels = (128, 256, 512, 512) if full else (32, 32, 32, 32)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=channels,
        layers_per_block=2 if full else 1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
    )


# --- diffusers -> LDM key names ---------------------------------------------------------------

_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def _sub(rest: str, table: list[tuple[str, str]]) -> str:
    for new, old in table:
        if rest.startswith(new):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    return {"model.diffusion_model." + k: v for k, v in unet_keys_to_ldm(unet.state_dict(), unet.config).items()}


def unet_keys_to_ldm(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """A diffusers UNet's (or ControlNet's encoder's) keys in the original layout, unprefixed."""
    per = cfg.layers_per_block + 1
    attn_up = {i: "CrossAttn" in t for i, t in enumerate(getattr(cfg, "up_block_types", ()) or ())}
    out = {}
    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for k, v in state.items():
        parts = k.split(".")
        new = None
        for a, b in fixed.items():
            if k.startswith(a):
                new = b + k[len(a) :]
        if new is None and parts[0] == "down_blocks":
            i = int(parts[1])
            if parts[2] == "downsamplers":
                new = f"input_blocks.{per * (i + 1)}.0.op." + ".".join(parts[5:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                slot = 0 if parts[2] == "resnets" else 1
                rest = _sub(rest, _RESNET) if slot == 0 else rest
                new = f"input_blocks.{1 + per * i + j}.{slot}.{rest}"
        elif new is None and parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            if parts[1] == "resnets":
                new = f"middle_block.{2 * j}.{_sub(rest, _RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        elif new is None and parts[0] == "up_blocks":
            i = int(parts[1])
            if parts[2] == "upsamplers":
                new = f"output_blocks.{per * i + per - 1}.{2 if attn_up[i] else 1}.conv." + ".".join(parts[5:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                slot = 0 if parts[2] == "resnets" else 1
                rest = _sub(rest, _RESNET) if slot == 0 else rest
                new = f"output_blocks.{per * i + j}.{slot}.{rest}"
        if new is None:
            raise KeyError(f"no LDM name for UNet key {k}")
        out[new] = v
    return out


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    out = {}
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    for k, v in vae.state_dict().items():
        parts = k.split(".")
        side = parts[0]
        if parts[1] == "down_blocks":
            i = parts[2]
            new = f"{side}.down.{i}." + (
                "downsample.conv." + ".".join(parts[6:])
                if parts[3] == "downsamplers"
                else f"block.{parts[4]}." + ".".join(parts[5:]).replace("conv_shortcut.", "nin_shortcut.")
            )
        elif parts[1] == "up_blocks":
            i = n - 1 - int(parts[2])
            new = f"{side}.up.{i}." + (
                "upsample.conv." + ".".join(parts[6:])
                if parts[3] == "upsamplers"
                else f"block.{parts[4]}." + ".".join(parts[5:]).replace("conv_shortcut.", "nin_shortcut.")
            )
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{side}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
            else:
                new = f"{side}.mid.attn_1." + _sub(".".join(parts[4:]), attn)
                if v.ndim == 2:
                    v = v[:, :, None, None]  # LDM attention uses 1x1 convolutions
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out." + ".".join(parts[2:])
        else:
            new = k
        out["first_stage_model." + new] = v
    return out


def openclip_to_ldm(model: CLIPTextModel | CLIPTextModelWithProjection, prefix: str) -> dict[str, torch.Tensor]:
    sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in model.state_dict().items()}
    tm = "text_model."
    out = {
        prefix + "token_embedding.weight": sd[tm + "embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd[tm + "embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd[tm + "final_layer_norm.weight"],
        prefix + "ln_final.bias": sd[tm + "final_layer_norm.bias"],
    }
    hidden = model.config.hidden_size
    out[prefix + "text_projection"] = (
        sd["text_projection.weight"].T.contiguous() if "text_projection.weight" in sd else torch.eye(hidden)
    )
    for i in range(model.config.num_hidden_layers):
        src, dst = f"{tm}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[src + f"self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            )
            for theirs, ours in [
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
                ("self_attn.out_proj", "attn.out_proj"),
            ]:
                out[dst + f"{ours}.{kind}"] = sd[src + f"{theirs}.{kind}"]
    return out


def clip_to_ldm(model: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP keys as the original checkpoints store them (always under `text_model.`)."""
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in model.state_dict().items()
        if "position_ids" not in k
    }


def make_state_dict(family: str, full_size: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-weight checkpoint of `family` in LDM layout (float32)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if full_size and family not in FULL_SIZE:
        raise ValueError(f"--full-size is only available for {', '.join(FULL_SIZE)}")
    torch.manual_seed(seed)
    size = FULL_SD1_TEXT if full_size else TINY_TEXT
    sd: dict[str, torch.Tensor] = {}
    if family in ("sd1", "sd1-inpaint"):
        te = CLIPTextModel(_text_config(size, "quick_gelu"))
        sd.update(clip_to_ldm(te, "cond_stage_model.transformer."))
        context, pooled = size["hidden_size"], 0
    elif family == "sd2":
        te = CLIPTextModel(_text_config(size, "gelu"))
        sd.update(openclip_to_ldm(te, "cond_stage_model.model."))
        context, pooled = size["hidden_size"], 0
    elif family == "sdxl-refiner":  # OpenCLIP bigG alone, where SDXL base has CLIP-L
        big = FULL_BIGG_TEXT if full_size else TINY_REFINER_TEXT
        projection = big["hidden_size"] if full_size else TINY_REFINER_PROJECTION
        te = CLIPTextModelWithProjection(_text_config(big, "gelu", projection_dim=projection))
        sd.update(openclip_to_ldm(te, "conditioner.embedders.0.model."))
        context, pooled = big["hidden_size"], projection
    else:  # SDXL base: CLIP-L and OpenCLIP bigG, contexts side by side, bigG's pooled projection
        te1 = CLIPTextModel(_text_config(size, "quick_gelu"))
        big = FULL_BIGG_TEXT if full_size else dict(size, hidden_size=TINY_BIGG_WIDTH, num_attention_heads=1)
        te2 = CLIPTextModelWithProjection(_text_config(big, "gelu", projection_dim=big["hidden_size"]))
        sd.update(clip_to_ldm(te1, "conditioner.embedders.0.transformer."))
        sd.update(openclip_to_ldm(te2, "conditioner.embedders.1.model."))
        context, pooled = size["hidden_size"] + big["hidden_size"], big["hidden_size"]
    unet = _unet(family, full_size, context, pooled)
    if not full_size:
        # Default init leaves conv_out at zero scale-ish; widen the weights so outputs differ visibly.
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    sd.update(unet_to_ldm(unet))
    sd.update(vae_to_ldm(_vae(full_size)))
    return sd


def write_checkpoint(path: Path, family: str, full_size: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a checkpoint; `.safetensors` or a torch zip pickle (`.ckpt`) by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = make_state_dict(family, full_size, seed)
    sd = {k: full.pop(k).to(dtype).contiguous() for k in list(full)}  # cast one at a time: a full SDXL is 14 GB in float32
    if path.suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    return path


def write_transformer_family(path: Path, family: str, seed: int = 0, fp8: bool = False,
                             gguf: str | None = None) -> Path:
    """An SD3 or Flux file at `path` with its parts beside it (see the module docstring); with `fp8`
    the transformer's 2-D weights in float8_e4m3fn, with `gguf` the transformer alone as GGUF in
    that block type (bare keys, as city96's files)."""
    from safetensors.torch import load_file

    from webui.testing.make_flux import write_flux, write_gguf
    from webui.testing.make_sd3 import write_sd3

    path = Path(path)
    models = path.parent.parent
    written = path.with_suffix(".safetensors")
    if family.startswith("flux"):
        write_flux(models, name=written.stem, seed=seed, guidance=family == "flux")
        (models / "Stable-diffusion" / written.name).replace(written)  # OUT may be in another folder
    else:
        write_sd3(written, seed=seed, text_encoder_dir=models / "text_encoder" if family == "sd3-split" else None)
    if gguf:
        sd = load_file(str(written))
        written.unlink()
        transformer = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()
                       if not k.startswith(("first_stage_model.", "text_encoders."))}
        if any(k.startswith("first_stage_model.") for k in sd):  # the VAE goes beside it, as users keep it
            (models / "VAE").mkdir(parents=True, exist_ok=True)
            save_file({k.removeprefix("first_stage_model."): v for k, v in sd.items()
                       if k.startswith("first_stage_model.")}, str(models / "VAE" / f"{family[:3]}_vae.safetensors"))
        return write_gguf(path.with_suffix(".gguf"), transformer, qtype=gguf)
    if fp8:
        sd = load_file(str(written))
        save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and not k.startswith(("first_stage_model.",
                   "text_encoders.")) else v for k, v in sd.items()}, str(written))
    return written


def write_control_family(path: Path, family: str, seed: int = 0) -> Path:
    """A ControlNet (original layout, steering), T2I-Adapter (TencentARC's layout) or IP-Adapter (h94's,
    with a tiny CLIP vision model in `../clip_vision/`) fitting the tiny checkpoints of its family."""
    from webui.testing import make_controlnet as control

    base = "sdxl" if family.endswith("sdxl") else "sd1"
    text = TINY_TEXT["hidden_size"]
    torch.manual_seed(seed)
    if base == "sdxl":  # the contexts make_state_dict's tiny SDXL gives its UNet
        unet = _unet(base, False, text + TINY_BIGG_WIDTH, TINY_BIGG_WIDTH)
    else:
        unet = _unet(base, False, text)
    if family.startswith("controlnet"):
        return control.write_controlnet(path, unet, strength=0.5, seed=seed)
    if family == "t2i-adapter-sd1":
        return control.write_adapter(path, unet, seed=seed)
    vision = path.parent.parent / "clip_vision" / "CLIP-ViT-H-14.safetensors"
    vision.parent.mkdir(parents=True, exist_ok=True)
    save_file(control.make_clip_vision(projection=24, seed=seed), str(vision))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(control.make_ip_adapter(unet, image_embed_dim=24, seed=seed), str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m webui.testing.make_checkpoint", description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=(*FAMILIES, "sdxl-vpred-ztsnr", *TRANSFORMER_FAMILIES, *CONTROL_FAMILIES),
                    default="sd1")
    ap.add_argument("--fp8", action="store_true", help="sd3/flux: the transformer's weights in float8_e4m3fn")
    ap.add_argument("--gguf", metavar="QTYPE", help="sd3/flux: the transformer alone as GGUF (Q8_0, Q4_0, ...)")
    ap.add_argument("--full-size", action="store_true",
                    help="full-size architecture (sd1: SD1.5, sdxl: SDXL base, sdxl-refiner: SDXL refiner), not a tiny model")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    if a.family in TRANSFORMER_FAMILIES:
        print(write_transformer_family(a.out, a.family, a.seed, a.fp8, a.gguf))
        return 0
    if a.family in CONTROL_FAMILIES:
        print(write_control_family(a.out, a.family, a.seed))
        return 0
    family = "sdxl" if a.family == "sdxl-vpred-ztsnr" else a.family
    write_checkpoint(a.out, family, a.full_size, getattr(torch, a.dtype), a.seed)
    if a.family == "sdxl-vpred-ztsnr":  # the marker keys NoobAI-XL v-pred and the like carry
        from safetensors.torch import load_file

        save_file({**load_file(str(a.out)), "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, str(a.out))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
