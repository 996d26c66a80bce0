"""The prompt language, as plain text: no torch here.

Four independent passes, applied by the encoder in this order:

1. `split_and`: composable-diffusion sub-prompts joined by `AND`, each with an optional
   trailing `:weight`.
2. `prompt_schedule`: prompt editing (`[from:to:when]`, `[to:when]`, `[from::when]`) and
   alternation (`[a|b|c]`) resolved into one plain text per range of sampling steps.
3. `extract_extra_networks`: `<lora:name:0.8>`-style tags taken out of the text.
4. `parse_attention`: emphasis `(x)`, `[x]`, `(x:1.3)` and `BREAK` into weighted pieces.

Behaviour follows the syntax users know from the AUTOMATIC1111 web UI (see
`compat-facts.md`, section 3); the few places where it deliberately differs are noted on
the functions below.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal

__all__ = [
    "BREAK",
    "ExtraNetworkTag",
    "extract_extra_networks",
    "lora_weight",
    "parse_attention",
    "prompt_schedule",
    "split_and",
]

BREAK = "BREAK"
BREAK_WEIGHT = -1.0
ROUND_MULTIPLIER = 1.1
SQUARE_DIVISOR = 1.1

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"

# --------------------------------------------------------------------------------------
# Emphasis


_ATTENTION_TOKEN = re.compile(
    rf"""
      \\[()\[\]\\]                         # escaped bracket or backslash: a literal
    | [(\[]                                # opening bracket
    | :\s*(?P<weight>[+-]?{_NUMBER})\s*\)  # explicit weight, closes a round bracket
    | [)\]]                                # closing bracket
    | [^\\()\[\]:]+                        # ordinary text
    | [:\\]                                # stray colon, lone backslash: literals
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")


class _Stack:
    """Persistent stack of brackets: node 0 is the empty stack; each node knows its parent.

    A piece of text remembers the node that was on top when it was read; its weight is the
    product of the factors of that node and all its ancestors, known once every bracket has
    been closed. That keeps parsing linear however deep the nesting.
    """

    def __init__(self) -> None:
        self.parent = [0]
        self.factor = [1.0]
        self.open: list[int] = []  # node ids of the brackets still open, innermost last

    @property
    def top(self) -> int:
        return self.open[-1] if self.open else 0

    def push(self) -> None:
        self.parent.append(self.top)
        self.factor.append(1.0)
        self.open.append(len(self.parent) - 1)

    def pop(self, factor: float) -> None:
        self.factor[self.open.pop()] = factor

    def products(self) -> list[float]:
        out = [1.0] * len(self.parent)
        for node in range(1, len(self.parent)):  # parents always precede their children
            out[node] = self.factor[node] * out[self.parent[node]]
        return out


