"""LoRA layer names for the transformer families (SD3's MMDiT, Flux), as the files name them.

Trainers name the layers in the original layouts (kohya / sd-scripts and ai-toolkit's ComfyUI
form: `lora_unet_double_blocks_0_img_attn_qkv`, `diffusion_model.single_blocks.3.linear1`,
`lora_unet_joint_blocks_0_x_block_attn_qkv`) or in diffusers' (`transformer.transformer_blocks.0.
attn.to_q`). diffusers splits some original layers: one `qkv` is `to_q`, `to_k`, `to_v`, and a
Flux single block's `linear1` is those three and `proj_mlp`. `transformer_table` maps each flat
name to the module it patches, or, for a split layer, to the modules and the rows of the original
layer's output each one holds (a LoRA's delta for it is split along the same rows).
"""

from __future__ import annotations

from torch import nn

from webui.networks.lora_names import PATCHABLE, flat

Target = str | list[tuple[str, int, int]]  # a module path, or (module path, first row, end row) per part


def transformer_table(denoiser: nn.Module) -> dict[str, Target]:
    """flat alias -> target for every patchable module of an MMDiT / Flux denoiser (the wrapper
    from webui.models.mmdit, whose `transformer` is diffusers' model)."""
    transformer = denoiser.transformer
    table: dict[str, Target] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, PATCHABLE):
            table[flat(name)] = "transformer." + name
    config = transformer.config
    if hasattr(config, "num_single_layers"):
        table.update(_flux(config))
    else:
        table.update(_sd3(config))
    return table


def _split(names: list[str], widths: list[int]) -> list[tuple[str, int, int]]:
    out, start = [], 0
    for name, width in zip(names, widths):
        out.append(("transformer." + name, start, start + width))
        start += width
    return out


def _flux(config) -> dict[str, Target]:
    width = config.num_attention_heads * config.attention_head_dim
    mlp = 4 * width  # Flux's MLP ratio
    table: dict[str, Target] = {}

    def one(original: str, ours: str) -> None:
        table[flat(original)] = "transformer." + ours

    for i in range(config.num_layers):
        o, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        table[flat(o + "img_attn.qkv")] = _split([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"], [width] * 3)
        table[flat(o + "txt_attn.qkv")] = _split([b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"],
                                                 [width] * 3)
        for original, ours in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                               ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                               ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                               ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear")):
            one(o + original, b + ours)
    for i in range(config.num_single_layers):
        o, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        table[flat(o + "linear1")] = _split([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"],
                                            [width, width, width, mlp])
        one(o + "linear2", b + "proj_out")
        one(o + "modulation.lin", b + "norm.linear")
    for original, ours in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                           ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                           ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                           ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                           ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                           ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                           ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
                           ("final_layer.linear", "proj_out")):
        one(original, ours)
    return table


def _sd3(config) -> dict[str, Target]:
    width = config.num_attention_heads * config.attention_head_dim
    table: dict[str, Target] = {}
    for i in range(config.num_layers):
        o, b = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = i == config.num_layers - 1
        table[flat(o + "x_block.attn.qkv")] = _split([b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"], [width] * 3)
        table[flat(o + "context_block.attn.qkv")] = _split(
            [b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"], [width] * 3)
        pairs = [("x_block.attn.proj", "attn.to_out.0"), ("x_block.mlp.fc1", "ff.net.0.proj"),
                 ("x_block.mlp.fc2", "ff.net.2"), ("x_block.adaLN_modulation.1", "norm1.linear")]
        if i in tuple(config.dual_attention_layers or ()):
            table[flat(o + "x_block.attn2.qkv")] = _split([b + "attn2.to_q", b + "attn2.to_k", b + "attn2.to_v"],
                                                         [width] * 3)
            pairs.append(("x_block.attn2.proj", "attn2.to_out.0"))
        if not last:  # the last block's context side ends after its attention
            pairs += [("context_block.attn.proj", "attn.to_add_out"), ("context_block.mlp.fc1", "ff_context.net.0.proj"),
                      ("context_block.mlp.fc2", "ff_context.net.2"),
                      ("context_block.adaLN_modulation.1", "norm1_context.linear")]
        for original, ours in pairs:
            table[flat(o + original)] = "transformer." + b + ours
    return table
