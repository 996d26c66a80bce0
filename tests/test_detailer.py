"""The shipped ADetailer extension: a YOLO-style ONNX detector built here on the fly (its boxes
fixed in its weights), the repaint through a nested generation, ADetailer's API shape and
infotext, and detectors an extension registers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_extensions import write_extension
from tests.test_shipped_prompt_extensions import engine_for, infos, pixels, req
from webui.extensions.api import JobRejected

BOX = (12, 16, 28, 36)  # left, top, right, bottom in a 64x64 image


def write_detector(path: Path, anchors: list[tuple[float, float, float, float, float]], size: int = 64,
                   protos: bool = False) -> Path:
    """A YOLOv8-layout ONNX model: input [1, 3, size, size], output [1, 5 (+32), anchors] holding
    `anchors` (cx, cy, w, h, score) whatever the image; with `protos`, a second output of mask
    prototypes that are all ones (so each mask is its box)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    pred = np.array(anchors, dtype=np.float32).T[None]  # [1, 5, n]
    outputs = [helper.make_tensor_value_info("output0", TensorProto.FLOAT, None)]
    nodes = []
    if protos:
        coeffs = np.full((1, 32, pred.shape[2]), 0.5, dtype=np.float32)
        pred = np.concatenate([pred, coeffs], axis=1)
        nodes.append(helper.make_node("Constant", [], ["output1"],
                                      value=numpy_helper.from_array(np.ones((1, 32, 16, 16), np.float32))))
        outputs.append(helper.make_tensor_value_info("output1", TensorProto.FLOAT, None))
    # the image goes through a no-op (x * 0 summed into nothing) so the graph reads its input
    nodes.append(helper.make_node("Constant", [], ["output0"], value=numpy_helper.from_array(pred)))
    nodes.append(helper.make_node("ReduceMean", ["images"], ["seen"], keepdims=0))
    outputs.append(helper.make_tensor_value_info("seen", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info(
        "images", TensorProto.FLOAT, [1, 3, size, size])], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def unit(**kw) -> dict:
    return {"ad_model": "box.onnx", "ad_denoising_strength": 0.9, "ad_dilate_erode": 4, "ad_mask_blur": 4, **kw}


def adetailer(*units: dict, enable: bool = True) -> dict:
    return {"ADetailer": {"args": [enable, False, *units]}}


def centre(box: tuple[int, int, int, int], score: float) -> tuple[float, float, float, float, float]:
    x0, y0, x1, y1 = box
    return ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, score)


@pytest.fixture
def detailer_dir(data_dir: Path) -> Path:
    write_detector(data_dir / "models" / "detailer" / "box.onnx",
                   [centre(BOX, 0.9), centre((13, 17, 29, 37), 0.8), centre((40, 40, 60, 60), 0.2)])
    return data_dir


def test_only_the_detected_region_is_repainted(detailer_dir: Path) -> None:
    engine = engine_for(detailer_dir)
    plain = engine.runner.generate(req(steps=3))
    done = engine.runner.generate(req(steps=3, extensions=adetailer(unit(ad_prompt="a detailed face"))))
    before, after = pixels(plain.images[0]), pixels(done.images[0])
    changed = np.abs(after - before).max(axis=2) > 0
    assert changed.any()
    margin = 4 + 3 * 4 + 1  # dilation, then the mask blur (a Gaussian: 3 sigma)
    ys, xs = np.nonzero(changed)
    assert xs.min() >= BOX[0] - margin and xs.max() < BOX[2] + margin
    assert ys.min() >= BOX[1] - margin and ys.max() < BOX[3] + margin
    info = infos(done)[0]
    assert info["ADetailer model"] == "box.onnx" and info["ADetailer confidence"] == "0.3"
    assert info["ADetailer denoising strength"] == "0.9" and info["ADetailer prompt"] == "a detailed face"
    assert info["ADetailer version"] and "ADetailer model" not in infos(plain)[0]


