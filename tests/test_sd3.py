"""SD3 / SD3.5 single-file checkpoints (#19): detection from keys and shapes (tiny files and the
full-size layouts on the meta device), loading with and without T5, generation equal to diffusers'
StableDiffusion3Pipeline on the same weights, noise and sigmas, the flow schedule and its shift,
img2img, samplers, and the HTTP API."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from webui.app import Engine, build_engine
from webui.config import Config
from webui.infotext import infotext_to_fields, parse_infotext
from webui.models.detect import detect, mmdit_config_from_shapes
from webui.models.errors import ModelError
from webui.pipeline.request import GenerationRequest
from webui.testing.make_sd3 import FULL_CONFIGS, SD3Parts, mmdit_to_original, write_sd3

PROMPT = "a red cube on a table"


def req(**kw) -> GenerationRequest:
    base = {"prompt": PROMPT, "negative_prompt": "", "steps": 4, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler",
                "cfg_scale": 4.0, "save_images": False}
    return GenerationRequest(**(base | kw))


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SD3Parts, SD3Parts]:
    root = tmp_path_factory.mktemp("sd3")
    folder = root / "models" / "Stable-diffusion"
    with_t5 = write_sd3(folder / "sd35.safetensors", seed=1)
    without_t5 = write_sd3(folder / "sd3-no-t5.safetensors", seed=2, t5=False, sd35=False)
    return root, with_t5, without_t5


@pytest.fixture(scope="module")
def engine(sd3_dir) -> Engine:
    return build_engine(Config(data_dir=sd3_dir[0], dtype="float32"))


def _diffusers(engine: Engine, parts: SD3Parts, name: str, steps: int, cfg: float, shift: float = 3.0) -> np.ndarray:
    """diffusers' StableDiffusion3Pipeline over the modules the file was written from (not ours),
    with our tokenizers, the noise our seed gives, and the same flow times (diffusers shifts them).
    Without T5, its zeros are 77 tokens long as in Stability's reference code (diffusers makes
    `max_sequence_length` of them, hence 77 there)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizers = {te.spec.kind + te.spec.prefix: te.tokenizer for te in engine.bundle(name).text_encoders}
    clip_l, clip_g = (tokenizers[f"cliptext_encoders.clip_{k}.transformer."] for k in "lg")
    t5 = tokenizers.get("t5text_encoders.t5xxl.transformer.")
    pipe = StableDiffusion3Pipeline(
        transformer=parts.transformer, vae=parts.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder=parts.clip_l, tokenizer=clip_l, text_encoder_2=parts.clip_g, tokenizer_2=clip_g,
        text_encoder_3=parts.t5, tokenizer_3=t5)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    image = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=cfg, latents=noise,
                 height=64, width=64, sigmas=list(np.linspace(1.0, 1 / steps, steps)), output_type="np",
                 max_sequence_length=256 if parts.t5 is not None else 77).images[0]
    return np.round(image * 255).astype(np.int16)


@pytest.mark.parametrize("name,which", [("sd35", 1), ("sd3-no-t5", 2)])
def test_generation_equals_diffusers_sd3_pipeline(engine: Engine, sd3_dir, name: str, which: int) -> None:
    """With T5 (SD3.5 layout: second attention, q/k norms) and without it (SD3 Medium layout; T5's
    part of the context is zeros), CFG 4, 4 Euler steps on the flow schedule with shift 3."""
    result = engine.runner.generate(req(checkpoint=name))
    ours = np.asarray(result.images[0]).astype(np.int16)
    theirs = _diffusers(engine, sd3_dir[which], name, steps=4, cfg=4.0)
    diff = np.abs(ours - theirs)
    assert ours.std() > 5  # a real picture, not a flat one that would match anything
    assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())
    fields = parse_infotext(result.infotexts[0])
    assert fields["Shift"] == "3.0" and fields["Model"] == name


