"""Settings: the typed model, `config.json` (round trip, bad input, unknown keys, corrupt files),
extension sections, subscribers, and the Settings tab built from the model."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from webui.settings import Settings, SettingsStore, describe


class FilterSettings(BaseModel):
    """An extension's section, as an extension would write it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = Field(True, title="Enable the filter")
    words: list[str] = Field(default_factory=lambda: ["spam"], title="Blocked words")
    strength: float = Field(0.5, ge=0, le=1, title="Strength", json_schema_extra={"note": "applies to the next job"})


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "config.json"


def on_disk(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --- the model -------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = Settings()
    assert (s.samples_format, s.jpeg_quality, s.filename_pattern) == ("png", 95, "[seed]")
    assert (s.outdir_txt2img_samples, s.outdir_img2img_samples, s.outdir_extras_samples) == ("", "", "")
    assert (s.default_sampler, s.default_scheduler, s.default_steps) == ("Euler a", "Automatic", 20)
    assert (s.default_width, s.default_height, s.default_cfg_scale) == (512, 512, 7.0)
    assert (s.live_previews_enable, s.show_progress_every_n_steps, s.live_preview_method) == (True, 3, "TAESD")
    assert s.model_cache_size == 1
    with pytest.raises(ValidationError):
        s.model_copy(update={}).__setattr__("jpeg_quality", 50)  # frozen
    with pytest.raises(ValidationError, match="extra"):
        Settings(no_such_setting=1)


def test_every_field_has_a_title_description_and_section() -> None:
    for spec in describe(Settings):
        assert spec.title and spec.description and spec.section, spec


@pytest.mark.parametrize("changes, field", [
    ({"default_sampler": "No Such Sampler"}, "default_sampler"),
    ({"default_scheduler": "Sometimes"}, "default_scheduler"),
    ({"default_width": 500}, "default_width"),  # not a multiple of 8
    ({"default_height": 4096}, "default_height"),
    ({"default_steps": 0}, "default_steps"),
    ({"jpeg_quality": 101}, "jpeg_quality"),
    ({"samples_format": "gif"}, "samples_format"),
    ({"model_cache_size": 9}, "model_cache_size"),
    ({"default_cfg_scale": 0.5}, "default_cfg_scale"),
    ({"show_progress_every_n_steps": 0}, "show_progress_every_n_steps"),
    ({"live_preview_method": "Full"}, "live_preview_method"),
    ({"filename_pattern": "../[seed]"}, "filename_pattern"),
    ({"filename_pattern": "  "}, "filename_pattern"),
    ({"outdir_txt2img_samples": "a\x00b"}, "outdir_txt2img_samples"),
    ({"no_such_setting": 1}, "no_such_setting"),
])
def test_a_bad_value_names_the_field_and_saves_nothing(config: Path, changes: dict, field: str) -> None:
    store = SettingsStore(config)
    store.update({"jpeg_quality": 80})
    before = config.read_bytes()
    with pytest.raises(ValueError) as info:
        store.update({"samples_format": "webp", **changes})
    message = str(info.value)
    assert message.startswith(f"{field}:") and "\n" not in message, message
    assert config.read_bytes() == before
    assert store.get().samples_format == "png" and store.get().jpeg_quality == 80


def test_sampler_names_are_canonical_and_legacy_names_split() -> None:
    assert Settings(default_sampler="euler_ancestral").default_sampler == "Euler a"
    s = Settings(default_sampler="DPM++ 2M Karras")
    assert (s.default_sampler, s.default_scheduler) == ("DPM++ 2M", "Karras")
    assert Settings(default_scheduler="karras").default_scheduler == "Karras"


def test_samples_dir(tmp_path: Path) -> None:
    outputs, data = tmp_path / "outputs", tmp_path
    assert Settings().samples_dir("txt2img", data, outputs) == outputs / "txt2img-images"
    assert Settings().samples_dir("extras", data, outputs) == outputs / "extras-images"
    s = Settings(outdir_img2img_samples="mine/i2i", outdir_extras_samples=str(tmp_path / "abs"))
    assert s.samples_dir("img2img", data, outputs) == data / "mine" / "i2i"
    assert s.samples_dir("extras", data, outputs) == tmp_path / "abs"
    with pytest.raises(ValueError, match="kind"):
        s.samples_dir("video", data, outputs)


# --- the store -------------------------------------------------------------------------------------


def test_no_file_gives_defaults_and_writes_nothing(config: Path) -> None:
    assert SettingsStore(config).get() == Settings()
    assert not config.exists()


def test_update_and_reload_round_trip(config: Path) -> None:
    store = SettingsStore(config)
    new, notes = store.update({"samples_format": "webp", "jpeg_quality": 80,
                               "filename_pattern": "[seed]-[prompt_words]", "default_sampler": "DPM++ 2M",
                               "default_cfg_scale": 6.5, "model_cache_size": 2, "live_previews_enable": False})
    assert new == store.get() and new.samples_format == "webp" and new.model_cache_size == 2
    assert "model_cache_size applies to the next model load" in notes
    assert any(n.startswith("default_sampler ") for n in notes)
    assert not any(n.startswith(("samples_format", "jpeg_quality")) for n in notes)  # the next image uses them
    assert on_disk(config)["samples_format"] == "webp"
    assert SettingsStore(config).get() == new
    assert not [p for p in config.parent.iterdir() if p.name != "config.json"]  # no temp file left


def test_unchanged_values_save_nothing(config: Path) -> None:
    store = SettingsStore(config)
    calls: list[Settings] = []
    store.subscribe(calls.append)
    assert store.update({"jpeg_quality": 95}) == (Settings(), ["No changes."])
    assert not config.exists() and calls == []


def test_unknown_keys_survive_a_save(config: Path) -> None:
    config.write_text(json.dumps({"sd_model_checkpoint": "v1-5 [6ce0161689]", "jpeg_quality": 70,
                                  "old-extension": {"x": [1, 2]}, "samples_format": "jpeg"}))
    store = SettingsStore(config)
    assert store.get().jpeg_quality == 70 and store.get().samples_format == "jpeg"
    store.update({"jpeg_quality": 90})
    data = on_disk(config)
    assert data["sd_model_checkpoint"] == "v1-5 [6ce0161689]"
    assert data["old-extension"] == {"x": [1, 2]}
    assert data["jpeg_quality"] == 90 and data["samples_format"] == "jpeg"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2, 3]", b"\xff\xfe\x00garbage", b""])
