"""ControlNet on tiny random-weight ControlNets built on the tiny checkpoints' UNets, in the
original (lllyasviel) layout and diffusers' layout: loading and conversion, the units' fields
and modes, txt2img / img2img / hires, the preprocessors, and the A1111 extension's API."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tests.conftest import start_server, stop_server
from webui.app import Engine, build_engine
from webui.config import Config
from webui.controlnet import preprocess
from webui.extensions.api import ModelCall
from webui.infotext import parse_infotext
from webui.models.errors import ModelError
from webui.pipeline.request import GenerationRequest
from webui.testing.make_checkpoint import write_checkpoint
from webui.testing.make_controlnet import write_controlnet


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube", steps=3, width=64, height=64, seed=5, sampler_name="Euler", save_images=False)
    base.update(kw)
    return GenerationRequest(**base)


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def square(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    image.paste((255, 255, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def engine(data_dir: Path) -> Engine:
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    unet = engine.bundle("sd1").unet
    folder = data_dir / "models" / "ControlNet"
    write_controlnet(folder / "cn_zero.safetensors", unet, strength=0.0)
    write_controlnet(folder / "cn_canny.safetensors", unet, strength=0.5, seed=1)
    write_controlnet(folder / "diffusers" / "cn_canny_diffusers.safetensors", unet, strength=0.5, seed=1,
                     layout="diffusers")
    write_controlnet(folder / "cn_sd2.safetensors", engine.bundle("sd2").unet, strength=0.5)
    engine.bundle("sd1")  # back to the SD1 model for the tests
    return engine


def unit(**kw) -> dict:
    return {"model": "cn_canny", "module": "canny", "image": square(), **kw}


def test_a_zero_controlnet_changes_nothing_a_trained_one_steers(engine: Engine) -> None:
    plain = px(engine.runner.generate(req(checkpoint="sd1")).images[0])
    zero = engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(model="cn_zero")]))
    assert np.array_equal(px(zero.images[0]), plain)
    steered = engine.runner.generate(req(checkpoint="sd1", controlnet=[unit()]))
    assert np.abs(px(steered.images[0]) - plain).mean() > 1
    same = engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(model="cn_canny_diffusers")]))
    assert np.array_equal(px(same.images[0]), px(steered.images[0]))  # both layouts load the same weights
    info = parse_infotext(steered.infotexts[0])["ControlNet 0"]
    title = next(t for t in engine.controlnets.titles() if t.startswith("cn_canny ["))
    assert info == (f"Module: canny, Model: {title}, Weight: 1, Resize Mode: Crop and Resize, Processor Res: 512, "
                    "Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, "
                    "Control Mode: Balanced")


def theirs_with(pipeline: type, bundle, seed: int, prompt: str, **call) -> np.ndarray:
    """diffusers' `pipeline` around `bundle`'s modules (and the extra modules in `call` named like its
    arguments) with the Euler schedule ours matches: its picture, 6 steps at CFG 5, from our seed's noise."""
    from diffusers import EulerDiscreteScheduler

    te = bundle.text_encoders[0]
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="linspace", steps_offset=1)
    parts = {k: call.pop(k) for k in ("controlnet", "adapter") if k in call}
    pipe = pipeline(vae=bundle.vae, text_encoder=te.model, tokenizer=te.tokenizer, unet=bundle.unet,
                    scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                    **parts)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
    image = pipe(prompt=prompt, negative_prompt="", image=square(), num_inference_steps=6, guidance_scale=5.0,
                 latents=noise, height=64, width=64, output_type="np", **call).images[0]
    return np.round(image * 255).astype(np.int16)