def test_confidence_top_k_and_a_second_pass(detailer_dir: Path) -> None:
    engine = engine_for(detailer_dir)
    plain = engine.runner.generate(req(steps=3))
    high = engine.runner.generate(req(steps=3, extensions=adetailer(unit(ad_confidence=0.95))))
    assert np.array_equal(pixels(high.images[0]), pixels(plain.images[0]))  # nothing that sure
    low = engine.runner.generate(req(steps=3, extensions=adetailer(unit(ad_confidence=0.1, ad_mask_k_largest=1),
                                                                  unit(ad_confidence=0.1))))
    changed = np.abs(pixels(low.images[0]) - pixels(plain.images[0])).max(axis=2) > 0
    assert changed[50, 50]  # the second pass repainted the low-confidence box too
    assert infos(low)[0]["ADetailer mask only top k largest"] == "1" and infos(low)[0]["ADetailer model 2nd"]


def test_a_segmenting_detector_and_the_page_form(detailer_dir: Path) -> None:
    write_detector(detailer_dir / "models" / "detailer" / "seg.onnx", [centre(BOX, 0.9)], protos=True)
    engine = engine_for(detailer_dir)
    plain = engine.runner.generate(req(steps=3))
    done = engine.runner.generate(req(steps=3, extensions={"ADetailer": {
        "ad_enable": True, "ad_model": "seg.onnx", "ad_denoising_strength": 0.9}}))
    changed = np.abs(pixels(done.images[0]) - pixels(plain.images[0])).max(axis=2) > 0
    assert changed.any() and not changed[:, 45:].any()
    assert infos(done)[0]["ADetailer model"] == "seg.onnx"


def test_pickles_missing_models_and_older_shapes(detailer_dir: Path) -> None:
    engine = engine_for(detailer_dir)
    with pytest.raises(JobRejected, match="are Python pickles.*yolo export model=face_yolov8n.pt format=onnx"):
        engine.runner.generate(req(extensions=adetailer(unit(ad_model="face_yolov8n.pt"))))
    with pytest.raises(JobRejected, match="no detector 'hands.onnx'.*found: box.onnx"):
        engine.runner.generate(req(extensions=adetailer(unit(ad_model="hands.onnx"))))
    (detailer_dir / "models" / "detailer" / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(JobRejected, match="broken.onnx is not a usable ONNX model"):
        engine.runner.generate(req(extensions=adetailer(unit(ad_model="broken.onnx"))))
    older = engine.runner.generate(req(steps=2, extensions={"ADetailer": {"args": [unit()]}}))  # units only
    assert infos(older)[0]["ADetailer model"] == "box.onnx"


def test_a_detector_an_extension_registers(data_dir: Path) -> None:
    write_extension(data_dir, "corner-finder", '''
        @hookimpl
        def detectors():
            return [Detector("corner", lambda image, confidence: [Detection((0, 0, 16, 16), 0.99)])]
    ''')
    engine = engine_for(data_dir)
    plain = engine.runner.generate(req(steps=3))
    done = engine.runner.generate(req(steps=3, extensions=adetailer(unit(ad_model="corner"))))
    changed = np.abs(pixels(done.images[0]) - pixels(plain.images[0])).max(axis=2) > 0
    assert changed[:8, :8].any() and not changed[40:, 40:].any()


def test_adetailer_over_the_api(detailer_dir: Path) -> None:
    from tests.conftest import start_server, stop_server

    s = start_server(detailer_dir, "--api", ready="/sdapi/v1/samplers")
    try:
        import requests

        body = {"prompt": "a portrait", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler",
                "alwayson_scripts": adetailer(unit(), {"ad_model": "None"})}
        r = requests.post(s.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        import json

        info = json.loads(r.json()["info"])
        assert "ADetailer model: box.onnx" in info["infotexts"][0] and "2nd" not in info["infotexts"][0]
        bad = requests.post(s.url + "/sdapi/v1/txt2img", timeout=120,
                            json={**body, "alwayson_scripts": adetailer(unit(ad_model="face_yolov8n.pt"))})
        assert 400 <= bad.status_code < 500 and "yolo export" in bad.text
    finally:
        stop_server(s)
