"""Keras HDF5 export and import: params <-> `model.h5` in the tf.keras 2.x layout.

Owns the job dir's `model.h5` contract. The file is written with h5py alone in
the layout of tf.keras 2.x's `model.save("model.h5")`, which Keras 3 (any
backend) and tf.keras 2.x both load; Keras 3's own layout would not load in
tf.keras 2.x. It holds the Sequential architecture (softmax output, the trained
dropout rates), the weights, and a Keras-2 compile state (RMSprop with the
trained learning rate, categorical crossentropy, accuracy), so the loaded model
can `evaluate` as well as `predict`.

`python -m mnist_jax.export` writes one from any saved checkpoint.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from mnist_jax.common import storage
from mnist_jax.common.errors import DataError
from mnist_jax.data.dataset import IMAGE_PIXELS, NUM_CLASSES
from mnist_jax.model.mlp import RMSPROP_EPSILON, RMSPROP_RHO

KERAS_VERSION = "2.15.0"
DENSE_LAYERS = ("dense", "dense_1", "dense_2")
DROPOUT_LAYERS = ("dropout", "dropout_1")
LAYER_NAMES = ("dense", "dropout", "dense_1", "dropout_1", "dense_2")


def _layer_config(class_name: str, name: str, **config: Any) -> dict[str, Any]:
    return {"class_name": class_name, "config": {"name": name, "trainable": True, "dtype": "float32", **config}}


def _dense_config(name: str, units: int, activation: str) -> dict[str, Any]:
    return _layer_config(
        "Dense",
        name,
        units=units,
        activation=activation,
        use_bias=True,
        kernel_initializer={"class_name": "GlorotUniform", "config": {"seed": None}},
        bias_initializer={"class_name": "Zeros", "config": {}},
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
    )


def _dropout_config(name: str, rate: float) -> dict[str, Any]:
    return _layer_config("Dropout", name, rate=rate, noise_shape=None, seed=None)


def model_config(hidden_units: int, dropout_rates: tuple[float, float]) -> dict[str, Any]:
    """The Sequential model's config, Keras-2 style (no "module" keys, which route Keras 3 to this loader)."""
    input_layer = {
        "class_name": "InputLayer",
        "config": {
            "batch_input_shape": [None, IMAGE_PIXELS],
            "dtype": "float32",
            "sparse": False,
            "ragged": False,
            "name": "dense_input",
        },
    }
    layers = [
        input_layer,
        _dense_config("dense", hidden_units, "relu"),
        _dropout_config("dropout", dropout_rates[0]),
        _dense_config("dense_1", hidden_units, "relu"),
        _dropout_config("dropout_1", dropout_rates[1]),
        _dense_config("dense_2", NUM_CLASSES, "softmax"),
    ]
    return {"class_name": "Sequential", "config": {"name": "sequential", "layers": layers}}


def training_config(learning_rate: float) -> dict[str, Any]:
    """The compile state as tf.keras 2.x stored it (a Keras-3 optimizer config breaks tf.keras 2.15)."""
    optimizer = {
        "class_name": "RMSprop",
        "config": {
            "name": "RMSprop",
            "learning_rate": learning_rate,
            "rho": RMSPROP_RHO,
            "momentum": 0.0,
            "epsilon": RMSPROP_EPSILON,
            "centered": False,
        },
    }
    return {
        "loss": "categorical_crossentropy",
        "metrics": ["accuracy"],
        "weighted_metrics": None,
        "loss_weights": None,
        "optimizer_config": optimizer,
    }


def _names(values: Sequence[str]) -> np.ndarray:
    return np.array([v.encode() for v in values]) if values else np.array([], dtype=np.float64)


def h5_bytes(params: Any, dropout_rates: tuple[float, float], learning_rate: float) -> bytes:
    """The complete `model.h5` for `params` (the Flax MLP's, layer names as Keras's)."""
    params = {name: {k: np.asarray(v, np.float32) for k, v in params[name].items()} for name in DENSE_LAYERS}
    hidden_units = params["dense"]["kernel"].shape[1]
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["keras_version"] = KERAS_VERSION
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(model_config(hidden_units, dropout_rates))
        f.attrs["training_config"] = json.dumps(training_config(learning_rate))
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = _names(LAYER_NAMES)
        weights.attrs["backend"] = "tensorflow"
        weights.attrs["keras_version"] = KERAS_VERSION
        for name in LAYER_NAMES:
            group = weights.create_group(name)
            if name in DROPOUT_LAYERS:
                group.attrs["weight_names"] = _names([])
                continue
            group.attrs["weight_names"] = _names([f"{name}/kernel:0", f"{name}/bias:0"])
            group.create_dataset(f"{name}/kernel:0", data=params[name]["kernel"])
            group.create_dataset(f"{name}/bias:0", data=params[name]["bias"])
        weights.create_group("top_level_model_weights").attrs["weight_names"] = _names([])
    return buffer.getvalue()


def write_model(uri: str, params: Any, dropout_rates: tuple[float, float], learning_rate: float) -> None:
    """Writes `model.h5` atomically, locally or to gs:// (built in memory: h5py cannot write to gs://)."""
    storage.write_bytes_atomic(uri, h5_bytes(params, dropout_rates, learning_rate))


def read_model(uri: str) -> tuple[dict[str, dict[str, np.ndarray]], tuple[float, float]]:
    """Reads the weights and dropout rates of any Keras HDF5 file of this architecture.

    Accepts our files, tf.keras 2.x's and Keras 3's `.h5`: the Dense layers'
    weights are taken in model order, whatever the layers are named.
    """
    try:
        with h5py.File(io.BytesIO(storage.read_bytes(uri)), "r") as f:
            config = json.loads(f.attrs["model_config"])
            weights = f["model_weights"] if "model_weights" in f else f
            layer_names = [n.decode() if isinstance(n, bytes) else n for n in weights.attrs["layer_names"]]
            arrays = []
            for name in layer_names:
                group = weights[name]
                arrays += [
                    np.asarray(group[w.decode() if isinstance(w, bytes) else w]) for w in group.attrs["weight_names"]
                ]
    except FileNotFoundError:
        raise DataError(f"model file not found: {uri}") from None
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{uri} is not a Keras HDF5 model: {e}") from None
    layers = [layer for layer in config["config"]["layers"] if layer["class_name"] in ("Dense", "Dropout")]
    kinds = [layer["class_name"] for layer in layers]
    if kinds != ["Dense", "Dropout", "Dense", "Dropout", "Dense"] or len(arrays) != 6:
        raise DataError(f"{uri} is not the mnist_mlp architecture (Dense, Dropout, Dense, Dropout, Dense): {kinds}")
    params = {
        name: {"kernel": arrays[2 * i].astype(np.float32), "bias": arrays[2 * i + 1].astype(np.float32)}
        for i, name in enumerate(DENSE_LAYERS)
    }
    shapes = [params[name]["kernel"].shape for name in DENSE_LAYERS]
    hidden = shapes[0][1]
    if shapes != [(IMAGE_PIXELS, hidden), (hidden, hidden), (hidden, NUM_CLASSES)]:
        raise DataError(f"{uri}: unexpected layer shapes {shapes}")
    rates = tuple(float(layer["config"]["rate"]) for layer in layers if layer["class_name"] == "Dropout")
    return params, rates  # type: ignore[return-value]