def test_a_unit_equals_diffusers_controlnet_pipeline(engine: Engine) -> None:
    """An independent computation: diffusers' StableDiffusionControlNetPipeline on the same weights
    (the original-layout file as we convert it), control image, initial noise and Euler schedule."""
    from diffusers import StableDiffusionControlNetPipeline

    ours = engine.runner.generate(req(checkpoint="sd1", steps=6, cfg_scale=5.0, controlnet=[unit(module="none")]))
    bundle = engine.bundle("sd1")
    theirs = theirs_with(StableDiffusionControlNetPipeline, bundle, 5, "a red cube",
                         controlnet=engine.controlnets.load("cn_canny", bundle), controlnet_conditioning_scale=1.0)
    diff = np.abs(px(ours.images[0]) - theirs)
    plain = px(engine.runner.generate(req(checkpoint="sd1", steps=6, cfg_scale=5.0)).images[0])
    assert np.abs(plain - theirs).mean() > 2  # the ControlNet changes the image, so agreeing means something
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_weight_range_and_modes(engine: Engine) -> None:
    plain = px(engine.runner.generate(req(checkpoint="sd1")).images[0])
    balanced = px(engine.runner.generate(req(checkpoint="sd1", controlnet=[unit()])).images[0])
    assert np.array_equal(px(engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(weight=0)])).images[0]),
                          plain)
    late = engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(guidance_start=1.0)])).images[0]
    assert np.array_equal(px(late), plain)  # never inside [1, 1]: steps are at 0, 1/3, 2/3
    early = px(engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(guidance_end=0.4)])).images[0])
    assert not np.array_equal(early, plain) and not np.array_equal(early, balanced)
    prompt_more = px(engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(
        control_mode="My prompt is more important")])).images[0])
    control_more = px(engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(control_mode=2)])).images[0])
    assert len({a.tobytes() for a in (plain, balanced, prompt_more, control_more)}) == 4
    two = px(engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(), unit(model="cn_zero")])).images[0])
    assert np.array_equal(two, balanced)  # a second unit adding zeros adds nothing


def test_the_step_range_decides_which_model_calls_get_residuals(engine: Engine, data_dir: Path) -> None:
    """A test extension's model input (run after the units') records, per UNet call, whether the
    ControlNet's residuals are there: only in the steps inside [guidance_start, guidance_end]."""
    from tests.test_extensions import write_extension

    write_extension(data_dir, "residual-counter", '''
        from pathlib import Path

        @hookimpl
        def setup_denoiser(stage):
            log = Path(__file__).parent / "calls.txt"
            log.write_text("")

            def record(call):
                with log.open("a") as f:
                    f.write(f"{call.step} {'down_block_additional_residuals' in call.kwargs}\\n")

            stage.model_inputs.append(record)
    ''')
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    log = data_dir / "extensions" / "residual-counter" / "calls.txt"

    def calls(**fields) -> list[tuple[int, bool]]:
        engine.runner.generate(req(checkpoint="sd1", steps=10, controlnet=[unit(**fields)]))
        return [(int(step), flag == "True") for step, flag in (line.split() for line in log.read_text().splitlines())]

    steps = calls(guidance_start=0.2, guidance_end=0.6)
    assert [s for s, _ in steps] == list(range(1, 11))  # Euler: one call per step, all rows at once
    assert [s for s, with_residuals in steps if with_residuals] == [3, 4, 5, 6, 7]  # (step - 1) / 10 in range
    assert all(flag for _, flag in calls())
    assert [s for s, flag in calls(guidance_end=0.0) if flag] == [1]


def test_img2img_hires_and_the_units_image(engine: Engine) -> None:
    init = Image.new("RGB", (64, 64), (90, 140, 200))
    own = engine.runner.generate(req(checkpoint="sd1", init_images=(square(),), denoising_strength=0.6,
                                     controlnet=[unit(image=None)]))
    given = engine.runner.generate(req(checkpoint="sd1", init_images=(square(),), denoising_strength=0.6,
                                       controlnet=[unit()]))
    assert np.array_equal(px(own.images[0]), px(given.images[0]))  # no image: the init image
    other = engine.runner.generate(req(checkpoint="sd1", init_images=(init,), denoising_strength=0.6,
                                       controlnet=[unit(image=None)]))
    assert not np.array_equal(px(other.images[0]), px(own.images[0]))
    hires = engine.runner.generate(req(checkpoint="sd1", enable_hr=True, hr_scale=1.5, denoising_strength=0.5,
                                       controlnet=[unit()]))
    plain_hires = engine.runner.generate(req(checkpoint="sd1", enable_hr=True, hr_scale=1.5, denoising_strength=0.5))
    assert hires.images[0].size == (96, 96)
    assert not np.array_equal(px(hires.images[0]), px(plain_hires.images[0]))


