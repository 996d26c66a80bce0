"""IP-Adapter in ControlNet units (#17): h94's file layout converted with diffusers' converters, a
CLIP vision encoder from models/clip_vision chosen by the width the adapter takes; the image
steers the generation, weight 0 changes nothing, the UNet is as it was after the job, and the
result equals diffusers' pipeline with the same adapter weights and image embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.test_controlnet import px
from webui.app import Engine, build_engine
from webui.config import Config
from webui.controlnet import ip_adapter
from webui.models.errors import ModelError
from webui.pipeline.request import GenerationRequest
from webui.testing.make_controlnet import make_clip_vision, make_ip_adapter


def req(**kw) -> GenerationRequest:
    base = {"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 21, "sampler_name": "Euler",
            "save_images": False, "checkpoint": "sd1", "cfg_scale": 5.0}
    return GenerationRequest(**{**base, **kw})


def picture() -> Image.Image:
    image = Image.new("RGB", (80, 64), (200, 40, 40))
    image.paste((20, 200, 60), (10, 10, 50, 50))
    return image


def as_the_unit_sees_it(image: Image.Image | None = None) -> Image.Image:
    """The unit's picture as its preprocessor passes it on (at the 512 px processor resolution)."""
    from webui.controlnet import preprocess

    return preprocess.run("ip-adapter_clip_sd15", image or picture(), 512, 0, 0)


def unit(**kw) -> dict:
    return {"model": "ip-adapter_sd15", "module": "ip-adapter_clip_sd15", "image": picture(), **kw}


@pytest.fixture
def engine(data_dir: Path) -> Engine:
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    unet = engine.bundle("sd1").unet
    for folder in ("clip_vision", "ControlNet"):
        (data_dir / "models" / folder).mkdir(parents=True)
    save_file(make_clip_vision(projection=24), data_dir / "models" / "clip_vision" / "CLIP-ViT-H-14.safetensors")
    save_file(make_ip_adapter(unet, image_embed_dim=24, seed=1),
              data_dir / "models" / "ControlNet" / "ip-adapter_sd15.safetensors")
    return engine


def test_an_image_prompt_steers_and_leaves_the_unet_as_it_was(engine: Engine) -> None:
    unet = engine.bundle("sd1").unet
    before = {name: type(p).__name__ for name, p in unet.attn_processors.items()}
    plain = px(engine.runner.generate(req()).images[0])
    steered = engine.runner.generate(req(controlnet=[unit()]))
    assert np.abs(px(steered.images[0]) - plain).mean() > 1
    assert {name: type(p).__name__ for name, p in unet.attn_processors.items()} == before
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert np.array_equal(px(engine.runner.generate(req()).images[0]), plain)  # nothing stayed patched
    assert np.array_equal(px(engine.runner.generate(req(controlnet=[unit(weight=0)])).images[0]), plain)
    late = px(engine.runner.generate(req(controlnet=[unit(guidance_start=1.0)])).images[0])
    assert np.array_equal(late, plain)
    assert "Module: ip-adapter_clip_sd15, Model: ip-adapter_sd15 [" in steered.infotexts[0]


def diffusers_image(bundle, state: dict | list[dict], positive: torch.Tensor | list[torch.Tensor],
                    negative: torch.Tensor | list[torch.Tensor]) -> np.ndarray:
    """diffusers' own pipeline on the same model, with the adapter(s) in `state` loaded by diffusers
    and the given image embeddings (one each); the UNet put back as it was afterwards."""
    states, positives, negatives = ([x] if not isinstance(x, list) else x for x in (state, positive, negative))
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    te = bundle.text_encoders[0]
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="linspace", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=te.model, tokenizer=te.tokenizer, unet=bundle.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    grouped = [{"image_proj": {k[11:]: v for k, v in one.items() if k.startswith("image_proj.")},
                "ip_adapter": {k[11:]: v for k, v in one.items() if k.startswith("ip_adapter.")}} for one in states]
    before = bundle.unet.attn_processors
    bundle.unet._load_ip_adapter_weights(grouped, low_cpu_mem_usage=False)
    try:
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(21))
        theirs = pipe(prompt="a lighthouse", negative_prompt="", num_inference_steps=4, guidance_scale=5.0,
                      latents=noise, height=64, width=64, output_type="np",
                      ip_adapter_image_embeds=[torch.cat([n, p]) for n, p in zip(negatives, positives)]).images[0]
    finally:  # the projection first: a plus one has attention layers of its own
        bundle.unet.encoder_hid_proj = None
        bundle.unet.config.encoder_hid_dim_type = None
        bundle.unet.set_attn_processor(before)
    return np.round(theirs * 255).astype(np.int16)


