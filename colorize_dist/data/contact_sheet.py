"""The contact sheet `shards make` writes beside the manifest: what it skipped as grayscale and what it kept for
review, as thumbnails captioned with their residual chroma and verdict, so that a person can check both by eye."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from colorize_dist.files import atomic_write

THUMBNAIL = 96  # longer side of a thumbnail, pixels
COLUMNS = 10
MAX_PER_SECTION = 200  # thumbnails drawn per section; the manifest lists every file
CAPTION_LINES = 2
LINE_HEIGHT = 12
PADDING = 6
TITLE_HEIGHT = 22
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def write(path: Path, sections: Sequence[tuple[str, str, Sequence[tuple[str, float, bytes]], int]]) -> None:
    """Write the sheet to `path` (atomically). Each section is (title, verdict, items, total): one tile per item
    (file, residual chroma, thumbnail PNG bytes), lowest score first, captioned with its score, the verdict and
    the file name; `total` is how many files the section holds in all (some may not be drawn)."""
    tile_width, tile_height = THUMBNAIL + PADDING, THUMBNAIL + CAPTION_LINES * LINE_HEIGHT + PADDING
    heights = [TITLE_HEIGHT + -(-len(items) // COLUMNS) * tile_height for _, _, items, _ in sections]
    sheet = Image.new("RGB", (COLUMNS * tile_width + PADDING, sum(heights) + PADDING), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    top = PADDING
    for (title, verdict, items, total), height in zip(sections, heights, strict=True):
        shown = f" (the first {len(items)} of {total}; the manifest lists every one)" if total > len(items) else ""
        draw.text((PADDING, top + 4), f"{title}: {total}{shown}", fill=INK)
        for index, (name, chroma, png) in enumerate(sorted(items, key=lambda item: item[1])):
            left = PADDING + index % COLUMNS * tile_width
            tile_top = top + TITLE_HEIGHT + index // COLUMNS * tile_height
            with Image.open(io.BytesIO(png)) as image:
                sheet.paste(image.convert("RGB"), (left, tile_top))
            draw.text((left, tile_top + THUMBNAIL + 1), f"{chroma:.1f} {verdict}", fill=INK)
            draw.text((left, tile_top + THUMBNAIL + 1 + LINE_HEIGHT), _fit(Path(name).name, draw), fill=INK)
        top += height
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())


def _fit(text: str, draw: ImageDraw.ImageDraw) -> str:
    """`text` cut (with "...") to the width of a thumbnail."""
    if draw.textlength(text) <= THUMBNAIL:
        return text
    while text and draw.textlength(text + "...") > THUMBNAIL:
        text = text[:-1]
    return text + "..."
