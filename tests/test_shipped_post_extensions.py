"""The shipped post-processing extensions, `safety-checker` and `watermark`, generating through a
tiny engine: each changes exactly what it says (and nothing when it is off), and says so in the
infotext.

The safety classifier is a tiny random `StableDiffusionSafetyChecker` saved in the diffusers
layout; its thresholds decide the verdict deterministically: cosine similarities lie in [-1, 1],
so a threshold of -2 flags every image and +2 none.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import add_checkpoint
from webui.app import Engine, build_engine
from webui.config import Config
from webui.extensions.manager import ExtensionError
from webui.infotext import parse_infotext
from webui.pipeline.request import GenerationRequest

FLAG_ALL, FLAG_NONE = -2.0, 2.0


# --- helpers ---------------------------------------------------------------------------------


def engine_for(data_dir: Path) -> Engine:
    return build_engine(Config(data_dir=data_dir, dtype="float32"))


def req(**kw: Any) -> GenerationRequest:
    base = dict(prompt="a red cube", steps=3, width=64, height=64, seed=5, sampler_name="Euler", save_images=False)
    base.update(kw)
    return GenerationRequest(**base)


def use_settings(engine: Engine, **sections: dict[str, Any]) -> None:
    """Give extensions these settings values (by extension name; the rest get their defaults).

    The manager reads each extension's settings through its settings source; tests set that
    source directly rather than going through a settings file."""
    manager = engine.extensions

    def source(name: str) -> Any:
        model = manager.get(name).settings_model
        return model(**sections.get(name, {})) if model is not None else None

    manager._settings_source = source


SMALL, ONE, BIG = req(batch_size=2), req(), req(width=256, height=256)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, checkpoint_store: Path) -> dict[str, list[Image.Image]]:
    """The images of SMALL, ONE and BIG with both extensions disabled (persisted, as the
    Extensions tab does it), from a data dir holding the same checkpoints as `data_dir`."""
    root = tmp_path_factory.mktemp("plain")
    for name in ("sd1.safetensors", "sd2.safetensors"):
        add_checkpoint(root, checkpoint_store, name)
    engine = engine_for(root)
    for name in ("safety-checker", "watermark"):
        engine.extensions.set_enabled(name, False)
    off = engine_for(root)
    assert {off.extensions.get(n).status for n in ("safety-checker", "watermark")} == {"disabled"}
    return {key: off.runner.generate(r).images for key, r in (("small", SMALL), ("one", ONE), ("big", BIG))}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def high_frequency(image: Image.Image) -> float:
    """Mean absolute difference between neighbouring pixels: detail, which a blur removes."""
    a = pixels(image)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def write_checker(folder: Path, threshold: float, *, processor: bool = False, safetensors: bool = True) -> Path:
    """A tiny StableDiffusionSafetyChecker in the diffusers folder layout: `model.safetensors` as
    this transformers saves it, or `pytorch_model.bin` with the key names of the released file
    (`vision_model.vision_model.*`, and the `position_ids` buffer older versions saved)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tiny, vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(tiny, image_size=224, patch_size=56),  # 224: CLIP's default preprocessing
        projection_dim=4,
    )
    torch.manual_seed(0)
    model = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(threshold)
    folder.mkdir(parents=True, exist_ok=True)
    if safetensors:
        model.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
        released = {re.sub(r"^vision_model\.(?!vision_model\.)", "vision_model.vision_model.", k): v
                    for k, v in model.state_dict().items()}
        released["vision_model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        torch.save(released, folder / "pytorch_model.bin")
    if processor:
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


@pytest.fixture
def in_data_dir(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The data dir as the working directory, as when the app runs (relative folders resolve there)."""
    monkeypatch.chdir(data_dir)
    return data_dir


# --- safety-checker ----------------------------------------------------------------------------


def test_safety_checker_without_weights_is_inactive_says_so_once_and_changes_nothing(
        in_data_dir: Path, plain: dict, caplog: pytest.LogCaptureFixture) -> None:
    engine = engine_for(in_data_dir)
    assert engine.extensions.get("safety-checker").status == "loaded"
    caplog.set_level(logging.INFO)
    first = engine.runner.generate(SMALL)
    second = engine.runner.generate(SMALL)
    for result in (first, second):
        for image, base, text in zip(result.images, plain["small"], result.infotexts, strict=True):
            assert np.array_equal(pixels(image), pixels(base))
            assert "NSFW" not in parse_infotext(text)
    notes = [r.getMessage() for r in caplog.records if "safety-checker inactive" in r.getMessage()]
    assert notes == ["safety-checker inactive: no weights in models/safety_checker"]


def test_flagged_images_are_blurred_or_blacked_out_with_a_note(in_data_dir: Path, plain: dict) -> None:
    write_checker(in_data_dir / "models" / "safety_checker", FLAG_ALL)
    engine = engine_for(in_data_dir)

    blurred = engine.runner.generate(SMALL)  # default settings: on, blur
    for image, base, text in zip(blurred.images, plain["small"], blurred.infotexts, strict=True):
        assert image.size == base.size and image.mode == base.mode
        assert high_frequency(image) < 0.25 * high_frequency(base)  # the detail is gone
        # ...but it is a blur of this image, not a flat fill: the average colour survives
        assert np.abs(pixels(image).mean(axis=(0, 1)) - pixels(base).mean(axis=(0, 1))).max() < 12
        assert parse_infotext(text)["NSFW"] == "blurred"

    use_settings(engine, **{"safety-checker": {"action": "black"}})
    black = engine.runner.generate(SMALL)
    assert all(not pixels(image).any() for image in black.images)
    assert [parse_infotext(t)["NSFW"] for t in black.infotexts] == ["blacked out", "blacked out"]

    use_settings(engine, **{"safety-checker": {"enabled": False}})  # turned off in the settings
    off = engine.runner.generate(SMALL)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(off.images, plain["small"], strict=True))
    assert all("NSFW" not in parse_infotext(t) for t in off.infotexts)


def test_unflagged_images_are_untouched_and_new_weights_apply_without_restart(in_data_dir: Path, plain: dict) -> None:
    folder = write_checker(in_data_dir / "models" / "safety_checker", FLAG_NONE, processor=True)
    engine = engine_for(in_data_dir)
    result = engine.runner.generate(ONE)
    assert np.array_equal(pixels(result.images[0]), pixels(plain["one"][0]))
    assert "NSFW" not in parse_infotext(result.infotexts[0])

    shutil.rmtree(folder)  # the user swaps the weights: the next image uses the new ones
    write_checker(folder, FLAG_ALL, safetensors=False)  # pytorch_model.bin, default preprocessing
    flagged = engine.runner.generate(req())
    assert parse_infotext(flagged.infotexts[0])["NSFW"] == "blurred"


def test_weights_as_released_load_completely(in_data_dir: Path) -> None:
    """The released pytorch_model.bin names its keys as older transformers did; every weight must
    still arrive (a missed one would leave random values and a classifier that means nothing)."""
    folder = write_checker(in_data_dir / "released", FLAG_NONE, safetensors=False)
    engine_for(in_data_dir)  # loads the extension
    classifier = next(m for name, m in sys.modules.items() if name.endswith("_safety_checker.classifier"))
    loaded = classifier.load(folder, "released", classifier.stamp(folder))
    written = torch.load(folder / "pytorch_model.bin", weights_only=True)
    for key, value in loaded.model.state_dict().items():
        source = written.get(key, written.get(key.replace("vision_model.", "vision_model.vision_model.", 1)))
        assert source is not None and torch.equal(value, source), key  # not a fresh random value
    assert loaded.flagged(Image.new("RGB", (64, 64))) is False


def test_a_custom_folder_setting_and_unreadable_weights_fail_the_job_naming_the_extension(in_data_dir: Path) -> None:
    folder = write_checker(in_data_dir / "checkers" / "mine", FLAG_ALL)
    engine = engine_for(in_data_dir)
    assert "NSFW" not in parse_infotext(engine.runner.generate(req()).infotexts[0])  # default folder: empty
    use_settings(engine, **{"safety-checker": {"models_dir": "checkers/mine"}})
    assert parse_infotext(engine.runner.generate(req()).infotexts[0])["NSFW"] == "blurred"

    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExtensionError, match="extension 'safety-checker' failed in postprocess_image.*checkers/mine"):
        engine.runner.generate(req())
    shutil.rmtree(folder)  # gone: inactive again, and the next job runs
    assert engine.runner.generate(req()).images


# --- watermark ---------------------------------------------------------------------------------


def test_watermark_is_off_by_default(in_data_dir: Path, plain: dict) -> None:
    engine = engine_for(in_data_dir)
    assert engine.extensions.get("watermark").status == "loaded"
    result = engine.runner.generate(ONE)
    assert np.array_equal(pixels(result.images[0]), pixels(plain["one"][0]))
    assert "Watermark" not in parse_infotext(result.infotexts[0])


def test_visible_watermark_changes_only_the_corner(in_data_dir: Path, plain: dict) -> None:
    engine = engine_for(in_data_dir)
    use_settings(engine, watermark={"enabled": True, "method": "visible"})
    result = engine.runner.generate(BIG)
    changed = np.argwhere((pixels(result.images[0]) != pixels(plain["big"][0])).any(axis=2))
    assert len(changed) > 50  # the text is there...
    top, left = changed.min(axis=0)
    assert top >= 256 * 3 // 4 and left >= 256 // 2  # ...and only in the bottom-right corner
    assert parse_infotext(result.infotexts[0])["Watermark"] == "visible"


@pytest.fixture
def marks_module(in_data_dir: Path) -> Iterator[types.ModuleType]:
    """The watermark extension's `marks` module, with its cached import of imwatermark reset
    before and after (tests below put a fake or a missing imwatermark in its place)."""
    engine_for(in_data_dir)  # loads the extension (and its submodule)
    marks = next(m for name, m in sys.modules.items() if name.endswith("_watermark.marks"))
    marks._encoder_class.cache_clear()
    yield marks
    marks._encoder_class.cache_clear()


def test_invisible_watermark_falls_back_to_visible_without_the_package(
        in_data_dir: Path, marks_module: types.ModuleType, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "imwatermark", None)  # importing it raises ImportError
    engine = engine_for(in_data_dir)
    use_settings(engine, watermark={"enabled": True})  # method: invisible, the default
    caplog.set_level(logging.WARNING)
    result = engine.runner.generate(req(width=256, height=256, batch_size=2))
    assert [parse_infotext(t)["Watermark"] for t in result.infotexts] == ["visible", "visible"]
    reasons = [r.getMessage() for r in caplog.records if "visible mark instead" in r.getMessage()]
    assert len(reasons) == 1 and "invisible-watermark package is not installed" in reasons[0]


def test_invisible_watermark_uses_imwatermark_when_importable(
        in_data_dir: Path, marks_module: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []

    class FakeEncoder:  # imwatermark.WatermarkEncoder's interface: BGR arrays in and out
        def set_watermark(self, kind: str, payload: bytes) -> None:
            calls.append((kind, payload))

        def encode(self, bgr: np.ndarray, method: str) -> np.ndarray:
            calls.append(("encode", method))
            out = bgr.copy()
            out[0, 0] = (255, 0, 0)  # blue, in BGR order
            return out

    monkeypatch.setitem(sys.modules, "imwatermark", types.SimpleNamespace(WatermarkEncoder=FakeEncoder))
    engine = engine_for(in_data_dir)
    use_settings(engine, watermark={"enabled": True, "text": "SDV2"})
    result = engine.runner.generate(req(width=256, height=256))
    assert calls == [("bytes", b"SDV2"), ("encode", "dwtDct")]
    assert tuple(result.images[0].getpixel((0, 0))) == (0, 0, 255)  # channels reversed back to RGB
    assert parse_infotext(result.infotexts[0])["Watermark"] == "invisible"
    # an image too small for the invisible mark gets the visible one
    small = engine.runner.generate(req())
    assert parse_infotext(small.infotexts[0])["Watermark"] == "visible"
    reason = marks_module.invisible(Image.new("RGB", (64, 64)), "SDV2")
    assert isinstance(reason, str) and "smaller than 256x256" in reason


def test_safety_checker_runs_before_the_watermark(in_data_dir: Path) -> None:
    write_checker(in_data_dir / "models" / "safety_checker", FLAG_ALL)
    engine = engine_for(in_data_dir)
    names = [e.name for e in engine.extensions.active()]
    assert names.index("safety-checker") < names.index("watermark")
    use_settings(engine, **{"safety-checker": {"action": "black"}, "watermark": {"enabled": True, "method": "visible"}})
    result = engine.runner.generate(req(width=256, height=256))
    fields = parse_infotext(result.infotexts[0])
    assert (fields["NSFW"], fields["Watermark"]) == ("blacked out", "visible")
    image = pixels(result.images[0])
    assert not image[: 256 * 3 // 4].any() and image.any()  # black, with the mark drawn over it


def test_the_safety_checker_says_whether_it_is_active(tmp_path: Path) -> None:
    from webui.app import build_engine
    from webui.config import Config

    engine = build_engine(Config(data_dir=tmp_path))
    manager = engine.extensions
    e = manager.get("safety-checker")
    assert manager.status_line(e) == "loaded: inactive: no weights in models/safety_checker"
    engine.settings.update_section("safety-checker", {"enabled": False})
    assert manager.status_line(e) == "loaded: off (Settings: safety-checker)"