def test_stabilitys_layout_takes_the_text_encoders_from_their_own_files(tmp_path: Path) -> None:
    """sd3.5_medium.safetensors as Stability ships it (MMDiT and VAE only) with clip_l, clip_g and
    t5xxl_fp16 in models/text_encoder/: the same picture as the all-in-one file of the same weights,
    and the infotext names the files (Forge's `Module n`). Without them: the error says what to put where."""
    write_sd3(tmp_path / "one" / "models" / "Stable-diffusion" / "sd35.safetensors", seed=4)
    write_sd3(tmp_path / "split" / "models" / "Stable-diffusion" / "sd35.safetensors", seed=4,
              text_encoder_dir=tmp_path / "split" / "models" / "text_encoder")
    one, split = (build_engine(Config(data_dir=tmp_path / d, dtype="float32")).runner.generate(req())
                  for d in ("one", "split"))
    assert np.array_equal(np.asarray(one.images[0]), np.asarray(split.images[0]))
    fields = parse_infotext(split.infotexts[0])
    assert [fields.get(f"Module {i}") for i in (1, 2, 3)] == ["clip_l", "clip_g", "t5xxl_fp16"]
    assert "Module 1" not in parse_infotext(one.infotexts[0])

    for name in ("clip_g", "t5xxl_fp16"):
        (tmp_path / "split" / "models" / "text_encoder" / f"{name}.safetensors").unlink()
    with pytest.raises(ModelError, match=r"no text encoders in it: put clip_g.safetensors \(and optionally "
                                         r"t5xxl_fp16.safetensors\) in .*text_encoder"):
        build_engine(Config(data_dir=tmp_path / "split", dtype="float32")).bundle(None)


def test_detection_reads_the_family_and_which_encoders_the_file_has(engine: Engine) -> None:
    with_t5, without = engine.bundle("sd35"), engine.bundle("sd3-no-t5")
    assert with_t5.family.name == without.family.name == "sd3"
    assert with_t5.prediction == "flow"
    assert [te.spec.kind for te in with_t5.text_encoders] == ["clip", "clip", "t5"]
    assert [te.spec.kind for te in without.text_encoders] == ["clip", "clip"]
    config = with_t5.unet.config
    assert (config.num_layers, config.dual_attention_layers, config.qk_norm) == (2, (0,), "rms_norm")
    assert (without.unet.config.dual_attention_layers, without.unet.config.qk_norm) == ((), None)
    assert with_t5.vae.config.latent_channels == 16 and not with_t5.vae.config.use_quant_conv


@pytest.mark.parametrize("name", sorted(FULL_CONFIGS))
def test_full_size_layouts_are_read_from_their_shapes(name: str) -> None:
    """SD3 Medium, SD3.5 Medium and SD3.5 Large built on the meta device, written back to the
    original key names: the config read from the shapes is the one they were built with."""
    from diffusers import SD3Transformer2DModel

    config = FULL_CONFIGS[name]
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config)
    found = mmdit_config_from_shapes(mmdit_to_original(transformer), None)
    for key, value in config.items():
        if key != "sample_size":
            assert found[key] == (tuple(value) if key == "dual_attention_layers" else value), key


def test_a_file_whose_parts_do_not_agree_is_refused(sd3_dir) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(sd3_dir[0] / "models" / "Stable-diffusion" / "sd35.safetensors"))
    sd["model.diffusion_model.y_embedder.mlp.0.weight"] = torch.zeros(64, 50)
    with pytest.raises(ModelError, match="pooled text vectors 50 wide"):
        detect(sd)


def test_shift_bends_the_schedule_and_is_written(engine: Engine) -> None:
    base = engine.runner.generate(req(checkpoint="sd35"))
    shifted = engine.runner.generate(req(checkpoint="sd35", shift=1.0))
    a, b = (np.asarray(r.images[0]).astype(np.int16) for r in (base, shifted))
    assert np.abs(a - b).mean() > 1
    fields = parse_infotext(shifted.infotexts[0])
    assert fields["Shift"] == "1.0"
    assert infotext_to_fields(fields)["shift"] == 1.0  # PNG Info sends it back to the request


