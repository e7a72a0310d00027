"""model.h5: the tf.keras 2.x layout, loaded by real Keras 3 (JAX backend), and the export CLI."""

from __future__ import annotations

import json
import os
import subprocess

import h5py
import numpy as np
import pytest

from helpers import load_final_state, run_here

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is imported
keras = pytest.importorskip("keras", reason="Keras 3 (test extra) is needed to load the exported model")

from mnist_jax.common.errors import DataError, StorageError  # noqa: E402
from mnist_jax.model import keras_h5  # noqa: E402
from mnist_jax.serving.predict import load_model  # noqa: E402


def _images(n=50, seed=7):
    return np.random.default_rng(seed).integers(0, 256, (n, 784), dtype=np.uint8).astype(np.float32) / 255


def test_h5_layout_is_tf_keras_2(trained_job):
    with h5py.File(trained_job / "model.h5", "r") as f:
        assert f.attrs["backend"] == "tensorflow" and f.attrs["keras_version"].startswith("2.")
        config = json.loads(f.attrs["model_config"])
        assert config["class_name"] == "Sequential" and '"module"' not in f.attrs["model_config"]
        layers = config["config"]["layers"]
        assert [layer["class_name"] for layer in layers] == [
            "InputLayer",
            "Dense",
            "Dropout",
            "Dense",
            "Dropout",
            "Dense",
        ]
        assert layers[0]["config"]["batch_input_shape"] == [None, 784]
        assert [layer["config"].get("rate") for layer in layers if layer["class_name"] == "Dropout"] == [0.3, 0.25]
        assert layers[-1]["config"]["activation"] == "softmax"
        training = json.loads(f.attrs["training_config"])
        assert training["loss"] == "categorical_crossentropy" and training["metrics"] == ["accuracy"]
        assert "loss_weights" in training
        optimizer = training["optimizer_config"]
        assert optimizer["class_name"] == "RMSprop" and "weight_decay" not in optimizer["config"]
        assert optimizer["config"]["learning_rate"] == 0.002 and optimizer["config"]["epsilon"] == 1e-7
        weights = f["model_weights"]
        assert [n.decode() for n in weights.attrs["layer_names"]] == list(keras_h5.LAYER_NAMES)
        assert [n.decode() for n in weights["dense_1"].attrs["weight_names"]] == ["dense_1/kernel:0", "dense_1/bias:0"]
        assert (
            weights["dense/dense/kernel:0"].shape == (784, 512) and weights["dense/dense/kernel:0"].dtype == np.float32
        )
        assert len(weights["dropout"].attrs["weight_names"]) == 0
        assert "top_level_model_weights" in weights


def test_keras_3_loads_it_and_predicts_what_we_predict(trained_job):
    model = keras.models.load_model(trained_job / "model.h5")
    assert model.count_params() == 669_706
    assert [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)] == [0.3, 0.25]
    assert model.layers[-1].get_config()["activation"] == "softmax"
    state = load_final_state(trained_job)
    for layer, name in zip(
        [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)], keras_h5.DENSE_LAYERS
    ):
        kernel, bias = layer.get_weights()
        np.testing.assert_array_equal(kernel, np.asarray(state.params[name]["kernel"]))
        np.testing.assert_array_equal(bias, np.asarray(state.params[name]["bias"]))
    images = _images()
    ours = load_model(str(trained_job / "model.h5"))(images)
    np.testing.assert_allclose(model.predict(images, verbose=0), ours, atol=1e-5)
    # The compile state came along: evaluate works and agrees with our accuracy.
    assert model.optimizer.get_config()["learning_rate"] == pytest.approx(0.002)
    labels = np.random.default_rng(1).integers(0, 10, len(images))
    loss, accuracy = model.evaluate(images, keras.utils.to_categorical(labels, 10), verbose=0)
    assert accuracy == pytest.approx(np.mean(ours.argmax(1) == labels))
    assert loss == pytest.approx(-np.mean(np.log(ours[np.arange(len(labels)), labels])), rel=1e-4)


def test_reads_a_model_saved_by_keras_3(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.save(tmp_path / "keras3.h5")
    images = _images()
    np.testing.assert_allclose(
        load_model(str(tmp_path / "keras3.h5"))(images), model.predict(images, verbose=0), atol=1e-5
    )


def test_export_cli_from_checkpoints(trained_job, tmp_path):
    def export_cli(*args):
        return run_here("export", ["--checkpoint", str(trained_job / "checkpoints"), *args])

    result = export_cli("--out", str(tmp_path / "latest.h5"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "latest.h5").read_bytes() == (trained_job / "model.h5").read_bytes()
    first = export_cli("--step", "4", "--out", str(tmp_path / "first.h5"))  # after epoch 1: 100/32 -> 4 steps
    assert first.returncode == 0, first.stderr
    assert not np.array_equal(
        keras_h5.read_model(str(tmp_path / "first.h5"))[0]["dense"]["kernel"],
        keras_h5.read_model(str(tmp_path / "latest.h5"))[0]["dense"]["kernel"],
    )
    missing = export_cli("--step", "3", "--out", str(tmp_path / "x.h5"))
    assert missing.returncode == 2 and "no checkpoint for step 3" in missing.stderr
    assert not (tmp_path / "x.h5").exists()


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "model.h5"
    target.write_bytes(b"previous model")
    params = {
        name: {"kernel": np.zeros(shape, np.float32), "bias": np.zeros(shape[1], np.float32)}
        for name, shape in zip(keras_h5.DENSE_LAYERS, [(784, 8), (8, 8), (8, 10)])
    }

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StorageError, match="cannot write .*model.h5: disk full"):
        keras_h5.write_model(str(target), params, (0.2, 0.2), 0.001)
    assert target.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.h5"]  # no temporary left behind


def test_not_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="is not a Keras HDF5 model"):
        keras_h5.read_model(str(tmp_path / "junk.h5"))


@pytest.mark.skipif(
    not os.environ.get("MNIST_JAX_TF_PYTHON"),
    reason="tf.keras 2.x is optional: set MNIST_JAX_TF_PYTHON to a Python with tensorflow-cpu 2.15",
)
def test_tf_keras_2_loads_it(trained_job, tmp_path):
    images = _images()
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "m = tf.keras.models.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))\n"
    )
    subprocess.run(
        [
            os.environ["MNIST_JAX_TF_PYTHON"],
            "-c",
            script,
            str(trained_job / "model.h5"),
            str(tmp_path / "images.npy"),
            str(tmp_path / "tf.npy"),
        ],
        check=True,
        capture_output=True,
    )
    ours = load_model(str(trained_job / "model.h5"))(images)
    np.testing.assert_allclose(np.load(tmp_path / "tf.npy"), ours, atol=1e-5)
