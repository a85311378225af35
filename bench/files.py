"""Files as the harness writes and identifies them: atomically, and by a streamed sha256.

Every output goes through :func:`atomic_path` (or :func:`atomic_write_bytes` / :func:`atomic_write_text`): the
content goes to a uniquely named temporary file in the target's folder, which ``os.replace`` then moves over
the target, so a reader sees the old file or the complete new one, and two writers never share a temporary
name. A failure removes the temporary file and leaves the target as it was.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from bench.errors import UserError


def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file under this process's umask (read without changing it)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_NEW_FILE_MODE = _new_file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; moved over ``path`` when the block ends without an
    exception, removed when it raises. Parent folders are created. The temporary name ends in ``.tmp``, so a
    glob for the outputs (``*.png``, ``*.csv``) never picks it up: a writer whose library chooses the format by
    the name's suffix passes the format explicitly (``savefig(..., format="png")``) or writes to an open file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        os.chmod(temporary, _NEW_FILE_MODE)  # mkstemp makes files private; outputs get the usual mode
        yield Path(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the target."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_path`); returns the target."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so that a multi-GB checkpoint never sits in memory."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(chunk_bytes), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise UserError(f"{path}: file does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a file") from None
    except PermissionError:
        raise UserError(f"{path}: cannot be read (permission denied)") from None
    return digest.hexdigest()