def test_euler_a_and_other_samplers(engine: Engine) -> None:
    """Euler a (its flow form) is seeded and varies with the seed; DPM++ 2M and UniPC run; a sampler whose
    noise assumes the SD schedule is refused with the ones that work."""
    a1 = np.asarray(engine.runner.generate(req(checkpoint="sd35", sampler_name="Euler a")).images[0])
    a2 = np.asarray(engine.runner.generate(req(checkpoint="sd35", sampler_name="Euler a")).images[0])
    euler = np.asarray(engine.runner.generate(req(checkpoint="sd35")).images[0])
    assert np.array_equal(a1, a2) and np.abs(a1.astype(int) - euler.astype(int)).mean() > 1
    dpm = engine.runner.generate(req(checkpoint="sd35", sampler_name="DPM++ 2M", scheduler="Karras")).images[0]
    assert np.asarray(dpm).std() > 5
    unipc = engine.runner.generate(req(checkpoint="sd35", sampler_name="UniPC"))
    assert np.asarray(unipc.images[0]).std() > 5 and "Sampler: UniPC" in unipc.infotexts[0]
    with pytest.raises(ValueError, match="does not work with SD 3.x models; choose one of Euler a, Euler"):
        engine.runner.generate(req(checkpoint="sd35", sampler_name="DPM++ 2M SDE"))


