"""Saving images: PNG/JPEG/WebP metadata as A1111 writes it, reading it back from any of them,
file names that never overwrite (and patterns no prompt can escape), atomic writes."""

from __future__ import annotations

import datetime as dt
import io
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from webui import images
from webui.images import (
    decode_user_comment,
    exif_with_user_comment,
    filename_stem,
    read_infotext,
    sanitize_filename_part,
    save_image,
)

INFOTEXT = (
    'a "red" cube, (glossy:1.2)\non a table — 日本語 🎨\n'
    "Negative prompt: blurry\nlow quality\n"
    'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 64x64, Lora hashes: "a: 0123456789ab, b: ba9876543210", Version: v0.1.0'
)

# What piexif (and so A1111) writes for UserComment "cat, 日本\nSteps: 1"
PIEXIF_EXIF = bytes.fromhex(
    "4578696600004d4d002a00000008000187690004000000010000001a000000000001928600070000002800000028"
    "554e49434f444500006300610074002c002065e5672c000a00530074006500700073003a00200031"
)


def picture(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8), mode)


def reopen(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im


def user_comment_entry(exif: bytes) -> tuple[str, int, bytes]:
    """(byte order, tag type, value) of UserComment, walking the TIFF structure by hand."""
    assert exif[:6] == b"Exif\x00\x00"
    tiff = exif[6:]
    order = tiff[:2].decode()
    e = ">" if order == "MM" else "<"

    def entries(offset: int):
        (count,) = struct.unpack(e + "H", tiff[offset : offset + 2])
        for i in range(count):
            tag, typ, n, value = struct.unpack(e + "HHLL", tiff[offset + 2 + 12 * i : offset + 14 + 12 * i])
            yield tag, typ, n, value

    (ifd0,) = struct.unpack(e + "L", tiff[4:8])
    exif_ifd = next(value for tag, _, _, value in entries(ifd0) if tag == 0x8769)
    tag, typ, n, offset = next(x for x in entries(exif_ifd) if x[0] == 0x9286)
    return order, typ, tiff[offset : offset + n]


# --- write, read back ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, ext", [("png", "png"), ("jpeg", "jpg"), ("jpg", "jpg"), ("webp", "webp"), ("JPEG", "jpg")])
def test_infotext_survives_each_format(tmp_path: Path, fmt: str, ext: str) -> None:
    path = save_image(picture(), tmp_path, 1234, INFOTEXT, fmt)
    assert path.name == f"00000-1234.{ext}"
    im = reopen(path)
    assert im.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext]
    assert read_infotext(im) == INFOTEXT


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_exif_is_written_as_a1111_writes_it(tmp_path: Path, fmt: str) -> None:
    im = reopen(save_image(picture(), tmp_path, 1, INFOTEXT, fmt))
    order, typ, value = user_comment_entry(im.info["exif"] if im.info["exif"].startswith(b"Exif") else b"Exif\0\0" + im.info["exif"])
    assert order == "MM" and typ == 7  # big-endian TIFF, UNDEFINED
    assert value == b"UNICODE\0" + INFOTEXT.encode("utf-16-be")


def test_exif_block_matches_piexif_layout() -> None:
    ours = exif_with_user_comment("cat, 日本\nSteps: 1")
    assert user_comment_entry(ours) == user_comment_entry(PIEXIF_EXIF)
    # byte for byte through the UserComment entry's tag, type and count; the value's offset is
    # 4 later in ours, after the Exif IFD's next-IFD pointer that piexif leaves out
    assert ours[: 6 + 26 + 2 + 8] == PIEXIF_EXIF[: 6 + 26 + 2 + 8]


def test_reads_a1111_jpeg_and_webp(tmp_path: Path) -> None:
    for fmt in ("JPEG", "WEBP"):
        buf = io.BytesIO()
        picture().save(buf, format=fmt, exif=PIEXIF_EXIF)
        assert read_infotext(Image.open(io.BytesIO(buf.getvalue()))) == "cat, 日本\nSteps: 1"


