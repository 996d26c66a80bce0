"""The shipped `regional-prompts` extension (`Guidance.parts`, API 1.2): the identity cases the
issue names, and regions that really steer their own area."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_shipped_prompt_extensions import engine_for, infos, pixels, req
from webui.extensions.api import JobRejected

PROMPT = "a red cube AND a blue ball"


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


WHITE, BLACK = b64(Image.new("L", (64, 64), 255)), b64(Image.new("L", (64, 64), 0))


def regions(**args) -> dict:
    return {"regional-prompts": {"enabled": True, **args}}


def test_all_ones_masks_are_plain_and(data_dir: Path) -> None:
    engine = engine_for(data_dir)
    plain = engine.runner.generate(req(prompt=PROMPT, steps=3))
    ones = engine.runner.generate(req(prompt=PROMPT, steps=3,
                                      extensions=regions(common_first=False, masks=[WHITE, WHITE])))
    assert np.abs(pixels(ones.images[0]) - pixels(plain.images[0])).max() <= 1
    assert infos(ones)[0]["Regional prompts"] == "masks" and "Regional prompts" not in infos(plain)[0]


def test_an_all_zero_mask_drops_its_part(data_dir: Path) -> None:
    engine = engine_for(data_dir)
    alone = engine.runner.generate(req(prompt="a red cube", steps=3))
    zero = engine.runner.generate(req(prompt=PROMPT, steps=3,
                                      extensions=regions(common_first=False, masks=[WHITE, BLACK])))
    assert np.abs(pixels(zero.images[0]) - pixels(alone.images[0])).max() <= 2


def test_columns_steer_their_own_half(data_dir: Path) -> None:
    """Common part everywhere, "red cube" on the left, "blue ball" on the right: the left half is
    nearer the image of "castle AND red cube" than the right half is, and the other way round."""
    engine = engine_for(data_dir)
    prompt = "a castle AND a red cube AND a blue ball"
    split = pixels(engine.runner.generate(req(prompt=prompt, steps=3, cfg_scale=9,
                                              extensions=regions(ratios="1,1"))).images[0])
    left_ref = pixels(engine.runner.generate(req(prompt="a castle AND a red cube", steps=3, cfg_scale=9)).images[0])
    right_ref = pixels(engine.runner.generate(req(prompt="a castle AND a blue ball", steps=3, cfg_scale=9)).images[0])

    def dist(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).mean())

    assert dist(split[:, :24], left_ref[:, :24]) < dist(split[:, :24], right_ref[:, :24])
    assert dist(split[:, 40:], right_ref[:, 40:]) < dist(split[:, 40:], left_ref[:, 40:])


def test_wrong_part_count_and_bad_sizes_are_named(data_dir: Path) -> None:
    engine = engine_for(data_dir)
    with pytest.raises(JobRejected, match="the prompt has 2 AND parts; 3 are needed"):
        engine.runner.generate(req(prompt=PROMPT, extensions=regions(ratios="1,1")))
    with pytest.raises(JobRejected, match="region sizes"):
        engine.runner.generate(req(prompt=PROMPT, extensions=regions(ratios="1,wide")))
    with pytest.raises(JobRejected, match="mask 1 is not a base64 image"):
        engine.runner.generate(req(prompt=PROMPT, extensions=regions(masks=["nope"])))
