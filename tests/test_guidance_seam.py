"""Combining guidance as an extension seam (`DenoiserStage.combine`, API 1.1), and the shipped
`cfg-rescale` extension written on it; the other denoiser seams (model inputs, attention
processors, nested generations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_extensions import write_extension
from tests.test_shipped_prompt_extensions import engine_for, infos, load_module, pixels, req
from webui.extensions.api import Guidance


def test_cfg_rescale_formula() -> None:
    rescale = load_module("cfg-rescale")
    gen = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(4, 8, 8, generator=gen) * 3, torch.tensor(2.5)
    cond, uncond = torch.randn(4, 8, 8, generator=gen), torch.randn(4, 8, 8, generator=gen)
    g = Guidance(cond, uncond, 9.0, x, sigma)
    guided = g.cfg()
    assert torch.allclose(rescale.rescaled(guided, g, 0.0), guided, atol=1e-5)  # phi 0: plain CFG

    def v(x0: torch.Tensor) -> torch.Tensor:  # the paper's space, written out independently
        return (x / (sigma**2 + 1) - x0) * (sigma**2 + 1) ** 0.5 / sigma

    full = rescale.rescaled(guided, g, 1.0)
    assert torch.isclose(v(full).std(), v(cond).std(), rtol=1e-4)  # phi 1: the conditional spread
    assert v(guided).std() > 2 * v(cond).std()  # (which plain CFG at scale 9 overshoots)
    half = rescale.rescaled(guided, g, 0.5)
    assert torch.allclose(half, (full + guided) / 2, atol=1e-5)  # a straight mix


def test_cfg_rescale_off_by_default_on_changes_the_image(data_dir: Path) -> None:
    engine = engine_for(data_dir)
    clean = engine_for(data_dir, disable_all_extensions=True).runner.generate(req(cfg_scale=12))
    default = engine.runner.generate(req(cfg_scale=12))
    assert np.array_equal(pixels(default.images[0]), pixels(clean.images[0]))
    assert "CFG Rescale φ" not in infos(default)[0]
    on = engine.runner.generate(req(cfg_scale=12, extensions={"cfg-rescale": {"args": [1.0]}}))
    assert not np.array_equal(pixels(on.images[0]), pixels(clean.images[0]))
    assert infos(on)[0]["CFG Rescale φ"] == "1"
    after = engine.runner.generate(req(cfg_scale=12))  # the next job is untouched
    assert np.array_equal(pixels(after.images[0]), pixels(clean.images[0]))
    with pytest.raises(ValueError, match="cfg-rescale.*phi"):
        engine.runner.generate(req(extensions={"cfg-rescale": {"phi": 3}}))


def test_an_extension_sees_cond_and_uncond_apart(data_dir: Path) -> None:
    """An extension combining guidance itself: returning `cond` alone is guidance off (the image of
    CFG scale 1), whatever the request's scale, and `Guidance.cfg` reproduces the built-in one."""
    write_extension(data_dir, "cond-only", '''
        from webui.extensions.api import hookimpl

        @hookimpl
        def setup_denoiser(stage):
            mode = (stage.request.prompt or "").split()[-1]
            if mode == "condonly":
                stage.combine = lambda g: g.cond
            elif mode == "cfg":
                stage.combine = lambda g: g.cfg()
    ''')
    engine = engine_for(data_dir)
    cond_only = engine.runner.generate(req(prompt="a red cube condonly", cfg_scale=9))
    scale_one = engine.runner.generate(req(prompt="a red cube condonly", cfg_scale=1))  # no uncond rows at 1
    assert np.abs(pixels(cond_only.images[0]) - pixels(scale_one.images[0])).max() <= 1
    via_seam = engine.runner.generate(req(prompt="a red cube cfg", cfg_scale=9))
    plain = engine_for(data_dir, disable_all_extensions=True).runner.generate(req(prompt="a red cube cfg", cfg_scale=9))
    assert np.abs(pixels(via_seam.images[0]) - pixels(plain.images[0])).max() <= 1


def test_model_inputs_reach_every_model_call(data_dir: Path) -> None:
    """`DenoiserStage.model_inputs`: an extension sees each model call (step, rows, input shape)
    and adds UNet inputs; a zero mid-block residual changes nothing, a non-zero one the image, and
    the next job without it is untouched (what ControlNet will use)."""
    write_extension(data_dir, "residual", '''
        import torch
        from webui.extensions.api import hookimpl

        @hookimpl
        def setup_denoiser(stage):
            strength = {"zero": 0.0, "push": 5.0}.get((stage.request.prompt or "").split()[-1])
            if strength is None:
                return
            cfg = stage.unet.config
            seen = stage.scratch.setdefault("calls", [])

            def add(call):
                rows, _, h, w = call.x.shape
                down = 2 ** (len(cfg.block_out_channels) - 1)
                shape = (rows, cfg.block_out_channels[-1], h // down, w // down)
                call.kwargs["mid_block_additional_residual"] = torch.full(shape, strength, dtype=call.x.dtype,
                                                                          device=call.x.device)
                seen.append((call.step, rows, len(call.row_image), call.uncond_rows is not None))

            stage.model_inputs.append(add)

        @hookimpl
        def step_end(stage):  # the same scratch as setup_denoiser's, for this job
            if "calls" in stage.scratch:
                stage.infotext["Model calls"] = len(stage.scratch["calls"])
                stage.infotext["Last call"] = "step {} rows {} images {} guided {}".format(*stage.scratch["calls"][-1])
    ''')
    engine = engine_for(data_dir)
    plain = engine_for(data_dir, disable_all_extensions=True).runner.generate(req(prompt="a red cube zero"))
    zero = engine.runner.generate(req(prompt="a red cube zero"))
    assert np.array_equal(pixels(zero.images[0]), pixels(plain.images[0]))
    assert infos(zero)[0]["Model calls"] == "2"  # Euler, 2 steps: one call per step
    assert infos(zero)[0]["Last call"] == "step 2 rows 2 images 2 guided True"  # cond + uncond row
    pushed = engine.runner.generate(req(prompt="a red cube push"))
    assert not np.array_equal(pixels(pushed.images[0]), pixels(plain.images[0]))
    after = engine.runner.generate(req(prompt="a red cube zero"))
    assert np.array_equal(pixels(after.images[0]), pixels(plain.images[0]))


