"""bench.files: one atomic writer (unique temporary names, nothing left on failure) and one streamed sha256."""
import hashlib
import os

import pytest

from bench.errors import UserError
from bench.files import atomic_path, atomic_write_bytes, atomic_write_text, sha256_file


def test_two_writers_of_one_target_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "cell.json"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        assert first.name.endswith(".tmp") and first.name.startswith(".cell.json.")
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer block ends last and wins
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cell.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "summary.csv", "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert [path.name for path in tmp_path.iterdir()] == ["summary.csv"]


def test_outputs_get_the_mode_a_plain_open_would_give(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    written = atomic_write_bytes(tmp_path / "nested" / "atomic.bin", b"x")
    assert written.read_bytes() == b"x"
    assert os.stat(written).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_sha256_streams_in_chunks_and_names_a_missing_file(tmp_path):
    data = os.urandom(10_000)
    path = atomic_write_bytes(tmp_path / "weights.pth", data)
    assert sha256_file(path, chunk_bytes=4096) == hashlib.sha256(data).hexdigest()
    with pytest.raises(UserError, match="absent.pth: file does not exist"):
        sha256_file(tmp_path / "absent.pth")
    with pytest.raises(UserError, match="is a folder"):
        sha256_file(tmp_path)
