"""WD14-style taggers: a tiny ONNX tagger built here (its scores a fixed function of the image's
mean colour, read in BGR as the real ones are) with its selected_tags.csv; thresholds,
exclusions, ratings, escaping; the API's /interrogate and the page's button."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import add_checkpoint, start_server, stop_server
from webui.interrogate.clip import ClipInterrogator
from webui.interrogate.tagger import Taggers
from webui.models.errors import ModelError
from webui.testing.captioners import WORDS, write_blip, write_clip

# name, category, weights on the mean (B, G, R) / 255, bias
TAGS = [("general", 9, (0, 0, 0), 2.0), ("explicit", 9, (0, 0, 0), -2.0),
        ("red_background", 0, (-4, -4, 8), -2.0), ("blue_sky", 0, (8, -4, -4), -2.0),
        ("solo", 0, (0, 0, 0), 1.0), ("looking_at_viewer", 0, (0, 0, 0), -1.0),
        ("^_^", 0, (0, 0, 0), 0.5), ("cure_(series)", 0, (0, 0, 0), 0.3), ("hero_x", 4, (-4, -4, 8), -3.0)]


def write_tagger(folder: Path, size: int = 32) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.array([w for _, _, w, _ in TAGS], dtype=np.float32).T / 255.0  # [3, n]
    bias = np.array([b for _, _, _, b in TAGS], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),  # [1, 3] (B, G, R)
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weights)),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(bias)),
        helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(nodes, "tagger", [helper.make_tensor_value_info(
        "input_1", TensorProto.FLOAT, [1, size, size, 3])], [helper.make_tensor_value_info(
            "predictions_sigmoid", TensorProto.FLOAT, [1, len(TAGS)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    rows = "".join(f"{i},{name},{cat},100\n" for i, (name, cat, _, _) in enumerate(TAGS))
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + rows)
    return folder


def test_tags_thresholds_and_escaping(tmp_path: Path) -> None:
    write_tagger(tmp_path / "wd-tiny")
    taggers = Taggers(tmp_path)
    assert taggers.names() == ["wd-tiny"]
    red = taggers.interrogate(Image.new("RGB", (64, 40), (255, 0, 0)))
    assert red.caption == "red background, hero x, solo, ^_^, cure \\(series\\)"  # most confident first
    assert red.ratings["general"] > 0.8 and red.ratings["explicit"] < 0.2
    blue = taggers.interrogate(Image.new("RGB", (32, 32), (0, 0, 255)), threshold=0.5)
    assert blue.caption == "blue sky, solo, ^_^, cure \\(series\\)"  # no character: below its 0.85
    fewer = taggers.interrogate(Image.new("RGB", (32, 32), (255, 0, 0)), exclude=("red background", "solo"))
    assert "red background" not in fewer.caption and "solo" not in fewer.caption
    with pytest.raises(ModelError, match="no tagger 'nope'.*wd-tiny"):
        taggers.get("nope")
    with pytest.raises(ModelError, match="no tagger in"):
        Taggers(tmp_path / "empty").get()


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_interrogate_over_the_api(tmp_path: Path, checkpoint_store: Path) -> None:
    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    write_tagger(tmp_path / "models" / "interrogators" / "wd-tiny")
    s = start_server(tmp_path, "--api", ready="/sdapi/v1/samplers")
    try:
        url = s.url + "/sdapi/v1/interrogate"
        red = b64(Image.new("RGB", (32, 32), (255, 0, 0)))
        r = requests.post(url, json={"image": red, "model": "deepdanbooru"}, timeout=60)
        assert r.status_code == 200 and r.json()["caption"].startswith("red background, hero x, solo")
        by_name = requests.post(url, json={"image": red, "model": "wd-tiny", "threshold": 0.9}, timeout=60)
        assert by_name.status_code == 200 and by_name.json()["caption"] == "red background, hero x"
        clip = requests.post(url, json={"image": red, "model": "clip"}, timeout=60)
        assert clip.status_code == 422 and "no BLIP captioner: put" in clip.json()["detail"]
        write_blip(tmp_path / "models" / "BLIP" / "blip-tiny")  # found on the next request
        write_clip(tmp_path / "models" / "clip_interrogate" / "clip-tiny")
        clip = requests.post(url, json={"image": red, "model": "clip"}, timeout=60)
        assert clip.status_code == 200 and ", by " in clip.json()["caption"]
        missing = requests.post(url, json={"image": red, "model": "wd-huge"}, timeout=60)
        assert missing.status_code == 404 and "wd-tiny" in missing.json()["detail"]
    finally:
        stop_server(s)


def test_clip_interrogator_caption_and_ranked_terms(tmp_path: Path) -> None:
    """BLIP's caption (a tiny random model: words of its vocabulary), then one medium, one artist,
    one movement and three flavours from the lists when a CLIP model is there; a user's own list
    file joins ours; the same image gives the same text."""
    from webui.interrogate.terms import ARTISTS, FLAVOURS, MEDIUMS, MOVEMENTS

    models = tmp_path / "models"
    interrogator = ClipInterrogator(models)
    missing = interrogator.missing()
    assert missing is not None and str(models / "BLIP") in missing and "clip_interrogate" in missing
    with pytest.raises(ModelError, match="no BLIP captioner"):
        interrogator.interrogate(Image.new("RGB", (32, 32)))
    write_blip(models / "BLIP" / "blip-tiny")
    assert interrogator.missing() is None
    red = Image.new("RGB", (48, 40), (220, 30, 30))
    caption = interrogator.interrogate(red)
    assert caption and set(caption.split()) <= set(WORDS)  # no CLIP yet: the caption alone
    write_clip(models / "clip_interrogate" / "clip-tiny")
    (models / "clip_interrogate" / "artists.txt").write_text("A Painter Of Our Own\n")
    text = interrogator.interrogate(red)
    parts = text.split(", ")
    assert parts[0] == caption and len(parts) == 7
    medium, artist, movement, *flavours = parts[1:]
    assert medium in MEDIUMS and movement in MOVEMENTS and all(f in FLAVOURS for f in flavours)
    assert artist.startswith("by ") and artist[3:] in (*ARTISTS, "A Painter Of Our Own")
    assert interrogator.interrogate(red) == text
    (models / "BLIP" / "a-broken").mkdir()  # sorts first: the one used
    (models / "BLIP" / "a-broken" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="a-broken: not a BLIP captioning model folder"):
        ClipInterrogator(models).interrogate(red)
