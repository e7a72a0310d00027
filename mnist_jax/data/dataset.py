"""MNIST input: read any dataset file safely, validate it, and hold out a validation split.

Owns the dataset format contract. A dataset file is the seed's pickle of
`((x_train, y_train), (x_test, y_test))` (plain or gzip, detected by magic
bytes; Python 2 pickles load) or Keras's `mnist.npz`. Pickles go through a
restricted unpickler that admits only what numpy arrays need, so an untrusted
file cannot run code. Every path is opened through fsspec (local, file://,
gs://).

`--validation-split F` holds out the last fraction F of the training set as
the validation set (`split_validation`); with 0 the test set validates, as in
the seed. The format's numbers live here: 784 pixels an image, 10 classes,
pixels scaled by 1/255 as the Keras script scales them.
"""

from __future__ import annotations

import gzip
import importlib
import io
import pickle
import zipfile
from typing import IO, Any, NamedTuple

import numpy as np

from mnist_jax.common import storage
from mnist_jax.common.errors import DataError

IMAGE_PIXELS = 784  # a 28x28 image, flattened: the model's inputs
NUM_CLASSES = 10


class Dataset(NamedTuple):
    """MNIST splits as validated numpy arrays: x uint8 (N, 784), y int32 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def scale_pixels(pixels: Any) -> Any:
    """uint8 pixels (numpy or JAX) as float32 model inputs in [0, 1], as the Keras script scales them."""
    return pixels.astype(np.float32) / np.float32(255)


# --- safe unpickling ------------------------------------------------------

# (module, name) pairs a pickle of numpy arrays in tuples may reference. numpy
# 1.x pickles (and Python 2 ones) say numpy.core; numpy 2 says numpy._core.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2 pickles
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        canonical = module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core") else module
        if (canonical, name) not in _SAFE_GLOBALS:
            raise DataError(f"refused to unpickle global '{module}.{name}': only numpy arrays in tuples are allowed")
        return getattr(importlib.import_module(canonical), name)


def safe_unpickle(stream: IO[bytes]) -> Any:
    """Unpickles numpy arrays and tuples only; latin1 lets Python 2 pickles load."""
    return _SafeUnpickler(stream, encoding="latin1").load()


# --- reading --------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"


def load(uri: str) -> Dataset:
    """Reads and validates a dataset file from a local path, file:// or gs:// URI."""
    try:
        with storage.open_read(uri) as raw:
            return validate(parse(raw, uri), uri)
    except FileNotFoundError:
        raise DataError(f"train file not found: {uri}") from None
    except IsADirectoryError:
        raise DataError(f"train file is a directory: {uri}") from None


def parse(stream: IO[bytes], uri: str) -> Any:
    """The object in a dataset file's bytes (not yet validated); bad bytes are a one-line DataError."""
    try:
        return _parse_unchecked(stream, uri)
    except DataError:
        raise
    except (EOFError, gzip.BadGzipFile, zipfile.BadZipFile) as e:
        raise DataError(f"{uri} is truncated or corrupt: {e or 'unexpected end of data'}") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        if "truncated" in str(e):
            raise DataError(f"{uri} is truncated or corrupt: {e}") from None
        raise DataError(f"{uri} is not a valid MNIST pickle or npz file: {e}") from None


def _parse_unchecked(stream: IO[bytes], uri: str) -> Any:
    """Dispatches on magic bytes: gzip (recursing into it), zip (npz), else pickle."""
    buffered = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(stream)  # type: ignore[arg-type]
    magic = buffered.peek(4)[:4]
    if not magic:
        raise DataError(f"{uri} is empty")
    if magic.startswith(_GZIP_MAGIC):
        return _parse_unchecked(gzip.GzipFile(fileobj=buffered), uri)  # type: ignore[arg-type]
    if magic.startswith(_ZIP_MAGIC):
        with np.load(io.BytesIO(buffered.read()), allow_pickle=False) as npz:
            return _from_npz(npz, uri)
    return safe_unpickle(buffered)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _from_npz(npz: Any, uri: str) -> Any:
    missing = [k for k in NPZ_KEYS if k not in npz.files]
    if missing:
        raise DataError(f"{uri}: npz file lacks arrays {missing} (has {npz.files})")
    return (npz["x_train"], npz["y_train"]), (npz["x_test"], npz["y_test"])


def validate(obj: Any, uri: str = "dataset") -> Dataset:
    """Checks nesting, shapes, dtypes and labels; returns flat uint8 images and int32 labels."""
    expected = "((x_train, y_train), (x_test, y_test))"
    if not is_pair(obj) or not all(is_pair(split) for split in obj):
        got = f"a {type(obj).__name__} of {len(obj)} items" if isinstance(obj, (tuple, list)) else type(obj).__name__
        raise DataError(f"{uri}: expected {expected}, got {got}")
    (x_train, y_train), (x_test, y_test) = obj
    train = _validate_split("train", x_train, y_train, uri)
    test = _validate_split("test", x_test, y_test, uri)
    return Dataset(*train, *test)


def is_pair(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2


def _validate_split(split: str, x: Any, y: Any, uri: str) -> tuple[np.ndarray, np.ndarray]:
    where = f"{uri}: {split} split"
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DataError(f"{where}: x and y must be numpy arrays, got {type(x).__name__} and {type(y).__name__}")
    if x.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 pixels 0..255, got dtype {x.dtype}")
    if x.shape[1:] not in ((28, 28), (IMAGE_PIXELS,)):
        raise DataError(f"{where}: images must have shape (N, 28, 28) or (N, 784), got {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{where} is empty")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise DataError(f"{where}: labels must be in 0..9, found {y.min()}..{y.max()}")
    return np.ascontiguousarray(x.reshape(len(x), IMAGE_PIXELS)), y.astype(np.int32)


def split_validation(dataset: Dataset, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): the last `fraction` of the training set held out."""
    n = len(dataset.x_train)
    held = round(n * fraction)
    if not 1 <= held < n:
        raise DataError(
            f"--validation-split {fraction:g} holds out {held} of {n} training examples; "
            "it must leave at least one on each side"
        )
    return dataset.x_train[:-held], dataset.y_train[:-held], dataset.x_train[-held:], dataset.y_train[-held:]