def test_bad_units_are_named_before_the_job(engine: Engine) -> None:
    for fields, error, message in [
        (unit(model="missing"), ModelError, "controlnet unit 0: ControlNet model 'missing' not found"),
        (unit(module="openpose_full"), ValueError,
         "unknown preprocessor .openpose_full.*openpose's hands and faces, DW pose and the BAE / DSINE normal maps"),
        (unit(module="openpose"), ValueError, "preprocessor openpose needs body_pose_model.pth .*annotators"),
        (unit(image=None), ValueError, "controlnet unit 0: no image"),
    ]:
        with pytest.raises(error, match=message):
            engine.check(req(checkpoint="sd1", controlnet=[fields]))
    with pytest.raises(ModelError, match="cn_sd2 does not fit sd1"):
        engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(model="cn_sd2")]))
    with pytest.raises(ValueError, match="resize_mode"):
        req(controlnet=[unit(resize_mode="sideways")])
    with pytest.raises(ValueError, match="guidance_start 0.8 is after guidance_end 0.2"):
        req(controlnet=[unit(guidance_start=0.8, guidance_end=0.2)])
    with pytest.raises(ValueError, match="at most 10 enabled ControlNet units"):
        req(controlnet=[unit()] * 11)
    assert len(req(controlnet=[unit(enabled=False)] * 5).controlnet) == 5
    with pytest.raises(ValueError, match="controlnet: at most 3 enabled units on this server"):
        engine.check(req(checkpoint="sd1", controlnet=[unit()] * 4))  # the Settings' count, 3 by default
    engine.settings.update({"control_net_unit_count": 4})
    engine.check(req(checkpoint="sd1", controlnet=[unit()] * 4))


def test_the_infotext_gives_the_units_back(engine: Engine) -> None:
    """What `ControlNet 0: "..."` records fills a unit again (the page's paste and PNG Info), and
    that unit, given the same control image, makes the same picture."""
    from webui.controlnet.units import units_from_infotext
    from webui.infotext import parse_infotext

    first = engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(
        weight=0.8, guidance_end=0.9, control_mode=1, resize_mode=0, threshold_a=50, threshold_b=150,
        union_control_type="Depth")]))
    assert "Union Control Type" not in first.infotexts[0]  # not a union model: its type means nothing
    back = units_from_infotext(parse_infotext(first.infotexts[0]))
    assert list(back) == [0]
    fields = back[0]
    assert fields["model"].startswith("cn_canny [") and fields["module"] == "canny" and fields["enabled"] is True
    assert (fields["weight"], fields["guidance_start"], fields["guidance_end"]) == (0.8, 0.0, 0.9)
    assert (fields["threshold_a"], fields["threshold_b"], fields["processor_res"]) == (50.0, 150.0, 512)
    assert fields["control_mode"] == "My prompt is more important" and fields["resize_mode"] == "Just Resize"
    again = engine.runner.generate(req(checkpoint="sd1", controlnet=[{**fields, "image": square()}]))
    assert np.array_equal(px(again.images[0]), px(first.images[0]))


def test_canny_finds_the_squares_outline() -> None:
    edges = np.asarray(preprocess.canny(square(), 100, 200).convert("L")) > 0
    ys, xs = np.nonzero(edges)
    assert edges.any() and xs.min() >= 14 and xs.max() <= 49 and ys.min() >= 14 and ys.max() <= 49
    assert not edges[24:40, 24:40].any() and not edges[:10].any()  # nothing inside or far outside
    assert not (np.asarray(preprocess.canny(square(), 2000, 3000).convert("L")) > 0).any()  # thresholds count
    inverted = preprocess.invert(square(), 0, 0)
    assert inverted.getpixel((0, 0)) == (255, 255, 255) and inverted.getpixel((32, 32)) == (0, 0, 0)
    assert preprocess.threshold(square(), 127, 0).getpixel((32, 32)) == (255, 255, 255)


def test_shuffle_keeps_the_colours_and_moves_the_layout() -> None:
    halves = Image.new("RGB", (96, 64), (255, 0, 0))
    halves.paste((0, 0, 255), (48, 0, 96, 64))
    out = np.asarray(preprocess.shuffle(halves, 0, 0)).astype(int)
    assert out.shape == (64, 96, 3) and not np.array_equal(out, np.asarray(halves))
    assert (out[..., 1] == 0).all() and (np.abs(out[..., 0] + out[..., 2] - 255) <= 1).all()  # only mixes of the two
    again, other = (np.asarray(preprocess.shuffle(halves, seed, 0)) for seed in (0, 1))
    assert np.array_equal(again, out) and not np.array_equal(other, out)  # the seed fixes the flow


def test_every_preprocessor_on_a_picture() -> None:
    """Each one, through `run` at a processor resolution, on a drawn scene: an RGB image of the
    scene's shape at that resolution."""
    from webui.testing.faces import face_scene

    scene = face_scene((320, 256))
    for name in preprocess.PREPROCESSORS:
        a, b = preprocess.defaults(name)
        out = preprocess.run(name, scene, 128, a, b)
        assert out.mode == "RGB", name
        assert out.size == ((320, 256) if name == "none" else (160, 128)), name
        if name not in ("none", "tile_resample", "tile_colorfix", "tile_colorfix+sharp"):  # these keep the picture
            assert not np.array_equal(np.asarray(out), np.asarray(scene.resize(out.size))), name