def test_reads_little_endian_and_ascii_user_comments() -> None:
    text = "a cat\nSteps: 20, Seed: 1, CFG scale: 7"
    for raw in (
        b"UNICODE\0" + text.encode("utf-16-le"),
        b"UNICODE\0" + text.encode("utf-16-be"),
        b"UNICODE\0" + text.encode("utf-16"),  # with a BOM
        b"UNICODE\0" + "\ufeff".encode("utf-16-be") + text.encode("utf-16-be"),
        b"UNICODE\0" + text.encode("utf-16-le") + b"\0\0",  # NUL-terminated
        b"ASCII\0\0\0" + text.encode("ascii"),
        b"\0" * 8 + text.encode("utf-8"),
        text.encode("utf-8"),  # no prefix at all
        tuple(b"ASCII\0\0\0" + text.encode("ascii")),
        "ASCII\0\0\0" + text,
    ):
        assert decode_user_comment(raw) == text, raw[:12]
    assert decode_user_comment(b"UNICODE\0" + "日本語、猫".encode("utf-16-be")) == "日本語、猫"
    assert decode_user_comment(b"JIS\0\0\0\0\0" + "猫".encode("shift_jis")) == "猫"


def test_reads_little_endian_exif_from_a_jpeg() -> None:
    exif = Image.Exif()  # Pillow writes "II" (little-endian) when asked
    exif.endian = "<"
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + INFOTEXT.encode("utf-16-le")
    buf = io.BytesIO()
    picture().save(buf, format="JPEG", exif=exif)
    im = Image.open(io.BytesIO(buf.getvalue()))
    assert user_comment_entry(im.info["exif"])[0] == "II"
    assert read_infotext(im) == INFOTEXT


@pytest.mark.parametrize("raw", [None, b"", b"UNICODE\0", b"\0" * 8, b"\xff\xfe\xfa garbage \x80\x81", 12345])
def test_unreadable_user_comments_are_none(raw: object) -> None:
    assert decode_user_comment(raw) is None  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00" + bytes(range(256)) * 3,  # not TIFF at all
        b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0" + b"\x00" * 40,  # IFD offset past the end
        exif_with_user_comment(INFOTEXT)[:40],  # cut short
        b"Exif\x00\x00II\x2a\x00\x08\x00\x00\x00\xff\xff" + b"\x01" * 30,  # absurd entry count
    ],
)
def test_garbage_exif_reads_as_none(tmp_path: Path, fmt: str, exif: bytes) -> None:
    path = tmp_path / f"bad.{fmt.lower()}"
    picture().save(path, format=fmt, exif=exif)
    with Image.open(path) as im:
        assert read_infotext(im) is None


def test_no_metadata_reads_as_none(tmp_path: Path) -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        picture().save(buf, format=fmt)
        assert read_infotext(Image.open(io.BytesIO(buf.getvalue()))) is None


def test_image_modes(tmp_path: Path) -> None:
    rgba = picture("RGBA")
    jpg = reopen(save_image(rgba, tmp_path, 1, INFOTEXT, "jpeg"))
    assert jpg.mode == "RGB" and read_infotext(jpg) == INFOTEXT
    webp = reopen(save_image(rgba, tmp_path, 1, INFOTEXT, "webp", quality=100))
    assert webp.mode == "RGBA"
    png = reopen(save_image(rgba, tmp_path, 1, INFOTEXT))
    assert png.mode == "RGBA" and np.array_equal(np.asarray(png), np.asarray(rgba))
    for mode in ("L", "P", "LA"):
        for fmt in ("jpeg", "webp"):
            assert read_infotext(reopen(save_image(rgba.convert(mode), tmp_path, 2, INFOTEXT, fmt))) == INFOTEXT


