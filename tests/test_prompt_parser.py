"""The prompt language as text: emphasis, BREAK, prompt editing, alternation, AND, extra
networks. Pure text, no model and no torch."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from webui.prompts import (
    ExtraNetworkTag,
    extract_extra_networks,
    lora_weight,
    parse_attention,
    prompt_schedule,
    split_and,
)
from webui.prompts.parser import MAX_DEPTH


def assert_pieces(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [t for t, _ in got] == [t for t, _ in want], got
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-9, abs=1e-9), got


# --------------------------------------------------------------------------------------
# Importing


def test_importing_webui_prompts_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from webui.prompts import parse_attention, prompt_schedule\n"
        "import webui.prompts.styles\n"
        "assert parse_attention('(a)') == [('a', 1.1)]\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------
# Emphasis


def test_compat_facts_example() -> None:
    got = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert_pieces(
        got,
        [
            ("a ", 1.0),
            ("house", 1.573),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641),
            (".", 1.1),
        ],
    )


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", [("", 1.0)]),
        ("plain text", [("plain text", 1.0)]),
        ("(a)", [("a", 1.1)]),
        ("((a))", [("a", 1.21)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("[[a]]", [("a", 1 / 1.21)]),
        ("(a:1.3)", [("a", 1.3)]),
        ("(a: 1.3 )", [("a", 1.3)]),
        ("(a:.5)", [("a", 0.5)]),
        ("(a:2.)", [("a", 2.0)]),
        ("(a:-1)", [("a", -1.0)]),
        ("(a:0)", [("a", 0.0)]),
        ("((a:1.3))", [("a", 1.43)]),
        ("[(a:1.3)]", [("a", 1.3 / 1.1)]),
        ("(a (b) c)", [("a ", 1.1), ("b", 1.21), (" c", 1.1)]),
        ("[(a)]", [("a", 1.0)]),
        ("x [(a)] y", [("x a y", 1.0)]),
        ("(a)(b)", [("ab", 1.1)]),
        ("(a)[b]", [("a", 1.1), ("b", 1 / 1.1)]),
        ("()", [("", 1.0)]),
        ("(:1.5)", [("", 1.0)]),
        ("a ()b", [("a b", 1.0)]),
    ],
)
def test_emphasis(text: str, want: list[tuple[str, float]]) -> None:
    assert_pieces(parse_attention(text), want)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("(a", [("a", 1.1)]),
        ("((a", [("a", 1.21)]),
        ("[a", [("a", 1 / 1.1)]),
        ("x (a (b", [("x ", 1.0), ("a ", 1.1), ("b", 1.21)]),
        ("(a:1.3", [("a:1.3", 1.1)]),
        ("a)", [("a)", 1.0)]),
        ("a]", [("a]", 1.0)]),
        ("a:1.3)", [("a:1.3)", 1.0)]),
        ("(a))b", [("a", 1.1), (")b", 1.0)]),
        # round and square brackets are counted separately
        ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 1 / 1.1)]),
        ("[a (b] c)", [("a ", 1 / 1.1), ("b", 1.0), (" c", 1.1)]),
        ("[a:1.3)]", [("a:1.3)", 1 / 1.1)]),
    ],
)
def test_unbalanced_brackets(text: str, want: list[tuple[str, float]]) -> None:
    assert_pieces(parse_attention(text), want)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (r"\(a\)", [("(a)", 1.0)]),
        (r"\[a\]", [("[a]", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        (r"(\(a\))", [("(a)", 1.1)]),
        (r"\\(a)", [("\\", 1.0), ("a", 1.1)]),
        (r"a\b", [("a\\b", 1.0)]),  # an unknown escape is a literal backslash
        ("a\\", [("a\\", 1.0)]),
        (r"(a\:1.2)", [("a\\", 1.2)]),  # `\:` is no escape: a backslash, then the weight
        (r"(a:1.2\)", [("a:1.2)", 1.1)]),
    ],
)
def test_escapes(text: str, want: list[tuple[str, float]]) -> None:
    assert_pieces(parse_attention(text), want)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("a:b", [("a:b", 1.0)]),
        ("(a:b)", [("a:b", 1.1)]),
        ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
        ("(a::1.2)", [("a:", 1.2)]),
        ("a | b", [("a | b", 1.0)]),
        ("(a|b)", [("a|b", 1.1)]),
        (":", [(":", 1.0)]),
        ("(:)", [(":", 1.1)]),
        ("time 12:30", [("time 12:30", 1.0)]),
    ],
)
def test_stray_colon_and_bar(text: str, want: list[tuple[str, float]]) -> None:
    assert_pieces(parse_attention(text), want)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAK", [("BREAK", -1.0)]),
        ("a BREAK", [("a", 1.0), ("BREAK", -1.0)]),
        ("BREAK, b", [("BREAK", -1.0), (", b", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),
        ("[(a BREAK b:1.5)]", [("a", 1.5 / 1.1), ("BREAK", -1.0), ("b", 1.5 / 1.1)]),
        ("(BREAK)", [("BREAK", -1.0)]),
        ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        # not the upper-case word on its own
        ("break Break", [("break Break", 1.0)]),
        ("BREAKING aBREAK BREAK_", [("BREAKING aBREAK BREAK_", 1.0)]),
    ],
)
def test_break(text: str, want: list[tuple[str, float]]) -> None:
    assert_pieces(parse_attention(text), want)


def test_non_ascii() -> None:
    assert_pieces(
        parse_attention("東京の(夜景:1.2), café [naïve] 🌸"),
        [("東京の", 1.0), ("夜景", 1.2), (", café ", 1.0), ("naïve", 1 / 1.1), (" 🌸", 1.0)],
    )


def test_pieces_join_back_to_the_text_without_syntax() -> None:
    text = "a (b [c] (d:0.7)) e, [f (g)] h"
    assert "".join(t for t, _ in parse_attention(text)) == "a b c d e, f g h"


def test_long_prompts_are_fast() -> None:
    cases = [
        "word, " * 1700,  # 10k characters of text
        "(" * 10_000,
        ")" * 10_000,
        "[(a:1.1) b] " * 900,
        "(" * 5000 + "x" + ")" * 5000,
        "\\(" * 5000,
        "a BREAK " * 1250,
    ]
    start = time.perf_counter()
    for text in cases:
        pieces = parse_attention(text)
        assert pieces
    assert time.perf_counter() - start < 2.0
    assert_pieces(parse_attention("(" * 100 + "x" + ")" * 100), [("x", 1.1**100)])
    assert_pieces(parse_attention("[" * 100 + "x"), [("x", 1.1**-100)])


# --------------------------------------------------------------------------------------
# Prompt editing and alternation


@pytest.mark.parametrize(
    ("prompt", "steps", "want"),
    [
        ("a [b:c:1] d", 10, [(1, "a b d"), (10, "a c d")]),
        ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
        ("a [b:0.5] c", 10, [(5, "a  c"), (10, "a b c")]),
        ("a [b::3] c", 10, [(3, "a b c"), (10, "a  c")]),
        ("a [b:c:0] d", 10, [(10, "a c d")]),
        ("a [b:c:10] d", 10, [(10, "a b d")]),
        ("a [b:c:99] d", 10, [(10, "a b d")]),
        ("a [b:c:1.0] d", 10, [(10, "a b d")]),
        ("a [b:c:2.5] d", 10, [(10, "a b d")]),
        ("a [b:c:0.0] d", 10, [(10, "a c d")]),
        ("a [b:c: 4 ] d", 10, [(4, "a b d"), (10, "a c d")]),
        ("a [b:c:.25] d", 10, [(2, "a b d"), (10, "a c d")]),
        ("[a:b:3] [c:d:3]", 10, [(3, "a c"), (10, "b d")]),
        ("[a:b:3] [c:d:6]", 10, [(3, "a c"), (6, "b c"), (10, "b d")]),
        ("plain prompt", 10, [(10, "plain prompt")]),
        ("", 10, [(10, "")]),
        ("[a:b:3]", 1, [(1, "a")]),
    ],
)
def test_prompt_editing(prompt: str, steps: int, want: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, steps) == want


def test_fraction_is_exact_in_decimal() -> None:
    # 0.29 * 100 is 28.999999999999996 in binary floating point
    assert prompt_schedule("[a:b:0.29]", 100) == [(29, "a"), (100, "b")]
    assert prompt_schedule("[a:b:0.7]", 10) == [(7, "a"), (10, "b")]


@pytest.mark.parametrize(
    ("prompt", "steps", "want"),
    [
        ("[cow|horse]", 4, [(1, "cow"), (2, "horse"), (3, "cow"), (4, "horse")]),
        ("a [cow|horse|dog]", 5, [(1, "a cow"), (2, "a horse"), (3, "a dog"), (4, "a cow"), (5, "a horse")]),
        ("[fe|]male", 3, [(1, "female"), (2, "male"), (3, "female")]),
        ("[|x]", 2, [(1, ""), (2, "x")]),
        ("[cow|cow]", 4, [(4, "cow")]),
        ("[a|b]", 1, [(1, "a")]),
    ],
)
def test_alternation(prompt: str, steps: int, want: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, steps) == want


@pytest.mark.parametrize(
    ("prompt", "steps", "want"),
    [
        # editing inside editing
        ("[a:[b:c:6]:3]", 10, [(3, "a"), (6, "b"), (10, "c")]),
        ("[[a:b:2]:c:5]", 10, [(2, "a"), (5, "b"), (10, "c")]),
        # alternation inside editing and editing inside alternation
        ("[x:[a|b]:2]", 5, [(2, "x"), (3, "a"), (4, "b"), (5, "a")]),
        ("[[a:b:2]|c]", 4, [(1, "a"), (2, "c"), (3, "b"), (4, "c")]),
        # editing inside emphasis keeps the emphasis for parse_attention
        ("(x [a:b:2]:1.2)", 4, [(2, "(x a:1.2)"), (4, "(x b:1.2)")]),
        ("[a:(b:1.5):2]", 4, [(2, "a"), (4, "(b:1.5)")]),
        ("[[a]:b:2]", 4, [(2, "[a]"), (4, "b")]),
        ("((a [b|c]))", 2, [(1, "((a b))"), (2, "((a c))")]),
    ],
)
def test_nesting(prompt: str, steps: int, want: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, steps) == want


def test_nested_alternation_takes_the_step_number_of_the_whole_schedule() -> None:
    # the inner [a|b] is only visible on odd steps, where it always shows "a"
    assert prompt_schedule("[[a|b]|c]", 4) == [(1, "a"), (2, "c"), (3, "a"), (4, "c")]


@pytest.mark.parametrize(
    "prompt",
    [
        r"a \[b:c:1\] d",
        r"a \[b:c:1] d",
        r"\[cow|horse\]",
        "(emphasis) [only]",
        "[a:b]",  # no number
        "[a:b:c]",  # not a number
        "[a:b:c:3]",  # too many parts
        "[a:b:1e3]",  # no exponents
        "[a:b:-3]",  # no signs
        "[a:b:3",  # unclosed
        "a:b:3]",
        "[a|b:c:3]",
        "(a|b)",
        "a|b",
        "|",
        ":",
        "]]][[[",
        "((((",
        "<lora:film grain:0.8>",
        "a\\",
        "[a\\]",
    ],
)
def test_text_without_valid_constructs_stays_literal(prompt: str) -> None:
    assert prompt_schedule(prompt, 10) == [(10, prompt)]


@pytest.mark.parametrize(
    ("prompt", "want"),
    [
        # stray separators and broken groups stay literal; the rest is still scheduled
        ("a | [b:c:2]", [(2, "a | b"), (4, "a | c")]),
        ("x: [b:c:2]", [(2, "x: b"), (4, "x: c")]),
        ("([a:b:2] [c:d:1]", [(1, "(a c"), (2, "(a d"), (4, "(b d")]),
        ("[a:b:2]]", [(2, "a]"), (4, "b]")]),
        ("[[a:b:2]", [(2, "[a"), (4, "[b")]),
        ("(x:y:z) [a:b:2]", [(2, "(x:y:z) a"), (4, "(x:y:z) b")]),
        (r"\[[a:b:2]\]", [(2, r"\[a\]"), (4, r"\[b\]")]),
        (r"[\(a:b\]:2]", [(2, r"\(a"), (4, r"b\]")]),
        ("<lora:x:0.5> [a:b:2]", [(2, "<lora:x:0.5> a"), (4, "<lora:x:0.5> b")]),
    ],
)
def test_stray_characters_around_valid_constructs(prompt: str, want: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, 4) == want


def test_too_deep_nesting_is_used_literally() -> None:
    deep = "[" * (MAX_DEPTH + 5) + "a:b:2" + "]" * (MAX_DEPTH + 5)
    assert prompt_schedule(deep, 4) == [(4, deep)]
    ok = "(" * 20 + "[a:b:2]" + ")" * 20
    assert prompt_schedule(ok, 4) == [(2, "(" * 20 + "a" + ")" * 20), (4, "(" * 20 + "b" + ")" * 20)]


def test_non_ascii_schedule() -> None:
    assert prompt_schedule("猫 [été:冬:2] 🌸", 3) == [(2, "猫 été 🌸"), (3, "猫 冬 🌸")]


def test_schedule_with_hires_pass() -> None:
    # fractions up to 1 are of the first pass, above 1 of the hires pass
    assert prompt_schedule("[a:b:0.5]", 10, 10) == [(5, "a"), (20, "b")]
    assert prompt_schedule("[a:b:1.0]", 10, 10) == [(10, "a"), (20, "b")]
    assert prompt_schedule("[a:b:1.5]", 10, 10) == [(15, "a"), (20, "b")]
    assert prompt_schedule("[a:b:1.25]", 10, 4) == [(11, "a"), (14, "b")]
    assert prompt_schedule("[a:b:2.0]", 10, 10) == [(20, "a")]
    assert prompt_schedule("[a:b:3.0]", 10, 10) == [(20, "a")]
    # integers are steps of the whole schedule
    assert prompt_schedule("[a:b:12]", 10, 10) == [(12, "a"), (20, "b")]
    assert prompt_schedule("[a:b:99]", 10, 10) == [(20, "a")]
    # alternation keeps counting through the hires pass
    assert prompt_schedule("[x|y]", 2, 2) == [(1, "x"), (2, "y"), (3, "x"), (4, "y")]
    # no prompt-editing: one entry covering everything
    assert prompt_schedule("plain", 10, 5) == [(15, "plain")]
    # a hires pass of 0 steps is no hires pass
    assert prompt_schedule("[a:b:1.5]", 10, 0) == prompt_schedule("[a:b:1.5]", 10) == [(10, "a")]


def test_bad_step_counts() -> None:
    with pytest.raises(ValueError, match="steps"):
        prompt_schedule("a", 0)
    with pytest.raises(ValueError, match="hires_steps"):
        prompt_schedule("a", 10, -1)


def test_schedule_covers_every_step_in_order() -> None:
    prompt = "[a:[b|c]:0.3] (x [d:e:7]:1.1) [f::0.9] [g|h|i]"
    for steps, hires in [(1, None), (7, None), (20, None), (20, 10), (3, 1)]:
        total = steps + (hires or 0)
        sched = prompt_schedule(prompt, steps, hires)
        ends = [s for s, _ in sched]
        assert ends == sorted(set(ends)) and ends[-1] == total and ends[0] >= 1
        texts = [t for _, t in sched]
        assert all(a != b for a, b in zip(texts, texts[1:], strict=False))


def test_long_prompts_schedule_fast() -> None:
    cases = [
        "word, " * 1700,
        "[a:b:5] " * 1250,
        "[cow|horse] " * 800,
        "[" * 10_000,
        "]" * 10_000,
        "(" * 10_000,
        "[a" * 5000,
        "[a:" * 3000,
        "(a:" * 3000,
        "[a|" * 3000,
        "|:" * 5000,
        "\\[" * 5000,
    ]
    start = time.perf_counter()
    for text in cases:
        sched = prompt_schedule(text, 30)
        assert sched[-1][0] == 30
    assert time.perf_counter() - start < 3.0
    assert prompt_schedule("[a:b:5] " * 1250, 30) == [(5, "a " * 1250), (30, "b " * 1250)]


def test_schedule_then_attention() -> None:
    sched = prompt_schedule(r"a ([b:c:2]:1.3) \[d\]", 4)
    assert [parse_attention(t) for _, t in sched] == [
        [("a ", 1.0), ("b", 1.3), (" [d]", 1.0)],
        [("a ", 1.0), ("c", 1.3), (" [d]", 1.0)],
    ]


# --------------------------------------------------------------------------------------
# AND


@pytest.mark.parametrize(
    ("prompt", "want"),
    [
        ("a cat AND a dog :0.5", [("a cat", 1.0), ("a dog", 0.5)]),
        ("a cat:1.2 AND a dog", [("a cat", 1.2), ("a dog", 1.0)]),
        ("a AND b AND c", [("a", 1.0), ("b", 1.0), ("c", 1.0)]),
        ("a : 2 AND b: -0.5 AND c:.5", [("a", 2.0), ("b", -0.5), ("c", 0.5)]),
        ("a cat", [("a cat", 1.0)]),
        ("  a cat  ", [("a cat", 1.0)]),
        ("a cat :0.5", [("a cat :0.5", 1.0)]),  # no AND: not searched for a weight
        ("", [("", 1.0)]),
        ("a and b", [("a and b", 1.0)]),
        ("SAND ANDROID", [("SAND ANDROID", 1.0)]),
        ("a AND", [("a", 1.0), ("", 1.0)]),
        ("a AND AND b", [("a", 1.0), ("", 1.0), ("b", 1.0)]),
        ("(x:1.2) AND [y:z:3]", [("(x:1.2)", 1.0), ("[y:z:3]", 1.0)]),
        ("a:b AND c:1.2.3", [("a:b", 1.0), ("c:1.2.3", 1.0)]),
        ("猫 AND 犬 :0.7", [("猫", 1.0), ("犬", 0.7)]),
        ("a\nAND\nb", [("a", 1.0), ("b", 1.0)]),
    ],
)
def test_split_and(prompt: str, want: list[tuple[str, float]]) -> None:
    assert split_and(prompt) == want


# --------------------------------------------------------------------------------------
# Extra networks


def test_extract_extra_networks() -> None:
    text, tags = extract_extra_networks("a photo <lora:film grain:0.8>, <hypernet:x:1> sharp<lora:y>")
    assert text == "a photo ,  sharp"
    assert tags == [
        ExtraNetworkTag("lora", "film grain", ("0.8",)),
        ExtraNetworkTag("hypernet", "x", ("1",)),
        ExtraNetworkTag("lora", "y", ()),
    ]


@pytest.mark.parametrize(
    ("text", "clean", "tags"),
    [
        ("no tags here", "no tags here", []),
        ("", "", []),
        ("<lora:a:0.5:0.7>", "", [ExtraNetworkTag("lora", "a", ("0.5", "0.7"))]),
        ("<lora: spaced name : 0.5 >", "", [ExtraNetworkTag("lora", "spaced name", ("0.5",))]),
        ("<lora:café/日本:1>", "", [ExtraNetworkTag("lora", "café/日本", ("1",))]),
        ("<lora::0.5>", "<lora::0.5>", []),  # no name
        ("<lora>", "<lora>", []),
        ("<:x:1>", "<:x:1>", []),
        ("<lora:x", "<lora:x", []),
        ("a < b > c", "a < b > c", []),
        ("<<lora:x:1>>", "<>", [ExtraNetworkTag("lora", "x", ("1",))]),
        ("(<lora:x:1>:1.2)", "(:1.2)", [ExtraNetworkTag("lora", "x", ("1",))]),
        ("<lora:x:1><lora:x:1>", "", [ExtraNetworkTag("lora", "x", ("1",))] * 2),
        ("<lyco_v2:x:te=1>", "", [ExtraNetworkTag("lyco_v2", "x", ("te=1",))]),
    ],
)
def test_extract_extra_networks_edges(text: str, clean: str, tags: list[ExtraNetworkTag]) -> None:
    assert extract_extra_networks(text) == (clean, tags)


def test_lora_weight() -> None:
    assert lora_weight(ExtraNetworkTag("lora", "x", ("0.8",))) == 0.8
    assert lora_weight(ExtraNetworkTag("lora", "x", ("-1", "0.5"))) == -1.0
    assert lora_weight(ExtraNetworkTag("lora", "x", ())) == 1.0
    assert lora_weight(ExtraNetworkTag("lora", "x", ("",))) == 1.0
    assert lora_weight(extract_extra_networks("<lora:x: 1.5 >")[1][0]) == 1.5
    for bad in ("abc", "nan", "inf", "1,5", "te=1"):
        with pytest.raises(ValueError, match=r"lora:film grain.*not a number"):
            lora_weight(ExtraNetworkTag("lora", "film grain", (bad,)))


def test_extra_network_tags_are_frozen() -> None:
    tag = ExtraNetworkTag("lora", "x", ("1",))
    with pytest.raises(AttributeError):
        tag.name = "y"  # type: ignore[misc]
    assert hash(tag) == hash(ExtraNetworkTag("lora", "x", ("1",)))
