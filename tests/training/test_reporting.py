"""The job dir's reports: TensorBoard events read back by TensorBoard itself, and curves.png."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import read_metrics

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard (test extra) is needed to read the event files back",
)


def test_tensorboard_events_hold_the_epoch_metrics(trained_job):
    records = read_metrics(trained_job)
    (run,) = (trained_job / "logs").iterdir()  # logs/<timestamp>, as the original trainer's logs_path
    events = event_accumulator.EventAccumulator(str(run))
    events.Reload()
    scalars = events.Tags()["scalars"]
    expected = {
        "loss/train": "loss",
        "loss/validation": "val_loss",
        "accuracy/train": "accuracy",
        "accuracy/validation": "val_accuracy",
        "epoch_time_s": "epoch_time_s",
    }
    for tag, key in expected.items():
        assert tag in scalars
        values = [(e.step, e.value) for e in events.Scalars(tag)]
        assert values == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in records]
    assert [e.value for e in events.Scalars("learning_rate")] == [pytest.approx(0.002)] * 2
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    assert b"dropout_one" in plugins["_hparams_/session_start_info"]


def test_curves_png_is_a_valid_image(trained_job):
    with Image.open(trained_job / "curves.png") as image:
        image.verify()
    with Image.open(trained_job / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1000, 400)
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn


def test_a_full_disk_under_tensorboard_is_one_line(tmp_path):
    """An event file that cannot be written (here it is /dev/full, under tensorboardX's record writer) fails the
    write with the project's one-line StorageError, not a library's traceback."""
    from mnist_jax.common.errors import StorageError
    from mnist_jax.training.metrics import TensorBoardLog

    log = TensorBoardLog(str(tmp_path / "logs"), {"learning_rate": 0.001})
    record = {"epoch": 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5}
    record = {**record, "learning_rate": 0.001, "epoch_time_s": 1.0}
    log.write(record)  # the first epoch is flushed
    log._events._py_recordio_writer._writer = open("/dev/full", "wb")  # noqa: SIM115  # closed by log.close
    log.write({**record, "epoch": 2})  # buffered: it reaches the file at close
    with pytest.raises(StorageError, match=r"^writing TensorBoard events to .*logs failed: .*No space left on device"):
        log.close()