def test_attention_processors_for_one_job_only(data_dir: Path) -> None:
    """`DenoiserStage.set_attn_processor` (API 1.2): an extension wraps the app's processors
    (same image, every layer called) or replaces them (another image, and with cross-attention
    kwargs from `model_inputs`); after the job the app's own processors are back."""
    write_extension(data_dir, "attn", '''
        from webui.extensions.api import hookimpl

        class Counting:
            def __init__(self, inner, seen):
                self.inner, self.seen = inner, seen

            # diffusers passes a cross-attention kwarg only to a processor that names it
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, strength=1.0):
                self.seen.append(strength)
                return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask) * strength

        @hookimpl
        def setup_denoiser(stage):
            mode = (stage.request.prompt or "").split()[-1]
            if mode not in ("wrap", "scale"):
                return
            seen = stage.scratch.setdefault("seen", [])
            stage.set_attn_processor({name: Counting(p, seen) for name, p in stage.unet.attn_processors.items()})
            if mode == "scale":
                stage.model_inputs.append(lambda call: call.kwargs.update(cross_attention_kwargs={"strength": 0.5}))

        @hookimpl
        def step_end(stage):
            if "seen" in stage.scratch:
                stage.infotext["Attention calls"] = len(stage.scratch["seen"])
                stage.infotext["Strengths"] = " ".join(sorted({str(s) for s in stage.scratch["seen"]}))
    ''')
    engine = engine_for(data_dir)
    unet = engine.bundle(None).unet
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    clean = engine_for(data_dir, disable_all_extensions=True).runner
    wrapped = engine.runner.generate(req(prompt="a red cube wrap"))
    assert np.array_equal(pixels(wrapped.images[0]), pixels(clean.generate(req(prompt="a red cube wrap")).images[0]))
    assert int(infos(wrapped)[0]["Attention calls"]) == 2 * len(before)  # 2 steps, every layer once each
    assert infos(wrapped)[0]["Strengths"] == "1.0"
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before
    scaled = engine.runner.generate(req(prompt="a red cube scale"))
    assert infos(scaled)[0]["Strengths"] == "0.5"
    assert not np.array_equal(pixels(scaled.images[0]),
                              pixels(clean.generate(req(prompt="a red cube scale")).images[0]))
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before
    after = engine.runner.generate(req(prompt="a red cube"))  # the extension leaves this job alone
    assert "Attention calls" not in infos(after)[0]
    assert np.array_equal(pixels(after.images[0]), pixels(clean.generate(req(prompt="a red cube")).images[0]))


def test_a_nested_generation_from_postprocess_repaints_a_region(data_dir: Path) -> None:
    """`ImageStage.generate`: a detailer-style pass, run through the engine from inside the job on
    the same model: img2img of the image with a mask over its top-left quarter changes that
    quarter only, is recorded in the infotext, and runs no hooks itself (no endless recursion)."""
    write_extension(data_dir, "detailer", '''
        from PIL import Image
        from webui.extensions.api import hookimpl

        @hookimpl
        def postprocess_image(stage):
            if not stage.request.prompt.endswith("detail"):
                return
            w, h = stage.image.size
            mask = Image.new("L", (w, h), 0)
            mask.paste(255, (0, 0, w // 2, h // 2))
            result = stage.generate(prompt="a shiny detail", init_images=(stage.image,), mask=mask,
                                    mask_blur=0, denoising_strength=0.9, inpainting_fill=1, width=w, height=h)
            stage.image = result.images[0]
            stage.infotext["Detailer"] = "top-left"
    ''')
    engine = engine_for(data_dir)
    plain = engine_for(data_dir, disable_all_extensions=True).runner.generate(req(prompt="a red cube detail"))
    detailed = engine.runner.generate(req(prompt="a red cube detail"))
    a, b = pixels(plain.images[0]), pixels(detailed.images[0])
    changed = np.abs(a - b).sum(axis=2) > 0
    assert changed[:32, :32].mean() > 0.5  # the masked quarter was repainted
    assert not changed[:, 40:].any() and not changed[40:, :].any()  # away from it, the same pixels
    assert infos(detailed)[0]["Detailer"] == "top-left"
    assert len(detailed.images) == 1 and detailed.paths == []
