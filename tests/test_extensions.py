"""Extensions: one small extension per stage proving each hook gets its documented arguments and
that its effect shows in the output; order; disable; failures at start-up and during a job; model
patches undone; arguments by name."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from webui.app import Engine, build_engine
from webui.config import Config
from webui.extensions.manager import ExtensionError
from webui.infotext import parse_infotext
from webui.pipeline.request import GenerationRequest


def write_extension(root: Path, name: str, code: str, manifest: str = "") -> Path:
    folder = root / "extensions" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "extension.toml").write_text(f'name = "{name}"\nversion = "1.2"\napi = "1"\n{manifest}')
    (folder / "__init__.py").write_text("from webui.extensions.api import *  # noqa\n" + textwrap.dedent(code))
    return folder


def engine_for(data_dir: Path, **kw) -> Engine:
    return build_engine(Config(data_dir=data_dir, dtype="float32", **kw))


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube", steps=3, width=64, height=64, seed=5, sampler_name="Euler", save_images=False)
    base.update(kw)
    return GenerationRequest(**base)


def test_prompt_stage_rewrites_per_image_and_adds_infotext(data_dir: Path) -> None:
    write_extension(data_dir, "shout", '''
        from pydantic import BaseModel

        class Args(BaseModel):
            suffix: str = "!"

        @hookimpl
        def ui_contribution():
            return UiSection(title="Shout", build=lambda: {}, args_model=Args)

        @hookimpl
        def process_prompt(stage):
            assert stage.extra_networks == [("lora", "none", ("0",))]
            stage.prompts = [p.upper() + stage.args.suffix + str(seed) for p, seed in zip(stage.prompts, stage.seeds)]
            stage.infotext["Shout"] = stage.args.suffix
    ''')
    engine = engine_for(data_dir)
    result = engine.runner.generate(req(prompt="a red cube <lora:none:0>", batch_size=2,
                                        extensions={"shout": {"suffix": "?"}}))
    prompts = [parse_infotext(t)["Prompt"] for t in result.infotexts]
    assert prompts == ["A RED CUBE ?5", "A RED CUBE ?6"]
    assert parse_infotext(result.infotexts[0])["Shout"] == "?"
    # the same through A1111's positional alwayson_scripts shape, and the defaults without args
    again = engine.runner.generate(req(prompt="x <lora:none:0>", extensions={"shout": {"args": ["#"]}}))
    assert parse_infotext(again.infotexts[0])["Prompt"] == "X #5"
    plain = engine.runner.generate(req(prompt="x <lora:none:0>"))
    assert parse_infotext(plain.infotexts[0])["Prompt"] == "X !5"
    with pytest.raises(ValueError, match="shout"):
        engine.runner.generate(req(extensions={"shout": {"suffix": ["not", "text"]}}))
    with pytest.raises(ValueError, match="no active extension named 'nope'"):
        engine.runner.generate(req(extensions={"nope": {}}))


def test_denoiser_wrap_and_model_patch_are_undone(data_dir: Path) -> None:
    write_extension(data_dir, "halve", '''
        calls = []

        @hookimpl
        def setup_denoiser(stage):
            inner = stage.denoiser
            stage.patch(stage.unet, "marker_attribute", "patched")

            def wrapped(x, sigma):
                calls.append(float(sigma))
                assert stage.unet.marker_attribute == "patched"
                return inner(x, sigma) * 0.5

            stage.denoiser = wrapped
            stage.infotext["Halved"] = True
    ''')
    engine = engine_for(data_dir)
    unet = engine.bundle(None).unet
    unet.marker_attribute = "original"
    result = engine.runner.generate(req())
    module = engine.extensions.get("halve").module
    assert len(module.calls) == 3  # one model call per Euler step
    assert unet.marker_attribute == "original"  # the patch is undone after the job
    assert parse_infotext(result.infotexts[0])["Halved"] == "True"
    engine.extensions.set_enabled("halve", False)
    clean = engine_for(data_dir).runner.generate(req())
    assert np.abs(np.asarray(result.images[0], dtype=int) - np.asarray(clean.images[0], dtype=int)).mean() > 1


def test_step_end_can_replace_latents(data_dir: Path) -> None:
    write_extension(data_dir, "zero", '''
        seen = []

        @hookimpl
        def step_end(stage):
            seen.append((stage.step, stage.steps, tuple(stage.x.shape), tuple(stage.denoised.shape)))
            if stage.step == stage.steps:
                stage.replace(stage.x * 0)
    ''')
    engine = engine_for(data_dir)
    result = engine.runner.generate(req())
    assert engine.extensions.get("zero").module.seen == [(1, 3, (1, 4, 8, 8), (1, 4, 8, 8)), (2, 3, (1, 4, 8, 8),
                                                          (1, 4, 8, 8)), (3, 3, (1, 4, 8, 8), (1, 4, 8, 8))]
    from webui.pipeline import latents as lat

    expected = lat.decode(engine.bundle(None), torch.zeros(1, 4, 8, 8))[0]  # the decode of zero latents
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))


def test_postprocess_and_saved_hooks(data_dir: Path) -> None:
    write_extension(data_dir, "invert", '''
        from PIL import ImageOps
        saved = []

        @hookimpl
        def postprocess_image(stage):
            stage.image = ImageOps.invert(stage.image)
            stage.infotext["Inverted"] = stage.index

        @hookimpl
        def image_saved(saved):
            globals()["saved"].append(saved.path)
    ''')
    engine = engine_for(data_dir)
    result = engine.runner.generate(req(save_images=True, batch_size=2))
    assert [parse_infotext(t)["Inverted"] for t in result.infotexts] == ["0", "1"]
    assert engine.extensions.get("invert").module.saved == result.paths
    engine.extensions.set_enabled("invert", False)
    plain = engine_for(data_dir).runner.generate(req(batch_size=2))
    assert np.array_equal(255 - np.asarray(plain.images[0]), np.asarray(result.images[0]))


def test_generate_wrapper_runs_around_the_job(data_dir: Path) -> None:
    write_extension(data_dir, "timer", '''
        events = []

        @hookimpl(wrapper=True)
        def generate(job):
            events.append(("start", job.kind, job.request.prompt))
            result = yield
            events.append(("end", len(result.images)))
            return result
    ''')
    engine = engine_for(data_dir)
    engine.runner.generate(req(prompt="p"))
    assert engine.extensions.get("timer").module.events == [("start", "txt2img", "p"), ("end", 1)]


def test_order_follows_the_manifests_then_names(data_dir: Path) -> None:
    code = '''
        @hookimpl
        def process_prompt(stage):
            stage.prompts = [p + " " + __name__.rsplit("_", 1)[-1] for p in stage.prompts]
    '''
    write_extension(data_dir, "b", code)
    write_extension(data_dir, "a", code, 'load_after = ["c"]\n')
    write_extension(data_dir, "c", code)
    write_extension(data_dir, "d", code, 'load_before = ["c"]\n')
    engine = engine_for(data_dir)
    result = engine.runner.generate(req(prompt="x"))
    assert parse_infotext(result.infotexts[0])["Prompt"] == "x b d c a"


def test_broken_extensions_are_disabled_with_a_reason_and_the_app_runs(data_dir: Path) -> None:
    write_extension(data_dir, "imports-badly", "import no_such_module_anywhere\n")
    write_extension(data_dir, "typo", "@hookimpl\ndef process_prompts(stage):\n    pass\n")
    write_extension(data_dir, "future", "", manifest="").joinpath("extension.toml").write_text(
        'name = "future"\napi = "2.0"\n')
    write_extension(data_dir, "startup-raises", '''
        @hookimpl
        def register_settings(settings):
            raise RuntimeError("no config for me")
    ''')
    write_extension(data_dir, "needs-friend", "", manifest='requires = ["friend"]\n')
    write_extension(data_dir, "fine", "@hookimpl\ndef process_prompt(stage):\n    stage.infotext['Fine'] = 1\n")
    engine = engine_for(data_dir)
    status = {e.name: e.status for e in engine.extensions.extensions}
    assert "ModuleNotFoundError" in status["imports-badly"]
    assert "process_prompts" in status["typo"]
    assert "API 2.0" in status["future"]
    assert "no config for me" in status["startup-raises"]
    assert "friend" in status["needs-friend"]
    assert status["fine"] == "loaded"
    result = engine.runner.generate(req())
    assert parse_infotext(result.infotexts[0])["Fine"] == "1"


def test_a_hook_failing_in_a_job_fails_that_job_only(data_dir: Path) -> None:
    write_extension(data_dir, "flaky", '''
        from webui.extensions.api import JobRejected

        @hookimpl
        def process_prompt(stage):
            if "boom" in stage.prompts[0]:
                raise KeyError("boom")
            if "no" in stage.prompts[0]:
                raise JobRejected("prompts saying no are refused")
    ''')
    engine = engine_for(data_dir)
    with pytest.raises(ExtensionError, match="extension 'flaky' failed in process_prompt: KeyError"):
        engine.runner.generate(req(prompt="boom"))
    with pytest.raises(ValueError, match="prompts saying no are refused"):
        engine.runner.generate(req(prompt="no"))
    assert engine.runner.generate(req(prompt="fine")).images


def test_disable_all_and_persisted_disable(data_dir: Path) -> None:
    write_extension(data_dir, "one", "@hookimpl\ndef process_prompt(stage):\n    stage.infotext['One'] = 1\n")
    engine = engine_for(data_dir, disable_all_extensions=True)
    assert all(not e.active for e in engine.extensions.extensions)
    assert "One" not in parse_infotext(engine.runner.generate(req()).infotexts[0])
    engine = engine_for(data_dir)
    engine.extensions.set_enabled("one", False)
    again = engine_for(data_dir)
    assert again.extensions.get("one").status == "disabled"
    assert "One" not in parse_infotext(again.runner.generate(req()).infotexts[0])


def test_extension_values_through_the_http_api(tmp_path: Path, checkpoint_store: Path) -> None:
    import requests

    from tests.conftest import add_checkpoint, start_server, stop_server

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    write_extension(tmp_path, "tagger", '''
        from pydantic import BaseModel, Field

        class Args(BaseModel):
            enabled: bool = False
            tag: str = Field("x", max_length=10)

        @hookimpl
        def ui_contribution():
            import gradio as gr
            return UiSection(title="Tagger", args_model=Args,
                             build=lambda: {"enabled": gr.Checkbox(False, label="On"), "tag": gr.Textbox("x")})

        @hookimpl
        def process_prompt(stage):
            if stage.args.enabled:
                stage.infotext["Tag"] = stage.args.tag
    ''')
    s = start_server(tmp_path, "--api", ready="/sdapi/v1/samplers")
    try:
        url = s.url + "/sdapi/v1"
        body = {"prompt": "a", "steps": 1, "width": 64, "height": 64}
        r = requests.post(url + "/txt2img", json={**body, "alwayson_scripts": {"tagger": {"args": [True, "hello"]}}},
                          timeout=120)
        assert r.status_code == 200, r.text
        import json as _json
        assert "Tag: hello" in _json.loads(r.json()["info"])["infotexts"][0]
        r = requests.post(url + "/txt2img", json={**body, "alwayson_scripts": {"tagger": {"args": {"enabled": True}}}},
                          timeout=120)
        assert "Tag: x" in _json.loads(r.json()["info"])["infotexts"][0]
        bad = requests.post(url + "/txt2img", json={**body, "alwayson_scripts": {"tagger": {"args": [True, "y" * 50]}}},
                            timeout=120)
        assert bad.status_code == 422 and "tagger" in bad.json()["detail"]
        assert requests.post(url + "/txt2img", json={**body, "alwayson_scripts": {"ghost": {}}},
                             timeout=120).status_code == 422
        assert "tagger" in requests.get(url + "/scripts", timeout=30).json()["txt2img"]
        listed = {e["name"]: e for e in requests.get(url + "/extensions", timeout=30).json()}
        assert listed["tagger"]["status"] == "loaded" and listed["tagger"]["version"] == "1.2"
    finally:
        stop_server(s)


def test_settings_sections_reach_the_hooks_and_apply_live(data_dir: Path) -> None:
    write_extension(data_dir, "greeter", '''
        from pydantic import BaseModel

        class GreeterSettings(BaseModel):
            word: str = "hello"

        @hookimpl
        def register_settings(settings):
            settings.add(GreeterSettings)

        @hookimpl
        def process_prompt(stage):
            stage.infotext["Greeting"] = stage.settings.word
    ''')
    engine = engine_for(data_dir)
    assert parse_infotext(engine.runner.generate(req()).infotexts[0])["Greeting"] == "hello"
    engine.settings.update_section("greeter", {"word": "bonjour"})
    assert parse_infotext(engine.runner.generate(req()).infotexts[0])["Greeting"] == "bonjour"
    assert '"bonjour"' in (data_dir / "config.json").read_text()  # saved with the other settings
    with pytest.raises(ValueError, match="word"):
        engine.settings.update_section("greeter", {"word": 3})


def test_installed_packages_with_an_entry_point_are_extensions(data_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path_factory.mktemp("site")
    (site / "pkg_ext_demo.py").write_text(textwrap.dedent('''
        from webui.extensions.api import hookimpl
        WEBUI_API = "1"

        @hookimpl
        def process_prompt(stage):
            stage.infotext["From package"] = True
    '''))
    info = site / "pkg_ext_demo-3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pkg-ext-demo\nVersion: 3.1\nSummary: demo\n")
    (info / "entry_points.txt").write_text("[webui.extensions]\npkg-demo = pkg_ext_demo\n")
    monkeypatch.syspath_prepend(str(site))
    engine = engine_for(data_dir)
    e = engine.extensions.get("pkg-demo")
    assert (e.source, e.version, e.status) == ("package", "3.1", "loaded")
    assert parse_infotext(engine.runner.generate(req()).infotexts[0])["From package"] == "True"


def test_an_extension_tab_is_added_to_the_page(data_dir: Path) -> None:
    write_extension(data_dir, "gallery-tab", '''
        @hookimpl
        def ui_contribution():
            import gradio as gr
            return UiSection(title="My gallery", tabs=("tab",),
                             build=lambda: {"note": gr.Markdown("hello", elem_id="my_gallery_note")})
    ''')
    write_extension(data_dir, "broken-ui", '''
        @hookimpl
        def ui_contribution():
            def build():
                raise RuntimeError("no widgets today")
            return UiSection(title="Broken", build=build)
    ''')
    from webui.ui.blocks import build_ui

    demo = build_ui(engine_for(data_dir))
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"tab_ext_gallery-tab", "my_gallery_note", "txt2img_ext_broken-ui", "tab_extensions",
            "tab_settings"} <= ids


def test_an_extension_sampler_is_listed_and_runs(data_dir: Path) -> None:
    write_extension(data_dir, "my-sampler", '''
        def plain_euler(denoiser, x, sigmas, *, noise, callback=None):
            for i in range(len(sigmas) - 1):
                denoised = denoiser(x, sigmas[i])
                x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
                if callback:
                    callback(SamplerStep(i, len(sigmas) - 1, x, sigmas[i], denoised))
            return x

        @hookimpl
        def samplers():
            return [ExtensionSampler("Plain Euler", plain_euler)]
    ''')
    write_extension(data_dir, "name-thief", '''
        @hookimpl
        def samplers():
            return [ExtensionSampler("Euler", lambda *a, **k: None)]
    ''')
    engine = engine_for(data_dir)
    assert "already taken" in engine.extensions.get("name-thief").status
    steps = []
    ours = engine.runner.generate(req(sampler_name="Plain Euler"), progress=lambda p: steps.append(p.step))
    builtin = engine.runner.generate(req(sampler_name="Euler"))
    assert steps == [1, 2, 3]
    assert np.abs(np.asarray(ours.images[0], dtype=int) - np.asarray(builtin.images[0], dtype=int)).max() <= 1
    assert parse_infotext(ours.infotexts[0])["Sampler"] == "Plain Euler"
    with pytest.raises(ValueError, match="unknown sampler 'Nope'.*Plain Euler"):
        engine.runner.generate(req(sampler_name="Nope"))
    from webui.ui.blocks import build_ui

    demo = build_ui(engine)
    dropdown = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "txt2img_sampler")
    assert "Plain Euler" in [c[0] if isinstance(c, tuple) else c for c in dropdown.choices]

    # the Settings default sampler may be the extension's: offered, accepted, kept over a restart
    setting = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "setting_default_sampler")
    assert "Plain Euler" in [c[0] if isinstance(c, tuple) else c for c in setting.choices]
    with pytest.raises(ValueError, match="unknown sampler 'Nope'"):
        engine.settings.update({"default_sampler": "Nope"})
    engine.settings.update({"default_sampler": "Plain Euler"})
    restarted = engine_for(data_dir)
    assert restarted.settings.get().default_sampler == "Plain Euler"
    page = build_ui(restarted)
    assert next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "txt2img_sampler").value == "Plain Euler"
    # the extension gone: the saved name stays in the file, the page starts with the built-in default
    shutil.rmtree(data_dir / "extensions" / "my-sampler")
    without = build_ui(engine_for(data_dir))
    assert next(b for b in without.blocks.values() if getattr(b, "elem_id", None) == "txt2img_sampler").value == "Euler a"


def test_stages_share_the_job_identity_and_a_scratch_space(data_dir: Path) -> None:
    """What an extension needs to count steps and say so in the infotext without module-level
    state: every stage of a job has its id and this extension's scratch dict; step_end may add
    infotext fields; the next job starts with a fresh scratch."""
    write_extension(data_dir, "step-counter", '''
        from webui.extensions.api import hookimpl

        @hookimpl
        def process_prompt(stage):
            stage.scratch["ids"] = {stage.job_id}
            stage.scratch["steps"] = 0

        @hookimpl
        def step_end(stage):
            stage.scratch["steps"] += 1
            stage.scratch["ids"].add(stage.job_id)
            stage.infotext["Counted steps"] = stage.scratch["steps"]
            assert stage.request.prompt == "a red cube"

        @hookimpl
        def postprocess_image(stage):
            stage.scratch["ids"].add(stage.job_id)
            stage.infotext["Job ids seen"] = len(stage.scratch["ids"])
    ''')
    engine = engine_for(data_dir)
    first = engine.runner.generate(req(steps=3))
    second = engine.runner.generate(req(steps=4))
    f, s = parse_infotext(first.infotexts[0]), parse_infotext(second.infotexts[0])
    assert (f["Counted steps"], f["Job ids seen"]) == ("3", "1")
    assert (s["Counted steps"], s["Job ids seen"]) == ("4", "1")  # a fresh scratch per job
