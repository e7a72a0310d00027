"""The train step, padding and the trainer CLI end to end (device-count invariance: test_checkpoint)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax.data.dataset import Dataset
from mnist_jax.model.mlp import MLP
from mnist_jax.training import parallel
from mnist_jax.training.placement import place
from mnist_jax.training.steps import Hyperparams, create_train_state, epoch_batches, eval_step, evaluate, train_step

from helpers import assert_refused, load_final_state, max_difference, read_metrics, run_here, run_process, tiny_args


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.integers(0, 256, (n, 784), dtype=np.uint8)),
        jnp.asarray(rng.integers(0, 10, n).astype(np.int32)),
    )


def test_padded_batch_equals_the_real_examples_alone():
    model = MLP()
    state = create_train_state(model, jax.random.PRNGKey(0), 0.001)
    x, y = _batch(96)
    # Padding rows hold garbage on purpose: weight 0 must make them irrelevant.
    x_pad = jnp.concatenate([x, jnp.full((32, 784), 255, jnp.uint8)])
    y_pad = jnp.concatenate([y, jnp.full(32, 7, jnp.int32)])
    w_pad = jnp.concatenate([jnp.ones(96), jnp.zeros(32)])
    hp = Hyperparams(jnp.float32(0.0), jnp.float32(0.0))
    evaluated = jax.jit(eval_step, static_argnums=2)  # as the programs run them: compiled whole
    trained = jax.jit(train_step, static_argnums=3)

    real = evaluated(state.params, (x, y, jnp.ones(96)), model)
    padded = evaluated(state.params, (x_pad, y_pad, w_pad), model)
    assert float(padded.count) == 96
    np.testing.assert_allclose(padded.loss_sum / padded.count, real.loss_sum / real.count, rtol=1e-6)

    after_real, _ = trained(state, (x, y, jnp.ones(96)), hp, model)
    after_pad, _ = trained(state, (x_pad, y_pad, w_pad), hp, model)
    for a, b in zip(jax.tree.leaves(after_real.params), jax.tree.leaves(after_pad.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_evaluation_in_steps_covers_the_whole_test_set():
    model = MLP()
    params = create_train_state(model, jax.random.PRNGKey(0), 0.001).params
    x, y = _batch(2345, seed=1)
    mesh = parallel.make_mesh()
    test = place(Dataset(x[:8], y[:8], np.asarray(x), np.asarray(y)), mesh).validation
    assert test[0].shape == (3, 1000, 784)  # the last step is padded with 655 weight-0 rows
    stepped = evaluate(params, test, model=model, batch_sharding=parallel.batch_sharded(mesh))
    whole = eval_step(params, (x, y, jnp.ones(2345)), model)
    assert float(stepped.count) == 2345 and float(stepped.correct) == float(whole.correct)
    np.testing.assert_allclose(stepped.loss_sum, whole.loss_sum, rtol=1e-5)


def test_epoch_visits_every_example_once():
    indices, weights = epoch_batches(jax.random.PRNGKey(0), jnp.int32(0), 100, 32)
    assert indices.shape == weights.shape == (4, 32)
    real = np.asarray(indices)[np.asarray(weights) == 1]
    assert sorted(real.tolist()) == list(range(100))
    again, _ = epoch_batches(jax.random.PRNGKey(0), jnp.int32(1), 100, 32)
    assert not np.array_equal(indices, again)  # reshuffled each epoch


def test_train_step_is_pure_and_uses_dropout():
    model = MLP()
    state = create_train_state(model, jax.random.PRNGKey(0), 0.001)
    batch = (*_batch(64), jnp.ones(64))
    hp = Hyperparams(jnp.float32(0.5), jnp.float32(0.5))
    one, _ = train_step(state, batch, hp, model)
    two, _ = train_step(state, batch, hp, model)
    np.testing.assert_array_equal(one.params["dense"]["kernel"], two.params["dense"]["kernel"])
    no_dropout, _ = train_step(state, batch, hp._replace(dropout_one=jnp.float32(0)), model)
    assert not np.allclose(one.params["dense"]["kernel"], no_dropout.params["dense"]["kernel"])


def test_batch_must_divide_over_devices(tiny_pickle, tmp_path):
    result = run_process(
        "train",
        ["--train-file", str(tiny_pickle), "--batch-size", "30", "--job-dir", str(tmp_path)],
        devices=4,
        timeout=240,
    )
    assert_refused(result, "--batch-size 30 does not divide evenly over 4 devices")


def test_cli_end_to_end(tiny_pickle, tmp_path):
    job_dir = tmp_path / "job"
    result = run_process(
        "train", [*tiny_args(tiny_pickle), "--job-dir", str(job_dir), "--seed", "3"], timeout=240, check=True
    )
    out = result.stdout
    assert "Total params: 669,706" in out and "dropout_1 (Dropout, rate 0.2)" in out
    assert "100 train samples" in out and "40 test samples" in out
    lines = [line for line in out.splitlines() if line.startswith("Epoch ")]
    assert len(lines) == 2 and lines[1].startswith("Epoch 2/2 - ")
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert f" - {key}: " in lines[0]
    records = read_metrics(job_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert set(record) >= {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "epoch_time_s"}
        assert 0 <= record["accuracy"] <= 1 and 0 <= record["val_accuracy"] <= 1 and record["epoch_time_s"] > 0
        assert np.isfinite(record["loss"]) and np.isfinite(record["val_loss"])
    assert f"Test accuracy: {records[-1]['val_accuracy']:.4f}" in out
    config = json.loads((job_dir / "config.json").read_text())
    assert config["seed"] == 3 and config["batch_size"] == 32 and config["train_file"] == str(tiny_pickle)
    assert config["runtime"]["devices"] == 1


def test_a_second_run_in_one_process_traces_and_compiles_nothing(tiny_pickle, tmp_path):
    run_here("train", [*tiny_args(tiny_pickle, 1), "--job-dir", str(tmp_path / "first")], check=True)
    events = []
    listener = lambda event, duration, **kwargs: events.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:  # other values, the same shapes: the programs the first run built are used as they are
        rates = ["--seed", "4", "--dropout-one", "0.3", "--learning-rate", "0.002"]
        run_here("train", [*tiny_args(tiny_pickle, 1), "--job-dir", str(tmp_path / "second"), *rates], check=True)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not [event for event in events if event.startswith("/jax/core/compile/")]
    assert max_difference(load_final_state(tmp_path / "first"), load_final_state(tmp_path / "second")) > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dropout-one", "1.5"], "error: argument --dropout-one/--dropout_one: must be in [0, 1), got 1.5"),
        (["--train-file", "/nonexistent/mnist.pkl"], "error: train file not found: /nonexistent/mnist.pkl"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path):
    result = run_here("train", [*args, "--job-dir", str(tmp_path)])
    assert result.returncode == 2
    assert result.stderr.strip() == message


def test_progress_bar_on_a_terminal(tiny_pickle, tmp_path, monkeypatch):
    from mnist_jax import train

    leader, follower = pty.openpty()
    output = bytearray()

    def read() -> None:  # the terminal's other end, read as the job writes: a full terminal would hold the job up
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the job's end closed
                return
            if not chunk:
                return
            output.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", os.devnull)
    args = ["--train-file", str(tiny_pickle), "--epochs", "1", "--batch-size", "4", "--job-dir", str(tmp_path)]
    try:
        with open(follower, "w", buffering=1) as terminal, contextlib.redirect_stdout(terminal):
            assert train.main(args) == 0
    finally:
        reader.join(timeout=60)
        os.close(leader)
    text = output.decode()
    assert "\r10/25 [" in text and "\r20/25 [" in text  # drawn every 10 of the 25 steps
    assert "Epoch 1/1 - " in text


def test_validation_split_validates_on_held_out_training_examples(tmp_path):
    import pickle

    from mnist_jax.serving.predict import load_model

    from helpers import make_arrays

    (x, y), (xt, yt) = make_arrays(n_train=125, n_test=40)  # 100 left to train on: `tiny_pickle`'s programs
    (tmp_path / "data.pkl").write_bytes(pickle.dumps(((x, y), (xt, yt))))
    job_dir = tmp_path / "job"
    result = run_here(
        "train", [*tiny_args(tmp_path / "data.pkl"), "--validation-split", "0.2", "--job-dir", str(job_dir)], check=True
    )
    assert (
        "100 train samples\n25 validation samples (the last 0.2 of the training set)\n40 test samples" in result.stdout
    )
    predict = load_model(str(job_dir / "model.h5"))
    final = read_metrics(job_dir)[-1]
    held_out = predict(x[100:].reshape(25, 784).astype(np.float32) / 255).argmax(1)
    assert final["val_accuracy"] == pytest.approx(np.mean(held_out == y[100:]))
    test = predict(xt.reshape(40, 784).astype(np.float32) / 255).argmax(1)
    assert f"Test accuracy: {np.mean(test == yt):.4f}" in result.stdout
