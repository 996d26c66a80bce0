"""Flux.1 (#19) as users have it: the transformer alone in Black Forest Labs' layout (or under
`model.diffusion_model.`), `ae.safetensors` in models/VAE, CLIP-L and T5 in models/text_encoder.
Generation equals diffusers' FluxPipeline on the same weights, noise and sigmas (dev with its
distilled guidance and size-dependent shift, with and without real CFG; schnell), the full-size
layouts are read from their shapes, float8 files load, and what is missing is named."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from webui.app import Engine, build_engine
from webui.config import Config
from webui.infotext import infotext_to_fields, parse_infotext
from webui.models.detect import flux_config_from_shapes
from webui.models.errors import ModelError
from webui.pipeline.request import GenerationRequest
from webui.testing.make_flux import FluxParts, flux_to_original, write_flux

PROMPT = "a red cube on a table"


def req(**kw) -> GenerationRequest:
    base = {"prompt": PROMPT, "negative_prompt": "", "steps": 4, "width": 64, "height": 64, "seed": 7,
            "sampler_name": "Euler", "cfg_scale": 1.0, "save_images": False}
    return GenerationRequest(**(base | kw))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.int16)


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FluxParts, FluxParts]:
    root = tmp_path_factory.mktemp("flux")
    dev = write_flux(root / "models", name="flux1-dev", seed=1)
    # schnell's encoders and VAE overwrite dev's: both files then use schnell's, which the reference gets too
    schnell = write_flux(root / "models", name="flux1-schnell", seed=2, guidance=False)
    dev.clip_l, dev.t5, dev.vae = schnell.clip_l, schnell.t5, schnell.vae
    return root, dev, schnell


@pytest.fixture(scope="module")
def engine(flux) -> Engine:
    return build_engine(Config(data_dir=flux[0], dtype="float32"))


def _diffusers(engine: Engine, parts: FluxParts, name: str, *, guidance: float | None, cfg: float = 1.0,
               negative: str = "") -> np.ndarray:
    """diffusers' FluxPipeline over the modules the files were written from, with our tokenizers,
    the noise our seed gives (packed as diffusers packs it) and the same flow times; dev's shift
    from the image size (diffusers' dynamic shifting), schnell's fixed at 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096) \
        if guidance is not None else FlowMatchEulerDiscreteScheduler(shift=1.0)
    te = engine.bundle(name).text_encoders
    pipe = FluxPipeline(transformer=parts.transformer, vae=parts.vae, text_encoder=parts.clip_l,
                        tokenizer=te[0].tokenizer, text_encoder_2=parts.t5, tokenizer_2=te[1].tokenizer,
                        scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    packed = noise.view(1, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 64)
    image = pipe(prompt=PROMPT, negative_prompt=negative or None, true_cfg_scale=cfg, num_inference_steps=4,
                 guidance_scale=guidance if guidance is not None else 0.0, latents=packed, height=64, width=64,
                 sigmas=list(np.linspace(1.0, 1 / 4, 4)), output_type="np", max_sequence_length=512).images[0]
    return np.round(image * 255).astype(np.int16)


@pytest.mark.parametrize("cfg,negative", [(1.0, ""), (2.5, "blurry, dark")])
def test_dev_equals_diffusers_flux_pipeline(engine: Engine, flux, cfg: float, negative: str) -> None:
    """Distilled guidance 3.5 as the model's input; with CFG above 1 a negative pass as well
    (diffusers' true_cfg_scale)."""
    result = engine.runner.generate(req(checkpoint="flux1-dev", cfg_scale=cfg, negative_prompt=negative))
    ours, theirs = pixels(result), _diffusers(engine, flux[1], "flux1-dev", guidance=3.5, cfg=cfg, negative=negative)
    diff = np.abs(ours - theirs)
    assert ours.std() > 5
    assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())
    fields = parse_infotext(result.infotexts[0])
    assert fields["Distilled CFG Scale"] == "3.5" and "Shift" not in fields  # the shift follows the size
    # the parts from files of their own, VAE first, as Forge writes them; PNG Info chooses them again
    assert (fields["VAE"], fields["Module 1"], fields["Module 2"], fields["Module 3"]) == \
        ("ae", "ae", "clip_l", "t5xxl_fp16")
    assert infotext_to_fields(fields)["distilled_cfg_scale"] == 3.5
    assert infotext_to_fields(fields)["modules"] == ("ae", "clip_l", "t5xxl_fp16")


