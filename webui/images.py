"""Saving images: folder layout, file names that never overwrite, metadata, atomic writes.

Metadata goes where A1111 puts it, so other tools (A1111's PNG Info, civitai, exiftool) read it:

- PNG: a `parameters` text chunk.
- JPEG, WebP: EXIF UserComment (tag 0x9286 in the Exif IFD), type UNDEFINED, the 8-byte prefix
  `UNICODE\\0` then the text in UTF-16 big-endian, in a big-endian ("MM") TIFF structure. That
  is what piexif (`UserComment.dump(text, encoding="unicode")`), and so A1111, writes (same
  layout; we also end the Exif IFD with the next-IFD pointer TIFF asks for). piexif reads
  UTF-16 as big-endian only and exiftool follows the TIFF byte order, so both read it.
  Pillow's `Image.Exif` would store the tag as BYTE (piexif then hands A1111 a tuple it cannot
  decode), so the Exif IFD is built with an explicit tag type.

File names are `NNNNN-<pattern>.<ext>`; the pattern's tokens (`[seed]`, `[prompt_words]`, ...,
see `FILENAME_TOKENS`) are filled in and the result is made safe on every OS (`filename_stem`), so
no prompt can name a file outside the folder. The default pattern `[seed]` gives `NNNNN-SEED.ext`.

Reading accepts more than it writes: UTF-16 in either byte order (a BOM, else whichever order
puts the zero bytes of ASCII characters in the high byte), the `ASCII\\0\\0\\0` and `JIS` prefixes,
and no prefix at all when the rest is valid UTF-8.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import re
import struct
import tempfile
import threading
import unicodedata
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin, TiffImagePlugin, TiffTags, UnidentifiedImageError

log = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^(\d{5,})-")
# Names are claimed one at a time within this process, so concurrent saves also get distinct
# numbers (not only distinct names) whatever their seed or format; across processes the hard
# link still guarantees that nothing is overwritten.
_NAMING = threading.Lock()

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\0"
_ASCII_PREFIX = b"ASCII\0\0\0"
_JIS_PREFIX = b"JIS\0\0\0\0\0"
_UNDEFINED_PREFIX = b"\0" * 8
_JPEG_MAX_EXIF = 65533  # an APP1 segment holds 65535 bytes, 2 of them its length

# format name as passed to `save_image` -> (Pillow format, file extension)
FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg"), "jpg": ("JPEG", "jpg"), "webp": ("WEBP", "webp")}


# file-name pattern tokens; each value comes from `values` given to `save_image` (the seed from `seed`)
FILENAME_TOKENS = ("seed", "steps", "cfg", "sampler", "width", "height", "model_name", "model_hash",
                   "prompt_words", "date", "datetime", "job_timestamp")
_TOKEN = re.compile(r"\[([A-Za-z_]+)\]")
_PROMPT_WORDS = 8
_STEM_MAX_CHARS = 120
_STEM_MAX_BYTES = 180  # file systems allow 255 bytes per name; leave room for NNNNN- and the extension
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"/\\|?*]')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                     *(f"COM{i}" for i in "123456789¹²³"), *(f"LPT{i}" for i in "123456789¹²³")}


def _prompt_words(prompt: str) -> str:
    """The first words of a prompt, without extra-network tags and prompt syntax."""
    text = re.sub(r"<[^>]*>", " ", prompt)
    text = re.sub(r":\s*-?[\d.]+\s*(?=[)\]]|$)", " ", text)  # attention weights and edit steps
    words = [w for w in re.split(r"[\s,()\[\]{}:|]+", text) if w and w not in ("AND", "BREAK")]
    return " ".join(words[:_PROMPT_WORDS])


def _token_text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:f}".rstrip("0").rstrip(".") if value == value else "nan"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y%m%d%H%M%S")
    return str(value)


def sanitize_filename_part(text: str, fallback: str = "") -> str:
    """`text` made safe as (part of) a file name on Linux, macOS and Windows: no path separators,
    control or reserved characters, no `..`, no leading dot, no trailing dot or space, no reserved device name,
    at most 120 characters (180 UTF-8 bytes). `fallback` when nothing is left."""
    chars = []
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs", "Zl", "Zp") or ch.isspace():
            chars.append(" ")
        elif category in ("Cf", "Co", "Cn") and ch != "\u200d":  # invisible/unassigned; keep emoji joiners
            continue
        else:
            chars.append(ch)
    name = _WINDOWS_FORBIDDEN.sub("_", "".join(chars))
    name = re.sub(r" {2,}", " ", name)
    name = re.sub(r"\.{2,}", ".", name)
    name = name.strip(" ")
    name = name[:_STEM_MAX_CHARS]
    while len(name.encode("utf-8")) > _STEM_MAX_BYTES:
        name = name[:-1]
    name = name.strip(". ")  # no hidden file, no trailing dot or space (Windows drops them)
    if name.split(".")[0].upper().rstrip(" ") in _WINDOWS_RESERVED:
        name = "_" + name
    return name or fallback


def filename_stem(pattern: str, seed: int, values: Mapping[str, object] | None = None,
                  now: dt.datetime | None = None) -> str:
    """The part of a file name after `NNNNN-`: `pattern` with its tokens filled in, made safe.

    Tokens (case-insensitive): `[seed]` (from `seed`), `[steps]`, `[cfg]`, `[sampler]`, `[width]`,
    `[height]`, `[model_name]`, `[model_hash]` (from `values`), `[prompt_words]` (the first 8 words
    of `values["prompt_words"]`, else of `values["prompt"]`), `[date]` (YYYY-MM-DD), `[datetime]`
    (YYYYMMDDHHMMSS), `[job_timestamp]` (from `values`, else as `[datetime]`). A known token with
    no value is dropped; an unknown one is kept as typed."""
    values = dict(values or {})
    now = now or dt.datetime.now()
    if "prompt_words" not in values and "prompt" in values:
        values["prompt_words"] = values["prompt"]
    if "prompt_words" in values:
        values["prompt_words"] = _prompt_words(str(values["prompt_words"]))
    values["seed"] = seed
    values.setdefault("date", now.date().isoformat())
    values.setdefault("datetime", now.strftime("%Y%m%d%H%M%S"))
    values.setdefault("job_timestamp", values["datetime"])

    def fill(match: re.Match[str]) -> str:
        token = match.group(1).lower()
        if token not in FILENAME_TOKENS:
            return match.group(0)
        value = values.get(token)
        return "" if value is None else _token_text(value)

    return sanitize_filename_part(_TOKEN.sub(fill, pattern), fallback=str(seed))


def next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.glob("*") if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


# --- EXIF UserComment ----------------------------------------------------------------------------


def exif_with_user_comment(text: str) -> bytes:
    """A complete EXIF block (`Exif\\0\\0` + big-endian TIFF) holding only UserComment = `text`,
    laid out as piexif lays it out."""
    head = b"MM\x00\x2a" + struct.pack(">L", 8)
    exif_ifd_offset = 8 + 2 + 12 + 4  # IFD0: count, one entry, next-IFD pointer
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHLL", EXIF_IFD, TiffTags.LONG, 1, exif_ifd_offset) + struct.pack(">L", 0)
    exif_ifd = TiffImagePlugin.ImageFileDirectory_v2(ifh=head)
    exif_ifd.tagtype[USER_COMMENT] = TiffTags.UNDEFINED
    exif_ifd[USER_COMMENT] = _UNICODE_PREFIX + text.encode("utf-16-be")
    return b"Exif\x00\x00" + head + ifd0 + exif_ifd.tobytes(exif_ifd_offset)


def _decode_utf16(body: bytes) -> str | None:
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        orders = ["utf-16-be" if body[:2] == b"\xfe\xff" else "utf-16-le"]
        body = body[2:]
    else:
        # ASCII characters have a zero high byte: at even offsets in big-endian, odd in little
        zeros_even, zeros_odd = body[0::2].count(0), body[1::2].count(0)
        orders = ["utf-16-le", "utf-16-be"] if zeros_odd > zeros_even else ["utf-16-be", "utf-16-le"]
    if len(body) % 2:
        body = body[:-1]
    for encoding in orders:
        try:
            return body.decode(encoding)
        except UnicodeDecodeError:
            continue
    return body.decode(orders[0], errors="replace")


def decode_user_comment(data: bytes | str | tuple | None) -> str | None:
    """The text of an EXIF UserComment value as Pillow returns it, or None."""
    if isinstance(data, tuple) and all(isinstance(b, int) and 0 <= b < 256 for b in data):
        data = bytes(data)
    if isinstance(data, str):
        text = data
        for prefix in ("UNICODE\0", "ASCII\0\0\0", "\0" * 8):
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
    elif isinstance(data, bytes):
        prefix, body = data[:8], data[8:]
        if prefix == _UNICODE_PREFIX:
            text = _decode_utf16(body)
        elif prefix in (_ASCII_PREFIX, _UNDEFINED_PREFIX):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = body.decode("latin-1")
        elif prefix == _JIS_PREFIX:
            text = body.decode("shift_jis", errors="replace")
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                return None
    else:
        return None
    text = (text or "").rstrip("\0")
    return text or None


def _exif_user_comment(image: Image.Image) -> bytes | str | tuple | None:
    exif = image.getexif()
    value = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    return exif.get(USER_COMMENT) if value is None else value  # some writers put it in IFD0


def read_infotext(image: Image.Image) -> str | None:
    """The infotext of an opened image: the PNG `parameters` chunk, else the EXIF UserComment
    (JPEG, WebP, PNG eXIf). None when there is none or it cannot be read; never raises."""
    try:
        parameters = image.info.get("parameters")
        if isinstance(parameters, str):
            return str(parameters)
        if isinstance(parameters, bytes):
            return parameters.decode("utf-8", errors="replace")
        return decode_user_comment(_exif_user_comment(image))
    except Exception:  # noqa: BLE001 - metadata from any file on disk: bad data is "no infotext"
        log.debug("could not read EXIF from %r", getattr(image, "filename", image), exc_info=True)
        return None


# --- saving --------------------------------------------------------------------------------------


def image_file_bytes(image: Image.Image, fmt: str, infotext: str, quality: int = 95) -> bytes:
    """The image as file bytes in `fmt` (png, jpeg, webp), the infotext as its metadata."""
    pil_format = FORMATS[fmt][0]
    buf = io.BytesIO()
    if pil_format == "PNG":
        meta = PngImagePlugin.PngInfo()
        if infotext:
            meta.add_text("parameters", infotext)
        image.save(buf, format="PNG", pnginfo=meta)
        return buf.getvalue()
    exif = exif_with_user_comment(infotext) if infotext else b""
    if pil_format == "JPEG":
        if image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")
        if len(exif) > _JPEG_MAX_EXIF:
            log.warning("infotext of %d characters is too long for JPEG EXIF; saved without it", len(infotext))
            exif = b""
        image.save(buf, format="JPEG", quality=quality, exif=exif)
    else:
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
        image.save(buf, format="WEBP", quality=quality, exif=exif)
    return buf.getvalue()


def save_image(image: Image.Image, folder: Path, seed: int, infotext: str, fmt: str = "png", quality: int = 95,
               pattern: str = "[seed]", values: Mapping[str, object] | None = None) -> Path:
    """Save as `NNNNN-<pattern>.<png|jpg|webp>` with the infotext as metadata (see the module doc);
    the default pattern gives `NNNNN-SEED.ext`, `values` fill the other tokens (`filename_stem`).

    The bytes go to a temporary file that is then hard-linked under its final name; linking
    fails if the name exists, so concurrent saves never overwrite each other, and a reader
    never sees a half-written image. Numbers are shared by all formats and seeds: the next
    one is one past the highest `NNNNN-` in the folder. `quality` applies to JPEG and WebP.
    """
    key = fmt.lower().lstrip(".")
    if key not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r} (available: png, jpeg, webp)")
    ext = FORMATS[key][1]
    stem = filename_stem(pattern, seed, values)
    data = image_file_bytes(image, key, infotext, quality)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=f".{ext}")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with _NAMING:
            number = next_number(folder)
            while True:
                target = folder / f"{number:05d}-{stem}.{ext}"
                try:
                    _publish(tmp, target)
                    return target
                except FileExistsError:
                    number += 1
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, target: Path) -> None:
    """Give `tmp` the name `target`; FileExistsError when that name is taken."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:
        # no hard links here (FAT, some network shares): claim the name exclusively, then
        # replace the empty placeholder atomically
        with open(target, "xb"):
            pass
        os.replace(tmp, target)


