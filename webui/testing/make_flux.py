"""Write random-weight Flux.1 files as users download them:

    python -m webui.testing.make_flux MODELS_DIR [--schnell] [--name flux1-dev]

MODELS_DIR/Stable-diffusion/<name>.safetensors holds the transformer alone in Black Forest Labs'
key layout (`double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1.weight`, ...), the VAE
goes to MODELS_DIR/VAE/ae.safetensors (16 latent channels, no quant convs) and CLIP-L and T5 to
MODELS_DIR/text_encoder/{clip_l,t5xxl_fp16}.safetensors. The modules are built with diffusers /
transformers at tiny widths (one 128-wide head: Flux's rotary embedding splits 128 channels) and
mapped back to the original names, so loading goes through the same conversion as a real file.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from webui.testing.make_checkpoint import vae_to_ldm
from webui.testing.make_sd3 import T5_VOCAB, _swap_halves, jitter, tiny_vae16


@dataclass
class FluxParts:
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    clip_l: CLIPTextModel
    t5: T5EncoderModel


def tiny_parts(seed: int = 0, guidance: bool = True) -> FluxParts:
    """dev (`guidance`: the distilled guidance embedder) or schnell (none)."""
    torch.manual_seed(seed)
    clip_l = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=1, projection_dim=32))
    t5 = T5EncoderModel(T5Config(vocab_size=T5_VOCAB, d_model=48, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                 dropout_rate=0.0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                         attention_head_dim=128, num_attention_heads=1, joint_attention_dim=48,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(16, 56, 56))
    jitter(transformer)
    return FluxParts(transformer.eval(), tiny_vae16(scaling_factor=0.3611, shift_factor=0.1159).eval(), clip_l.eval(),
                     t5.eval())


def flux_to_original(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel keys -> Black Forest Labs' (the inverse of diffusers'
    convert_flux_transformer_checkpoint_to_diffusers)."""
    sd = transformer.state_dict()
    out: dict[str, torch.Tensor] = {}

    def pair(ours: str, theirs: str) -> None:
        for kind in ("weight", "bias"):
            if f"{theirs}.{kind}" in sd:
                out[f"{ours}.{kind}"] = sd[f"{theirs}.{kind}"]

    for ours, theirs in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        pair(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        pair(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")
    pair("txt_in", "context_embedder")
    pair("img_in", "x_embedder")
    for i in range(transformer.config.num_layers):
        o, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        pair(o + "img_mod.lin", b + "norm1.linear")
        pair(o + "txt_mod.lin", b + "norm1_context.linear")
        for kind in ("weight", "bias"):
            out[f"{o}img_attn.qkv.{kind}"] = torch.cat([sd[f"{b}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{o}txt_attn.qkv.{kind}"] = torch.cat([sd[f"{b}attn.add_{x}_proj.{kind}"] for x in "qkv"])
        for ours, theirs in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                             ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                             ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[f"{o}{ours}.scale"] = sd[f"{b}{theirs}.weight"]
        pair(o + "img_mlp.0", b + "ff.net.0.proj")
        pair(o + "img_mlp.2", b + "ff.net.2")
        pair(o + "txt_mlp.0", b + "ff_context.net.0.proj")
        pair(o + "txt_mlp.2", b + "ff_context.net.2")
        pair(o + "img_attn.proj", b + "attn.to_out.0")
        pair(o + "txt_attn.proj", b + "attn.to_add_out")
    for i in range(transformer.config.num_single_layers):
        o, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        pair(o + "modulation.lin", b + "norm.linear")
        for kind in ("weight", "bias"):
            out[f"{o}linear1.{kind}"] = torch.cat([sd[f"{b}attn.to_{x}.{kind}"] for x in "qkv"] + [sd[f"{b}proj_mlp.{kind}"]])
        out[f"{o}norm.query_norm.scale"] = sd[f"{b}attn.norm_q.weight"]
        out[f"{o}norm.key_norm.scale"] = sd[f"{b}attn.norm_k.weight"]
        pair(o + "linear2", b + "proj_out")
    pair("final_layer.linear", "proj_out")
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd[f"norm_out.linear.{kind}"])
    return out


def write_flux(models_dir: Path, name: str = "flux1-dev", seed: int = 0, guidance: bool = True,
               prefixed: bool = False) -> FluxParts:
    """The transformer (bare BFL keys, or under `model.diffusion_model.` with `prefixed`), ae,
    clip_l and t5xxl_fp16 in `models_dir`; returns the modules they were made from."""
    parts = tiny_parts(seed, guidance)
    transformer = flux_to_original(parts.transformer)
    if prefixed:
        transformer = {"model.diffusion_model." + k: v for k, v in transformer.items()}
    files = {
        models_dir / "Stable-diffusion" / f"{name}.safetensors": transformer,
        models_dir / "VAE" / "ae.safetensors": {k.removeprefix("first_stage_model."): v
                                                for k, v in vae_to_ldm(parts.vae).items()},
        models_dir / "text_encoder" / "clip_l.safetensors": {k: v for k, v in parts.clip_l.state_dict().items()
                                                            if "position_ids" not in k},
        models_dir / "text_encoder" / "t5xxl_fp16.safetensors": {k: v for k, v in parts.t5.state_dict().items()
                                                                 if k != "encoder.embed_tokens.weight"},
    }
    for path, tensors in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return parts


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], qtype: str = "Q8_0") -> Path:
    """`tensors` as a GGUF file the way city96's quantised transformers are made: 2-D weights whose
    rows fill whole blocks in `qtype`, the rest (biases, norms, narrow layers) in float32."""
    import gguf  # optional dependency: the gguf extra (and the test extra)

    quant = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[quant][0]
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, tensor in tensors.items():
        values = tensor.float().numpy()
        if values.ndim == 2 and values.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(values, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models_dir", type=Path)
    ap.add_argument("--schnell", action="store_true", help="no guidance embedder (Flux.1 schnell)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    name = args.name or ("flux1-schnell" if args.schnell else "flux1-dev")
    write_flux(args.models_dir, name=name, seed=args.seed, guidance=not args.schnell)
    print(args.models_dir / "Stable-diffusion" / f"{name}.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
