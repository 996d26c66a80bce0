"""The declared dependencies are the whole truth: every third-party import of the app (`webui/`,
the shipped extensions inside it, `launch.py`) is a declared dependency, or an optional extra
imported behind an ImportError guard; the tests' imports are in the `test` extra. Read from the
source, so an import added later without a declaration fails here, not on a new user's machine."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# import name -> distribution, for optional packages that need not be installed here
NOT_INSTALLED = {"imwatermark": "invisible-watermark", "xformers": "xformers", "spandrel": "spandrel"}


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imports(files: list[Path], root: Path = ROOT) -> dict[str, dict[str, bool]]:
    """top-level module -> {file: guarded}, for every absolute import that is not stdlib or ours.
    `guarded`: see the module docstring."""
    catches = {"ImportError", "ModuleNotFoundError", "Exception"}
    found: dict[str, dict[str, bool]] = {}
    for path in files:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text)
        guarded_nodes: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in catches
                or isinstance(h.type, ast.Tuple) and any(getattr(e, "id", "") in catches for e in h.type.elts)
                for h in node.handlers
            ):
                for inner in node.body:
                    guarded_nodes.update(id(n) for n in ast.walk(inner))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("webui", "tests", "launch", "__future__"):
                    continue
                where = str(path.relative_to(root))
                guarded = id(node) in guarded_nodes or "# optional dependency" in lines[node.lineno - 1]
                found.setdefault(top, {})[where] = found.get(top, {}).get(where, True) and guarded
    return found


def _distribution_of(module: str) -> str:
    dists = md.packages_distributions().get(module) or [NOT_INSTALLED.get(module, module)]
    return dists[0].lower().replace("_", "-")


def _app_files() -> list[Path]:
    return sorted((ROOT / "webui").rglob("*.py")) + [ROOT / "launch.py"]


def test_every_app_import_is_declared() -> None:
    core = {_dist(r) for r in PROJECT["dependencies"]}
    extras = {_dist(r) for reqs in PROJECT["optional-dependencies"].values() for r in reqs}
    problems = []
    for module, files in sorted(_imports(_app_files()).items()):
        dist = _distribution_of(module)
        if dist in core:
            continue
        unguarded = [f for f, guarded in files.items() if not guarded]
        if dist not in extras:
            problems.append(f"{module} (distribution {dist}) is imported by {sorted(files)} but not declared")
        elif unguarded:
            problems.append(f"{module} is an optional extra but imported without an ImportError guard in {unguarded}")
    assert not problems, "\n".join(problems)


def test_every_test_import_is_declared() -> None:
    declared = {_dist(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]}
    problems = []
    for module, files in sorted(_imports(sorted((ROOT / "tests").rglob("*.py"))).items()):
        dist = _distribution_of(module)
        if dist not in declared and not all(files.values()):
            problems.append(f"{module} ({dist}) is imported by {sorted(files)} but not in the test extra")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_an_undeclared_import(tmp_path: Path) -> None:
    """The scan itself works: an unguarded import of an undeclared package is found as such."""
    source = tmp_path / "mod.py"
    source.write_text("import os\ntry:\n    import maybe_there\nexcept ImportError:\n    pass\nimport surely_missing.sub\n")
    found = _imports([source], root=tmp_path)
    assert found == {"maybe_there": {"mod.py": True}, "surely_missing": {"mod.py": False}}


def test_python_requirement_matches_the_launcher() -> None:
    """pyproject's requires-python is what launch.py checks, and what this interpreter satisfies."""
    assert PROJECT["requires-python"] == ">=3.11"
    assert "sys.version_info < (3, 11)" in (ROOT / "launch.py").read_text()
    assert sys.version_info >= (3, 11)


def test_shipped_extensions_are_package_data() -> None:
    """A non-editable install carries the shipped extensions: every file of theirs matches a
    package-data pattern (the install itself is exercised by .ci/run's clean-venv smoke run)."""
    import fnmatch

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["webui"]
    shipped = ROOT / "webui" / "builtin_extensions"
    files = [p.relative_to(ROOT / "webui").as_posix() for p in shipped.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert {f.split("/")[1] for f in files} == {p.name for p in shipped.iterdir() if (p / "extension.toml").is_file()}
    assert len({f.split("/")[1] for f in files}) >= 7
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, f"not carried by a non-editable install: {missing}"