def test_it_equals_diffusers_pipeline_with_the_same_adapter(engine: Engine, data_dir: Path) -> None:
    from webui.models.readers import read_state_dict

    ours = engine.runner.generate(req(controlnet=[unit()])).images[0]
    bundle = engine.bundle("sd1")
    adapter = engine.controlnets.load("ip-adapter_sd15", bundle)
    encoder = engine.controlnets.clip_vision.encoder_for(adapter, torch.device("cpu"))
    assert not any(b.is_meta for b in encoder.buffers())  # position_ids made, not left on the meta device
    positive, negative = ip_adapter.embeddings(adapter, encoder, as_the_unit_sees_it())
    assert torch.equal(positive, ip_adapter.embeddings(adapter, encoder, as_the_unit_sees_it())[0])
    state = read_state_dict(data_dir / "models" / "ControlNet" / "ip-adapter_sd15.safetensors")
    theirs = diffusers_image(bundle, state, positive, negative)
    diff = np.abs(px(ours) - theirs)
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_a_missing_encoder_or_an_adapter_for_another_model_is_named(engine: Engine, data_dir: Path,
                                                                     checkpoint_store: Path) -> None:
    import shutil

    shutil.copy(checkpoint_store / "sdxl.safetensors", data_dir / "models" / "Stable-diffusion" / "sdxl.safetensors")
    engine.registry.refresh(compute_hashes=False)
    with pytest.raises(ModelError, match=r"IP-Adapter ip-adapter_sd15 does not fit sdxl"):
        engine.runner.generate(req(checkpoint="sdxl", controlnet=[unit()]))
    (data_dir / "models" / "clip_vision" / "CLIP-ViT-H-14.safetensors").unlink()
    with pytest.raises(ModelError, match=r"needs a CLIP vision model giving 24-wide embeddings in .*clip_vision"):
        engine.runner.generate(req(controlnet=[unit()]))


def test_a_plus_adapter_reads_clips_tokens_as_diffusers_does(engine: Engine, data_dir: Path) -> None:
    """ip-adapter-plus (h94's Resampler): the penultimate CLIP tokens of the image, those of a black
    image for the negative; equal to diffusers with the same weights and embeddings."""
    bundle = engine.bundle("sd1")
    state = make_ip_adapter(bundle.unet, image_embed_dim=32, seed=2, plus=True)  # the encoder's hidden width
    save_file(state, data_dir / "models" / "ControlNet" / "ip-adapter-plus_sd15.safetensors")
    plain = px(engine.runner.generate(req()).images[0])
    ours = engine.runner.generate(req(controlnet=[unit(model="ip-adapter-plus_sd15")])).images[0]
    assert np.abs(px(ours) - plain).mean() > 1
    adapter = engine.controlnets.load("ip-adapter-plus_sd15", bundle)
    assert adapter.plus and adapter.embed_width == 32
    encoder = engine.controlnets.clip_vision.encoder_for(adapter, torch.device("cpu"))
    positive, negative = ip_adapter.embeddings(adapter, encoder, as_the_unit_sees_it())
    assert positive.shape == (1, 1, 5, 32)  # one image, 2x2 patches (28 px at 14 a patch) + CLS, 32 wide
    theirs = diffusers_image(bundle, state, positive, negative)
    diff = np.abs(px(ours) - theirs)
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_several_adapters_each_add_their_image_as_diffusers_does(engine: Engine, data_dir: Path) -> None:
    """Two units (a plain and a plus adapter, each with its picture): each adds its own branch to
    the cross-attention, equal to diffusers with both adapters loaded; a unit at weight 0 leaves
    the other's result; the UNet is as it was after the job."""
    from webui.models.readers import read_state_dict

    bundle = engine.bundle("sd1")
    plus_state = make_ip_adapter(bundle.unet, image_embed_dim=32, seed=2, plus=True)
    save_file(plus_state, data_dir / "models" / "ControlNet" / "ip-adapter-plus_sd15.safetensors")
    second = Image.new("RGB", (64, 64), (30, 30, 220))
    units = [unit(), unit(model="ip-adapter-plus_sd15", image=second)]
    before = {name: type(p).__name__ for name, p in bundle.unet.attn_processors.items()}
    ours = engine.runner.generate(req(controlnet=units)).images[0]
    assert {name: type(p).__name__ for name, p in bundle.unet.attn_processors.items()} == before
    first_only = engine.runner.generate(req(controlnet=[unit()])).images[0]
    assert np.abs(px(ours) - px(first_only)).mean() > 0.5  # the second picture counts
    muted = engine.runner.generate(req(controlnet=[units[0], {**units[1], "weight": 0}])).images[0]
    assert np.array_equal(px(muted), px(first_only))
    embeds = []
    for name, image in (("ip-adapter_sd15", picture()), ("ip-adapter-plus_sd15", second)):
        adapter = engine.controlnets.load(name, bundle)
        encoder = engine.controlnets.clip_vision.encoder_for(adapter, torch.device("cpu"))
        embeds.append(ip_adapter.embeddings(adapter, encoder, as_the_unit_sees_it(image)))
    state = read_state_dict(data_dir / "models" / "ControlNet" / "ip-adapter_sd15.safetensors")
    theirs = diffusers_image(bundle, [state, plus_state], [e[0] for e in embeds], [e[1] for e in embeds])
    diff = np.abs(px(ours) - theirs)
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())

