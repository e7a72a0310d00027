"""Job dirs made before any work: a file in the way, or a place that cannot be written, is one line naming the
flag."""

from __future__ import annotations

import pytest

from mnist_jax.common import storage
from mnist_jax.common.errors import StorageError


def test_make_dirs_makes_the_directory_and_its_parents(tmp_path):
    storage.make_dirs(str(tmp_path / "a" / "b"), "--job-dir")
    storage.make_dirs(str(tmp_path / "a" / "b"), "--job-dir")  # again: nothing to do
    assert (tmp_path / "a" / "b").is_dir()


def test_a_file_where_the_directory_should_be_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=rf"^--job-dir {tmp_path / 'f'} is a file, not a directory$"):
        storage.make_dirs(str(tmp_path / "f"), "--job-dir")
    with pytest.raises(StorageError, match=rf"^--job-dir {tmp_path / 'f' / 'x'}: {tmp_path / 'f'} is a file"):
        storage.make_dirs(str(tmp_path / "f" / "x"), "--job-dir")
    assert (tmp_path / "f").read_text() == "x"


def test_a_place_that_cannot_be_written_is_one_line():
    with pytest.raises(StorageError, match=r"^--job-dir /proc/nope: cannot create it: No such file or directory$"):
        storage.make_dirs("/proc/nope", "--job-dir")