def test_schnell_equals_diffusers_flux_pipeline(engine: Engine, flux) -> None:
    result = engine.runner.generate(req(checkpoint="flux1-schnell"))
    diff = np.abs(pixels(result) - _diffusers(engine, flux[2], "flux1-schnell", guidance=None))
    assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())
    fields = parse_infotext(result.infotexts[0])
    assert fields["Shift"] == "1.0" and "Distilled CFG Scale" not in fields


def test_distilled_guidance_is_an_input_of_dev(engine: Engine) -> None:
    a, b = (pixels(engine.runner.generate(req(checkpoint="flux1-dev", distilled_cfg_scale=g))) for g in (3.5, 1.0))
    assert np.abs(a - b).mean() > 1


def test_prefixed_and_float8_files_load(flux, tmp_path: Path) -> None:
    """The same transformer under `model.diffusion_model.`, or as Black Forest Labs' first `.sft`
    files (with `ae.sft`), gives the same picture. Stored in
    float8_e4m3fn (as most Flux downloads are), with --fp8-weights packed its linear weights stay
    float8 in memory and are computed in the runtime's dtype: the picture is the one of those
    float8 values upcast to float32 in the file, and close to the original's."""
    root = flux[0]
    original = load_file(str(root / "models" / "Stable-diffusion" / "flux1-dev.safetensors"))
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    save_file({"model.diffusion_model." + k: v for k, v in original.items()}, str(folder / "prefixed.safetensors"))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in original.items()}
    save_file(fp8, str(folder / "fp8.safetensors"))
    save_file({k: v.float() for k, v in fp8.items()}, str(folder / "fp8-upcast.safetensors"))
    (folder / "bfl.sft").symlink_to(root / "models" / "Stable-diffusion" / "flux1-dev.safetensors")  # BFL's .sft
    (tmp_path / "models" / "VAE").mkdir()
    (tmp_path / "models" / "VAE" / "ae.sft").symlink_to(root / "models" / "VAE" / "ae.safetensors")
    (tmp_path / "models" / "text_encoder").symlink_to(root / "models" / "text_encoder")
    engine = build_engine(Config(data_dir=tmp_path, dtype="float32", fp8_weights="packed"))
    reference = pixels(build_engine(Config(data_dir=root, dtype="float32")).runner.generate(req(checkpoint="flux1-dev")))
    assert np.array_equal(pixels(engine.runner.generate(req(checkpoint="prefixed"))), reference)
    assert np.array_equal(pixels(engine.runner.generate(req(checkpoint="bfl"))), reference)  # bfl.sft with ae.sft
    packed = pixels(engine.runner.generate(req(checkpoint="fp8")))
    transformer = engine.bundle("fp8").unet.transformer
    assert transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert transformer.transformer_blocks[0].attn.to_q.bias.dtype == torch.float32
    upcast = pixels(engine.runner.generate(req(checkpoint="fp8-upcast")))
    assert np.array_equal(packed, upcast)
    assert 0 < np.abs(packed - reference).mean() < 12, np.abs(packed - reference).mean()
    # the default on the CPU: upcast when loaded (float8 casts are slow there), the same picture
    default = build_engine(Config(data_dir=tmp_path, dtype="float32"))
    assert default.bundle("fp8").unet.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32
    assert np.array_equal(pixels(default.runner.generate(req(checkpoint="fp8"))), upcast)


def test_a_gguf_quantised_transformer_loads(flux, tmp_path: Path) -> None:
    """The transformer as a Q8_0 GGUF file (city96's format): listed, dequantised when read, and
    close to the float32 picture; a file that is not GGUF is refused with a reason."""
    from webui.testing.make_flux import write_gguf

    root = flux[0]
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    write_gguf(folder / "flux1-dev-Q8_0.gguf", load_file(str(root / "models" / "Stable-diffusion" / "flux1-dev.safetensors")))
    (folder / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 12)
    for sub in ("VAE", "text_encoder"):
        (tmp_path / "models" / sub).symlink_to(root / "models" / sub)
    engine = build_engine(Config(data_dir=tmp_path, dtype="float32"))
    assert "flux1-dev-Q8_0.gguf" in [c.name for c in engine.registry.checkpoints()]
    reference = pixels(build_engine(Config(data_dir=root, dtype="float32")).runner.generate(req(checkpoint="flux1-dev")))
    quantised = pixels(engine.runner.generate(req(checkpoint="flux1-dev-Q8_0")))
    assert 0 < np.abs(quantised - reference).mean() < 6, np.abs(quantised - reference).mean()
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        engine.bundle("broken")