def test_img2img_equals_diffusers_sd3_img2img_pipeline(engine: Engine, sd3_dir) -> None:
    """img2img at strength 0.5 (the last 2 of 4 steps, the init latents noised as (1 - s) x0 + s
    noise) equals diffusers' StableDiffusion3Img2ImgPipeline. diffusers samples the VAE's latent
    distribution with the generator where we take its mode (deterministic); its encoder is made to
    return the mode here, so that the generator gives both the same noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline

    rng = np.random.default_rng(0)
    init = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((64, 64), Image.Resampling.BILINEAR)
    ours = np.asarray(engine.runner.generate(req(checkpoint="sd35", init_images=[init], denoising_strength=0.5))
                      .images[0]).astype(np.int16)
    parts = sd3_dir[1]
    encoders = engine.bundle("sd35").text_encoders
    pipe = StableDiffusion3Img2ImgPipeline(
        transformer=parts.transformer, vae=parts.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=parts.clip_l, tokenizer=encoders[0].tokenizer, text_encoder_2=parts.clip_g,
        tokenizer_2=encoders[1].tokenizer, text_encoder_3=parts.t5, tokenizer_3=encoders[2].tokenizer)
    pipe.set_progress_bar_config(disable=True)
    encode = parts.vae.encode

    def encode_to_mode(x, *args, **kwargs):
        out = encode(x, *args, **kwargs)
        out.latent_dist.sample = lambda generator=None: out.latent_dist.mode()
        return out

    parts.vae.encode = encode_to_mode
    try:
        theirs = pipe(prompt=PROMPT, negative_prompt="", image=init, strength=0.5, num_inference_steps=4,
                      guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(7), output_type="np",
                      height=64, width=64,
                      sigmas=list(np.linspace(1.0, 1 / 4, 4))).images[0]
    finally:
        del parts.vae.encode
    diff = np.abs(ours - np.round(theirs * 255).astype(np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())
    txt2img = np.asarray(engine.runner.generate(req(checkpoint="sd35")).images[0]).astype(np.int16)
    assert np.abs(ours - txt2img).mean() > 1  # the init image mattered


def test_txt2img_over_the_api(sd3_dir, tmp_path: Path) -> None:
    """A1111's payload shape with JSON nulls and its defaults (Euler a) on an SD3.5 file; a bad
    sampler answers 4xx with the reason."""
    from tests.conftest import start_server, stop_server

    root = tmp_path
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    (folder / "sd35.safetensors").symlink_to(sd3_dir[0] / "models" / "Stable-diffusion" / "sd35.safetensors")
    s = start_server(root, "--api")
    try:
        body = {"prompt": PROMPT, "negative_prompt": None, "steps": 3, "width": 64, "height": 64, "seed": 3,
                "sampler_name": None, "cfg_scale": 4, "styles": None, "override_settings": None}
        answer = requests.post(s.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        assert image.size == (64, 64) and np.asarray(image).std() > 5
        assert "Shift: 3.0" in answer.json()["info"]
        bad = requests.post(s.url + "/sdapi/v1/txt2img", json=body | {"sampler_name": "DPM++ 3M SDE"}, timeout=60)
        assert 400 <= bad.status_code < 500 and "does not work with SD 3.x models" in bad.text
    finally:
        stop_server(s)


def test_loras_in_kohya_and_diffusers_names(engine: Engine, sd3_dir) -> None:
    """An SD3 LoRA on the fused x-block qkv (kohya's original names) and the same delta on
    diffusers' to_q/to_k/to_v give the same picture; one for another family is refused by name."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    down, up = torch.randn(4, 64, generator=gen) * 0.3, torch.randn(192, 4, generator=gen) * 0.3
    kohya = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down,
             "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up,
             "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(4.0)}
    peft = {}
    for i, part in enumerate("qkv"):
        peft |= {f"transformer.transformer_blocks.0.attn.to_{part}.lora_A.weight": down.clone(),
                 f"transformer.transformer_blocks.0.attn.to_{part}.lora_B.weight": up[i * 64:(i + 1) * 64].clone()}
    sd1 = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
           "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    loras = sd3_dir[0] / "models" / "Lora"
    loras.mkdir(exist_ok=True)
    for name, tensors in (("sd3-kohya", kohya), ("sd3-peft", peft), ("for-sd1", sd1)):
        save_file(tensors, str(loras / f"{name}.safetensors"))
    engine.networks.refresh()
    plain = np.asarray(engine.runner.generate(req(checkpoint="sd35")).images[0]).astype(np.int16)
    a, b = (np.asarray(engine.runner.generate(req(checkpoint="sd35", prompt=f"{PROMPT} <lora:{n}:1>")).images[0])
            .astype(np.int16) for n in ("sd3-kohya", "sd3-peft"))
    assert np.abs(a - plain).mean() > 1 and np.abs(a - b).max() <= 1
    with pytest.raises(ModelError, match="none of its 1 LoRA layers match a layer of this SD 3.x model"):
        engine.runner.generate(req(checkpoint="sd35", prompt=f"{PROMPT} <lora:for-sd1:1>"))


def test_a_t5_lora_in_kohya_and_diffusers_names(engine: Engine, sd3_dir) -> None:
    """The third text encoder (T5) takes LoRAs as `lora_te3_*` (kohya) and `text_encoder_3.*`
    (diffusers): the same picture from each, another without."""
    from safetensors.torch import save_file

    q = engine.bundle("sd35").text_encoders[2].model.encoder.block[0].layer[0].SelfAttention.q
    gen = torch.Generator().manual_seed(6)
    down, up = torch.randn(4, q.in_features, generator=gen), torch.randn(q.out_features, 4, generator=gen)
    name = "encoder_block_0_layer_0_SelfAttention_q"
    kohya = {f"lora_te3_{name}.lora_down.weight": down, f"lora_te3_{name}.lora_up.weight": up,
             f"lora_te3_{name}.alpha": torch.tensor(4.0)}
    peft = {"text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": down.clone(),
            "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": up.clone()}
    loras = sd3_dir[0] / "models" / "Lora"
    loras.mkdir(exist_ok=True)
    for file, tensors in (("t5-kohya", kohya), ("t5-peft", peft)):
        save_file(tensors, str(loras / f"{file}.safetensors"))
    engine.networks.refresh()
    plain, a, b = (np.asarray(engine.runner.generate(req(checkpoint="sd35", prompt=PROMPT + tag)).images[0])
                   .astype(np.int16) for tag in ("", " <lora:t5-kohya:1>", " <lora:t5-peft:1>"))
    assert np.abs(a - plain).mean() > 1 and np.abs(a - b).max() <= 1
