"""ControlNet preprocessors that need weights (#17): depth from a Depth Anything or DPT model the
user put in models/ControlNet/annotators/ (tiny random-weight ones here, in transformers' own
format); HED, line art and openpose from the single files users have (random weights in those
files' layouts); listed always, refused with what to put where when the folder is empty."""

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


# two people's 18 keypoints (x, y), in the model's order: nose, neck, right shoulder/elbow/wrist,
# left shoulder/elbow/wrist, right hip/knee/ankle, left hip/knee/ankle, right/left eye, right/left ear
PERSON = ((64, 40), (64, 70), (40, 70), (34, 110), (30, 145), (88, 70), (94, 110), (98, 145), (50, 150), (48, 195),
          (46, 240), (78, 150), (80, 195), (82, 240), (58, 34), (70, 34), (50, 38), (78, 38))


def drawn_maps(people: list[list[tuple[int, int]]], size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps and affinity fields as a trained network gives them for `people`: a peak of 1 at each
    keypoint, and along each limb its direction in the limb's two field channels."""
    from webui.controlnet.openpose import FIELDS, LIMBS

    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    heat, fields = np.zeros((h, w, 19), np.float32), np.zeros((h, w, 38), np.float32)
    for keypoints in people:
        for part, (x, y) in enumerate(keypoints):
            heat[:, :, part] = np.maximum(heat[:, :, part], np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 4.0**2)))
        for (a, b), (fx, fy) in zip(LIMBS, FIELDS):
            (x0, y0), (x1, y1) = keypoints[a - 1], keypoints[b - 1]
            length = np.hypot(x1 - x0, y1 - y0)
            ux, uy = (x1 - x0) / length, (y1 - y0) / length
            along = (xs - x0) * ux + (ys - y0) * uy
            across = np.abs((xs - x0) * uy - (ys - y0) * ux)
            near = (along >= -2) & (along <= length + 2) & (across <= 3)
            fields[near, fx], fields[near, fy] = ux, uy
    return heat, fields


def test_openpose_joins_keypoints_into_people_and_draws_them() -> None:
    """From the maps a trained network gives: each person's 18 keypoints found and kept together
    (two people side by side apart), a stray pair of keypoints dropped; the picture has each limb
    in its colour at 60 % and each keypoint in its full colour, on black."""
    from webui.controlnet import openpose

    left = list(PERSON)
    right = [(x + 128, y) for x, y in PERSON]
    heat, fields = drawn_maps([left, right])
    candidates, rows = openpose.people(heat, fields)
    assert len(rows) == 2 and (rows[:, -1] == 18).all()
    found = sorted([[tuple(candidates[int(i), :2]) for i in row[:18]] for row in rows])
    for got, want in zip(found, [left, right]):
        assert all(abs(gx - wx) <= 1 and abs(gy - wy) <= 1 for (gx, gy), (wx, wy) in zip(got, want))
    lone = np.zeros_like(heat)
    lone[:, :, :2] = heat[:, :, :2]  # only noses and necks: one limb per person, too few keypoints
    assert len(openpose.people(lone, fields)[1]) == 0
    picture = openpose.draw(candidates, rows, 256, 256)
    assert picture.shape == (256, 256, 3) and (picture[0, 0] == 0).all()
    for part, (x, y) in enumerate(left):
        assert tuple(picture[y, x]) == openpose.COLOURS[part], part
    neck, shoulder = left[1], left[2]  # limb 0 runs from the neck to the right shoulder
    middle = picture[neck[1], (neck[0] + shoulder[0]) // 2]
    assert tuple(middle) == tuple(int(c * 0.6) for c in openpose.COLOURS[0])


def test_openpose_runs_the_users_body_network(tmp_path: Path) -> None:
    """body_pose_model.pth (random weights here, in that file's layout) found under the annotators
    folder: the pose picture at the image's size; a missing or wrong file is named."""
    import torch

    from webui.controlnet.annotators import Annotators
    from webui.controlnet.openpose import BodyPose

    annotators = Annotators(tmp_path / "annotators")
    with pytest.raises(ValueError, match=r"openpose needs body_pose_model.pth .*annotators"):
        preprocess.check("openpose", annotators)
    torch.manual_seed(0)
    net = BodyPose()
    (tmp_path / "annotators" / "openpose").mkdir(parents=True)
    state = net.state_dict()
    assert "conv1_1.weight" in state and "conv5_5_CPM_L2.weight" in state and "Mconv7_stage6_L1.bias" in state
    assert len(state) == 2 * (12 + 10 + 5 * 14)  # 12 backbone layers, 2 x 5 in stage 1, 2 x 7 in stages 2-6
    torch.save(state, tmp_path / "annotators" / "openpose" / "body_pose_model.pth")
    fields, heat = net(torch.zeros(1, 3, 64, 48))
    assert fields.shape == (1, 38, 8, 6) and heat.shape == (1, 19, 8, 6)
    out = preprocess.run("openpose", picture(), 80, -1, -1, annotators)
    assert out.mode == "RGB" and out.size == (96, 80)
    (tmp_path / "annotators" / "openpose" / "body_pose_model.pth").unlink()
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "annotators" / "body_pose_model.pth")
    with pytest.raises(ValueError, match="body_pose_model.pth is not the openpose network"):
        Annotators(tmp_path / "annotators").run("openpose", picture())
