"""The shipped extensions of the prompt and sampler stages: `wildcards`, `prompt-filter` and
`dynamic-thresholding` -- their pure functions, their effect on a generation through a tiny
engine, and the same over real HTTP."""

from __future__ import annotations

import ast
import base64
import io
import json
import random
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from webui.app import SHIPPED_EXTENSIONS, Engine, build_engine
from webui.config import Config
from webui.extensions.api import JobRejected, PromptStage
from webui.extensions.manager import read_manifest
from webui.infotext import parse_infotext
from webui.pipeline.request import GenerationRequest

SHIPPED = ("wildcards", "prompt-filter", "dynamic-thresholding")
COLORS = [f"color{n}" for n in range(24)]


def load_module(name: str) -> ModuleType:
    ext = read_manifest(SHIPPED_EXTENSIONS / name)
    assert ext.loader is not None
    return ext.loader()


@pytest.fixture(scope="module")
def wildcards() -> ModuleType:
    return load_module("wildcards")


@pytest.fixture(scope="module")
def prompt_filter() -> ModuleType:
    return load_module("prompt-filter")


@pytest.fixture(scope="module")
def thresholding() -> ModuleType:
    return load_module("dynamic-thresholding")


@pytest.fixture
def workdir(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The data dir as the working directory (as when the app runs from it), with wildcard files."""
    monkeypatch.chdir(data_dir)
    folder = data_dir / "wildcards"
    (folder / "shapes").mkdir(parents=True)
    (folder / "color.txt").write_text("# colours, one per line\n\n" + "\n".join(COLORS) + "\n\n# the end\n")
    (folder / "shapes" / "round.txt").write_text("ball\nring\ndisc\n")
    (folder / "nested.txt").write_text("{light|dark} __color__\n")
    (folder / "bad.txt").write_text("forbidden\n")
    return data_dir


def engine_for(data_dir: Path, **kw) -> Engine:
    return build_engine(Config(data_dir=data_dir, dtype="float32", **kw))


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube", steps=2, width=64, height=64, seed=5, sampler_name="Euler", save_images=False)
    base.update(kw)
    return GenerationRequest(**base)


def infos(result) -> list[dict[str, str]]:
    return [parse_infotext(t) for t in result.infotexts]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- loading ----------------------------------------------------------------------------------


def test_the_shipped_extensions_load_and_import_only_the_api(data_dir: Path) -> None:
    engine = engine_for(data_dir)
    for name in SHIPPED:
        e = engine.extensions.get(name)
        assert e is not None and e.status == "loaded", (name, e and e.status)
        assert e.version == "1.0.0" and e.api_version == "1" and e.description
        assert e.path == SHIPPED_EXTENSIONS / name
    assert engine.extensions.get("wildcards").settings_model is not None
    assert engine.extensions.get("prompt-filter").settings_model is not None
    ui = engine.extensions.get("dynamic-thresholding").ui
    assert ui is not None and list(ui.args_model.model_fields) == ["enabled", "threshold", "percentile"]
    # the filter runs after wildcards picked their text
    names = [e.name for e in engine.extensions.active()]
    assert names.index("wildcards") < names.index("prompt-filter")
    # only the public API of the app; gradio only inside functions (build())
    for name in SHIPPED:
        tree = ast.parse((SHIPPED_EXTENSIONS / name / "__init__.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("webui"):
                assert node.module == "webui.extensions.api", (name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("webui") for a in node.names), name
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not any("gradio" in ast.unparse(n) for n in top_level), name


# --- wildcards: the pure part -----------------------------------------------------------------


def test_braces_pick_one_option_reproducibly(wildcards: ModuleType) -> None:
    def pick(text: str, seed: int) -> str:
        return wildcards.expand(text, random.Random(seed), lambda name: None)

    seen = {pick("a {red|green|blue} cube", seed) for seed in range(60)}
    assert seen == {"a red cube", "a green cube", "a blue cube"}
    assert all(pick("{a|b|c|d|e}", s) == pick("{a|b|c|d|e}", s) for s in range(20))
    nested = {pick("{x|{y|z}}", seed) for seed in range(80)}
    assert nested == {"x", "y", "z"}
    assert {pick("{small {red|blue}|big}", s) for s in range(80)} == {"small red", "small blue", "big"}
    assert {pick("{a|}", s) for s in range(40)} == {"a", ""}
    # not a choice: kept as typed
    for text in ("{}", "{solo}", "a { b", "a } b", r"\{a|b\}", "x | y", "[cat|dog]"):
        assert pick(text, 1) == text
    assert {pick("{solo {a|b}}", s) for s in range(40)} == {"{solo a}", "{solo b}"}


def test_wildcard_names_files_and_nesting(wildcards: ModuleType, tmp_path: Path) -> None:
    table = {"color": ["red", "green"], "sub/shape": ["ball"], "loop": ["__loop__"], "deep": ["{__color__|x}"]}
    missing: list[str] = []

    def expand(text: str, seed: int = 0) -> str:
        return wildcards.expand(text, random.Random(seed), table.get, missing)

    assert {expand("__color__ __sub/shape__", s) for s in range(30)} == {"red ball", "green ball"}
    assert {expand("__deep__", s) for s in range(40)} == {"red", "green", "x"}
    assert expand("__a__.__color__", 3).startswith("__a__.") and missing == ["a"]
    assert expand("snake_case and __init_ and ____") == "snake_case and __init_ and ____"
    assert expand("__loop__") == "__loop__"  # a file naming itself stops at the depth limit
    assert wildcards.parse_entries("# c\n\n one \n#x\ntwo\n  \n") == ["one", "two"]
    # files: sub-folders, comments, changes picked up, names leaving the folder refused
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "thing.txt").write_text("# c\nfirst\n\nsecond\n")
    assert wildcards.read_wildcard(tmp_path, "sub/thing") == ["first", "second"]
    (tmp_path / "sub" / "thing.txt").write_text("third entry only\n")
    assert wildcards.read_wildcard(tmp_path, "sub/thing") == ["third entry only"]
    assert wildcards.read_wildcard(tmp_path, "nothing") is None
    assert wildcards.read_wildcard(tmp_path, "../secret") is None
    assert wildcards.wildcard_file(tmp_path, "a/./b") is None


def test_the_hook_uses_the_settings_and_each_images_seed(wildcards: ModuleType, tmp_path: Path) -> None:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "color.txt").write_text("\n".join(COLORS))

    def run(seeds: list[int], **settings) -> PromptStage:
        stage = PromptStage(prompts=["a __color__ {x|y|z}"] * len(seeds), negative_prompts=["__color__"] * len(seeds),
                            seeds=seeds, extra_networks=[], settings=wildcards.WildcardSettings(**settings))
        wildcards.process_prompt(stage=stage)
        return stage

    stage = run([7, 8, 9, 10], folder=str(folder))
    assert stage.prompts[1:3] == run([8, 9], folder=str(folder)).prompts  # independent of the other images
    assert all(p.split()[1] in COLORS for p in stage.prompts)
    assert all(n in COLORS for n in stage.negative_prompts)
    assert stage.infotext == {"Wildcard prompt": "a __color__ {x|y|z}", "Wildcard negative prompt": "__color__"}
    off = run([7], folder=str(folder), enabled=False)
    assert off.prompts == ["a __color__ {x|y|z}"] and off.infotext == {}
    nowhere = run([7], folder=str(tmp_path / "none"))
    assert nowhere.prompts[0].startswith("a __color__ ") and nowhere.infotext["Wildcards missing"] == "color"


# --- wildcards: through the engine ------------------------------------------------------------


def test_wildcards_in_a_generation(workdir: Path) -> None:
    engine = engine_for(workdir)
    prompt = "a __color__ cube, {shiny|matte|glossy|rough|smooth|dull} finish, __shapes/round__"
    result = engine.runner.generate(req(prompt=prompt, batch_size=4, seed=100))
    got = infos(result)
    chosen = [i["Prompt"] for i in got]
    for text in chosen:
        color, rest = text.removeprefix("a ").split(" cube, ")
        finish, shape = rest.split(" finish, ")
        assert color in COLORS and finish in "shiny matte glossy rough smooth dull".split()
        assert shape in ("ball", "ring", "disc")
    assert len(set(chosen)) > 1  # the images of a batch differ
    assert all(i["Wildcard prompt"] == prompt for i in got)  # commas and all, read back from the infotext
    assert "Wildcards missing" not in got[0]
    # the same seed gives the same text, in a batch or alone
    again = infos(engine.runner.generate(req(prompt=prompt, batch_size=4, seed=100)))
    assert [i["Prompt"] for i in again] == chosen
    alone = infos(engine.runner.generate(req(prompt=prompt, seed=102)))
    assert alone[0]["Prompt"] == chosen[2] and alone[0]["Seed"] == "102"
    # nested braces and a wildcard file that uses braces and wildcards itself
    nested = infos(engine.runner.generate(req(prompt="{a {big|small}|the {red|blue}} __nested__", batch_size=4,
                                              seed=7)))
    for i in nested:
        head, tail = i["Prompt"].rsplit(" ", 2)[0], i["Prompt"].rsplit(" ", 2)[1:]
        assert head in ("a big", "a small", "the red", "the blue")
        assert tail[0] in ("light", "dark") and tail[1] in COLORS
    # the negative prompt too
    neg = infos(engine.runner.generate(req(prompt="plain", negative_prompt="__color__, blur")))[0]
    assert neg["Prompt"] == "plain" and neg["Negative prompt"].split(", ")[0] in COLORS
    assert neg["Wildcard negative prompt"] == "__color__, blur" and "Wildcard prompt" not in neg


def test_a_missing_wildcard_stays_as_typed_with_a_note(workdir: Path) -> None:
    engine = engine_for(workdir)
    got = infos(engine.runner.generate(req(prompt="a __nope__ {}", batch_size=2)))
    assert [i["Prompt"] for i in got] == ["a __nope__ {}"] * 2
    assert got[0]["Wildcards missing"] == "nope" and "Wildcard prompt" not in got[0]
    mixed = infos(engine.runner.generate(req(prompt="__nope__ __color__ __gone/too__")))[0]
    assert mixed["Prompt"].startswith("__nope__ ") and mixed["Prompt"].endswith(" __gone/too__")
    assert mixed["Wildcards missing"] == "gone/too, nope"
    assert mixed["Wildcard prompt"] == "__nope__ __color__ __gone/too__"
    plain = infos(engine.runner.generate(req(prompt="no wildcards here")))[0]
    assert not any(k.startswith("Wildcard") for k in plain)


# --- prompt filter ----------------------------------------------------------------------------


def test_blocklist_parsing_and_matching(prompt_filter: ModuleType) -> None:
    rules = prompt_filter.parse_blocklist("# comment\n\ncat\nred  cube\nre:blood(y|shed)?\nRE:^start\nc++\n", "test")
    assert [r.entry for r in rules] == ["cat", "red  cube", "re:blood(y|shed)?", "RE:^start", "c++"]
    match = lambda text: prompt_filter.first_match(text, rules)  # noqa: E731
    assert match("a CAT on a mat") == "CAT"
    assert match("(cat:1.2)") == "cat"
    assert match("concatenate cats catalog") is None  # whole words only
    assert match("a red\ncube") == "red\ncube"
    assert match("a redcube") is None
    assert match("BLOODSHED at dawn") == "BLOODSHED"
    assert match("start here") == "start" and match("do not start") is None
    assert match("learn c++ today") == "c++"
    with pytest.raises(prompt_filter.InvalidRule, match=r"'re:\[oops' \(test, line 2\) is not a valid regular"):
        prompt_filter.parse_blocklist("fine\nre:[oops\n", "test")
    with pytest.raises(prompt_filter.InvalidRule, match="empty regular expression"):
        prompt_filter.parse_blocklist("re:", "test")


def test_the_filter_hook_uses_its_settings(prompt_filter: ModuleType, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no prompt-filter.txt here

    def check(prompt: str, negative: str = "", **settings) -> None:
        stage = PromptStage(prompts=[prompt], negative_prompts=[negative], seeds=[1], extra_networks=[],
                            settings=prompt_filter.FilterSettings(**settings))
        prompt_filter.process_prompt(stage=stage)

    check("anything goes")
    with pytest.raises(JobRejected, match="^Prompt blocked by the prompt filter: matched 'Red Cube'$"):
        check("a Red Cube", blocklist="red cube\nre:^x")
    check("a Red Cube", blocklist="red cube", enabled=False)
    check("a blue cube", negative="red cube", blocklist="red cube")  # negative prompts are not checked
    with pytest.raises(JobRejected, match="misconfigured.*'re:\\(' \\(the blocklist setting, line 1\\)"):
        check("a", blocklist="re:(")


def test_a_blocked_prompt_fails_the_job(workdir: Path) -> None:
    (workdir / "prompt-filter.txt").write_text("# admin's list\nnsfw\nre:blood(y|shed)\nforbidden\n")
    engine = engine_for(workdir)
    with pytest.raises(ValueError, match="^Prompt blocked by the prompt filter: matched 'NSFW'$"):
        engine.runner.generate(req(prompt="a NSFW picture"))
    with pytest.raises(JobRejected, match="matched 'bloodshed'"):
        engine.runner.generate(req(prompt="scenes of bloodshed, oil painting"))
    with pytest.raises(ValueError, match="matched 'forbidden'"):  # chosen by a wildcard, then filtered
        engine.runner.generate(req(prompt="a __bad__ fruit"))
    with pytest.raises(ValueError, match="matched 'nsfw'"):  # the hires prompt is a positive prompt too
        engine.runner.generate(req(prompt="fine", enable_hr=True, hr_scale=1.5, hr_prompt="nsfw", steps=1))
    ok = engine.runner.generate(req(prompt="nsfwish bloodless", negative_prompt="nsfw"))
    assert ok.images and infos(ok)[0]["Prompt"] == "nsfwish bloodless"
    # the file is read for each job: a bad regex is reported by name, the next fix applies at once
    (workdir / "prompt-filter.txt").write_text("re:[unclosed\n")
    with pytest.raises(ValueError, match=r"Prompt filter misconfigured: .*'re:\[unclosed' \(.*prompt-filter.txt, "
                                         r"line 1\) is not a valid regular expression"):
        engine.runner.generate(req(prompt="anything"))
    (workdir / "prompt-filter.txt").write_text("re:unclosed\n")
    assert engine.runner.generate(req(prompt="a NSFW picture")).images


# --- dynamic thresholding ---------------------------------------------------------------------


def test_dynamic_threshold_function(thresholding: ModuleType) -> None:
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.5, 0.0]).reshape(1, 4, 1, 1)
    calm = torch.randn(2, 4, 16, 16, generator=gen).clamp(-2, 2) * 0.5 + mean
    assert torch.allclose(thresholding.dynamic_threshold(calm, 3.0, 0.995), calm, atol=1e-6)  # in range: untouched
    burnt = torch.randn(2, 4, 16, 16, generator=gen) * 10 + mean
    out = thresholding.dynamic_threshold(burnt, 2.0, 0.995)
    around_mean = (out - burnt.mean(dim=(2, 3), keepdim=True)).abs()
    assert around_mean.max() <= 2.0 + 1e-4  # scaled into the range around each channel's mean
    assert torch.allclose(out.mean(dim=(2, 3)), burnt.mean(dim=(2, 3)), atol=0.5)
    centered = [(v - v.mean(dim=(2, 3), keepdim=True)).flatten() for v in (out, burnt)]
    assert torch.corrcoef(torch.stack(centered))[0, 1] > 0.95  # the same picture, scaled down
    half = thresholding.dynamic_threshold(burnt.half(), 2.0, 0.99)
    assert half.dtype == torch.float16 and half.shape == burnt.shape


def test_dynamic_thresholding_is_off_by_default_and_changes_the_image_when_on(data_dir: Path) -> None:
    engine = engine_for(data_dir)
    clean = engine_for(data_dir, disable_all_extensions=True).runner.generate(req(cfg_scale=12))
    default = engine.runner.generate(req(cfg_scale=12))
    assert np.array_equal(pixels(default.images[0]), pixels(clean.images[0]))
    assert not any(k.startswith("Dynamic thresholding") for k in infos(default)[0])
    explicit_off = engine.runner.generate(req(cfg_scale=12, extensions={"dynamic-thresholding": {"enabled": False}}))
    assert np.array_equal(pixels(explicit_off.images[0]), pixels(clean.images[0]))

    on = engine.runner.generate(req(cfg_scale=12, extensions={"dynamic-thresholding": {"enabled": True,
                                                                                       "threshold": 1.0}}))
    assert np.abs(pixels(on.images[0]) - pixels(clean.images[0])).mean() > 1
    info = infos(on)[0]
    assert info["Dynamic thresholding"] == "1" and info["Dynamic thresholding percentile"] == "0.995"
    # A1111's positional alwayson_scripts shape gives the same image
    positional = engine.runner.generate(req(cfg_scale=12, extensions={"dynamic-thresholding": {"args": [True, 1.0]}}))
    assert np.array_equal(pixels(positional.images[0]), pixels(on.images[0]))
    # missing values take the defaults; bad values are refused, naming the extension and field
    defaults = engine.runner.generate(req(cfg_scale=12, extensions={"dynamic-thresholding": {"args": [True]}}))
    assert infos(defaults)[0]["Dynamic thresholding"] == "3"
    with pytest.raises(ValueError, match="dynamic-thresholding.*threshold"):
        engine.runner.generate(req(extensions={"dynamic-thresholding": {"args": [True, 99]}}))
    # the job after is untouched: the wrapper lived for that job only
    after = engine.runner.generate(req(cfg_scale=12))
    assert np.array_equal(pixels(after.images[0]), pixels(clean.images[0]))


# --- over HTTP --------------------------------------------------------------------------------


def test_the_shipped_extensions_over_http(tmp_path: Path, checkpoint_store: Path) -> None:
    from tests.conftest import add_checkpoint, start_server, stop_server

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    (tmp_path / "prompt-filter.txt").write_text("nsfw\nre:gor(e|y)\n")
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "color.txt").write_text("\n".join(COLORS))
    s = start_server(tmp_path, "--api", ready="/sdapi/v1/samplers")
    try:
        url = s.url + "/sdapi/v1/txt2img"
        body = {"prompt": "a cube", "steps": 2, "width": 64, "height": 64, "seed": 3, "cfg_scale": 12,
                "sampler_name": "Euler"}

        def post(**kw) -> requests.Response:
            return requests.post(url, json={**body, **kw}, timeout=120)

        blocked = post(prompt="something NSFW")
        assert blocked.status_code == 422, blocked.text
        assert blocked.json()["detail"] == "Prompt blocked by the prompt filter: matched 'NSFW'"
        assert "matched 'gory'" in post(prompt="gory details").json()["detail"]

        plain = post()
        on = post(alwayson_scripts={"dynamic-thresholding": {"args": [True, 1.0]}})
        assert plain.status_code == 200 and on.status_code == 200, on.text
        plain_info = parse_infotext(json.loads(plain.json()["info"])["infotexts"][0])
        on_info = parse_infotext(json.loads(on.json()["info"])["infotexts"][0])
        assert "Dynamic thresholding" not in plain_info and on_info["Dynamic thresholding"] == "1"
        images = [pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))) for r in (plain, on)]
        assert np.abs(images[0] - images[1]).mean() > 1

        picked = post(prompt="a __color__ cube", batch_size=2)
        assert picked.status_code == 200, picked.text
        texts = [parse_infotext(t) for t in json.loads(picked.json()["info"])["infotexts"]]
        assert all(t["Prompt"].split()[1] in COLORS and t["Wildcard prompt"] == "a __color__ cube" for t in texts)
    finally:
        stop_server(s)


def test_the_settings_tab_values_reach_the_filter_and_wildcards(workdir: Path) -> None:
    engine = engine_for(workdir)
    engine.settings.update_section("prompt-filter", {"blocklist": "castle\nre:dra+gon"})
    with pytest.raises(ValueError, match="castle"):
        engine.runner.generate(req(prompt="a castle on a hill"))
    with pytest.raises(ValueError, match="draaagon"):
        engine.runner.generate(req(prompt="a draaagon"))
    engine.settings.update_section("prompt-filter", {"enabled": False})
    assert engine.runner.generate(req(prompt="a castle on a hill")).images
    (workdir / "elsewhere").mkdir()
    (workdir / "elsewhere" / "animal.txt").write_text("otter\n")
    engine.settings.update_section("wildcards", {"folder": str(workdir / "elsewhere")})
    assert infos(engine.runner.generate(req(prompt="an __animal__")))[0]["Prompt"] == "an otter"


def test_relative_files_are_found_in_the_data_dir_from_any_working_directory(
        data_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    (data_dir / "prompt-filter.txt").write_text("castle\n")
    (data_dir / "wildcards").mkdir()
    (data_dir / "wildcards" / "animal.txt").write_text("otter\n")
    engine = engine_for(data_dir)
    with pytest.raises(ValueError, match="castle"):
        engine.runner.generate(req(prompt="a castle"))
    assert infos(engine.runner.generate(req(prompt="an __animal__")))[0]["Prompt"] == "an otter"
