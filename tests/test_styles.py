"""Prompt styles: the A1111-compatible styles.csv, applying styles and recognising them again
in a pasted prompt."""

from __future__ import annotations

import csv
import os
import threading
from pathlib import Path

import pytest

from webui.prompts.styles import Style, StyleStore, apply_styles, extract_styles

A1111_FILE = (
    "name,prompt,negative_prompt\r\n"
    'Cinematic,"cinematic still {prompt}, shallow depth of field, film grain","anime, cartoon"\r\n'
    "Sharp,\"sharp focus, 8k\",blurry\r\n"
    "Negative only,,\"lowres, bad anatomy\"\r\n"
    '"Quoted ""name""","a ""quoted"" word",\r\n'
)


# --------------------------------------------------------------------------------------
# The file


def test_reads_an_a1111_file(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_text(A1111_FILE, encoding="utf-8", newline="")
    store = StyleStore(path)
    assert store.list() == [
        Style("Cinematic", "cinematic still {prompt}, shallow depth of field, film grain", "anime, cartoon"),
        Style("Sharp", "sharp focus, 8k", "blurry"),
        Style("Negative only", "", "lowres, bad anatomy"),
        Style('Quoted "name"', 'a "quoted" word', ""),
    ]
    assert store.get("Sharp").negative_prompt == "blurry"


def test_missing_file_is_empty_and_get_names_the_style(tmp_path: Path) -> None:
    store = StyleStore(tmp_path / "nope" / "styles.csv")
    assert store.list() == []
    with pytest.raises(KeyError, match="Sharp"):
        store.get("Sharp")
    with pytest.raises(KeyError, match="Sharp"):
        store.delete("Sharp")


def test_save_adds_replaces_in_place_and_delete(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "styles.csv"
    store = StyleStore(path)
    store.save(Style("one", "a, b", "c"))
    store.save(Style("two", "{prompt}, d", ""))
    store.save(Style("three", "e", "f"))
    store.save(Style("two", "changed", "g"))
    assert [s.name for s in store.list()] == ["one", "two", "three"]
    assert store.get("two") == Style("two", "changed", "g")
    store.delete("one")
    assert [s.name for s in store.list()] == ["two", "three"]
    # a second store on the same file sees the same thing
    assert StyleStore(path).list() == store.list()
    # no temporary files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["styles.csv"]


def test_written_file_is_a1111_csv(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    store = StyleStore(path)
    tricky = Style('comma, "quote"', 'line one\nline two, "x"', "naïve, 日本, 🌸")
    store.save(tricky)
    store.save(Style("plain", "p", "n"))
    raw = path.read_bytes()
    assert raw.startswith(b"name,prompt,negative_prompt\r\n")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"name": tricky.name, "prompt": tricky.prompt, "negative_prompt": tricky.negative_prompt},
        {"name": "plain", "prompt": "p", "negative_prompt": "n"},
    ]
    assert StyleStore(path).list() == [tricky, Style("plain", "p", "n")]


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "styles.csv"
    store = StyleStore(path)
    store.save(Style("kept", "a", "b"))
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save(Style("new", "c", "d"))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["styles.csv"]
    assert [s.name for s in store.list()] == ["kept"]


def test_edits_by_hand_are_seen(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    store = StyleStore(path)
    store.save(Style("a", "x", ""))
    assert [s.name for s in store.list()] == ["a"]
    path.write_text("name,prompt,negative_prompt\nb,y,z\nc,,\n", encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse mtime clocks
    assert store.list() == [Style("b", "y", "z"), Style("c", "", "")]
    path.unlink()
    assert store.list() == []


def test_odd_files(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    # byte-order mark, legacy `text` column, no negative column, blank names, duplicate names
    path.write_text(
        "\ufeffname,text\nold,legacy prompt\n,nameless\n  ,blank\ndup,first\nother,o\ndup,second\n",
        encoding="utf-8",
    )
    assert StyleStore(path).list() == [
        Style("old", "legacy prompt", ""),
        Style("dup", "second", ""),
        Style("other", "o", ""),
    ]
    path.write_text("", encoding="utf-8")
    assert StyleStore(path).list() == []
    path.write_text("name,prompt,negative_prompt\n", encoding="utf-8")
    assert StyleStore(path).list() == []
    path.write_text("name,prompt,negative_prompt\nshort\n", encoding="utf-8")
    assert StyleStore(path).list() == [Style("short", "", "")]


def test_save_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name"):
        StyleStore(tmp_path / "s.csv").save(Style("  ", "a", "b"))


def test_concurrent_saves_lose_nothing(tmp_path: Path) -> None:
    store = StyleStore(tmp_path / "styles.csv")

    def work(k: int) -> None:
        for j in range(10):
            store.save(Style(f"s{k}-{j}", "p", "n"))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(StyleStore(tmp_path / "styles.csv").list()) == 40


def test_list_returns_a_copy(tmp_path: Path) -> None:
    store = StyleStore(tmp_path / "styles.csv")
    store.save(Style("a", "x", ""))
    store.list().clear()
    assert len(store.list()) == 1


# --------------------------------------------------------------------------------------
# Applying


CINEMATIC = Style("Cinematic", "cinematic still {prompt}, film grain", "anime, {prompt}")
SHARP = Style("Sharp", "sharp focus, 8k", "blurry")
NEG_ONLY = Style("Neg", "", "lowres")
EMPTY = Style("Empty", "", "")


@pytest.mark.parametrize(
    ("prompt", "negative", "styles", "want"),
    [
        ("a cat", "ugly", [SHARP], ("a cat, sharp focus, 8k", "ugly, blurry")),
        ("a cat", "", [SHARP], ("a cat, sharp focus, 8k", "blurry")),
        ("", "", [SHARP], ("sharp focus, 8k", "blurry")),
        ("  a cat  ", " ugly ", [SHARP], ("a cat, sharp focus, 8k", "ugly, blurry")),
        ("a cat", "ugly", [CINEMATIC], ("cinematic still a cat, film grain", "anime, ugly")),
        ("", "", [CINEMATIC], ("cinematic still , film grain", "anime, ")),
        (
            "a cat",
            "ugly",
            [SHARP, CINEMATIC],
            ("cinematic still a cat, sharp focus, 8k, film grain", "anime, ugly, blurry"),
        ),
        (
            "a cat",
            "ugly",
            [CINEMATIC, SHARP],
            ("cinematic still a cat, film grain, sharp focus, 8k", "anime, ugly, blurry"),
        ),
        ("a cat", "ugly", [NEG_ONLY], ("a cat", "ugly, lowres")),
        ("a cat ", "ugly", [EMPTY], ("a cat ", "ugly")),
        ("a cat", "ugly", [], ("a cat", "ugly")),
        ("x", "", [Style("twice", "{prompt} and {prompt}", "")], ("x and x", "")),
        ("猫", "", [Style("u", "🌸 {prompt} 🌸", "")], ("🌸 猫 🌸", "")),
    ],
)
def test_apply_styles(prompt: str, negative: str, styles: list[Style], want: tuple[str, str]) -> None:
    assert apply_styles(prompt, negative, styles) == want


# --------------------------------------------------------------------------------------
# Recognising


ALL = [CINEMATIC, SHARP, NEG_ONLY, EMPTY, Style("Twice", "{prompt} and {prompt}", "no {prompt}")]


@pytest.mark.parametrize(
    "chosen",
    [
        [],
        [SHARP],
        [CINEMATIC],
        [NEG_ONLY],
        [SHARP, CINEMATIC],
        [CINEMATIC, SHARP],
        [CINEMATIC, NEG_ONLY, SHARP],
        [ALL[4]],
        [SHARP, ALL[4]],
    ],
)
@pytest.mark.parametrize(("prompt", "negative"), [("a cat, (detailed:1.2)", "ugly"), ("a cat", ""), ("日本, 🌸", "")])
def test_apply_then_extract_round_trip(chosen: list[Style], prompt: str, negative: str) -> None:
    styled = apply_styles(prompt, negative, chosen)
    got_prompt, got_negative, names = extract_styles(*styled, ALL)
    assert (got_prompt, got_negative) == (prompt, negative)
    assert sorted(names) == sorted(s.name for s in chosen)
    # styles that commute may come back in another order, but always in one that gives the
    # same text again
    by_name = {s.name: s for s in ALL}
    assert apply_styles(got_prompt, got_negative, [by_name[n] for n in names]) == styled


def test_extract_keeps_the_order_of_styles_that_do_not_commute() -> None:
    for chosen in ([SHARP, CINEMATIC], [CINEMATIC, SHARP], [SHARP, NEG_ONLY], [NEG_ONLY, SHARP]):
        styled = apply_styles("a cat", "ugly", chosen)
        assert extract_styles(*styled, ALL) == ("a cat", "ugly", [s.name for s in chosen])


def test_extract_needs_both_parts_to_match() -> None:
    # the prompt part of SHARP is there but the negative part is not
    assert extract_styles("a cat, sharp focus, 8k", "ugly", [SHARP]) == ("a cat, sharp focus, 8k", "ugly", [])
    assert extract_styles("a cat", "ugly, blurry", [SHARP]) == ("a cat", "ugly, blurry", [])


def test_extract_only_whole_comma_separated_parts() -> None:
    s = Style("focus", "focus", "")
    assert extract_styles("a cat, sharp focus", "", [s]) == ("a cat, sharp focus", "", [])
    assert extract_styles("a cat, focus", "", [s]) == ("a cat", "", ["focus"])
    assert extract_styles("focus", "", [s]) == ("", "", ["focus"])


def test_extract_ignores_styles_not_offered_and_empty_styles() -> None:
    styled = apply_styles("a cat", "ugly", [SHARP])
    assert extract_styles(*styled, [CINEMATIC, NEG_ONLY, EMPTY]) == (*styled, [])
    assert extract_styles("a cat", "ugly", [EMPTY, Style("noop", "{prompt}", "{prompt}")]) == ("a cat", "ugly", [])


def test_extract_prefers_the_style_that_explains_more() -> None:
    short = Style("short", "x", "")
    long = Style("long", "y, x", "")
    styled = apply_styles("a cat", "", [long])
    assert styled == ("a cat, y, x", "")
    assert extract_styles(*styled, [short, long]) == ("a cat", "", ["long"])
    both = apply_styles("a cat", "", [short, long])
    assert extract_styles(*both, [short, long]) == ("a cat", "", ["short", "long"])


def test_extract_tolerates_whitespace_from_infotext() -> None:
    prompt, negative = apply_styles("a cat", "ugly", [CINEMATIC])
    assert extract_styles(f"  {prompt}\n", f" {negative} ", [CINEMATIC]) == ("a cat", "ugly", ["Cinematic"])


def test_extract_with_regex_characters_in_styles() -> None:
    weird = Style("re", "(a|b)* [x:y:0.5] {prompt} $1 \\d+", "^.*?")
    styled = apply_styles("cat", "dog", [weird])
    assert styled == ("(a|b)* [x:y:0.5] cat $1 \\d+", "dog, ^.*?")
    assert extract_styles(*styled, [weird]) == ("cat", "dog", ["re"])


def test_styles_from_a_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_text(A1111_FILE, encoding="utf-8", newline="")
    styles = StyleStore(path).list()
    chosen = [styles[1], styles[0], styles[2]]
    styled = apply_styles("portrait of a woman", "", chosen)
    assert extract_styles(*styled, styles) == ("portrait of a woman", "", [s.name for s in chosen])