def test_a_corrupt_file_gives_defaults_and_is_left_alone(config: Path, content: bytes,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    config.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="webui.settings"):
        store = SettingsStore(config)
    assert store.get() == Settings()
    assert any(str(config) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    store.register_section("filter", FilterSettings)
    assert config.read_bytes() == content  # untouched until the user saves
    store.update({"jpeg_quality": 50})
    assert on_disk(config)["jpeg_quality"] == 50
    assert (config.parent / "config.json.corrupt").read_bytes() == content  # the old content is kept


def test_a_bad_stored_value_falls_back_to_its_default(config: Path, caplog: pytest.LogCaptureFixture) -> None:
    config.write_text(json.dumps({"jpeg_quality": 500, "samples_format": "webp", "default_sampler": "Nope"}))
    with caplog.at_level(logging.WARNING, logger="webui.settings"):
        store = SettingsStore(config)
        # an unknown sampler may be an extension's, so it stands until the extensions are known
        assert store.get().default_sampler == "Nope"
        store.allow_samplers([])  # what the app does once its extensions are loaded
    assert store.get().jpeg_quality == 95 and store.get().default_sampler == "Euler a"
    assert "default_sampler 'Nope'" in caplog.text
    assert store.get().samples_format == "webp"
    assert "jpeg_quality" in caplog.text


def test_subscribers_get_the_new_settings_in_order(config: Path) -> None:
    store = SettingsStore(config)
    seen: list[tuple[str, int]] = []
    store.subscribe(lambda s: seen.append(("a", s.model_cache_size)))
    store.subscribe(lambda s: seen.append(("b", s.model_cache_size)))
    store.update({"model_cache_size": 3})
    with pytest.raises(ValueError):
        store.update({"model_cache_size": 30})
    assert seen == [("a", 3), ("b", 3)]


def test_a_failing_subscriber_is_reported_and_the_others_run(config: Path) -> None:
    store = SettingsStore(config)
    seen: list[Settings] = []

    def broken(settings: Settings) -> None:
        raise RuntimeError("boom")

    store.subscribe(broken)
    store.subscribe(seen.append)
    new, notes = store.update({"default_steps": 30})
    assert seen == [new] and on_disk(config)["default_steps"] == 30
    assert any("boom" in n for n in notes)


def test_concurrent_updates_are_all_saved(config: Path) -> None:
    store = SettingsStore(config)
    store.register_section("filter", FilterSettings)
    barrier = threading.Barrier(6)

    def work(i: int) -> None:
        barrier.wait()
        if i % 2:
            store.update({"default_steps": 10 + i})
        else:
            store.update_section("filter", {"words": [f"w{i}"]})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reloaded = SettingsStore(config)
    reloaded.register_section("filter", FilterSettings)
    assert reloaded.get() == store.get() and reloaded.section("filter") == store.section("filter")


# --- extension sections ----------------------------------------------------------------------------


def test_sections_register_validate_and_persist(config: Path) -> None:
    store = SettingsStore(config)
    assert store.register_section("filter", FilterSettings) == FilterSettings()
    assert store.register_section("filter", FilterSettings) == FilterSettings()  # again: a no-op
    assert store.sections() == {"filter": FilterSettings}
    values, notes = store.update_section("filter", {"words": ["a", "b"], "strength": 0.25})
    assert values == FilterSettings(words=["a", "b"], strength=0.25)
    assert notes == ["filter.strength applies to the next job"]
    assert on_disk(config)["filter"] == {"enabled": True, "words": ["a", "b"], "strength": 0.25}

    with pytest.raises(ValueError) as info:
        store.update_section("filter", {"strength": 2})
    assert str(info.value).startswith("filter.strength:")
    with pytest.raises(ValueError, match="filter.colour: unknown setting"):
        store.update_section("filter", {"colour": "red"})
    with pytest.raises(ValueError, match="nothing: no such settings section"):
        store.update_section("nothing", {})
    assert store.section("filter").strength == 0.25

    # all or nothing: a bad section value keeps a good Settings change from being saved too
    with pytest.raises(ValueError, match="filter.strength"):
        store.update({"jpeg_quality": 10}, {"filter": {"strength": -1}})
    assert store.get().jpeg_quality == 95 and on_disk(config)["jpeg_quality"] == 95

    reloaded = SettingsStore(config)
    reloaded.register_section("filter", FilterSettings)
    assert reloaded.section("filter") == values


def test_section_values_of_an_unloaded_extension_survive(config: Path) -> None:
    store = SettingsStore(config)
    store.register_section("filter", FilterSettings)
    store.update_section("filter", {"enabled": False})
    without = SettingsStore(config)  # the extension is disabled this time
    without.update({"default_steps": 40})
    assert on_disk(config)["filter"]["enabled"] is False
    later = SettingsStore(config)
    assert later.register_section("filter", FilterSettings).enabled is False


def test_bad_section_registrations(config: Path) -> None:
    store = SettingsStore(config)

    class Other(BaseModel):
        x: int = 1

    class NoDefault(BaseModel):
        x: int

    store.register_section("filter", FilterSettings)
    with pytest.raises(ValueError, match="already registered"):
        store.register_section("filter", Other)
    with pytest.raises(ValueError, match="built-in"):
        store.register_section("jpeg_quality", Other)
    with pytest.raises(ValueError, match="letters"):
        store.register_section("../x", Other)
    with pytest.raises(ValueError, match="default"):
        store.register_section("nodefault", NoDefault)
    with pytest.raises(TypeError):
        store.register_section("notamodel", dict)  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        store.section("unknown")


def test_a_bad_stored_section_falls_back_to_defaults(config: Path) -> None:
    config.write_text(json.dumps({"filter": {"strength": 7, "words": ["kept"]}, "other": "not an object"}))
    store = SettingsStore(config)
    assert store.register_section("filter", FilterSettings) == FilterSettings(words=["kept"])

    class Other(BaseModel):
        x: int = 1

    assert store.register_section("other", Other) == Other()


def test_section_values_are_copies(config: Path) -> None:
    class Mutable(BaseModel):
        items: list[int] = Field(default_factory=list)

    store = SettingsStore(config)
    store.register_section("m", Mutable)
    store.section("m").items.append(1)  # type: ignore[attr-defined]
    assert store.section("m") == Mutable()


# --- the Settings tab ------------------------------------------------------------------------------


def _build(store: SettingsStore):
    import gradio as gr

    from webui.ui.settings import build_settings_tab

    with gr.Blocks() as demo:
        with gr.Tabs():
            build_settings_tab(store)
    return demo


def _fn(demo, name: str):
    return next(f for f in demo.fns.values() if f.name == name)


def test_settings_tab_has_a_control_per_setting(config: Path) -> None:
    import gradio as gr

    store = SettingsStore(config)
    store.register_section("filter", FilterSettings)
    store.update({"samples_format": "jpeg", "default_steps": 33})
    demo = _build(store)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert isinstance(by_id["tab_settings"], gr.Tab)
    assert isinstance(by_id["settings_apply"], gr.Button)
    for name, info in Settings.model_fields.items():
        component = by_id[f"setting_{name}"]
        assert component.label == info.title
    assert isinstance(by_id["setting_samples_format"], gr.Dropdown)
    assert by_id["setting_samples_format"].value == "jpeg"
    assert isinstance(by_id["setting_live_previews_enable"], gr.Checkbox)
    assert isinstance(by_id["setting_default_steps"], gr.Slider) and by_id["setting_default_steps"].value == 33
    assert by_id["setting_default_width"].step == 8
    assert isinstance(by_id["setting_filename_pattern"], gr.Textbox)
    assert isinstance(by_id["setting_default_sampler"], gr.Dropdown)
    assert isinstance(by_id["settings_section_filter"], gr.Accordion)
    assert isinstance(by_id["setting_filter_enabled"], gr.Checkbox)
    assert isinstance(by_id["setting_filter_strength"], gr.Slider)
    config_file = demo.get_config_file()
    assert {d.get("api_visibility") for d in config_file["dependencies"]} == {"private"}


def test_settings_tab_apply_and_reload(config: Path) -> None:
    import gradio as gr

    store = SettingsStore(config)
    store.register_section("filter", FilterSettings)
    demo = _build(store)
    values = _fn(demo, "stored_values").fn()
    names = list(Settings.model_fields) + ["enabled", "words", "strength"]
    assert len(values) == len(names)
    edited = dict(zip(names, values, strict=True))
    edited.update(jpeg_quality=60.0, words='["x", "y"]', default_sampler="DPM++ 2M")
    out = _fn(demo, "apply_settings").fn(*edited.values())
    assert out[-1].startswith("Settings saved.")
    assert store.get().jpeg_quality == 60 and store.section("filter").words == ["x", "y"]

    edited["default_width"] = 100
    with pytest.raises(gr.Error, match="default_width"):
        _fn(demo, "apply_settings").fn(*edited.values())
    edited["default_width"], edited["words"] = 512, "[not json"
    with pytest.raises(gr.Error, match="filter.words"):
        _fn(demo, "apply_settings").fn(*edited.values())
    assert on_disk(config)["jpeg_quality"] == 60

    store.update({"jpeg_quality": 42})  # changed elsewhere (the API, another page)
    reloaded = _fn(demo, "reload_settings").fn()
    assert reloaded[names.index("jpeg_quality")] == 42