def test_quality_is_used(tmp_path: Path) -> None:
    big = picture(size=(256, 256))
    low = save_image(big, tmp_path, 1, "x", "jpeg", quality=20).stat().st_size
    high = save_image(big, tmp_path, 1, "x", "jpeg", quality=95).stat().st_size
    assert low < high


def test_too_long_for_jpeg_exif_still_saves(tmp_path: Path) -> None:
    long_text = "word, " * 6000  # > 65533 bytes as UTF-16
    jpg = reopen(save_image(picture(), tmp_path, 1, long_text, "jpeg"))
    assert read_infotext(jpg) is None
    webp = reopen(save_image(picture(), tmp_path, 1, long_text, "webp"))
    assert read_infotext(webp) == long_text.rstrip("\0")


def test_unknown_format_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gif"):
        save_image(picture(), tmp_path / "out", 1, "x", "gif")
    assert not (tmp_path / "out").exists()


# --- naming and atomicity ----------------------------------------------------------------------------


def test_numbers_continue_across_formats_and_never_overwrite(tmp_path: Path) -> None:
    (tmp_path / "00007-5.png").write_bytes(b"someone else's file")
    (tmp_path / "notes.txt").write_text("ignored")
    names = [save_image(picture(), tmp_path, 5, "x", fmt).name for fmt in ("png", "jpeg", "webp")]
    assert names == ["00008-5.png", "00009-5.jpg", "00010-5.webp"]
    assert (tmp_path / "00007-5.png").read_bytes() == b"someone else's file"