# where a block's float16 scales lie (K-quants: gguf cannot write them, so the blocks are random bytes)
K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_blocks_are_dequantised_exactly_as_gguf_does(qtype: str) -> None:
    import gguf

    from webui.runtime.gguf import BLOCK_BYTES, QuantizedTensor, dequantize

    rng = np.random.default_rng(1)
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype in K_SCALES:
        blocks = rng.integers(0, 256, size=(6 * 2, BLOCK_BYTES[qtype]), dtype=np.uint8)
        for at in K_SCALES[qtype]:
            blocks[:, at:at + 2] = rng.uniform(-0.1, 0.1, (len(blocks), 1)).astype(np.float16).view(np.uint8)
        blocks = blocks.reshape(6, -1)
    else:
        blocks = gguf.quants.quantize(rng.standard_normal((6, 512)).astype(np.float32) * 3, kind)
    expected = gguf.quants.dequantize(blocks, kind)
    assert expected.shape == (6, 512)
    assert np.array_equal(dequantize(torch.from_numpy(blocks), qtype).numpy(), expected)
    # cut and joined by rows, as the layout converter does with fused layers, it stays quantised
    t = QuantizedTensor.wrap(torch.from_numpy(blocks), qtype, 512)
    first, second = t.chunk(2, dim=0)
    swapped = torch.cat([second, first], dim=0)
    assert isinstance(swapped, QuantizedTensor) and tuple(swapped.shape) == (6, 512)
    assert np.array_equal(swapped.dequantized().numpy(), np.concatenate([expected[3:], expected[:3]]))
    assert np.array_equal((t * 2).numpy(), expected * 2)  # any other use sees the values


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_a_gguf_transformer_stays_quantised_in_memory(flux, tmp_path: Path, qtype: str) -> None:
    """With --fp8-weights packed (the default on a GPU) the linear layers keep the file's blocks and
    dequantise them as they run: the same picture as dequantising when reading, the memory of the
    blocks (under 0.6x of bfloat16 for Q8_0), and LoRAs applied to them for the job only."""
    from webui.runtime.gguf import is_quantized
    from webui.testing.make_flux import write_gguf

    root = flux[0]
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    original = load_file(str(root / "models" / "Stable-diffusion" / "flux1-dev.safetensors"))
    write_gguf(folder / f"flux1-dev-{qtype}.gguf", original, qtype=qtype)
    for sub in ("VAE", "text_encoder"):
        (tmp_path / "models" / sub).symlink_to(root / "models" / sub)
    gen = torch.Generator().manual_seed(4)
    lora = {}
    for layer, rows, columns in (("double_blocks_0_img_attn_qkv", 3 * 128, 128),
                                 ("single_blocks_1_linear1", 7 * 128, 128)):
        down, up = _lora_pair(gen, rows, columns)
        lora |= {f"lora_unet_{layer}.lora_down.weight": down, f"lora_unet_{layer}.lora_up.weight": up,
                 f"lora_unet_{layer}.alpha": torch.tensor(4.0)}
    (tmp_path / "models" / "Lora").mkdir()
    save_file(lora, str(tmp_path / "models" / "Lora" / "gguf-test.safetensors"))
    upcast = build_engine(Config(data_dir=tmp_path, dtype="float32", fp8_weights="upcast"))
    packed = build_engine(Config(data_dir=tmp_path, dtype="float32", fp8_weights="packed"))
    name = f"flux1-dev-{qtype}"
    layers = [m for m in packed.bundle(name).unet.modules() if is_quantized(m)]
    assert len(layers) > 20 and not any(is_quantized(m) for m in upcast.bundle(name).unet.modules())
    if qtype == "Q8_0":
        stored = sum(m.qweight.numel() for m in layers)
        as_bf16 = sum(2 * m.in_features * m.out_features for m in layers)
        assert stored < 0.6 * as_bf16, (stored, as_bf16)
    a, b = (pixels(e.runner.generate(req(checkpoint=name))) for e in (upcast, packed))
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max()
    prompt = f"{PROMPT} <lora:gguf-test:0.8>"
    with_lora = [pixels(e.runner.generate(req(checkpoint=name, prompt=prompt))) for e in (upcast, packed)]
    assert np.abs(with_lora[0] - a).mean() > 1 and np.abs(with_lora[0] - with_lora[1]).max() <= 2
    assert np.array_equal(pixels(packed.runner.generate(req(checkpoint=name))), b)  # the LoRA is gone again

