"""curves.png: whole epochs on the x axis, round values on the y axis, both series drawn."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mnist_jax.training.curves import SIZE, TRAIN, VALIDATION, curves_png, epoch_ticks, value_ticks


def test_the_epoch_axis_holds_whole_epochs_only():
    assert epoch_ticks(1, 1) == [1]  # one epoch: the tick 1, not 0.96 ... 1.04
    for first, last in ((1, 2), (1, 20), (3, 9), (1, 100), (7, 300)):
        ticks = epoch_ticks(first, last)
        assert all(isinstance(t, int) and first <= t <= last for t in ticks) and 2 <= len(ticks) <= 8
    assert epoch_ticks(1, 5) == [1, 2, 3, 4, 5]


def test_value_ticks_are_round_and_cover_the_values():
    for low, high in ((0.02, 0.3), (2.25, 2.44), (0.9, 0.9), (0.0, 1.0)):
        ticks = value_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high and 2 <= len(ticks) <= 8
        steps = np.diff(ticks)
        assert np.allclose(steps, steps[0])


def test_both_series_are_drawn_in_their_colours():
    records = [
        {"epoch": e, "loss": 1 / e, "accuracy": 1 - 0.5 / e, "val_loss": 1.2 / e, "val_accuracy": 1 - 0.6 / e}
        for e in range(1, 6)
    ]
    with Image.open(io.BytesIO(curves_png(records))) as image:
        assert image.format == "PNG" and image.size == SIZE
        pixels = {tuple(p) for p in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    assert TRAIN in pixels and VALIDATION in pixels
    assert curves_png([{**records[0], "loss": float("nan")}])  # a non-finite value is left out, not an error
