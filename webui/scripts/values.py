"""A1111's X/Y/Z value syntax: a comma-separated list (double quotes around a value that holds a
comma), where a number axis also takes ranges:

    1-5          1, 2, 3, 4, 5            (ends included)
    1-5 (+2)     1, 3, 5                  (a step; `10-1 (-3)` counts down)
    1-10 [5]     1, 3, 5, 7, 10           (that many values, evenly spread; ints rounded down)
    0.5-1 (+0.25), 1-2 [3]                the same for decimal numbers

Parsing never guesses: a value that is neither a number nor a range is an error naming it.
"""

from __future__ import annotations

import csv
import io
import math
import re

_NUM = r"[+-]?\s*\d+(?:\.\d*)?"
_RANGE = re.compile(rf"\s*({_NUM})\s*-\s*({_NUM})\s*(?:\(\s*([+-]\s*\d+(?:\.\d*)?)\s*\)|\[\s*(\d+)\s*\])?\s*")
MAX_VALUES = 1000  # one axis; a typo like 1-1000000 is refused, not run


def split_list(text: str) -> list[str]:
    """`a, "b, c", d` -> ["a", "b, c", "d"]; empty items dropped."""
    rows = list(csv.reader(io.StringIO(text.strip()), skipinitialspace=True))
    return [item.strip() for row in rows for item in row if item.strip()]


def _number(text: str, kind: type) -> float | int:
    text = text.replace(" ", "")
    try:
        return kind(text) if kind is float else int(text)
    except ValueError:
        value = float(text)  # "7.0" on an int axis is 7; "7.5" is not an int
        if not value.is_integer():
            raise ValueError(f"{text!r} is not a whole number") from None
        return int(value)


def expand(item: str, kind: type) -> list[float | int]:
    """One list item of a number axis: a number, or a range as in the module docstring."""
    m = _RANGE.fullmatch(item)
    if m is None:
        try:
            float(item.replace(" ", ""))
        except ValueError:
            raise ValueError(f"{item!r} is not a number or a range like 1-5, 1-5 (+2) or 1-10 [5]") from None
        return [_number(item, kind)]
    start, end = _number(m[1], kind), _number(m[2], kind)
    if m[4] is not None:  # [count]
        count = int(m[4])
        if count < 1:
            raise ValueError(f"{item!r}: the count in [] must be at least 1")
        if count == 1:
            values = [start]
        else:
            values = [start + (end - start) * i / (count - 1) for i in range(count)]
    else:
        step = _number(m[3], kind) if m[3] is not None else (1 if end >= start else -1)
        if step == 0 or (end - start) * step < 0:
            raise ValueError(f"{item!r}: the step {step} never reaches {end}")
        n = math.floor((end - start) / step + 1e-9) + 1
        if n > MAX_VALUES:
            raise ValueError(f"{item!r} makes {n} values (at most {MAX_VALUES} per axis)")
        values = [start + step * i for i in range(n)]
    if kind is int:
        return [math.floor(v + 1e-9) for v in values]
    return [round(float(v), 10) for v in values]


def parse_values(text: str, kind: type) -> list:
    """The values of one axis from its text; `kind` is int, float or str."""
    items = split_list(text)
    if kind is str:
        return items
    values: list = []
    for item in items:
        values.extend(expand(item, kind))
        if len(values) > MAX_VALUES:
            raise ValueError(f"more than {MAX_VALUES} values on one axis")
    return values