@pytest.mark.parametrize("name,config", [
    ("flux1-dev", {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24, "guidance_embeds": True}),
    ("flux1-schnell", {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24, "guidance_embeds": False}),
])
def test_full_size_layouts_are_read_from_their_shapes(name: str, config: dict) -> None:
    from diffusers import FluxTransformer2DModel

    full = {"patch_size": 1, "in_channels": 64, "attention_head_dim": 128, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56), **config}
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**full)
    found = flux_config_from_shapes({"model.diffusion_model." + k: v for k, v in flux_to_original(transformer).items()},
                                    None)
    assert {k: found[k] for k in full} == full


def test_what_is_missing_is_named(flux, tmp_path: Path) -> None:
    root = flux[0]
    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    (tmp_path / "models" / "Stable-diffusion" / "flux1-dev.safetensors").symlink_to(
        root / "models" / "Stable-diffusion" / "flux1-dev.safetensors")
    engine = build_engine(Config(data_dir=tmp_path, dtype="float32"))
    with pytest.raises(ModelError, match=r"Flux.1 checkpoint has no text encoders in it: put clip_l.safetensors and "
                                         r"t5xxl_fp16.safetensors in .*text_encoder"):
        engine.bundle(None)
    (tmp_path / "models" / "text_encoder").symlink_to(root / "models" / "text_encoder")
    with pytest.raises(ModelError, match=r"no VAE; put one in models/VAE/ \(Flux's is ae.safetensors\)"):
        build_engine(Config(data_dir=tmp_path, dtype="float32")).bundle(None)


def test_sizes_flux_cannot_take_and_samplers_it_cannot_use(engine: Engine) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        engine.runner.generate(req(checkpoint="flux1-dev", width=72))
    with pytest.raises(ValueError, match="does not work with Flux.1 models"):
        engine.runner.generate(req(checkpoint="flux1-dev", sampler_name="DPM++ SDE"))


