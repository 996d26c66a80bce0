"""Prompt filter: refuse jobs whose prompt matches a blocklist. A worked example of the *prompt*
stage refusing a job.

The blocklist has one entry per line; blank lines and lines starting with `#` are skipped.

- `re:<pattern>` is a regular expression (Python syntax), matched case-insensitively anywhere in
  the prompt: `re:\\bblood(y|shed)?\\b`.
- Anything else is a keyword, matched case-insensitively as a whole word (or whole phrase:
  `red cube` also matches `red  cube`, but `cube` does not match `cubes` and `cat` not `concat`).

Entries come from the `blocklist` setting (Settings tab) and from a `prompt-filter.txt` file in
the working directory (the data folder), if there is one; both are read for every job, so an edit
applies to the next job without a restart. A server admin can ship the file; users of the page
can add entries in Settings.

Only the positive prompts are checked: each image's prompt as the sampler will see it (after
styles and after the `wildcards` extension picked its text -- the manifest says
`load_after = ["wildcards"]`, so a wildcard cannot smuggle a blocked word in) and the hires-fix
prompt when one is given. The negative prompt is what the image should *not* show, so a blocked
word there is no reason to refuse the job.

A match raises `JobRejected("Prompt blocked by the prompt filter: matched '...'")`: the job fails
with exactly that message (the HTTP API answers 422 with it). An invalid regular expression in
the list is reported the same way, naming the entry and where it came from, instead of failing
with a traceback: the admin sees what to fix and no prompt slips through unchecked.

How it plugs in: `register_settings` declares the settings model (its values arrive as
`stage.settings`, None when the app runs without a settings store); `process_prompt` reads
`stage.prompts` (one per image) and raises `JobRejected` to refuse the job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field

from webui.extensions.api import JobRejected, PromptStage, SettingsRegistry, hookimpl

BLOCKLIST_FILE = "prompt-filter.txt"  # in the working directory (the data folder)
REGEX_PREFIX = "re:"


class FilterSettings(BaseModel):
    enabled: bool = Field(True, title="Filter prompts",
                          description="Refuse jobs whose prompt matches an entry of the blocklist.")
    blocklist: str = Field("", title="Blocklist",
                           description="One entry per line: a keyword or phrase (whole words, any case), "
                                       "or re:<pattern> for a case-insensitive regular expression. Lines "
                                       f"starting with # are comments. {BLOCKLIST_FILE} in the data folder "
                                       "is read as well.")


@dataclass(frozen=True)
class Rule:
    entry: str  # as written in the list
    pattern: re.Pattern[str]


class InvalidRule(ValueError):
    pass


def keyword_pattern(keyword: str) -> re.Pattern[str]:
    """A whole-word, case-insensitive match of `keyword` (its words separated by any spaces)."""
    words = r"\s+".join(re.escape(w) for w in keyword.split())
    return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)


@lru_cache(maxsize=32)
def parse_blocklist(text: str, source: str) -> tuple[Rule, ...]:
    """The rules of a blocklist (InvalidRule naming the first bad entry and its line)."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.lower().startswith(REGEX_PREFIX):
            pattern = entry[len(REGEX_PREFIX):].strip()
            if not pattern:
                raise InvalidRule(f"entry {entry!r} ({source}, line {number}) has an empty regular expression")
            try:
                rules.append(Rule(entry, re.compile(pattern, re.IGNORECASE)))
            except re.error as err:
                raise InvalidRule(f"entry {entry!r} ({source}, line {number}) is not a valid regular "
                                  f"expression: {err}") from None
        else:
            rules.append(Rule(entry, keyword_pattern(entry)))
    return tuple(rules)


def first_match(text: str, rules: tuple[Rule, ...] | list[Rule]) -> str | None:
    """The text the first matching rule matched in `text`, or None."""
    for rule in rules:
        if m := rule.pattern.search(text):
            return m.group(0) or rule.entry  # a regex may match the empty string: name the entry
    return None


def rules_for(settings: FilterSettings, file: Path = Path(BLOCKLIST_FILE)) -> list[Rule]:
    """The rules of the setting and of the file (when it exists)."""
    rules = list(parse_blocklist(settings.blocklist, "the blocklist setting"))
    try:
        text = file.read_text(encoding="utf-8", errors="replace") if file.is_file() else ""
    except OSError:
        text = ""
    rules += parse_blocklist(text, str(file))
    return rules


# --- the hooks ---------------------------------------------------------------------------------

@hookimpl
def register_settings(settings: SettingsRegistry) -> None:
    settings.add(FilterSettings)


@hookimpl
def process_prompt(stage: PromptStage) -> None:
    config = stage.settings if stage.settings is not None else FilterSettings()
    if not config.enabled:
        return
    try:
        rules = rules_for(config, Path(stage.data_dir or ".") / BLOCKLIST_FILE)
    except InvalidRule as err:
        raise JobRejected(f"Prompt filter misconfigured: {err}") from None
    if not rules:
        return
    texts = list(stage.prompts)
    request = stage.request
    if request is not None and getattr(request, "enable_hr", False) and getattr(request, "hr_prompt", ""):
        texts.append(request.hr_prompt)
    for text in texts:
        matched = first_match(text, rules)
        if matched is not None:
            raise JobRejected(f"Prompt blocked by the prompt filter: matched '{matched}'")
