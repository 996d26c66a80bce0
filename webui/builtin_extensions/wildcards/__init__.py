"""Wildcards: random prompts that reproduce. A worked example of the *prompt* stage.

Syntax, in the prompt and in the negative prompt:

- `__name__` is replaced by one line of `<folder>/name.txt`; `__sub/name__` reads
  `<folder>/sub/name.txt`. Blank lines and lines starting with `#` are skipped. `<folder>` is the
  `folder` setting ("wildcards", relative to the working directory, i.e. the data folder).
- `{a|b|c}` is replaced by one of its options. Options may nest (`{red|{dark|light} blue}`) and
  may hold wildcards (`{__color__|plain}`); braces without a `|` (`{x}`) are left as typed.
- A picked line is expanded again, so a wildcard file may use wildcards and braces too (up to
  `MAX_DEPTH` levels, which stops a file that names itself). `\\{`, `\\}`, `\\|` and `\\_` are
  kept as typed and never start a pick.

Each image draws from its own random generator seeded by that image's seed (`stage.seeds[i]`),
so a seed always gives the same text, the images of a batch differ, and no image depends on the
others. The chosen text becomes the prompt (it is what the infotext's prompt shows, so pasting an
infotext reproduces the image); the prompt as typed is kept in the infotext as
`Wildcard prompt` (and `Wildcard negative prompt`). A wildcard whose file is missing or empty
stays as typed, and `Wildcards missing: name, ...` says so.

How it plugs in -- the parts an extension author copies:

1. `register_settings` declares a pydantic model; the Settings tab edits it and its current
   values arrive as `stage.settings` (None when the app runs without a settings store, so fall
   back to the model's defaults).
2. `process_prompt` gets a `PromptStage` per batch: one prompt and one negative prompt per image,
   with that image's seed. Rewrite the lists in place (same length), add `stage.infotext` pairs.
   The values are written into the infotext as they are (the formatter quotes text holding
   commas), so pass plain strings.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

from webui.extensions.api import PromptStage, SettingsRegistry, hookimpl

MAX_DEPTH = 20  # how deep a wildcard may expand into wildcards

# `__name__` or `__sub/dir/name__`: word characters, `-`, `.` and `/`; the shortest match, so
# `__a__.__b__` is two wildcards. (Names that would leave the folder are refused when read.)
WILDCARD = re.compile(r"__([\w\-./]+?)__")


class WildcardSettings(BaseModel):
    enabled: bool = Field(True, title="Expand wildcards",
                          description="Replace __name__ with a line of wildcards/name.txt and {a|b} with one option.")
    folder: str = Field("wildcards", title="Wildcards folder",
                        description="Where name.txt files are looked up; relative to the data folder.")


# --- the pure part: parsing and picking (no files, no stage; unit-testable) --------------------

Lookup = Callable[[str], "list[str] | None"]  # wildcard name -> its entries (None: not found)


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` matching the `{` at `start`, or None when it is never closed."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def split_options(inner: str) -> list[str]:
    """The `|`-separated options of a brace group's inside, at its top level only."""
    options, depth, last, i = [], 0, 0, 0
    while i < len(inner):
        ch = inner[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "|" and depth == 0:
            options.append(inner[last:i])
            last = i + 1
        i += 1
    options.append(inner[last:])
    return options


def expand(text: str, rng: random.Random, lookup: Lookup, missing: list[str] | None = None,
           depth: int = 0) -> str:
    """`text` with every `{a|b}` and `__name__` replaced by a pick drawn from `rng`, left to right.

    Names `lookup` cannot find are left as typed and appended to `missing`."""
    missing = [] if missing is None else missing
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped character is kept as typed, backslash included
            out.append(text[i:i + 2])
            i += 2
            continue
        if ch == "{":
            end = _closing_brace(text, i)
            if end is None:  # never closed: an ordinary character
                out.append(ch)
                i += 1
                continue
            options = split_options(text[i + 1:end])
            if len(options) == 1:  # `{x}` is no choice: keep the braces, expand what is inside
                out.append("{" + expand(options[0], rng, lookup, missing, depth) + "}")
            else:
                out.append(expand(rng.choice(options), rng, lookup, missing, depth))
            i = end + 1
            continue
        if ch == "_" and (m := WILDCARD.match(text, i)):
            entries = lookup(m.group(1)) if depth < MAX_DEPTH else None
            if entries:
                out.append(expand(rng.choice(entries), rng, lookup, missing, depth + 1))
            else:
                out.append(m.group(0))
                if depth < MAX_DEPTH:
                    missing.append(m.group(1))
            i = m.end()
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def parse_entries(text: str) -> list[str]:
    """The entries of a wildcard file: one per line; blank lines and `#` comments skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


# --- files -------------------------------------------------------------------------------------

_cache: dict[Path, tuple[int, int, list[str]]] = {}  # path -> (mtime_ns, size, entries)


def wildcard_file(folder: Path, name: str) -> Path | None:
    """`folder/name.txt`, or None for a name that would leave the folder (`__../x__`)."""
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return folder.joinpath(*parts[:-1], parts[-1] + ".txt")


def read_wildcard(folder: Path, name: str) -> list[str] | None:
    """The entries of wildcard `name` in `folder` (re-read when the file changes), or None."""
    path = wildcard_file(folder, name)
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    hit = _cache.get(path)
    if hit and hit[:2] == (stat.st_mtime_ns, stat.st_size):
        return hit[2]
    try:
        entries = parse_entries(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    _cache[path] = (stat.st_mtime_ns, stat.st_size, entries)
    return entries


# --- the hooks ---------------------------------------------------------------------------------

@hookimpl
def register_settings(settings: SettingsRegistry) -> None:
    settings.add(WildcardSettings)


@hookimpl
def process_prompt(stage: PromptStage) -> None:
    config = stage.settings if stage.settings is not None else WildcardSettings()
    if not config.enabled:
        return
    folder = Path(stage.data_dir or ".") / Path(config.folder).expanduser()  # relative: to the data folder
    lookup: Lookup = lambda name: read_wildcard(folder, name)  # noqa: E731
    missing: list[str] = []
    originals = (list(stage.prompts), list(stage.negative_prompts))
    for i, seed in enumerate(stage.seeds):
        # Each image its own generators, seeded by its own seed: reproducible, independent of the
        # other images. The negative prompt draws from a second stream so that editing one prompt
        # does not change the picks of the other.
        stage.prompts[i] = expand(stage.prompts[i], random.Random(seed), lookup, missing)
        stage.negative_prompts[i] = expand(stage.negative_prompts[i], random.Random(f"negative {seed}"),
                                           lookup, missing)
    # The infotext fields are shared by the images of the job: the typed prompt is the same for
    # all of them (it is the per-image choices that differ, and those are each image's prompt).
    if stage.prompts != originals[0]:
        stage.infotext["Wildcard prompt"] = originals[0][0]
    if stage.negative_prompts != originals[1]:
        stage.infotext["Wildcard negative prompt"] = originals[1][0]
    if missing:
        stage.infotext["Wildcards missing"] = ", ".join(sorted(set(missing)))