def test_flux_over_the_api_and_from_the_page(flux) -> None:
    """txt2img with A1111's payload shape and Forge's `distilled_cfg_scale` field; then the page's
    own endpoint (gradio_client) with its Distilled CFG Scale and Shift controls."""
    from gradio_client import Client

    from tests.conftest import start_server, stop_server

    s = start_server(flux[0], "--api")
    try:
        body = {"prompt": PROMPT, "negative_prompt": None, "steps": 3, "width": 64, "height": 64, "seed": 3,
                "cfg_scale": 1, "distilled_cfg_scale": 2.5, "sd_model_checkpoint": None,
                "override_settings": {"sd_model_checkpoint": "flux1-dev"}}
        answer = requests.post(s.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        assert image.size == (64, 64) and np.asarray(image).std() > 5
        assert "Distilled CFG Scale: 2.5" in answer.json()["info"]
        bad = requests.post(s.url + "/sdapi/v1/txt2img", json=body | {"width": 72}, timeout=60)
        assert 400 <= bad.status_code < 500 and "multiples of 16" in bad.text
        gallery, _ = Client(s.url, verbose=False).predict(
            checkpoint="flux1-dev.safetensors", prompt=PROMPT, steps=2, width=64, height=64, cfg_scale=1, seed=5,
            distilled_cfg_scale=5, shift=2.0, api_name="/txt2img")
        fields = parse_infotext(Image.open(gallery[0]["image"]).info["parameters"])
        assert (fields["Distilled CFG Scale"], fields["Shift"], fields["Model"]) == ("5.0", "2.0", "flux1-dev")
    finally:
        stop_server(s)


def _lora_pair(gen: torch.Generator, out: int, inp: int, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, inp, generator=gen) * 0.3, torch.randn(out, rank, generator=gen) * 0.3


def test_loras_in_kohya_comfy_and_diffusers_names(flux, tmp_path: Path) -> None:
    """One LoRA written three ways: kohya's (fused qkv and linear1 as the original layers), the
    ComfyUI/ai-toolkit form (`diffusion_model.` + original names) and diffusers' (`transformer.`,
    the parts split): the same picture from each, another without, and the weights restored."""
    root = flux[0]
    gen = torch.Generator().manual_seed(3)
    w = 128  # the tiny transformer's width
    qkv, linear1, mlp2, clip_q = (_lora_pair(gen, 3 * w, w), _lora_pair(gen, 3 * w + 4 * w, w),
                                  _lora_pair(gen, w, 4 * w), _lora_pair(gen, 32, 32))
    kohya = {}
    for name, (down, up) in (("lora_unet_double_blocks_0_img_attn_qkv", qkv), ("lora_unet_single_blocks_1_linear1", linear1),
                             ("lora_unet_double_blocks_0_img_mlp_2", mlp2),
                             ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", clip_q)):
        kohya |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)}
    comfy = {}
    for name, (down, up) in (("diffusion_model.double_blocks.0.img_attn.qkv", qkv),
                             ("diffusion_model.single_blocks.1.linear1", linear1),
                             ("diffusion_model.double_blocks.0.img_mlp.2", mlp2),
                             ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", clip_q)):
        comfy |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    peft = {}
    parts = [("transformer_blocks.0.attn.to_q", qkv, 0), ("transformer_blocks.0.attn.to_k", qkv, 1),
             ("transformer_blocks.0.attn.to_v", qkv, 2), ("single_transformer_blocks.1.attn.to_q", linear1, 0),
             ("single_transformer_blocks.1.attn.to_k", linear1, 1), ("single_transformer_blocks.1.attn.to_v", linear1, 2)]
    for name, (down, up), i in parts:
        peft |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up[i * w:(i + 1) * w]}
    peft |= {"transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight": linear1[0],
             "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight": linear1[1][3 * w:],
             "transformer.transformer_blocks.0.ff.net.2.lora_A.weight": mlp2[0],
             "transformer.transformer_blocks.0.ff.net.2.lora_B.weight": mlp2[1],
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": clip_q[0],
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": clip_q[1]}
    loras = root / "models" / "Lora"
    loras.mkdir(exist_ok=True)
    for name, tensors in (("kohya", kohya), ("comfy", comfy), ("peft", peft)):
        save_file({k: v.clone() for k, v in tensors.items()}, str(loras / f"flux-{name}.safetensors"))
    engine = build_engine(Config(data_dir=root, dtype="float32"))
    plain = pixels(engine.runner.generate(req(checkpoint="flux1-dev")))
    results = {name: engine.runner.generate(req(checkpoint="flux1-dev", prompt=f"{PROMPT} <lora:flux-{name}:0.8>"))
               for name in ("kohya", "comfy", "peft")}
    images = {name: pixels(r) for name, r in results.items()}
    assert np.abs(images["kohya"] - plain).mean() > 1
    assert np.abs(images["kohya"] - images["peft"]).max() <= 1 and np.abs(images["comfy"] - images["peft"]).max() <= 1
    assert "Lora hashes" in parse_infotext(results["kohya"].infotexts[0])
    assert np.array_equal(pixels(engine.runner.generate(req(checkpoint="flux1-dev"))), plain)  # weights restored


def test_a_t5_lora_is_the_second_text_encoders(flux) -> None:
    """Flux's text encoders are CLIP-L then T5: kohya's `lora_te2_*` and diffusers' `text_encoder_2.*`
    reach T5, the same picture from each."""
    root = flux[0]
    engine = build_engine(Config(data_dir=root, dtype="float32"))
    q = engine.bundle("flux1-dev").text_encoders[1].model.encoder.block[0].layer[0].SelfAttention.q
    gen = torch.Generator().manual_seed(8)
    down, up = torch.randn(4, q.in_features, generator=gen), torch.randn(q.out_features, 4, generator=gen)
    name = "encoder_block_0_layer_0_SelfAttention_q"
    files = {"flux-t5-kohya": {f"lora_te2_{name}.lora_down.weight": down, f"lora_te2_{name}.lora_up.weight": up,
                               f"lora_te2_{name}.alpha": torch.tensor(4.0)},
             "flux-t5-peft": {"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": down.clone(),
                              "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": up.clone()}}
    (root / "models" / "Lora").mkdir(exist_ok=True)
    for file, tensors in files.items():
        save_file(tensors, str(root / "models" / "Lora" / f"{file}.safetensors"))
    engine.networks.refresh()
    plain, a, b = (pixels(engine.runner.generate(req(checkpoint="flux1-dev", prompt=PROMPT + tag)))
                   for tag in ("", " <lora:flux-t5-kohya:1>", " <lora:flux-t5-peft:1>"))
    assert np.abs(a - plain).mean() > 1 and np.abs(a - b).max() <= 1
