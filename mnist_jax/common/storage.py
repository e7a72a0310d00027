"""File access over fsspec: one code path for local paths, file:// and gs://.

Owns atomic writes: a file appears whole or not at all. Locally that is a
temporary name in the same directory, fsync, then rename; on object stores a
single upload, which the store commits atomically. Transient object-store errors
are retried by gcsfs itself (HTTP 429/5xx and dropped connections, with
backoff); what is left when it gives up becomes a one-line `StorageError`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mnist_jax.common.errors import StorageError

T = TypeVar("T")

# Large blocks with read-ahead: one round trip per 8 MiB when streaming a
# dataset from an object store, which also keeps gzip decoding fed.
_READ_BLOCK = 8 << 20


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path within it."""
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open {uri}: {e}") from e


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def join(base: str, *names: str) -> str:
    """Joins path components with '/', keeping a URL scheme intact."""
    return "/".join([base.rstrip("/"), *names])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _guard(uri, lambda: fs.exists(path))


def make_dirs(uri: str, what: str) -> None:
    """Makes the local directory `uri` and its parents (object stores have none to make). A file in the way, or a
    place that cannot be written, is a one-line StorageError naming `what` (the flag that named `uri`)."""
    fs, path = filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        return
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == path else f": {existing}"
        raise StorageError(f"{what} {uri}{where} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{what} {uri}: cannot create it: {e.strerror or e}") from None


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """Opens `uri` for streaming reads (read-ahead on remote stores)."""
    fs, path = filesystem(uri)
    options = {} if isinstance(fs, LocalFileSystem) else {"block_size": _READ_BLOCK, "cache_type": "readahead"}
    handle = _guard(uri, lambda: fs.open(path, "rb", **options))
    with handle:
        yield handle


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return _guard(uri, lambda: fs.cat_file(path))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Writes `data` to `uri` so readers see the old file or the new one, never a part."""
    fs, path = filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        try:
            _guard(uri, lambda: fs.pipe_file(path, data))
        except FileNotFoundError:
            raise StorageError(f"cannot write {uri}: no such bucket") from None
        return
    try:
        _write_local_atomic(path, data)
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {e.strerror or e}") from None


def _write_local_atomic(path: str, data: bytes) -> None:
    """A temporary name in the same directory, fsync, then rename: the old file or the new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _guard(uri: str, action: Callable[[], T]) -> T:
    """Runs a filesystem action, turning failures that outlived retries into StorageError.

    A missing path or a directory stays as it is, for the caller to name.
    """
    try:
        return action()
    except (FileNotFoundError, IsADirectoryError):
        raise
    except OSError as e:
        detail = " ".join(str(e).split())  # one line, whatever the server's body held
        raise StorageError(f"storage error on {uri}: {detail}") from e