def test_a_taken_name_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer took the name between counting and linking: take the next one."""
    (tmp_path / "00003-9.png").write_bytes(b"taken")
    monkeypatch.setattr(images, "next_number", lambda folder: 3)
    path = save_image(picture(), tmp_path, 9, "x")
    assert path.name == "00004-9.png"
    assert (tmp_path / "00003-9.png").read_bytes() == b"taken"


def test_concurrent_saves_get_distinct_files(tmp_path: Path) -> None:
    barrier = threading.Barrier(8)
    formats = ["png", "jpeg", "webp", "png"] * 2

    def save(i: int) -> Path:
        barrier.wait()
        return save_image(picture(), tmp_path, 40 + i % 3, f"{INFOTEXT}\nthread {i}", formats[i])

    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(save, range(8)))
    assert len({p.name for p in paths}) == 8
    assert sorted(int(p.name[:5]) for p in paths) == list(range(8))
    for i, p in enumerate(paths):
        assert read_infotext(reopen(p)) == f"{INFOTEXT}\nthread {i}"
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)  # no temp files left


def test_works_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(images.os, "link", no_links)
    (tmp_path / "00000-1.png").write_bytes(b"keep")
    monkeypatch.setattr(images, "next_number", lambda folder: 0)
    path = save_image(picture(), tmp_path, 1, INFOTEXT, "webp")
    assert path.name == "00000-1.webp"
    path2 = save_image(picture(), tmp_path, 1, INFOTEXT)
    assert path2.name == "00001-1.png" and (tmp_path / "00000-1.png").read_bytes() == b"keep"
    assert read_infotext(reopen(path)) == INFOTEXT
    assert sorted(os.listdir(tmp_path)) == ["00000-1.png", "00000-1.webp", "00001-1.png"]


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_image(picture(), tmp_path, 1, "x", "jpeg")
    assert list(tmp_path.iterdir()) == []


# --- file-name patterns --------------------------------------------------------------------------------

NOW = dt.datetime(2025, 3, 4, 5, 6, 7)
VALUES = {"steps": 20, "cfg": 7.0, "sampler": "DPM++ 2M", "width": 512, "height": 768,
          "model_name": "v1-5-pruned-emaonly", "model_hash": "6ce0161689", "job_timestamp": "20250304050000",
          "prompt": "(masterpiece:1.2), a <lora:style:0.8> red [cube|ball] on a table, glossy, studio light, 4k"}


def test_default_pattern_gives_number_and_seed(tmp_path: Path) -> None:
    assert filename_stem("[seed]", 1234) == "1234"
    assert save_image(picture(), tmp_path, 1234, "x", pattern="[seed]", values=VALUES).name == "00000-1234.png"


@pytest.mark.parametrize("pattern, expected", [
    ("[seed]-[steps]-[cfg]", "99-20-7"),
    ("[sampler]_[width]x[height]", "DPM++ 2M_512x768"),
    ("[model_name]-[model_hash]", "v1-5-pruned-emaonly-6ce0161689"),
    ("[prompt_words]", "masterpiece a red cube ball on a table"),
    ("[date] [datetime]", "2025-03-04 20250304050607"),
    ("[job_timestamp]", "20250304050000"),
    ("[SEED]", "99"),
    ("[seed]-[unknown]-[x", "99-[unknown]-[x"),
])
def test_pattern_tokens(pattern: str, expected: str) -> None:
    assert filename_stem(pattern, 99, VALUES, now=NOW) == expected


def test_token_values_and_fallbacks() -> None:
    assert filename_stem("[cfg]", 1, {"cfg": 6.5}) == "6.5"
    assert filename_stem("[prompt_words]", 1, {"prompt_words": "one two three four five six seven eight nine"}) \
        == "one two three four five six seven eight"
    assert filename_stem("[job_timestamp]", 1, {}, now=NOW) == "20250304050607"
    assert filename_stem("[model_name]", 7, {}) == "7"  # nothing left: the seed
    assert filename_stem("[seed]-[model_name]", 7, {}) == "7-"


@pytest.mark.parametrize("prompt", [
    "../../etc/passwd", "..\\..\\Windows\\System32", "a/b\\c", "CON", "nul.txt", "LPT1", "com9 ", "x" * 500,
    "line one\nline two\r\nthree\x00four\x1b[31m", "what? <yes> | no * \"quoted\": end.", "...", "  ", "\u2028\ud800",
    "日本語の猫" * 60, "/absolute/path", "trailing dots...",
])
def test_hostile_prompts_stay_inside_the_folder(tmp_path: Path, prompt: str) -> None:
    folder = tmp_path / "out"
    stem = filename_stem("[prompt_words]", 5, {"prompt_words": prompt})
    assert stem and len(stem) <= 120 and len(stem.encode("utf-8")) <= 180
    assert not set(stem) & set('/\\<>:"|?*') and ".." not in stem
    assert all(ord(c) >= 32 and c != "\x7f" for c in stem)
    assert stem == stem.strip(". ")
    assert stem.split(".")[0].strip().upper() not in {"CON", "NUL", "LPT1", "COM9"}
    path = save_image(picture(), folder, 5, "x", pattern="[seed]-[prompt_words]", values={"prompt": prompt})
    assert path.parent == folder and path.resolve().parent == folder.resolve()
    assert path.name.startswith("00000-5-") or path.name == "00000-5-.png"
    assert sorted(os.listdir(folder)) == [path.name]


def test_sanitize_keeps_ordinary_names() -> None:
    assert sanitize_filename_part("a cat, on a mat (v2) [x]") == "a cat, on a mat (v2) [x]"
    assert sanitize_filename_part("🎨 日本語 café") == "🎨 日本語 café"
    assert sanitize_filename_part("", fallback="1") == "1"


def test_numbers_are_shared_across_patterns(tmp_path: Path) -> None:
    a = save_image(picture(), tmp_path, 1, "x", pattern="[seed]")
    b = save_image(picture(), tmp_path, 1, "x", pattern="[seed]-[steps]", values={"steps": 20})
    c = save_image(picture(), tmp_path, 1, "x", pattern="[steps]", values={"steps": 20}, fmt="jpeg")
    assert [a.name, b.name, c.name] == ["00000-1.png", "00001-1-20.png", "00002-20.jpg"]
