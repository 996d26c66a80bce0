"""Image grids: cells in rows and columns, and labels drawn above the columns and left of the
rows (long labels wrapped to the cell width), as the X/Y/Z plot and the prompt matrix draw them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from webui.outputs import OutputWriter
    from webui.pipeline.request import GenerationRequest
    from webui.pipeline.state import GenerationResult
    from webui.settings import Settings

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
MAX_LINES = 6  # a longer label is cut with an ellipsis


def image_grid(images: Sequence[Image.Image], rows: int | None = None, margin: int = 0) -> Image.Image:
    """`images` left to right, top to bottom, in `rows` rows (default: as square as it gets);
    every cell the size of the first image, `margin` pixels between cells."""
    if not images:
        raise ValueError("a grid needs at least one image")
    n = len(images)
    rows = rows if rows and rows > 0 else max(1, round(math.sqrt(n)))
    rows = min(rows, n)
    cols = math.ceil(n / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * margin, rows * h + (rows - 1) * margin), BACKGROUND)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        cell = image.convert("RGB")
        if cell.size != (w, h):
            cell = cell.resize((w, h), Image.Resampling.LANCZOS)
        grid.paste(cell, (c * (w + margin), r * (h + margin)))
    return grid


def _font(cell_w: int, cell_h: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(10, min(48, (cell_w + cell_h) // 2 // 12))
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
          width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (a word longer than that is broken)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = max(1, next((i for i in range(len(word), 0, -1)
                                   if draw.textlength(word[:i], font=font) <= width), 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if len(lines) > MAX_LINES:
        lines = [*lines[: MAX_LINES - 1], lines[MAX_LINES - 1] + " …"]
    return lines


def annotate(grid: Image.Image, cell_w: int, cell_h: int, columns: Sequence[str], rows: Sequence[str],
             margin: int = 0) -> Image.Image:
    """`grid` (cells of cell_w x cell_h, `margin` apart) with `columns` labels above it and `rows`
    labels to its left; an empty list draws no band on that side."""
    font = _font(cell_w, cell_h)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.size * 1.25) if hasattr(font, "size") else 14
    pad = line_h // 2
    col_lines = [_wrap(scratch, text, font, cell_w - 2 * pad) for text in columns]
    row_w = 0 if not any(rows) else min(max(cell_w, 256), int(cell_w * 1.5))
    row_lines = [_wrap(scratch, text, font, row_w - 2 * pad) for text in rows] if row_w else []
    top = (max(len(lines) for lines in col_lines) * line_h + 2 * pad) if any(columns) else 0
    out = Image.new("RGB", (grid.width + row_w, grid.height + top), BACKGROUND)
    out.paste(grid, (row_w, top))
    draw = ImageDraw.Draw(out)
    for c, lines in enumerate(col_lines):
        cx = row_w + c * (cell_w + margin) + cell_w // 2
        y = top // 2 - len(lines) * line_h // 2
        for i, line in enumerate(lines):
            draw.text((cx, y + i * line_h + line_h // 2), line, font=font, fill=INK, anchor="mm")
    for r, lines in enumerate(row_lines):
        cy = top + r * (cell_h + margin) + cell_h // 2 - len(lines) * line_h // 2
        for i, line in enumerate(lines):
            draw.text((row_w // 2, cy + i * line_h + line_h // 2), line, font=font, fill=INK, anchor="mm")
    return out


def add_batch_grid(request: GenerationRequest, result: GenerationResult, settings: Settings,
                   writer: OutputWriter) -> GenerationResult:
    """Several images of one request (a GenerationResult): their grid, saved to `<kind>-grids`
    (grid_save, when images are saved) and put first among the results (return_grid), laid out
    by n_rows (-1 square, 0 a row per batch), as A1111 does."""
    s = settings
    if len(result.images) < 2 or not (s.return_grid or (s.grid_save and request.save_images)):
        return result
    rows = s.n_rows if s.n_rows > 0 else (request.batch_size if s.n_rows == 0 else None)
    grid = image_grid(result.images, rows=rows)
    kind = "img2img" if request.is_img2img else "txt2img"
    if s.grid_save and request.save_images:
        result.paths.insert(0, writer.save(grid, f"{kind}-grids", result.infotexts[0], seed=result.seeds[0]))
    if s.return_grid:
        result.images.insert(0, grid)
        result.seeds.insert(0, result.seeds[0])
        result.subseeds.insert(0, result.subseeds[0])
        result.infotexts.insert(0, result.infotexts[0])
        result.grids += 1
    return result