def png_bytes(image: Image.Image, infotext: str | None = None) -> bytes:
    """The image as PNG bytes, with the infotext in its `parameters` chunk when given."""
    if infotext:
        return image_file_bytes(image, "png", infotext, 0)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def list_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, by name (case-insensitive)."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: p.name.lower())


def pixel_limit() -> int:
    """The most pixels an image from outside may have: PIL's own limit, which the Settings
    (`max_input_megapixels`) set for the whole process, so Gradio's decoding of uploads obeys it too."""
    return int(Image.MAX_IMAGE_PIXELS or 0)


def check_pixels(image: Image.Image, what: str = "image") -> Image.Image:
    """`image`, or ValueError when it is over the pixel limit."""
    w, h = image.size
    limit = pixel_limit()
    if limit and w * h > limit:
        raise ValueError(f"{what}: {w}x{h} is {w * h / 1e6:.0f} megapixels, over this server's limit of "
                         f"{limit / 1e6:.0f} (setting max_input_megapixels)")
    return image


def open_untrusted(source: bytes | Path | str, what: str = "image") -> Image.Image:
    """Every image from outside (an upload, an API body, a file of a folder batch) is decoded here:
    the size is checked from the header before any pixel is decoded (a decompression bomb is a few
    KB that claims 20000x20000), then the whole file is read. ValueError with the reason for a
    bomb, a truncated or damaged file, or something that is not an image."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        check_pixels(image, what)
        image.load()
        return image
    except Image.DecompressionBombError:
        raise ValueError(f"{what}: over this server's limit of {pixel_limit() / 1e6:.0f} megapixels "
                         "(setting max_input_megapixels)") from None
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file") from None
    except UnidentifiedImageError:
        raise ValueError(f"{what}: not an image this server reads (PNG, JPEG, WebP, BMP, TIFF, GIF)") from None
    except (OSError, SyntaxError, EOFError, struct.error) as e:
        raise ValueError(f"{what}: a damaged or truncated image ({e})") from None


def open_image(path: Path) -> tuple[Image.Image, str | None] | None:
    """(image fully read, its infotext), or None with a warning when the file is not a readable image."""
    try:
        opened = open_untrusted(Path(path), what=Path(path).name)
        return opened, read_infotext(opened)
    except ValueError as e:
        log.warning("skipped %s", e)
        return None
