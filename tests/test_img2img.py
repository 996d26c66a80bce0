"""img2img, inpainting, hires fix, variation seeds, interrupt/skip, previews, concurrency."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from tests.conftest import add_checkpoint
from webui.app import Engine, build_engine
from webui.config import Config
from webui.infotext import parse_infotext
from webui.pipeline.progress import CancelToken, Progress
from webui.pipeline.request import GenerationRequest


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube", steps=6, width=64, height=64, seed=7, sampler_name="Euler", save_images=False)
    base.update(kw)
    return GenerationRequest(**base)


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(np.int16)


@pytest.fixture
def engine(data_dir: Path) -> Engine:
    return build_engine(Config(data_dir=data_dir, dtype="float32"))


@pytest.fixture
def photo() -> Image.Image:
    """A structured 96x80 test image (gradients and shapes)."""
    y, x = np.mgrid[0:80, 0:96]
    arr = np.stack([x * 2.5, y * 3.0, (x + y) * 1.4], axis=-1).astype(np.uint8)
    img = Image.fromarray(arr)
    ImageDraw.Draw(img).ellipse((20, 15, 60, 55), fill=(240, 240, 30))
    return img


def square_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def test_strength_zero_returns_the_input(engine: Engine, photo: Image.Image) -> None:
    out = engine.runner.generate(req(init_images=(photo,), denoising_strength=0.0, width=96, height=80)).images[0]
    assert np.array_equal(px(out), px(photo))


def test_img2img_changes_the_image_and_keeps_its_size(engine: Engine, photo: Image.Image) -> None:
    result = engine.runner.generate(req(init_images=(photo,), denoising_strength=0.6, width=96, height=80))
    out = result.images[0]
    assert out.size == (96, 80)
    assert np.abs(px(out) - px(photo)).mean() > 1
    assert parse_infotext(result.infotexts[0])["Denoising strength"] == "0.6"


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_resize_modes_give_the_requested_size(engine: Engine, photo: Image.Image, mode: int) -> None:
    out = engine.runner.generate(req(init_images=(photo,), denoising_strength=0.3, resize_mode=mode,
                                     width=64, height=96)).images[0]
    assert out.size == (64, 96)


def test_base64_init_image_and_data_url(engine: Engine, photo: Image.Image) -> None:
    from webui.pipeline.request import encode_image

    b64 = encode_image(photo)
    a = engine.runner.generate(req(init_images=(b64,), denoising_strength=0.0, width=96, height=80)).images[0]
    b = engine.runner.generate(req(init_images=("data:image/png;base64," + b64,), denoising_strength=0.0,
                                   width=96, height=80)).images[0]
    assert np.array_equal(px(a), px(photo)) and np.array_equal(px(b), px(photo))
    with pytest.raises(ValueError, match="base64"):
        req(init_images=("%%%not base64%%%",))
    with pytest.raises(ValueError, match="not an image"):
        req(init_images=("aGVsbG8gd29ybGQ=",))


@pytest.mark.parametrize("checkpoint", ["sd1.safetensors", "sd1-inpaint.safetensors"])
@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpainting_keeps_unmasked_pixels(data_dir: Path, checkpoint_store: Path, photo: Image.Image,
                                          checkpoint: str, fill: int) -> None:
    add_checkpoint(data_dir, checkpoint_store, "sd1-inpaint.safetensors")
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    mask = square_mask(photo.size, (30, 20, 70, 60))
    out = engine.runner.generate(req(checkpoint=checkpoint, init_images=(photo,), mask=mask, mask_blur=4,
                                     inpainting_fill=fill, denoising_strength=0.9, width=96, height=80)).images[0]
    untouched = np.asarray(mask.filter(ImageFilter.GaussianBlur(4))) == 0
    assert np.array_equal(px(out)[untouched], px(photo)[untouched])
    inside = np.asarray(mask) == 255
    assert np.abs(px(out)[inside] - px(photo)[inside]).mean() > 1


def test_outpainting_extends_the_canvas_and_keeps_the_original(engine: Engine, photo: Image.Image) -> None:
    from webui.pipeline.init_image import Outpaint, extend_canvas

    image, mask = extend_canvas(photo, Outpaint(left=16, right=20))  # 96 + 36 = 132 -> 136
    assert image.size == (136, 80) and mask.size == (136, 80)
    m = np.asarray(mask)
    assert (m[:, :16 + 8] == 255).all() and (m[:, 16 + 8:16 + 96 - 8] == 0).all() and (m[:, 16 + 96 - 8:] == 255).all()
    # the request names the border; the engine grows the canvas the same way
    out = engine.runner.generate(req(init_images=(photo,), outpaint=(16, 0, 20, 0), mask_blur=2, inpainting_fill=0,
                                     denoising_strength=0.9)).images[0]
    assert out.size == (136, 80)
    kept = np.asarray(mask.filter(ImageFilter.GaussianBlur(2))) == 0
    assert np.array_equal(px(out)[kept], px(image)[kept])
    assert np.array_equal(px(image)[:, 16:112][:, 12:84], px(photo)[:, 12:84])  # the original sits in the middle
    assert np.abs(px(out)[:, :8] - px(image)[:, :8]).mean() > 1  # the border was painted
    with pytest.raises(ValueError, match="LEFT,TOP,RIGHT,BOTTOM"):
        Outpaint.parse("1,2,3")
    with pytest.raises(ValueError, match="outpaint: four sizes"):
        req(init_images=(photo,), outpaint=(0, -8, 0, 0))
    with pytest.raises(ValueError, match="exactly one init image"):
        req(init_images=(photo, photo), outpaint=(0, 8, 0, 0))


def test_inpaint_only_masked_at_full_resolution(engine: Engine, photo: Image.Image) -> None:
    mask = square_mask(photo.size, (40, 30, 55, 45))
    result = engine.runner.generate(req(init_images=(photo,), mask=mask, mask_blur=2, inpaint_full_res=True,
                                        inpaint_full_res_padding=8, denoising_strength=0.9, width=64, height=64))
    out = result.images[0]
    assert out.size == photo.size  # pasted back into the original
    untouched = np.asarray(mask.filter(ImageFilter.GaussianBlur(2))) == 0
    assert np.array_equal(px(out)[untouched], px(photo)[untouched])
    assert parse_infotext(result.infotexts[0])["Inpaint area"] == "Only masked"


def test_inverted_mask_repaints_the_outside(engine: Engine, photo: Image.Image) -> None:
    mask = square_mask(photo.size, (30, 20, 70, 60))
    out = engine.runner.generate(req(init_images=(photo,), mask=mask, mask_blur=0, inpainting_mask_invert=1,
                                     denoising_strength=0.9, width=96, height=80)).images[0]
    inside = np.asarray(mask) == 255
    assert np.array_equal(px(out)[inside], px(photo)[inside])


def test_hires_fix_reaches_the_target_size(engine: Engine) -> None:
    steps_seen: list[int] = []
    result = engine.runner.generate(req(enable_hr=True, hr_scale=1.5, denoising_strength=0.5),
                                    progress=lambda p: steps_seen.append(p.total_steps))
    assert result.images[0].size == (96, 96)
    assert steps_seen[-1] == 6 + 3  # first pass + int(0.5 * 6) hires steps
    fields = parse_infotext(result.infotexts[0])
    assert fields["Hires upscale"] == "1.5" and fields["Hires upscaler"] == "Latent"
    sized = engine.runner.generate(req(enable_hr=True, hr_resize_x=128, hr_resize_y=80, hr_second_pass_steps=2))
    assert sized.images[0].size == (128, 80)
    assert parse_infotext(sized.infotexts[0])["Hires resize"] == "128x80"


def test_variation_strength_zero_and_one(engine: Engine) -> None:
    base = px(engine.runner.generate(req(seed=7)).images[0])
    other = px(engine.runner.generate(req(seed=99)).images[0])
    zero = px(engine.runner.generate(req(seed=7, subseed=99, subseed_strength=0.0)).images[0])
    one = engine.runner.generate(req(seed=7, subseed=99, subseed_strength=1.0))
    half = px(engine.runner.generate(req(seed=7, subseed=99, subseed_strength=0.5)).images[0])
    assert np.array_equal(zero, base)
    assert np.abs(px(one.images[0]) - other).max() <= 1
    assert not np.array_equal(half, base) and not np.array_equal(half, other)
    fields = parse_infotext(one.infotexts[0])
    assert fields["Variation seed"] == "99" and fields["Variation seed strength"] == "1"


def test_seed_resize_from_keeps_the_composition(engine: Engine) -> None:
    same = px(engine.runner.generate(req(seed_resize_from_w=64, seed_resize_from_h=64)).images[0])
    assert np.array_equal(same, px(engine.runner.generate(req()).images[0]))
    wider = engine.runner.generate(req(width=96, seed_resize_from_w=64, seed_resize_from_h=64)).images[0]
    assert wider.size == (96, 64)


def test_interrupt_stops_within_one_step_and_keeps_the_image(engine: Engine) -> None:
    token = CancelToken()
    seen: list[int] = []

    def progress(p: Progress) -> None:
        seen.append(p.step)
        if p.step == 2:
            token.interrupt()

    result = engine.runner.generate(req(steps=10, n_iter=3), progress=progress, cancel=token)
    assert seen == [1, 2]
    assert result.interrupted and len(result.images) == 1


def test_interrupt_in_the_hires_pass_keeps_the_hires_image(engine: Engine) -> None:
    token = CancelToken()

    def progress(p: Progress) -> None:
        if p.step == 5:  # the first pass has 4 steps: this is the second pass's first
            token.interrupt()

    result = engine.runner.generate(req(steps=4, enable_hr=True, hr_scale=1.5, denoising_strength=0.5),
                                    progress=progress, cancel=token)
    assert result.interrupted and [im.size for im in result.images] == [(96, 96)]
    assert "Hires upscale: 1.5" in result.infotexts[0]


def test_skip_ends_the_batch_and_goes_on(engine: Engine) -> None:
    token = CancelToken()

    def progress(p: Progress) -> None:
        if p.step == 2:
            token.skip()

    result = engine.runner.generate(req(steps=5, n_iter=2), progress=progress, cancel=token)
    assert not result.interrupted and len(result.images) == 2 and result.seeds == [7, 8]


def test_previews_arrive_every_n_steps(engine: Engine) -> None:
    previews = []
    engine.runner.generate(req(steps=6), progress=lambda p: previews.append(p.preview), preview_every=2)
    assert [p is not None for p in previews] == [False, True, False, True, False, True]
    assert previews[1][0].size == (64, 64)


def test_previews_use_taesd_when_its_decoder_is_there(engine: Engine, data_dir: Path) -> None:
    from webui.pipeline.taesd import TaesdPreviewer, load_taesd
    from webui.testing.make_taesd import write_taesd

    def last_preview() -> Image.Image:
        seen: list = []
        engine.runner.generate(req(steps=2), progress=lambda p: seen.append(p.preview), preview_every=1)
        return seen[-1][0]

    approx = px(last_preview())
    path = write_taesd(data_dir / "models" / "VAE-approx" / "taesd_decoder.safetensors", seed=3)
    taesd = last_preview()
    assert taesd.size == (64, 64) and np.abs(px(taesd) - approx).mean() > 1
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = TaesdPreviewer(load_taesd(path, "cpu", torch.float32))(z)[0]
    assert np.abs(px(engine.runner.previewer(engine.bundle(None))(z)[0]) - px(expected)).max() <= 1
    # a broken decoder file: the job still runs, with the approximation
    path.write_bytes(b"not a safetensors file")
    assert np.abs(px(last_preview()) - approx).max() == 0


def test_tiling_is_undone_after_the_job(engine: Engine) -> None:
    result = engine.runner.generate(req(tiling=True))
    assert "Tiling: True" in result.infotexts[0]
    bundle = engine.bundle(None)
    assert all(m.padding_mode == "zeros" for m in bundle.unet.modules() if isinstance(m, torch.nn.Conv2d))


def test_two_concurrent_jobs_keep_their_own_parameters(engine: Engine) -> None:
    results = {}

    def run(name: str, request: GenerationRequest) -> None:
        results[name] = engine.runner.generate(request)

    a = threading.Thread(target=run, args=("a", req(prompt="a red cube", seed=1, steps=4)))
    b = threading.Thread(target=run, args=("b", req(prompt="a blue ball", seed=2, steps=3, width=72)))
    a.start(), b.start()
    a.join(60), b.join(60)
    fa, fb = parse_infotext(results["a"].infotexts[0]), parse_infotext(results["b"].infotexts[0])
    assert (fa["Prompt"], fa["Seed"], fa["Steps"], fa["Size"]) == ("a red cube", "1", "4", "64x64")
    assert (fb["Prompt"], fb["Seed"], fb["Steps"], fb["Size"]) == ("a blue ball", "2", "3", "72x64")


def test_mask_without_image_is_rejected() -> None:
    with pytest.raises(ValueError, match="mask needs an init image"):
        req(mask=Image.new("L", (8, 8)))


def test_sampler_options_reach_the_sampler(engine: Engine) -> None:
    base = px(engine.runner.generate(req(sampler_name="Euler a")).images[0])
    no_noise = engine.runner.generate(req(sampler_name="Euler a", eta=0.0))
    euler = px(engine.runner.generate(req(sampler_name="Euler")).images[0])
    # Euler a with eta 0 adds no noise: it is Euler
    assert np.abs(px(no_noise.images[0]) - euler).max() <= 1
    assert not np.array_equal(base, euler)
    assert parse_infotext(no_noise.infotexts[0])["Eta"] == "0"
    churned = px(engine.runner.generate(req(sampler_name="Euler", s_churn=5.0)).images[0])
    assert not np.array_equal(churned, euler)
    # options a sampler does not take are ignored, not an error
    assert engine.runner.generate(req(sampler_name="DPM++ 2M", eta=0.5, s_churn=1.0)).images
