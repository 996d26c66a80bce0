"""docs/extensions.md cannot drift: it is what `webui.extensions.docs.render()` makes from the
tutorial and the code, it names every hook and stage object, and the tutorial's extension and
test, taken from the page, work."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

from webui.extensions import api, docs
from webui.extensions.hookspecs import Hooks

PAGE = docs.OUTPUT


def test_the_committed_page_is_what_render_makes() -> None:
    assert PAGE.is_file(), "docs/extensions.md is missing: run python -m webui.extensions.docs"
    assert PAGE.read_text(encoding="utf-8") == docs.render(), \
        "docs/extensions.md is out of date: run python -m webui.extensions.docs"
    assert docs.main(["--check"]) == 0


def test_every_hook_and_stage_object_is_documented() -> None:
    text = PAGE.read_text(encoding="utf-8")
    specs = [name for name in vars(Hooks) if hasattr(getattr(Hooks, name), f"{api.PROJECT}_spec")]
    assert docs.hook_names() == specs and len(specs) >= 10
    for name in specs:
        assert f"#### `{name}`" in text
        assert " ".join(getattr(Hooks, name).__doc__.split()[:6]) in " ".join(text.split())  # its docstring
    for name in api.__all__:
        obj = getattr(api, name)
        if dataclasses.is_dataclass(obj):
            assert f"#### `{name}`" in text
            for field in dataclasses.fields(obj):
                assert field.name.startswith("_") or f"| `{field.name}` |" in text
        else:
            assert f"`{name}" in text
    for section in ("## Reference", "### The stability promise", "### When an extension breaks",
                    "### Publishing an extension", "### Shipped extensions", 'WEBUI_API = "1"',
                    '[project.entry-points."webui.extensions"]', "install.py", "requirements.txt", "style.css"):
        assert section in text
    for shipped in ("wildcards", "prompt-filter", "safety-checker", "watermark"):
        assert f"[`{shipped}`](../webui/builtin_extensions/{shipped}/)" in text


def tutorial_files() -> dict[str, str]:
    """The files the tutorial writes: fenced blocks titled with a path (the last one of each path
    is the finished version)."""
    blocks = re.findall(r'^```\w+ title="([^"]+)"\n(.*?)^```$', PAGE.read_text(encoding="utf-8"), re.M | re.S)
    return dict(blocks)


def test_the_tutorial_extension_and_its_test_work(tmp_path: Path) -> None:
    files = tutorial_files()
    assert set(files) == {"extensions/suffix/extension.toml", "extensions/suffix/__init__.py",
                          "extensions/suffix/test_suffix.py"}
    for path, text in files.items():
        (tmp_path / "src" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / path).write_text(text, encoding="utf-8")
    test_file = tmp_path / "src" / "extensions" / "suffix" / "test_suffix.py"
    spec = importlib.util.spec_from_file_location("tutorial_test_suffix", test_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "run").mkdir()
    module.test_the_suffix_reaches_the_prompt_and_the_infotext(tmp_path / "run")
