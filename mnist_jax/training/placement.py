"""The dataset on the devices: the training set whole on every device, the evaluation sets in steps.

Each lane gathers its own shuffled batches from the training arrays (replicated
over the mesh); the validation and test sets are laid out as (steps, batch,
...) with each step's batch split over the mesh's `data` axis and the last
step padded with weight-0 rows, so evaluation covers every example.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from mnist_jax.data.dataset import Dataset, split_validation
from mnist_jax.training import parallel

# Examples per evaluation step: all 10,000 test images at once held about 60 MB of activations.
EVAL_BATCH = 1000


class Placed(NamedTuple):
    """A dataset on the devices: training arrays (x, y) replicated, evaluation sets as (steps, batch, ...)."""

    train: tuple[jax.Array, jax.Array]
    validation: tuple[jax.Array, jax.Array, jax.Array]
    test: tuple[jax.Array, jax.Array, jax.Array] | None  # None: the validation set is the test set
    train_examples: int
    validation_examples: int
    test_examples: int


def eval_steps(x: np.ndarray, y: np.ndarray, mesh: Mesh) -> tuple[jax.Array, jax.Array, jax.Array]:
    """An evaluation set as (steps, batch, ...) on the devices, batches of about EVAL_BATCH examples.

    Each batch is a multiple of the `data` axis and split over it; the last step
    is padded with weight-0 rows, so evaluation covers every example.
    """
    n, devices = len(x), mesh.shape[parallel.DATA_AXIS]
    batch = -(-min(EVAL_BATCH, n) // devices) * devices
    steps = -(-n // batch)
    pad = steps * batch - n
    x = np.concatenate([x, np.zeros((pad, x.shape[1]), np.uint8)])
    y = np.concatenate([y, np.zeros(pad, np.int32)])
    weight = (np.arange(n + pad) < n).astype(np.float32)
    arrays = tuple(a.reshape(steps, batch, *a.shape[1:]) for a in (x, y, weight))
    return jax.device_put(arrays, parallel.steps_sharded(mesh))


def place(dataset: Dataset, mesh: Mesh, validation_split: float = 0.0) -> Placed:
    """Puts the training set on every device and the evaluation sets in steps over them."""
    test = eval_steps(dataset.x_test, dataset.y_test, mesh)
    if validation_split:
        x_train, y_train, x_val, y_val = split_validation(dataset, validation_split)
        validation, held_out = eval_steps(x_val, y_val, mesh), test
    else:
        x_train, y_train, x_val = dataset.x_train, dataset.y_train, dataset.x_test
        validation, held_out = test, None
    train = jax.device_put((x_train, y_train), parallel.replicated(mesh))
    return Placed(train, validation, held_out, len(x_train), len(x_val), len(dataset.x_test))