def test_the_extensions_api(data_dir: Path) -> None:
    """The A1111 ControlNet extension's routes and its unit shape in alwayson_scripts."""
    write_checkpoint(data_dir / "models" / "Stable-diffusion" / "sd1.safetensors", "sd1")
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    write_controlnet(data_dir / "models" / "ControlNet" / "cn_canny.safetensors", engine.bundle("sd1").unet, 0.5)
    s = start_server(data_dir, "--api", "--ckpt", "sd1", ready="/sdapi/v1/samplers")
    try:
        def get(route: str) -> dict:
            r = requests.get(s.url + route, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        models = get("/controlnet/model_list")["model_list"]
        assert models[0] == "None" and models[1].startswith("cn_canny [")
        assert "canny" in get("/controlnet/module_list")["module_list"]
        assert get("/controlnet/version")["version"] >= 1 and get("/controlnet/settings")["control_net_unit_count"] == 3
        detected = requests.post(s.url + "/controlnet/detect", timeout=60, json={
            "controlnet_module": "canny", "controlnet_input_images": [b64(square())], "controlnet_processor_res": 64})
        assert detected.status_code == 200 and detected.json()["info"] == "Success"
        edges = Image.open(io.BytesIO(base64.b64decode(detected.json()["images"][0])))
        assert edges.size == (64, 64) and np.asarray(edges.convert("L")).max() == 255
        body = {"prompt": "a red cube", "steps": 3, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
                "alwayson_scripts": {"controlnet": {"args": [
                    {"enabled": True, "module": "canny", "model": models[1], "weight": 1.0,
                     "image": {"image": b64(square()), "mask": None}, "resize_mode": "Crop and Resize",
                     "processor_res": 512, "threshold_a": 100, "threshold_b": 200, "guidance_start": 0.0,
                     "guidance_end": 1.0, "pixel_perfect": False, "control_mode": "Balanced", "lowvram": False},
                    {"enabled": False, "module": "none", "model": "None"}]}}}
        r = requests.post(s.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert 'ControlNet 0: "Module: canny, Model: cn_canny [' in info["infotexts"][0]
        bad = requests.post(s.url + "/sdapi/v1/txt2img", timeout=120, json={
            **body, "alwayson_scripts": {"ControlNet": {"args": [{"model": "nope", "image": b64(square())}]}}})
        assert 400 <= bad.status_code < 500 and "nope" in bad.text
        wrong = requests.post(s.url + "/controlnet/detect", timeout=60,
                              json={"controlnet_module": "openpose", "controlnet_input_images": [b64(square())]})
        assert wrong.status_code == 422 and "openpose" in wrong.text
        depth = requests.post(s.url + "/controlnet/detect", timeout=60,
                              json={"controlnet_module": "depth_anything", "controlnet_input_images": [b64(square())]})
        assert depth.status_code == 422 and "annotators/depth_anything" in depth.text  # says what to put where
        assert "depth_anything" in get("/controlnet/module_list")["module_list"]
    finally:
        stop_server(s)


def test_an_sdxl_controlnet_gets_the_size_conditioning(data_dir: Path, checkpoint_store: Path) -> None:
    """SDXL's ControlNets take the pooled text and size ids like its UNet (`ModelCall.added_cond_kwargs`)."""
    from tests.conftest import add_checkpoint

    add_checkpoint(data_dir, checkpoint_store, "sdxl.safetensors")
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    for layout in ("diffusers", "original"):
        write_controlnet(data_dir / "models" / "ControlNet" / f"xl_{layout}.safetensors", engine.bundle("sdxl").unet,
                         strength=0.5, layout=layout)
    plain = px(engine.runner.generate(req(checkpoint="sdxl")).images[0])
    steered = engine.runner.generate(req(checkpoint="sdxl", controlnet=[unit(model="xl_diffusers")]))
    assert np.abs(px(steered.images[0]) - plain).mean() > 1
    converted = engine.runner.generate(req(checkpoint="sdxl", controlnet=[unit(model="xl_original")]))
    assert np.array_equal(px(converted.images[0]), px(steered.images[0]))


def test_the_tile_colour_fix_takes_the_control_images_colours(engine: Engine, data_dir: Path) -> None:
    """tile_colorfix: each row's denoised estimate keeps its detail (what its own blur leaves out)
    and takes its colours (its blur) from the control image's latents, inside the unit's step range.
    With a ControlNet adding nothing, the last estimate's blur moves to the control image's."""
    from tests.test_extensions import write_extension
    from webui.controlnet import apply
    from webui.pipeline.init_image import resize_image
    from webui.pipeline.latents import encode

    write_extension(data_dir, "last-estimate", '''
        from pathlib import Path
        import torch

        @hookimpl
        def step_end(stage):
            if stage.step == stage.steps:
                torch.save(stage.denoised, Path(__file__).parent / "last.pt")
    ''')
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    bundle = engine.bundle("sd1")
    control = square()
    fix = {"model": "cn_zero", "module": "tile_colorfix", "image": control}
    (prepared,) = apply.prepare(req(checkpoint="sd1", controlnet=[fix]), engine.controlnets, bundle)
    correct = apply.colour_fix([(prepared, None)], bundle, (64, 64), 3, 64)
    fitted = resize_image(prepared.image, 1, 64, 64)  # the control image as the ControlNet sees it (512 px back to 64)
    colours = apply.box_blur(encode(bundle, [fitted]), 8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        d = torch.randn(3, 4, 8, 8, generator=gen) * 5
        out = correct(d, ModelCall(d, None, None, None, 1, [0, 0, 0], [2]))
        assert torch.allclose(out - (d - apply.box_blur(d, 8)), colours.expand_as(d), atol=1e-5)

    def last() -> torch.Tensor:
        return torch.load(data_dir / "extensions" / "last-estimate" / "last.pt")

    def colour_error(latents: torch.Tensor) -> float:
        return float((apply.box_blur(latents, 8) - apply.box_blur(colours, 8)).abs().mean())

    plain = engine.runner.generate(req(checkpoint="sd1"))
    plain_error = colour_error(last())
    fixed = engine.runner.generate(req(checkpoint="sd1", controlnet=[fix]))
    assert colour_error(last()) < plain_error / 2
    info = parse_infotext(fixed.infotexts[0])["ControlNet 0"]
    assert "Module: tile_colorfix, " in info and "Threshold A: 8, Threshold B: 0," in info
    outside = engine.runner.generate(req(checkpoint="sd1", controlnet=[{**fix, "guidance_start": 1.0}]))
    assert np.array_equal(px(outside.images[0]), px(plain.images[0]))
    sharp = {**fix, "module": "tile_colorfix+sharp"}
    no_sharpness = engine.runner.generate(req(checkpoint="sd1", controlnet=[{**sharp, "threshold_b": 0}]))
    assert np.array_equal(px(no_sharpness.images[0]), px(fixed.images[0]))
    sharper = engine.runner.generate(req(checkpoint="sd1", controlnet=[{**sharp, "threshold_b": 2}]))
    assert not np.array_equal(px(sharper.images[0]), px(fixed.images[0]))
    hires = engine.runner.generate(req(checkpoint="sd1", enable_hr=True, hr_scale=2, denoising_strength=0.5,
                                       controlnet=[fix]))
    assert hires.images[0].size == (128, 128)  # the hires pass blurs over 16 latent pixels, its own colours


def test_the_inpaint_preprocessor_marks_the_masked_pixels(engine: Engine) -> None:
    """The inpaint ControlNet's input is the picture with the pixels to repaint at -1: the unit's
    own mask (A1111's {"image", "mask"}), else img2img's inpaint mask; none is an error up front."""
    from webui.controlnet import apply
    from webui.controlnet.units import ControlUnit

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half is to be repainted
    cn_unit = ControlUnit(**unit(module="inpaint_only", image={"image": b64(square()), "mask": b64(mask)}))
    assert cn_unit.mask is not None
    request = req(checkpoint="sd1", controlnet=[cn_unit])
    (prepared,) = apply.prepare(request, engine.controlnets, engine.bundle("sd1"))
    hint = prepared.control((64, 64), torch.device("cpu"), torch.float32)[0]
    assert (hint[:, :, :32] == -1).all() and (hint[:, :, 32:] >= 0).all()
    assert hint[:, 32, 40].min() == 1.0  # the square's white, kept where it is not masked
    masked = px(engine.runner.generate(request).images[0])
    plain = px(engine.runner.generate(req(checkpoint="sd1", controlnet=[unit(module="none")])).images[0])
    assert not np.array_equal(masked, plain)
    with pytest.raises(ValueError, match="controlnet unit 0: the inpaint preprocessor needs a mask"):
        engine.check(req(checkpoint="sd1", controlnet=[unit(module="inpaint_only")]))
    inpaint = req(checkpoint="sd1", init_images=(square(),), mask=mask, denoising_strength=0.8,
                  controlnet=[{"model": "cn_canny", "module": "inpaint"}])  # img2img's mask, img2img's image
    engine.check(inpaint)
    assert engine.runner.generate(inpaint).images[0].size == (64, 64)
