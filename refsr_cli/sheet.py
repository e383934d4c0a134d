"""Contact sheets: many upscalings of one image side by side, cropped at the same place at 100 %, each labelled, so
that a person can pick a sample or a reference by eye and re-run just that one (`sample --sheet`, `upscale --sheet`,
and the model card's comparisons)."""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .report import one_line

LABEL_HEIGHT = 18
GAP = 4
MAX_LABEL_WIDTH = 128  # a cell is widened for its label up to this (the tiles of a tiny image left no room at all)


def busiest_window(image: np.ndarray, size: int) -> tuple:
    """(top, left) of the size x size window with the most edge energy: where samples differ is where detail is.
    `image` HxWxC; a window larger than the image is the whole image."""
    grey = image[..., :3].astype(np.float32).mean(axis=2) if image.ndim == 3 else image.astype(np.float32)
    h, w = grey.shape
    if h <= size and w <= size:
        return 0, 0
    energy = np.zeros_like(grey)
    energy[:, 1:] += np.abs(np.diff(grey, axis=1))
    energy[1:, :] += np.abs(np.diff(grey, axis=0))
    sat = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table: every window in O(1)
    sh, sw = min(size, h), min(size, w)
    sums = sat[sh:, sw:] - sat[:-sh, sw:] - sat[sh:, :-sw] + sat[:-sh, :-sw]
    top, left = np.unravel_index(np.argmax(sums), sums.shape)
    return int(top), int(left)


def sheet_window(lr: np.ndarray, scale: int, crop: int = 256) -> tuple:
    """The output-pixel slices (rows, columns) of the `crop`-pixel window shown for an LR image: its busiest
    region, chosen on the LR before anything is decoded, so that only the crops need to be kept."""
    top, left = busiest_window(lr, max(1, crop // scale))
    h, w = min(crop, lr.shape[0] * scale - top * scale), min(crop, lr.shape[1] * scale - left * scale)
    return slice(top * scale, top * scale + h), slice(left * scale, left * scale + w)


def contact_sheet(tiles, labels, columns: int = 4) -> Image.Image:
    """One RGB image of `tiles` (HxWxC uint8 or uint16, all the same size), `columns` to a row, each with its label
    underneath. Alpha is dropped; 16-bit tiles are shown at 8 bits."""
    labels = [one_line(label) for label in labels]  # (a newline in a reference's name: PIL cannot measure it)
    h, tile_width = tiles[0].shape[:2]
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    font = ImageFont.load_default()
    widest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label, font=font) for label in labels)
    w = tile_width  # a cell: its tile, and room for its label
    if widest > tile_width:
        w = max(tile_width, min(math.ceil(widest) + 4, MAX_LABEL_WIDTH))
    sheet = Image.new("RGB", (columns * (w + GAP) + GAP, rows * (h + LABEL_HEIGHT + GAP) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        if tile.dtype == np.uint16:
            tile = (tile // 257).astype(np.uint8)
        tile = np.repeat(tile[..., :1], 3, axis=2) if tile.shape[2] <= 2 else tile[..., :3]
        x, y = GAP + (i % columns) * (w + GAP), GAP + (i // columns) * (h + LABEL_HEIGHT + GAP)
        sheet.paste(Image.fromarray(np.ascontiguousarray(tile)), (x, y))
        draw.text((x + 2, y + h + 3), fitted(draw, font, label, w), fill="black", font=font)
    return sheet


def fitted(draw, font, label: str, width: int) -> str:
    """`label` as it fits `width` pixels: whole, or cut in its middle, where two long names of references (or two
    long seeds) most likely agree: "--ref holiday_phot…beach_002.png"."""
    if draw.textlength(label, font=font) <= width:
        return label
    for keep in range(len(label) - 1, 0, -1):
        text = label[:(keep + 1) // 2] + "…" + label[len(label) - keep // 2:]
        if draw.textlength(text, font=font) <= width - 2:  # drawn 2 pixels in
            return text
    return "…"
