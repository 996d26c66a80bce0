"""Prompt styles, kept in an A1111-compatible `styles.csv`.

The file has the header `name,prompt,negative_prompt` and is read and written with the csv
module (so prompts may hold commas, quotes and newlines). Files written by older versions
that name the prompt column `text` are read too; a UTF-8 byte-order mark (spreadsheet
programs add one) is ignored. Rows without a name are skipped; when a name appears twice
the last row wins, at the place of the first.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from webui.files import write_atomic

__all__ = ["PLACEHOLDER", "Style", "StyleStore", "apply_styles", "extract_styles"]

PLACEHOLDER = "{prompt}"
FIELDS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


class StyleStore:
    """The styles in one csv file. Reads are cached by the file's mtime and size, so edits
    made by hand (or by another process) show up on the next `list()`; writes replace the
    file atomically (temporary file in the same folder, then `os.replace`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cache_key: tuple[int, int] | None = None
        self._cache: list[Style] = []

    def list(self) -> list[Style]:
        with self._lock:
            return list(self._read())

    def get(self, name: str) -> Style:
        for style in self.list():
            if style.name == name:
                return style
        raise KeyError(f"style {name!r} is not in {self.path}")

    def save(self, style: Style) -> None:
        """Add `style`, or replace the style of the same name where it stands."""
        if not style.name.strip():
            raise ValueError("a style needs a name")
        with self._lock:
            styles = list(self._read())
            for k, old in enumerate(styles):
                if old.name == style.name:
                    styles[k] = style
                    break
            else:
                styles.append(style)
            self._write(styles)

    def delete(self, name: str) -> None:
        with self._lock:
            styles = self._read()
            kept = [s for s in styles if s.name != name]
            if len(kept) == len(styles):
                raise KeyError(f"style {name!r} is not in {self.path}")
            self._write(kept)

    # The lock is held by the callers of these two.

    def _read(self) -> list[Style]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._cache_key, self._cache = None, []
            return []
        key = (st.st_mtime_ns, st.st_size)
        if key != self._cache_key:
            self._cache = _parse_csv(self.path.read_text(encoding="utf-8-sig"))
            self._cache_key = key
        return self._cache

    def _write(self, styles: list[Style]) -> None:
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(FIELDS)
        for s in styles:
            writer.writerow((s.name, s.prompt, s.negative_prompt))
        write_atomic(self.path, buf.getvalue())
        self._cache_key, self._cache = None, []  # re-read (and re-stat) on next access


def _parse_csv(text: str) -> list[Style]:
    found: dict[str, Style] = {}
    for row in csv.DictReader(io.StringIO(text, newline="")):
        name = (row.get("name") or "").strip()
        if not name:
            continue
        prompt = row.get("prompt")
        if prompt is None:
            prompt = row.get("text")
        found[name] = Style(name, prompt or "", row.get("negative_prompt") or "")
    return list(found.values())


# --------------------------------------------------------------------------------------
# Applying and recognising styles


def _apply_one(text: str, style_text: str) -> str:
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, text)
    if not style_text.strip():
        return text
    if not text.strip():
        return style_text.strip()
    return f"{text.strip()}, {style_text.strip()}"


def apply_styles(prompt: str, negative: str, styles: list[Style]) -> tuple[str, str]:
    """Apply `styles` in order to the prompt and the negative prompt.

    A style text holding `{prompt}` has every placeholder replaced by the text so far;
    otherwise the style text is appended after `, ` (both stripped of surrounding
    whitespace; no comma when the text so far is blank). A blank style text changes nothing.
    """
    for style in styles:
        prompt = _apply_one(prompt, style.prompt)
        negative = _apply_one(negative, style.negative_prompt)
    return prompt, negative


def _placeholder_pattern(style_text: str) -> re.Pattern[str]:
    """A regex matching `style_text` with `{prompt}` filled in, capturing what filled it.

    Whitespace next to a placeholder is optional and the capture never starts or ends with
    whitespace: styles appended after a `{prompt}` style strip the text they append to
    (`anime, {prompt}` with an empty prompt, then `blurry`, gives `anime,, blurry`)."""
    segments = style_text.strip().split(PLACEHOLDER)
    parts = []
    for k, seg in enumerate(segments):
        core = seg.strip()
        lead = seg[: len(seg) - len(seg.lstrip())]
        trail = seg[len(seg.rstrip()) :] if core else ""
        parts.append((r"\s*" if lead else "") + re.escape(core) + (r"\s*" if trail else ""))
        if k < len(segments) - 1:
            parts.append(r"(?P<p>(?:\S(?:.*\S)?)?)" if k == 0 else "(?P=p)")
    return re.compile("".join(parts), re.DOTALL)


def _unapply_one(text: str, style_text: str) -> str | None:
    """The text before `_apply_one(_, style_text)` made `text`, or None if it cannot have."""
    if PLACEHOLDER in style_text:
        m = _placeholder_pattern(style_text).fullmatch(text.strip())
        return m.group("p") if m else None
    wanted = style_text.strip()
    if not wanted:
        return text
    have = text.strip()
    if have == wanted:
        return ""
    if have.endswith(", " + wanted):
        return have[: -len(wanted) - 2]
    return None


def extract_styles(prompt: str, negative: str, styles: list[Style]) -> tuple[str, str, list[str]]:
    """Undo `apply_styles` for the styles in `styles` (e.g. when pasting infotext).

    Styles are peeled off from the last applied one backwards: a style is recognised when
    both its prompt and its negative prompt part match (a blank part matches anything, but
    a style must remove some text to count), applying it to what is left gives the text
    back, and it has not been used yet. When several match, the one removing the most text
    is taken, ties by order in `styles`. Surrounding whitespace is ignored throughout, and
    the texts returned are stripped once a style has been taken off.
    Returns the original prompt, the original negative prompt and the style names in the
    order they were applied.
    """
    remaining = list(styles)
    found: list[str] = []
    while True:
        best: tuple[int, int, str, str] | None = None  # (removed chars, index, prompt, negative)
        for k, style in enumerate(remaining):
            p = _unapply_one(prompt, style.prompt)
            n = _unapply_one(negative, style.negative_prompt) if p is not None else None
            if p is None or n is None:
                continue
            # the candidate must give the text back when applied again (up to surrounding
            # whitespace): this rejects matches that only the loose whitespace allowed
            if _apply_one(p, style.prompt).strip() != prompt.strip():
                continue
            if _apply_one(n, style.negative_prompt).strip() != negative.strip():
                continue
            removed = len(prompt.strip()) - len(p.strip()) + len(negative.strip()) - len(n.strip())
            if removed > 0 and (best is None or removed > best[0]):
                best = (removed, k, p, n)
        if best is None:
            break
        _, k, prompt, negative = best
        found.append(remaining.pop(k).name)
    found.reverse()
    return prompt, negative, found
