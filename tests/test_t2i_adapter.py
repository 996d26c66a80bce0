"""T2I-Adapters in ControlNet units (#17): TencentARC's original layout and diffusers' load to the
same network diffusers builds; a unit with an adapter steers the image (weight 0 changes
nothing), in its step range, at sizes the adapter does not divide evenly, in the hires pass;
an adapter for another UNet is refused by name; the API takes one as any ControlNet model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.test_controlnet import px, square, theirs_with
from webui.app import Engine, build_engine
from webui.config import Config
from webui.controlnet import adapter as adapter_module
from webui.models.errors import ModelError
from webui.models.readers import read_state_dict
from webui.pipeline.request import GenerationRequest
from webui.testing.make_controlnet import make_adapter, write_adapter


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a lighthouse", steps=3, width=64, height=64, seed=11, sampler_name="Euler",
                save_images=False, checkpoint="sd1")
    base.update(kw)
    return GenerationRequest(**base)


def unit(**kw) -> dict:
    return {"model": "t2iadapter_canny_sd15v2", "module": "canny", "image": square(), **kw}


@pytest.fixture
def engine(data_dir: Path) -> Engine:
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    unet = engine.bundle("sd1").unet
    folder = data_dir / "models" / "ControlNet"
    write_adapter(folder / "t2iadapter_canny_sd15v2.pth", unet, seed=1, layout="original")
    write_adapter(folder / "diffusers" / "t2i_canny_diffusers.safetensors", unet, seed=1, layout="diffusers")
    write_adapter(folder / "t2iadapter_sketch_sd15v2.safetensors", unet, seed=2, in_channels=1)
    return engine


def test_both_layouts_load_as_diffusers_builds_the_adapter(engine: Engine, data_dir: Path) -> None:
    unet = engine.bundle("sd1").unet
    reference = make_adapter(unet, seed=1)  # the network both files were written from
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    want = reference(hint)
    for name in ("t2iadapter_canny_sd15v2", "t2i_canny_diffusers"):
        net = engine.controlnets.load(name, engine.bundle("sd1"))
        assert type(net).__name__ == "T2IAdapter"
        got = net(hint)
        assert len(got) == len(want) == len(unet.config.block_out_channels)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    state = read_state_dict(data_dir / "models" / "ControlNet" / "t2iadapter_canny_sd15v2.pth")
    assert adapter_module.is_adapter(state) and not any(k.startswith("adapter.") for k in state)


def test_an_adapter_unit_steers_within_its_weight_and_step_range(engine: Engine) -> None:
    plain = px(engine.runner.generate(req()).images[0])
    steered = engine.runner.generate(req(controlnet=[unit()]))
    assert np.abs(px(steered.images[0]) - plain).mean() > 1
    same = px(engine.runner.generate(req(controlnet=[unit(model="t2i_canny_diffusers")])).images[0])
    assert np.array_equal(same, px(steered.images[0]))  # both layouts: the same weights, the same image
    assert np.array_equal(px(engine.runner.generate(req(controlnet=[unit(weight=0)])).images[0]), plain)
    late = px(engine.runner.generate(req(controlnet=[unit(guidance_start=1.0)])).images[0])
    assert np.array_equal(late, plain)  # never inside [1, 1]: steps are at 0, 1/3, 2/3
    control_more = px(engine.runner.generate(req(controlnet=[unit(control_mode=2)])).images[0])
    assert not np.array_equal(control_more, px(steered.images[0]))
    sketch = px(engine.runner.generate(req(controlnet=[unit(model="t2iadapter_sketch_sd15v2",
                                                             module="invert")])).images[0])
    assert np.abs(sketch - plain).mean() > 1  # a one-channel (sketch) adapter reads the grey image
    assert "Model: t2iadapter_canny_sd15v2 [" in steered.infotexts[0]


def test_odd_sizes_hires_and_a_controlnet_beside_it(engine: Engine, data_dir: Path) -> None:
    from webui.testing.make_controlnet import write_controlnet

    odd = engine.runner.generate(req(width=72, height=88, controlnet=[unit()]))  # 9x11 latents: not even
    assert odd.images[0].size == (72, 88)
    hires = engine.runner.generate(req(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6,
                                       hr_second_pass_steps=2, controlnet=[unit()]))
    assert hires.images[0].size == (96, 96)
    write_controlnet(data_dir / "models" / "ControlNet" / "cn.safetensors", engine.bundle("sd1").unet,
                     strength=0.5, seed=4)
    alone = px(engine.runner.generate(req(controlnet=[unit()])).images[0])
    both = px(engine.runner.generate(req(controlnet=[unit(), unit(model="cn")])).images[0])
    assert not np.array_equal(alone, both)


def test_sdxl_adapters_and_adapters_for_another_unet_refused_by_name(engine: Engine, data_dir: Path,
                                                                       checkpoint_store: Path) -> None:
    import shutil

    shutil.copy(checkpoint_store / "sdxl.safetensors", data_dir / "models" / "Stable-diffusion" / "sdxl.safetensors")
    engine.registry.refresh(compute_hashes=False)
    write_adapter(data_dir / "models" / "ControlNet" / "t2i-adapter-canny-sdxl-1.0.safetensors",
                  engine.bundle("sdxl").unet, seed=5, layout="diffusers")
    xl = {"checkpoint": "sdxl", "controlnet": [unit(model="t2i-adapter-canny-sdxl-1.0")]}
    plain = px(engine.runner.generate(req(checkpoint="sdxl")).images[0])
    steered = px(engine.runner.generate(req(**xl)).images[0])
    assert np.abs(steered - plain).mean() > 1
    zero = req(**{**xl, "controlnet": [unit(model="t2i-adapter-canny-sdxl-1.0", weight=0)]})
    assert np.array_equal(px(engine.runner.generate(zero).images[0]), plain)
    with pytest.raises(ModelError, match=r"t2iadapter_canny_sd15v2 does not fit .*an SD 1.x/2.x adapter"):
        engine.runner.generate(req(checkpoint="sdxl", controlnet=[unit()]))
    with pytest.raises(ModelError, match=r"t2i-adapter-canny-sdxl-1.0 does not fit .*an SDXL adapter"):
        engine.runner.generate(req(controlnet=[unit(model="t2i-adapter-canny-sdxl-1.0")]))
    style = {"style_embedding": torch.zeros(1, 8, 32), "transformer_layes.0.attn.in_proj_weight": torch.zeros(96, 32),
             "ln_pre.weight": torch.zeros(32), "proj": torch.zeros(32, 32)}  # TencentARC's style adapter's keys
    save_file(style, str(data_dir / "models" / "ControlNet" / "t2iadapter_style_sd14v1.safetensors"))
    with pytest.raises(ModelError, match="t2iadapter_style_sd14v1: a style adapter"):
        engine.runner.generate(req(controlnet=[unit(model="t2iadapter_style_sd14v1")]))


def test_the_light_colour_adapter_and_its_colour_grid(engine: Engine, data_dir: Path) -> None:
    """The colour adapter (TencentARC's light architecture, original layout) converts to the network
    diffusers builds; it repeats its last width, as SD 1.x's UNet does and the tiny one does not,
    which is refused by name. `t2ia_color_grid` gives the picture's colours in flat 64-px cells."""
    from diffusers import T2IAdapter
    from PIL import Image

    from webui.controlnet import preprocess

    unet = engine.bundle("sd1").unet
    reference = make_adapter(unet, seed=3, light=True)  # maps of 32 and 32 channels
    write_adapter(data_dir / "models" / "ControlNet" / "t2iadapter_color_sd14v1.pth", unet, seed=3, light=True)
    state = read_state_dict(data_dir / "models" / "ControlNet" / "t2iadapter_color_sd14v1.pth")
    assert "body.0.body.0.block1.weight" in state and "body.0.out_conv.weight" in state
    assert adapter_module.is_adapter(state)
    rebuilt = T2IAdapter(**reference.config)
    rebuilt.load_state_dict(adapter_module.to_diffusers(state))
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for a, b in zip(rebuilt(hint), reference(hint), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ModelError, match=r"t2iadapter_color_sd14v1 does not fit sd1 .*light SD 1.x/2.x adapter with "
                                         r"\[32, 32\] channels, this UNet has \[32, 64\]"):
        engine.runner.generate(req(controlnet=[{"model": "t2iadapter_color_sd14v1", "module": "t2ia_color_grid",
                                                "image": square()}]))
    halves = Image.new("RGB", (256, 128), (250, 20, 20))
    halves.paste((20, 20, 250), (128, 0, 256, 128))
    grid = np.asarray(preprocess.run("t2ia_color_grid", halves, 128, 0, 0))
    assert grid.shape == (128, 256, 3)
    assert (grid[:, :64] == grid[0, 0]).all() and grid[0, 0, 0] > 200 and grid[0, -1, 2] > 200  # flat cells


def test_an_adapter_unit_matches_diffusers_adapter_pipeline(engine: Engine) -> None:
    """An independent computation: diffusers' StableDiffusionAdapterPipeline on the same weights,
    control image, initial noise and Euler schedule."""
    from diffusers import StableDiffusionAdapterPipeline

    ours = engine.runner.generate(req(steps=6, cfg_scale=5.0, controlnet=[unit(module="none")])).images[0]
    bundle = engine.bundle("sd1")
    theirs = theirs_with(StableDiffusionAdapterPipeline, bundle, 11, "a lighthouse",
                         adapter=engine.controlnets.load("t2iadapter_canny_sd15v2", bundle),
                         adapter_conditioning_scale=1.0)
    diff = np.abs(px(ours) - theirs)
    plain = px(engine.runner.generate(req(steps=6, cfg_scale=5.0)).images[0])
    assert np.abs(plain - theirs).mean() > 2  # the adapter changes the image, so agreeing means something
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())
