"""Write random-weight SD3 / SD3.5 checkpoints in the single-file layout Stability ships.

    python -m webui.testing.make_sd3 OUT.safetensors [--no-t5] [--sd35]

The modules are built with diffusers / transformers (tiny widths; `full_config` gives the real
architectures for checks on the meta device) and their keys mapped back to the original names:
the MMDiT under `model.diffusion_model.`, CLIP-L, CLIP-G and T5-XXL under
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.` (HF layout), the 16-channel VAE under
`first_stage_model.`. Loading such a file goes through the same conversion as a downloaded one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from webui.testing.make_checkpoint import vae_to_ldm

T5_VOCAB = 32128  # T5 v1.1's embedding rows (the shipped tokenizer's ids all fall below)


@dataclass
class SD3Parts:
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    clip_l: CLIPTextModelWithProjection
    clip_g: CLIPTextModelWithProjection
    t5: T5EncoderModel | None


# SD3.5 Medium (stabilityai/stable-diffusion-3.5-medium) and Large, as diffusers configures them
FULL_CONFIGS = {
    "sd3.5-medium": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
                         "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
                         "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
                         "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"},
    "sd3.5-large": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
                        "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
                        "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    "sd3-medium": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
                       "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
                       "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192},
}


def tiny_parts(seed: int = 0, t5: bool = True, sd35: bool = True) -> SD3Parts:
    """Tiny SD3(.5) modules: one 64-wide head (the file does not say the head count: 64 per head
    is SD3's), 2 blocks (SD3.5: the first with the second attention and q/k norms)."""
    torch.manual_seed(seed)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=1, projection_dim=32))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", hidden_size=48, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=1, projection_dim=40))
    width = 96
    encoder = None
    if t5:
        encoder = T5EncoderModel(T5Config(vocab_size=T5_VOCAB, d_model=width, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                          feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                          dropout_rate=0.0))
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=1,
        joint_attention_dim=width, caption_projection_dim=64, pooled_projection_dim=32 + 40, out_channels=16,
        pos_embed_max_size=16, dual_attention_layers=(0,) if sd35 else (), qk_norm="rms_norm" if sd35 else None)
    jitter(transformer)
    vae = tiny_vae16(scaling_factor=1.5305, shift_factor=0.0609)
    return SD3Parts(transformer.eval(), vae.eval(), clip_l.eval(), clip_g.eval(), encoder.eval() if encoder else None)


def jitter(transformer: torch.nn.Module, scale: float = 0.05) -> None:
    """Random noise on every weight: the default init zeroes the output layers, and a model whose
    output does not depend on its input would make every comparison pass."""
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * scale)


