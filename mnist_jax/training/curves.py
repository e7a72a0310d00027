"""`curves.png`: a job's loss and accuracy by epoch, train and validation, drawn with Pillow.

A study draws one per trial, so the picture must cost less than the training
it shows: with Pillow's primitives it takes a few milliseconds, where a
matplotlib figure of the same two panels took about 70 ms of CPU (its text
and tick layout), more than a tiny trial's twenty epochs in a lane. The x
axis holds whole epochs only.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

SIZE = (1000, 400)
TRAIN, VALIDATION = (31, 119, 180), (255, 127, 14)  # the two series' colours
INK, GRID = (40, 40, 40), (225, 225, 225)
MARGIN = {"left": 62, "right": 16, "top": 34, "bottom": 46}  # around each panel's plot area
MAX_TICKS = 8


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def epoch_ticks(first: int, last: int) -> list[int]:
    """Whole epochs from `first` to `last`, at most MAX_TICKS of them, at a step of 1, 2 or 5 times a power of 10."""
    span = max(last - first, 1)
    step = next(s * 10**k for k in range(12) for s in (1, 2, 5) if span / (s * 10**k) < MAX_TICKS)
    start = math.ceil(first / step) * step
    return [first] if first == last else list(range(start, last + 1, step))


def value_ticks(low: float, high: float) -> list[float]:
    """About five round values covering [low, high]."""
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], name: str, records: Sequence[dict]) -> None:
    """One panel: `name` and `val_name` by epoch inside `box` (left, top, right, bottom of the whole panel)."""
    left, top = box[0] + MARGIN["left"], box[1] + MARGIN["top"]
    right, bottom = box[2] - MARGIN["right"], box[3] - MARGIN["bottom"]
    epochs = [r["epoch"] for r in records]
    series = {"train": [r[name] for r in records], "validation": [r[f"val_{name}"] for r in records]}
    values = [v for s in series.values() for v in s if math.isfinite(v)] or [0.0]
    ys = value_ticks(min(values), max(values))
    x_low, x_high, y_low, y_high = min(epochs) - 0.5, max(epochs) + 0.5, ys[0], ys[-1]

    def point(epoch: float, value: float) -> tuple[float, float]:
        x = left + (epoch - x_low) / (x_high - x_low) * (right - left)
        return x, bottom - (value - y_low) / (y_high - y_low) * (bottom - top)

    small, large = _font(12), _font(15)
    for value in ys:
        y = point(x_low, value)[1]
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((left - 6, y), f"{value:.4g}", fill=INK, font=small, anchor="rm")
    for epoch in epoch_ticks(min(epochs), max(epochs)):
        x = point(epoch, y_low)[0]
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.text((x, bottom + 6), str(epoch), fill=INK, font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) / 2, box[1] + 10), f"{name} per epoch", fill=INK, font=large, anchor="mt")
    draw.text(((left + right) / 2, box[3] - 8), "epoch", fill=INK, font=small, anchor="mb")
    styles = zip(series.items(), (TRAIN, VALIDATION), (draw.ellipse, draw.rectangle))
    for (_, data), colour, mark in styles:
        points = [point(e, v) for e, v in zip(epochs, data) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2, joint="curve")
        for x, y in points:
            mark([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=colour)
    draw.rectangle([right - 118, top + 4, right - 6, top + 46], fill="white", outline=GRID)  # the legend
    for row, (label, colour) in enumerate(zip(series, (TRAIN, VALIDATION))):
        y = top + 15 + 20 * row
        draw.line([(right - 110, y), (right - 86, y)], fill=colour, width=2)
        draw.text((right - 80, y), label, fill=INK, font=small, anchor="lm")


def curves_png(records: Sequence[dict[str, Any]]) -> bytes:
    """Loss and accuracy against epoch, train and validation, as a PNG of SIZE."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    half = SIZE[0] // 2
    _panel(draw, (0, 0, half, SIZE[1]), "loss", records)
    _panel(draw, (half, 0, SIZE[0], SIZE[1]), "accuracy", records)
    buffer = io.BytesIO()
    image.save(buffer, format="png", compress_level=1)  # zlib's fastest: 8 against 12 ms, the file 40% larger
    return buffer.getvalue()
