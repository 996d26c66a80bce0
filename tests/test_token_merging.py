"""Token merging (ToMe): the merge itself, and per job on the tiny checkpoint -- on changes the
pixels, off is bit-exact, nothing stays installed, the API override and the infotext."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.test_shipped_prompt_extensions import engine_for, infos, pixels, req
from webui.pipeline.tome import bipartite_merge


def test_merging_identical_tokens_loses_nothing() -> None:
    """Tokens constant over each 2x2 cell: merging 3/4 of them (every source into its own cell's
    destination, the only one it is parallel to) and unmerging gives them back exactly."""
    gen = torch.Generator().manual_seed(0)
    cells = torch.randn(2, 4, 4, 8, generator=gen)  # [B, h/2, w/2, C]
    x = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, 64, 8)
    merge, unmerge = bipartite_merge(x, 8, 8, 0.75)
    merged = merge(x)
    assert merged.shape == (2, 16, 8)
    assert torch.allclose(unmerge(merged), x, atol=1e-6)
    m_half, u_half = bipartite_merge(x, 8, 8, 0.5)
    assert m_half(x).shape == (2, 32, 8) and torch.allclose(u_half(m_half(x)), x, atol=1e-6)
    same, back = bipartite_merge(x, 8, 8, 0.0)
    assert same(x) is x and back(x) is x


def test_per_job_on_off_and_restored(data_dir: Path) -> None:
    engine = engine_for(data_dir)
    unet = engine.bundle(None).unet
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    plain = engine.runner.generate(req(steps=3))
    merged = engine.runner.generate(req(steps=3, token_merging_ratio=0.5))
    assert not np.array_equal(pixels(merged.images[0]), pixels(plain.images[0]))
    assert infos(merged)[0]["Token merging ratio"] == "0.5" and "Token merging ratio" not in infos(plain)[0]
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    again = engine.runner.generate(req(steps=3))
    assert np.array_equal(pixels(again.images[0]), pixels(plain.images[0]))  # off is bit-exact
    engine.settings.update({"token_merging_ratio": 0.5})
    from_settings = engine.runner.generate(req(steps=3))
    assert np.array_equal(pixels(from_settings.images[0]), pixels(merged.images[0]))
    overridden = engine.runner.generate(req(steps=3, token_merging_ratio=0))
    assert np.array_equal(pixels(overridden.images[0]), pixels(plain.images[0]))
    hires = engine.runner.generate(req(steps=3, enable_hr=True, hr_scale=1.5, token_merging_ratio_hr=0.3))
    assert infos(hires)[0]["Token merging ratio hr"] == "0.3"


def test_override_settings_over_the_api(data_dir: Path) -> None:
    from webui.api.models import GenerationBody

    request, notes = GenerationBody.model_validate({
        "prompt": "x", "override_settings": {"token_merging_ratio": 0.4, "token_merging_ratio_hr": 0.2}}).to_request()
    assert request.token_merging_ratio == 0.4 and request.token_merging_ratio_hr == 0.2 and not notes


def test_the_infotext_reads_back_into_the_request() -> None:
    from webui.infotext import infotext_to_fields, parse_infotext

    text = "a cube\nSteps: 3, Sampler: Euler, Seed: 5, Size: 64x64, Token merging ratio: 0.5, Token merging ratio hr: 0.3"
    fields = infotext_to_fields(parse_infotext(text))
    assert fields["token_merging_ratio"] == 0.5 and fields["token_merging_ratio_hr"] == 0.3


def test_the_img2img_ratio(data_dir: Path) -> None:
    """A1111's "Token merging ratio for img2img": img2img only, and the request's ratio wins."""
    from PIL import Image

    engine = engine_for(data_dir)
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    plain_txt = engine.runner.generate(req(steps=3))
    explicit = engine.runner.generate(req(steps=3, init_images=(init,), token_merging_ratio=0.5))
    engine.settings.update({"token_merging_ratio_img2img": 0.5})
    from_setting = engine.runner.generate(req(steps=3, init_images=(init,)))
    assert np.array_equal(pixels(from_setting.images[0]), pixels(explicit.images[0]))
    assert infos(from_setting)[0]["Token merging ratio"] == "0.5"
    txt = engine.runner.generate(req(steps=3))  # txt2img keeps the general ratio (0)
    assert np.array_equal(pixels(txt.images[0]), pixels(plain_txt.images[0]))
    off = engine.runner.generate(req(steps=3, init_images=(init,), token_merging_ratio=0))
    assert "Token merging ratio" not in infos(off)[0]
