"""Predictions: a model (a Keras `.h5`, a directory holding `model.h5`, or a checkpoints directory) as a jitted
function from images to class probabilities, and the `{"predictions": [...]}` answer both the command line and
the server give."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from mnist_jax.common import storage
from mnist_jax.model import keras_h5
from mnist_jax.model.mlp import MLP


def load_model(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """A jitted function from float images (N, 784) in [0, 1] to class probabilities (N, 10).

    `path` is a Keras .h5 file, a directory holding `model.h5` (as Vertex's
    AIP_STORAGE_URI names one), or a checkpoints directory.
    """
    if not path.endswith((".h5", ".hdf5")) and storage.exists(storage.join(path, "model.h5")):
        path = storage.join(path, "model.h5")
    if path.endswith((".h5", ".hdf5")):
        params, _ = keras_h5.read_model(path)
    else:
        from mnist_jax.training import checkpoint  # Orbax is needed only for checkpoint directories

        params, _, _ = checkpoint.load_params(path)
    model = MLP(hidden_units=params["dense"]["kernel"].shape[1])

    def probabilities(p: Any, x: jax.Array) -> jax.Array:
        # Full float32 matmuls on every platform: a GPU's faster default (TF32) would make an answer depend
        # on the size of the batch it was served in, and the forward pass is cheap either way.
        with jax.default_matmul_precision("highest"):
            return jax.nn.softmax(model.apply({"params": p}, x))

    forward = jax.jit(probabilities)
    params = jax.device_put(params)
    return lambda images: np.asarray(forward(params, images))


def predictions(probabilities: np.ndarray) -> dict[str, list[dict[str, Any]]]:
    labels = probabilities.argmax(axis=1).tolist()
    return {
        "predictions": [
            {"label": label, "probabilities": p} for label, p in zip(labels, probabilities.tolist(), strict=True)
        ]
    }
