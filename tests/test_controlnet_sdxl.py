"""SDXL's own kinds of ControlNet on tiny random weights in their published layouts: union models
(xinsir's: one model, a control type chosen per unit; detection, the type from the unit or its
preprocessor, the model's own count of types, the infotext, a model for another family) and
Stability's control-LoRAs (the UNet's encoder plus low-rank changes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import add_checkpoint
from tests.test_controlnet import px, req, square
from webui.app import Engine, build_engine
from webui.config import Config
from webui.controlnet.units import units_from_infotext
from webui.infotext import parse_infotext
from webui.models.errors import ModelError
from webui.testing.make_controlnet import write_control_lora, write_controlnet


@pytest.fixture
def engine(data_dir: Path, checkpoint_store: Path) -> Engine:
    add_checkpoint(data_dir, checkpoint_store, "sdxl.safetensors")
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    unet = engine.bundle("sdxl").unet
    folder = data_dir / "models" / "ControlNet"
    write_controlnet(folder / "union_promax.safetensors", unet, strength=0.5, seed=1, union_types=8)
    write_controlnet(folder / "union_first.safetensors", unet, strength=0.5, seed=2, union_types=6)
    write_controlnet(folder / "union_zero.safetensors", unet, strength=0.0, seed=3, union_types=8)
    return engine


def union(**kw) -> dict:
    return {"model": "union_promax", "module": "canny", "image": square(), **kw}


def test_the_control_type_steers_a_union_model(engine: Engine) -> None:
    plain = px(engine.runner.generate(req(checkpoint="sdxl")).images[0])
    zero = engine.runner.generate(req(checkpoint="sdxl", controlnet=[union(model="union_zero")]))
    assert np.array_equal(px(zero.images[0]), plain)  # zero convolutions at zero: no change, whatever the type
    edges = engine.runner.generate(req(checkpoint="sdxl", controlnet=[union()]))
    assert np.abs(px(edges.images[0]) - plain).mean() > 1
    assert "Union Control Type" not in parse_infotext(edges.infotexts[0])["ControlNet 0"]  # canny says "Hard Edge"
    named = engine.runner.generate(req(checkpoint="sdxl", controlnet=[union(union_control_type="hard edge")]))
    assert np.array_equal(px(named.images[0]), px(edges.images[0]))
    depth = engine.runner.generate(req(checkpoint="sdxl", controlnet=[union(union_control_type="Depth")]))
    assert not np.array_equal(px(depth.images[0]), px(edges.images[0]))  # same picture, another type
    info = parse_infotext(depth.infotexts[0])["ControlNet 0"]
    assert info.endswith(", Union Control Type: Depth")
    back = units_from_infotext(parse_infotext(depth.infotexts[0]))[0]
    assert back["union_control_type"] == "Depth" and back["module"] == "canny"
    again = engine.runner.generate(req(checkpoint="sdxl", controlnet=[{**back, "image": square()}]))
    assert np.array_equal(px(again.images[0]), px(depth.images[0]))
    tile = engine.runner.generate(req(checkpoint="sdxl", controlnet=[union(module="tile_resample")]))
    assert not np.array_equal(px(tile.images[0]), px(edges.images[0]))
    after = engine.runner.generate(req(checkpoint="sdxl"))  # nothing stays patched
    assert np.array_equal(px(after.images[0]), plain)


def test_two_union_units_and_a_union_models_own_types(engine: Engine) -> None:
    one = px(engine.runner.generate(req(checkpoint="sdxl", controlnet=[union()])).images[0])
    light = Image.new("RGB", (64, 64), (200, 200, 200))
    two = engine.runner.generate(req(checkpoint="sdxl", controlnet=[
        union(), union(module="none", image=light, union_control_type="Tile", weight=0.7)]))
    assert not np.array_equal(px(two.images[0]), one)
    first = engine.runner.generate(req(checkpoint="sdxl", controlnet=[union(model="union_first")]))
    assert first.images[0].size == (64, 64)
    with pytest.raises(ValueError, match=r"union_first knows 6 control types \(OpenPose, .*Segmentation\), not 'Tile'"):
        engine.runner.generate(req(checkpoint="sdxl", controlnet=[union(model="union_first", module="tile_resample")]))
    with pytest.raises(ValueError, match="union_promax is a union model; choose its control type .*'shuffle'"):
        engine.runner.generate(req(checkpoint="sdxl", controlnet=[union(module="shuffle")]))
    with pytest.raises(ValueError, match="unknown union_control_type 'Pose'"):
        req(controlnet=[union(union_control_type="Pose")])
    with pytest.raises(ModelError, match="union_promax is a union model for SDXL; it does not fit sd1"):
        engine.runner.generate(req(checkpoint="sd1", controlnet=[union()]))
    assert any(t.startswith("union_promax [") for t in engine.controlnets.titles())


def test_a_control_lora_is_its_unets_encoder_plus_its_changes(engine: Engine, data_dir: Path) -> None:
    """A control-LoRA gives the pictures of the same ControlNet written whole; the layers it leaves
    out come from the loaded UNet; on another family it is refused by name."""
    folder = data_dir / "models" / "ControlNet"
    write_control_lora(folder / "control-lora-canny-rank4.safetensors", engine.bundle("sdxl").unet, strength=0.5,
                       full=folder / "control-canny-whole.safetensors")
    plain = px(engine.runner.generate(req(checkpoint="sdxl")).images[0])
    lora = engine.runner.generate(req(checkpoint="sdxl", controlnet=[union(model="control-lora-canny-rank4")]))
    whole = engine.runner.generate(req(checkpoint="sdxl", controlnet=[union(model="control-canny-whole")]))
    assert np.abs(px(lora.images[0]) - plain).mean() > 1
    assert np.abs(px(lora.images[0]) - px(whole.images[0])).max() <= 1
    assert "Model: control-lora-canny-rank4 [" in lora.infotexts[0]
    net = engine.controlnets.load("control-lora-canny-rank4", engine.bundle("sdxl"))
    unet_storage = {t.untyped_storage().data_ptr() for t in engine.bundle("sdxl").unet.state_dict().values()}
    assert not any(t.untyped_storage().data_ptr() in unet_storage for t in net.state_dict().values())  # copies
    with pytest.raises(ModelError, match="control-LoRA layer .* does not fit sd1"):
        engine.runner.generate(req(checkpoint="sd1", controlnet=[union(model="control-lora-canny-rank4")]))
