"""ControlNet preprocessors that need weights (#17): depth from a Depth Anything or DPT model the
user put in models/ControlNet/annotators/ (tiny random-weight ones here, in transformers' own
format); listed always, refused with what to put where when the folder is empty."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from webui.app import build_engine
from webui.config import Config
from webui.controlnet import preprocess
from webui.pipeline.request import GenerationRequest
from webui.testing.make_controlnet import write_controlnet


def write_depth_model(folder: Path, kind: str = "depth_anything") -> Path:
    """A tiny random-weight depth model saved as transformers saves one (config.json + model.safetensors)."""
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTConfig,
        DPTForDepthEstimation,
    )

    torch.manual_seed(0)
    if kind == "depth_anything":
        backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                                reshape_hidden_states=False)
        model = DepthAnythingForDepthEstimation(DepthAnythingConfig(
            backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
            fusion_hidden_size=16, head_hidden_size=8, patch_size=14))
    else:
        model = DPTForDepthEstimation(DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                                intermediate_size=64, image_size=64, patch_size=16,
                                                backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                                                fusion_hidden_size=16, head_in_index=-1))
    model.save_pretrained(folder)
    return folder


def picture() -> Image.Image:
    """A left-to-right grey ramp with a bright square: something with structure."""
    ramp = np.tile(np.linspace(0, 255, 96, dtype=np.float32), (80, 1))
    ramp[20:50, 30:60] = 255
    return Image.fromarray(ramp.astype(np.uint8)).convert("RGB")


def test_depth_preprocessors_run_the_users_model_and_say_what_is_missing(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    annotators = engine.controlnets.annotators
    assert {"depth_anything", "depth_anything_v2", "depth_midas"} <= set(preprocess.names())
    with pytest.raises(ValueError, match=r"depth_anything needs a depth model .* in .*annotators/depth_anything"):
        preprocess.check("depth_anything", annotators)
    write_depth_model(annotators.folder / "depth_anything")
    write_depth_model(annotators.folder / "depth_midas", kind="dpt")
    for name in ("depth_anything", "depth_midas"):
        preprocess.check(name, annotators)
        depth = preprocess.run(name, picture(), 64, -1, -1, annotators)
        grey = np.asarray(depth.convert("L"), dtype=np.float32)
        assert depth.size == (77, 64) and depth.mode == "RGB"  # the picture at the processor resolution
        assert grey.min() == 0 and grey.max() == 255  # stretched to the full range, near = white
    (annotators.folder / "depth_anything_v2").mkdir()
    (annotators.folder / "depth_anything_v2" / "config.json").write_text('{"model_type": "dpt"}')
    with pytest.raises(ValueError, match="model.safetensors"):
        preprocess.check("depth_anything_v2", annotators)



def test_a_normal_map_from_depth_slopes() -> None:
    """Flat ground faces the viewer (127, 127, 255); a surface rising to the right (near on the right)
    leans its normal the same way in red; the steeper, the further; background stays flat."""
    from webui.controlnet.annotators import normal_from_depth

    flat = normal_from_depth(np.full((16, 16), 3.0, dtype=np.float32), 0.4)
    assert (flat == (127, 127, 255)).all()
    x = np.linspace(0, 1, 32, dtype=np.float32)
    gentle = normal_from_depth(np.tile(x * 4, (16, 1)), 0.0)[4:-4, 4:-4]
    steep = normal_from_depth(np.tile(x * 16, (16, 1)), 0.0)[4:-4, 4:-4]
    assert (gentle[..., 0] > 127).all() and (gentle[..., 1] == 127).all()  # leans in x only
    assert (steep[..., 0] > gentle[..., 0]).all() and (steep[..., 2] < gentle[..., 2]).all()
    down = normal_from_depth(np.tile(x[:, None] * 4, (1, 16)), 0.0)[4:-4, 4:-4]
    assert (down[..., 1] > 127).all() and (down[..., 0] == 127).all()  # rising downwards: green
    masked = normal_from_depth(np.tile(x * 4, (16, 1)), 0.5)  # the far (low) half is background
    assert (masked[:, 2:14] == (127, 127, 255)).all() and (masked[4:-4, 18:-4, 0] > 127).all()


def test_normal_midas_reads_the_depth_midas_model(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    annotators = engine.controlnets.annotators
    assert "normal_midas" in preprocess.names() and preprocess.defaults("normal_midas") == (0.4, 0.0)
    with pytest.raises(ValueError, match=r"normal_midas needs a depth model .* in .*annotators/depth_midas"):
        preprocess.check("normal_midas", annotators)
    write_depth_model(annotators.folder / "depth_midas", kind="dpt")
    preprocess.check("normal_midas", annotators)
    normal = np.asarray(preprocess.run("normal_midas", picture(), 64, -1, -1, annotators))
    assert normal.shape == (64, 77, 3)
    lengths = np.linalg.norm(normal.astype(np.float32) / 127.5 - 1, axis=2)
    assert np.abs(lengths - 1).max() < 0.03  # unit normals, as colours
    assert (normal[..., 2] >= 127).all()  # every normal faces the viewer's side
    everything_background = np.asarray(preprocess.run("normal_midas", picture(), 64, 1.01, -1, annotators))
    assert (everything_background == (127, 127, 255)).all()  # threshold A is the background level

def test_a_depth_unit_in_a_generation_and_over_the_api(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    write_controlnet(data_dir / "models" / "ControlNet" / "control_v11f1p_sd15_depth.safetensors",
                     engine.bundle("sd1").unet, strength=0.5, seed=2)
    base = dict(prompt="a room", steps=2, width=64, height=64, seed=3, save_images=False, checkpoint="sd1")
    unit = {"model": "control_v11f1p_sd15_depth", "module": "depth_anything", "image": picture()}
    request = GenerationRequest(**base, controlnet=[unit])
    with pytest.raises(ValueError, match="annotators/depth_anything"):
        engine.check(request)  # before the job: the user learns what to put where
    write_depth_model(engine.controlnets.annotators.folder / "depth_anything")
    engine.check(request)
    result = engine.runner.generate(request)
    assert 'Module: depth_anything' in result.infotexts[0]
    plain = engine.runner.generate(GenerationRequest(**base))
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))


def test_hed_and_line_art_networks_from_the_files_users_have(tmp_path: Path) -> None:
    """ControlNetHED.pth and sk_model.pth / sk_model2.pth (random weights here, written in the
    layout of those files) found anywhere under the annotators folder, run at the image's size."""
    import torch

    from webui.controlnet.annotator_nets import HED, LineArt
    from webui.controlnet.annotators import Annotators

    annotators = Annotators(tmp_path / "annotators")
    with pytest.raises(ValueError, match=r"softedge_hed needs ControlNetHED.pth .*annotators"):
        preprocess.check("softedge_hed", annotators)
    torch.manual_seed(0)
    (tmp_path / "annotators" / "hed").mkdir(parents=True)
    torch.save(HED().state_dict(), tmp_path / "annotators" / "hed" / "ControlNetHED.pth")
    torch.save(LineArt().state_dict(), tmp_path / "annotators" / "sk_model.pth")
    torch.save({"model0.1.weight": torch.zeros(1)}, tmp_path / "annotators" / "sk_model2.pth")  # not the network
    for name in ("softedge_hed", "hed", "lineart_realistic"):
        out = preprocess.run(name, picture(), 80, -1, -1, annotators)
        grey = np.asarray(out.convert("L"))
        assert out.size == (96, 80) and grey.std() > 0, name  # the picture's size; a map, not a flat image
    with pytest.raises(ValueError, match="sk_model2.pth is not the lineart network"):
        preprocess.run("lineart_coarse", picture(), 80, -1, -1, annotators)


def test_lineart_standard_finds_dark_lines_without_weights() -> None:
    drawing = Image.new("RGB", (64, 64), "white")
    for x in range(20, 44):
        drawing.putpixel((x, 32), (0, 0, 0))  # one black line on white
    lines = np.asarray(preprocess.run("lineart_standard (from white bg & black line)", drawing, 64, -1, -1))
    assert lines[32, 30].min() > 100 and lines[10, 10].max() == 0  # white line where it was drawn, black elsewhere
