"""The built-in scripts of the Script dropdown (A1111's `script_name`): X/Y/Z plot, prompt
matrix, prompts from file or textbox, SD upscale, loopback. `Scripts` finds them by name and
runs one as a job; see `base` for what a script is."""

from __future__ import annotations

from webui.scripts.base import Script, ScriptContext, ScriptEnv
from webui.scripts.loopback import Loopback
from webui.scripts.prompt_matrix import PromptMatrix
from webui.scripts.prompts_from_file import PromptsFromFile
from webui.scripts.sd_upscale import SdUpscale
from webui.scripts.xyz import XyzPlot

__all__ = ["Script", "ScriptContext", "ScriptEnv", "all_scripts", "find_script"]


def all_scripts() -> tuple[Script, ...]:
    """Every built-in script, in the dropdown's order."""
    return (PromptMatrix(), PromptsFromFile(), XyzPlot(), SdUpscale(), Loopback())


def find_script(name: str, tab: str) -> Script:
    """The script called `name` (its title, any case) on `tab`; ValueError naming those there are."""
    wanted = name.strip().lower()
    scripts = [s for s in all_scripts() if tab in s.tabs]
    for s in scripts:
        if s.name == wanted or wanted in _ALIASES.get(s.name, ()):
            return s
    raise ValueError(f"script_name: no script {name!r} on {tab} (available: {', '.join(s.name for s in scripts)})")


_ALIASES = {"x/y/z plot": ("x/y plot", "xyz plot", "xyz_grid")}