def _tidy(weight: float) -> float:
    """Round to 12 significant digits so that equal weights reached by different bracket
    paths compare equal (`[(a)]` is exactly 1.0, `(((sky)))` inside `(` is 1.4641)."""
    return float(f"{weight:.12g}")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into `(piece, weight)` pairs.

    - `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:1.3)` multiplies by 1.3 instead of
      1.1; nested brackets multiply.
    - Round and square brackets are counted separately: `)` closes the innermost open `(`
      even if a `[` was opened after it (so `(a [b) c]` gives a=1.1, b=1.0, c=1/1.1).
    - Brackets still open at the end are closed there (with 1.1, or /1.1).
    - A closing bracket with nothing to close, a `:number)` with no open `(`, a `:` that is
      not followed by a number and `)`, and a lone `\\` are literal text.
    - `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters.
    - `BREAK` (upper case, a whole word) is its own piece `("BREAK", -1.0)`, wherever it
      stands, also inside brackets; the whitespace around it is dropped.
    - Neighbouring pieces of equal weight are merged (BREAK pieces never are); empty
      pieces are dropped; an empty result is `[("", 1.0)]`.
    """
    rounds, squares = _Stack(), _Stack()
    raw: list[tuple[str, int, int]] = []  # (text, round node, square node); node -1 = BREAK

    def add(piece: str) -> None:
        parts = _BREAK_SPLIT.split(piece)
        for k, part in enumerate(parts):
            if k:
                raw.append((BREAK, -1, -1))
            if part:
                raw.append((part, rounds.top, squares.top))

    for m in _ATTENTION_TOKEN.finditer(text):
        token = m.group(0)
        weight = m.group("weight")
        if len(token) == 2 and token[0] == "\\":
            raw.append((token[1], rounds.top, squares.top))
        elif token == "(":
            rounds.push()
        elif token == "[":
            squares.push()
        elif weight is not None and rounds.open:
            rounds.pop(float(weight))
        elif token == ")" and rounds.open:
            rounds.pop(ROUND_MULTIPLIER)
        elif token == "]" and squares.open:
            squares.pop(1.0 / SQUARE_DIVISOR)
        else:
            add(token)
    while rounds.open:
        rounds.pop(ROUND_MULTIPLIER)
    while squares.open:
        squares.pop(1.0 / SQUARE_DIVISOR)

    round_w, square_w = rounds.products(), squares.products()
    merged: list[tuple[list[str], float]] = []  # BREAK pieces have an empty list
    for piece, r, s in raw:
        if r < 0:
            merged.append(([], BREAK_WEIGHT))
            continue
        w = _tidy(round_w[r] * square_w[s]) if (r or s) else 1.0
        if merged and merged[-1][1] == w and merged[-1][0]:
            merged[-1][0].append(piece)
        else:
            merged.append(([piece], w))
    return [("".join(parts) if parts else BREAK, w) for parts, w in merged] or [("", 1.0)]


# --------------------------------------------------------------------------------------
# Prompt editing and alternation


@dataclass
class _Scheduled:
    before: list[_Node]
    after: list[_Node]
    when: str  # the number as written
    step: int = 0  # filled in by prompt_schedule


@dataclass
class _Alternate:
    options: list[list[_Node]] = field(default_factory=list)


_Node = str | _Scheduled | _Alternate

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.DOTALL)
_WHEN = re.compile(rf"\s*({_NUMBER})\s*")
MAX_DEPTH = 100


class _TooDeep(Exception):
    pass


class _ScheduleParser:
    """Recursive descent over the prompt-editing grammar, with memoised bracket groups.

    Inside a bracket group only well-formed content is accepted (text, nested groups, and
    the separators that group allows); a group that does not parse fails as a whole. At the
    top level a bracket that does not start a well-formed group, and any stray `]`, `)`, `:`
    or `|`, is literal text. Each group start is parsed once (memo), so the work is linear.
    """

    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.memo: dict[int, tuple[list[_Node], int] | None] = {}

    def parse(self) -> list[_Node]:
        s, n, out, i = self.s, self.n, [], 0
        while i < n:
            if s[i] in "([":
                group = self.group(i, 1)
                if group is not None:
                    nodes, i = group
                    out.extend(nodes)
                    continue
                out.append(s[i])
                i += 1
                continue
            m = _PLAIN.match(s, i)
            if m:
                out.append(m.group())
                i = m.end()
            else:  # stray `]`, `)`, `:`, `|`, or a backslash at the very end
                out.append(s[i])
                i += 1
        return out

    def group(self, i: int, depth: int) -> tuple[list[_Node], int] | None:
        if i in self.memo:
            return self.memo[i]
        if depth > MAX_DEPTH:
            raise _TooDeep
        result = self._round(i, depth) if self.s[i] == "(" else self._square(i, depth)
        self.memo[i] = result
        return result

    def _seq(self, i: int, depth: int) -> tuple[list[_Node], int] | None:
        """Content inside a group, up to (not including) the next `]`, `)`, `:` or `|`."""
        s, n, out = self.s, self.n, []
        while i < n:
            c = s[i]
            if c in "([":
                group = self.group(i, depth + 1)
                if group is None:
                    return None
                nodes, i = group
                out.extend(nodes)
            elif c in "]):|":
                break
            else:
                m = _PLAIN.match(s, i)
                if not m:  # backslash at the very end
                    return None
                out.append(m.group())
                i = m.end()
        return out, i

    def _at(self, i: int, char: str) -> bool:
        return i < self.n and self.s[i] == char

    def _round(self, i: int, depth: int) -> tuple[list[_Node], int] | None:
        first = self._seq(i + 1, depth)
        if first is None:
            return None
        inner, j = first
        if self._at(j, ")"):
            return ["(", *inner, ")"], j + 1
        if self._at(j, ":"):
            second = self._seq(j + 1, depth)
            if second is not None and self._at(second[1], ")"):
                return ["(", *inner, ":", *second[0], ")"], second[1] + 1
        return None

    def _square(self, i: int, depth: int) -> tuple[list[_Node], int] | None:
        first = self._seq(i + 1, depth)
        if first is None:
            return None
        inner, j = first
        if self._at(j, "]"):
            return ["[", *inner, "]"], j + 1
        if self._at(j, "|"):
            options = [inner]
            while self._at(j, "|"):
                nxt = self._seq(j + 1, depth)
                if nxt is None:
                    return None
                options.append(nxt[0])
                j = nxt[1]
            return ([_Alternate(options)], j + 1) if self._at(j, "]") else None
        if not self._at(j, ":"):
            return None
        second = self._seq(j + 1, depth)
        if second is None:
            return None
        middle, k = second
        if self._at(k, "]"):  # [to:when]
            written = "".join(middle) if all(isinstance(x, str) for x in middle) else ""
            m = _WHEN.fullmatch(written)
            return ([_Scheduled([], inner, m.group(1))], k + 1) if m else None
        if self._at(k, ":"):  # [from:to:when]
            m = _WHEN.match(self.s, k + 1)
            if m and self._at(m.end(), "]"):
                return [_Scheduled(inner, middle, m.group(1))], m.end() + 1
        return None


def _when_to_step(when: str, steps: int, hires_steps: int) -> int:
    if "." in when:
        fraction = Decimal(when)  # exact: "0.29" of 100 steps is step 29, not 28
        if fraction <= 1:
            step = math.floor(fraction * steps)
        else:
            step = steps + math.floor((fraction - 1) * hires_steps)
    else:
        step = int(when)
    return min(step, steps + hires_steps)


def _walk(nodes: list[_Node], steps: int, hires_steps: int, found: set[int]) -> bool:
    """Resolve every `when` to a step, collect the steps where text changes; True if any
    alternation is present."""
    has_alternate = False
    for node in nodes:
        if isinstance(node, _Scheduled):
            node.step = _when_to_step(node.when, steps, hires_steps)
            found.add(node.step)
            has_alternate |= _walk(node.before, steps, hires_steps, found)
            has_alternate |= _walk(node.after, steps, hires_steps, found)
        elif isinstance(node, _Alternate):
            has_alternate = True
            for option in node.options:
                _walk(option, steps, hires_steps, found)
    return has_alternate


def _render(nodes: list[_Node], step: int, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            _render(node.before if step <= node.step else node.after, step, out)
        else:
            _render(node.options[(step - 1) % len(node.options)], step, out)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """Resolve prompt editing and alternation: `[(last_step, text), ...]` covering steps
    1..total in order, where total = steps + (hires_steps or 0); consecutive equal texts
    are merged, so a prompt without either construct gives `[(total, prompt)]`.

    - `[from:to:when]` is `from` up to and including step `when`, `to` after it;
      `[to:when]` is `[:to:when]` (nothing, then `to`), `[from::when]` drops `from` after
      `when`. Both constructs nest inside each other and inside emphasis.
    - `when` written with a decimal point is a fraction: f <= 1 means step floor(f * steps)
      (computed exactly in decimal); f > 1 reaches into the hires pass:
      steps + floor((f - 1) * hires_steps). Without a hires pass anything past 1 is the last
      step. An integer `when` is a step number of the whole schedule (first pass then
      hires pass, counted 1..total). Values past the end are the last step; 0 means the
      `to` text from the first step.
    - `[a|b|c]` takes option (step - 1) % 3 at each step, counting on through the hires
      pass; options may be empty (`[fe|]male`).
    - The text keeps emphasis brackets and escapes (`\\[` stays `\\[`): `parse_attention`
      reads them next.
    - Unlike A1111, a stray `|` outside any alternation does not make the whole prompt
      unparseable; it is literal text like a stray `:` or bracket, and the rest of the
      prompt is still scheduled. Brackets nested deeper than MAX_DEPTH are the one input
      the parser gives up on; the prompt is then used literally: `[(total, prompt)]`.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if hires_steps is not None and hires_steps < 0:
        raise ValueError(f"hires_steps must not be negative, got {hires_steps}")
    extra = hires_steps or 0
    total = steps + extra
    if "[" not in prompt:
        return [(total, prompt)]
    try:
        tree = _ScheduleParser(prompt).parse()
    except _TooDeep:
        return [(total, prompt)]

    changes: set[int] = set()
    if _walk(tree, steps, extra, changes):
        boundaries: list[int] = list(range(1, total + 1))
    else:
        boundaries = sorted({s for s in changes if 1 <= s < total} | {total})
    result: list[tuple[int, str]] = []
    for step in boundaries:
        parts: list[str] = []
        _render(tree, step, parts)
        text = "".join(parts)
        if result and result[-1][1] == text:
            result[-1] = (step, text)
        else:
            result.append((step, text))
    return result


# --------------------------------------------------------------------------------------
# AND

_AND = re.compile(r"\bAND\b")
_TRAILING_WEIGHT = re.compile(rf"(?P<text>.*?)\s*:\s*(?P<weight>[+-]?{_NUMBER})\s*", re.DOTALL)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split composable-diffusion sub-prompts at the upper-case word `AND`.

    Each sub-prompt may end in `:weight` (`a cat AND a dog :0.5` gives
    `[("a cat", 1.0), ("a dog", 0.5)]`). Texts are stripped of surrounding whitespace;
    empty sub-prompts (`a AND AND b`) are kept. A prompt without `AND` is one sub-prompt of
    weight 1.0 and its text is not searched for a weight (`a:0.5` stays `a:0.5`).
    """
    parts = _AND.split(prompt)
    if len(parts) == 1:
        return [(prompt.strip(), 1.0)]
    out = []
    for part in parts:
        m = _TRAILING_WEIGHT.fullmatch(part)
        if m:
            out.append((m.group("text").strip(), float(m.group("weight"))))
        else:
            out.append((part.strip(), 1.0))
    return out


# --------------------------------------------------------------------------------------
# Extra networks


@dataclass(frozen=True)
class ExtraNetworkTag:
    kind: str  # "lora", "hypernet", "lyco", ...
    name: str
    args: tuple[str, ...] = ()


_EXTRA_NETWORK = re.compile(r"<(\w+):([^<>]+)>")


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Take `<kind:name>` / `<kind:name:arg:...>` tags out of `text`.

    `kind` is a word (letters, digits, `_`); name and arguments are stripped of surrounding
    whitespace and may contain spaces. A tag with an empty name is left in the text. The tag
    is removed and nothing else: the text around it (commas, spaces) stays as written.
    Returns the cleaned text and the tags in order of appearance.
    """
    tags: list[ExtraNetworkTag] = []

    def take(m: re.Match[str]) -> str:
        name, *args = (part.strip() for part in m.group(2).split(":"))
        if not name:
            return m.group(0)
        tags.append(ExtraNetworkTag(m.group(1), name, tuple(args)))
        return ""

    return _EXTRA_NETWORK.sub(take, text), tags


def lora_weight(tag: ExtraNetworkTag) -> float:
    """The multiplier of a `<lora:name:weight>` tag: its first argument, 1.0 when absent or
    empty. A value that is not a finite number raises ValueError naming the tag."""
    if not tag.args or not tag.args[0]:
        return 1.0
    value = tag.args[0]
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise ValueError(f"<{tag.kind}:{tag.name}:...>: weight {value!r} is not a number")
    return weight