def tiny_vae16(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A tiny 16-channel VAE without 1x1 convolutions around the latent (SD3's and Flux's layout)."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 32, 32),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor)


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """diffusers keeps adaLN's (scale, shift) where the original keeps (shift, scale): the same swap both ways."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_to_original(transformer: SD3Transformer2DModel) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel keys -> the original MMDiT's (the inverse of diffusers'
    convert_sd3_transformer_checkpoint_to_diffusers)."""
    sd = transformer.state_dict()
    n = transformer.config.num_layers
    out = {
        "pos_embed": sd["pos_embed.pos_embed"],
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "context_embedder.weight": sd["context_embedder.weight"],
        "context_embedder.bias": sd["context_embedder.bias"],
        "final_layer.linear.weight": sd["proj_out.weight"],
        "final_layer.linear.bias": sd["proj_out.bias"],
        "final_layer.adaLN_modulation.1.weight": _swap_halves(sd["norm_out.linear.weight"]),
        "final_layer.adaLN_modulation.1.bias": _swap_halves(sd["norm_out.linear.bias"]),
    }
    for ours, theirs in (("t_embedder", "time_text_embed.timestep_embedder"), ("y_embedder", "time_text_embed.text_embedder")):
        for i, j in ((0, 1), (2, 2)):
            for kind in ("weight", "bias"):
                out[f"{ours}.mlp.{i}.{kind}"] = sd[f"{theirs}.linear_{j}.{kind}"]
    for i in range(n):
        b, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == n - 1
        for kind in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{kind}"] = torch.cat([sd[f"{b}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{o}context_block.attn.qkv.{kind}"] = torch.cat([sd[f"{b}attn.add_{x}_proj.{kind}"] for x in "qkv"])
            out[f"{o}x_block.attn.proj.{kind}"] = sd[f"{b}attn.to_out.0.{kind}"]
            out[f"{o}x_block.adaLN_modulation.1.{kind}"] = sd[f"{b}norm1.linear.{kind}"]
            context_ada = sd[f"{b}norm1_context.linear.{kind}"]
            out[f"{o}context_block.adaLN_modulation.1.{kind}"] = _swap_halves(context_ada) if last else context_ada
            out[f"{o}x_block.mlp.fc1.{kind}"] = sd[f"{b}ff.net.0.proj.{kind}"]
            out[f"{o}x_block.mlp.fc2.{kind}"] = sd[f"{b}ff.net.2.{kind}"]
            if not last:
                out[f"{o}context_block.attn.proj.{kind}"] = sd[f"{b}attn.to_add_out.{kind}"]
                out[f"{o}context_block.mlp.fc1.{kind}"] = sd[f"{b}ff_context.net.0.proj.{kind}"]
                out[f"{o}context_block.mlp.fc2.{kind}"] = sd[f"{b}ff_context.net.2.{kind}"]
            if f"{b}attn2.to_q.{kind}" in sd:
                out[f"{o}x_block.attn2.qkv.{kind}"] = torch.cat([sd[f"{b}attn2.to_{x}.{kind}"] for x in "qkv"])
                out[f"{o}x_block.attn2.proj.{kind}"] = sd[f"{b}attn2.to_out.0.{kind}"]
        if f"{b}attn.norm_q.weight" in sd:
            for ours, theirs in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                                 ("context_block.attn.ln_q", "attn.norm_added_q"),
                                 ("context_block.attn.ln_k", "attn.norm_added_k"),
                                 ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
                if f"{b}{theirs}.weight" in sd:
                    out[f"{o}{ours}.weight"] = sd[f"{b}{theirs}.weight"]
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def _hf(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in model.state_dict().items() if "position_ids" not in k}


def text_encoder_files(parts: SD3Parts) -> dict[str, dict[str, torch.Tensor]]:
    """The text encoders as the separate files users download: name -> tensors (HF layout)."""
    files = {"clip_l": _hf(parts.clip_l, ""), "clip_g": _hf(parts.clip_g, "")}
    if parts.t5 is not None:
        files["t5xxl_fp16"] = _hf(parts.t5, "")
        files["t5xxl_fp16"].pop("encoder.embed_tokens.weight", None)  # the files keep `shared` only
    return files


def state_dict(parts: SD3Parts, with_text_encoders: bool = True) -> dict[str, torch.Tensor]:
    sd = mmdit_to_original(parts.transformer)
    if with_text_encoders:
        for name, tensors in text_encoder_files(parts).items():
            prefix = f"text_encoders.{name.removesuffix('_fp16')}.transformer."
            sd.update({prefix + k: v for k, v in tensors.items()})
    sd.update(vae_to_ldm(parts.vae))
    return {k: v.contiguous() for k, v in sd.items()}


def write_sd3(path: Path, seed: int = 0, t5: bool = True, sd35: bool = True,
              text_encoder_dir: Path | None = None) -> SD3Parts:
    """Write a tiny SD3(.5) file; returns the modules it was made from (for reference pipelines).
    With `text_encoder_dir` the text encoders go there as clip_l / clip_g / t5xxl_fp16.safetensors
    and the checkpoint holds the MMDiT and the VAE only, as Stability's SD3.5 files do."""
    parts = tiny_parts(seed, t5=t5, sd35=sd35)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(parts, with_text_encoders=text_encoder_dir is None), str(path))
    if text_encoder_dir is not None:
        text_encoder_dir.mkdir(parents=True, exist_ok=True)
        for name, tensors in text_encoder_files(parts).items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(text_encoder_dir / f"{name}.safetensors"))
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--no-t5", action="store_true", help="leave the T5 encoder out, as some SD3 files do")
    ap.add_argument("--sd3", action="store_true", help="SD3 Medium's layout (no second attention, no q/k norms)")
    ap.add_argument("--text-encoder-dir", type=Path, default=None,
                    help="write the text encoders there as separate files (Stability's SD3.5 layout)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write_sd3(args.out, seed=args.seed, t5=not args.no_t5, sd35=not args.sd3, text_encoder_dir=args.text_encoder_dir)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
