"""mnist_jax.predict: every input form, checkpoint or .h5, and one-line errors for bad input."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from mnist_jax.serving.predict import load_model

from helpers import run_here, run_process


def predict_cli(model, *args, stdin: bytes = b""):
    """`python -m mnist_jax.predict --model MODEL ARGS` in this process, bytes in and out."""
    return run_here("predict", ["--model", str(model), *args], stdin=stdin)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(3).integers(0, 256, (4, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def expected(trained_job, pixels):
    return load_model(str(trained_job / "model.h5"))(pixels.reshape(4, 784).astype(np.float32) / 255)


def _probabilities(stdout: bytes) -> np.ndarray:
    predictions = json.loads(stdout)["predictions"]
    probabilities = np.array([p["probabilities"] for p in predictions])
    assert [p["label"] for p in predictions] == probabilities.argmax(1).tolist()
    return probabilities


def test_npy_uint8_and_float(trained_job, pixels, expected, tmp_path):
    np.save(tmp_path / "u8.npy", pixels)
    np.save(tmp_path / "f32.npy", pixels.reshape(4, 784).astype(np.float32) / 255)
    for name in ("u8.npy", "f32.npy"):
        result = predict_cli(trained_job / "model.h5", "--input", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        np.testing.assert_allclose(_probabilities(result.stdout), expected, atol=1e-6)


def test_png(trained_job, pixels, expected, tmp_path):
    Image.fromarray(pixels[2]).save(tmp_path / "digit.png")
    result = predict_cli(trained_job / "model.h5", "--input", str(tmp_path / "digit.png"))
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(_probabilities(result.stdout), expected[2:3], atol=1e-6)


def test_instances_json_on_stdin_and_file_with_output(trained_job, pixels, expected, tmp_path):
    body = {"instances": [pixels[0].tolist(), pixels[1].reshape(784).tolist(), (pixels[2].reshape(784) / 255).tolist()]}
    # A real process, its request piped to stdin.
    result = run_process("predict", ["--model", str(trained_job / "model.h5")], stdin=json.dumps(body).encode())
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(_probabilities(result.stdout), expected[:3], atol=1e-6)
    (tmp_path / "request.json").write_text(json.dumps(body))
    out = tmp_path / "predictions.json"
    result = predict_cli(trained_job / "model.h5", "--input", str(tmp_path / "request.json"), "--output", str(out))
    assert result.returncode == 0 and result.stdout == b""
    np.testing.assert_allclose(_probabilities(out.read_bytes()), expected[:3], atol=1e-6)


def test_b64_instances_png_and_raw(trained_job, pixels, expected):
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, format="PNG")
    body = {
        "instances": [
            {"b64": base64.b64encode(png.getvalue()).decode()},
            {"b64": base64.b64encode(pixels[1].tobytes()).decode()},
        ]
    }
    result = predict_cli(trained_job / "model.h5", stdin=json.dumps(body).encode())
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(_probabilities(result.stdout), expected[:2], atol=1e-6)
    bad = predict_cli(trained_job / "model.h5", stdin=json.dumps({"instances": [{"b64": "%%"}]}).encode())
    assert bad.returncode == 2
    assert (
        bad.stderr.decode().strip() == "error: stdin: instance 0: b64 is not valid base64 (Only base64 data is allowed)"
    )


def test_checkpoint_directory_predicts_like_the_h5(trained_job, pixels, expected, tmp_path):
    np.save(tmp_path / "u8.npy", pixels)
    result = predict_cli(trained_job / "checkpoints", "--input", str(tmp_path / "u8.npy"))
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(_probabilities(result.stdout), expected, atol=1e-6)


def _bad_inputs(tmp_path):
    np.save(tmp_path / "shape.npy", np.zeros((3, 27, 27), np.uint8))
    np.save(tmp_path / "range.npy", np.full((2, 784), 1.5, np.float32))
    np.save(tmp_path / "dtype.npy", np.zeros((2, 784), np.int64))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "garbage.bin").write_bytes(b"\x00\x01garbage")
    return {
        "shape": (["--input", str(tmp_path / "shape.npy")], "must have shape (N, 28, 28) or (N, 784), got (3, 27, 27)"),
        "range": (["--input", str(tmp_path / "range.npy")], "float images must be in [0, 1]"),
        "dtype": (["--input", str(tmp_path / "dtype.npy")], "must be uint8 pixels or floats in [0, 1]"),
        "png_size": (["--input", str(tmp_path / "big.png")], "PNG must be 28x28, got 32x32"),
        "garbage": (["--input", str(tmp_path / "garbage.bin")], "not a .npy, PNG or JSON file"),
        "missing": (["--input", str(tmp_path / "nope.npy")], "cannot read input"),
        "no_instances": ([], 'expected a JSON object with an "instances" list', b'{"images": []}'),
        "short": ([], "instance 0 must be 784 or 28x28 numbers, got shape (3,)", b'{"instances": [[1, 2, 3]]}'),
        "pixel_range": (
            [],
            "instance 0 has integer pixels outside 0..255",
            json.dumps({"instances": [[300] * 784]}).encode(),
        ),
        "strings": ([], "instance 0 must hold numbers", json.dumps({"instances": [["a"] * 784]}).encode()),
        "malformed": ([], "not a .npy, PNG or JSON file", b'{"instances": ['),
    }


@pytest.mark.parametrize(
    "case",
    [
        "shape",
        "range",
        "dtype",
        "png_size",
        "garbage",
        "missing",
        "no_instances",
        "short",
        "pixel_range",
        "strings",
        "malformed",
    ],
)
def test_bad_input_is_a_one_line_error(trained_job, tmp_path, case):
    args, message, *stdin = _bad_inputs(tmp_path)[case]
    result = predict_cli(trained_job / "model.h5", *args, stdin=stdin[0] if stdin else b"")
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
