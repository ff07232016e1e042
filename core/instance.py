"""Files the service keeps on this machine: private modes and generated keys.

The embedded default keeps its database, queue and generated keys under ``instance/``. Those
files hold tokens and keys, so they are created readable by the service's user only (0600) and
the folders the service creates for them are 0700 (see docs/operations.md, "Secrets at rest").
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE = 0o600
FOLDER_MODE = 0o700
#: the generated encryption key's file name, next to the SQLite database (or in ./instance)
ENCRYPTION_KEY_FILE = "encryption_key"


def private_folder(path: Path, *, tighten: bool = False) -> Path:
    """Create ``path`` (and missing parents) with mode 0700.

    :param tighten: also set 0700 on an existing folder — only for folders that are ours alone
        (``instance/``), never for a folder a database file merely lives in (``/tmp``).
    """
    path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    if tighten:
        with contextlib.suppress(PermissionError):
            path.chmod(FOLDER_MODE)
    return path


def is_instance_folder(path: Path) -> bool:
    """``instance/``: the folder of the embedded default's files, ours alone, kept 0700."""
    return path.name == "instance"


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists with mode 0600 before another library opens it.

    SQLite and huey create their files with the process umask (usually 0644); an existing file
    of ours is tightened too. SQLite gives its ``-wal`` and ``-shm`` files the database file's
    mode.
    """
    private_folder(path.parent, tighten=is_instance_folder(path.parent))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    os.close(fd)
    with contextlib.suppress(PermissionError):
        path.chmod(FILE_MODE)
    return path


def read_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in ``path``, created with ``make()`` (mode 0600) when the file is missing.

    Written to a temporary file and linked into place, so a process starting at the same
    moment never reads a half-written file: exactly one creator wins, the others read its key.
    """
    private_folder(path.parent, tighten=is_instance_folder(path.parent))
    if not path.exists():
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:  # mkstemp creates it 0600
                fh.write(make())
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
    with contextlib.suppress(PermissionError):
        path.chmod(FILE_MODE)
    return path.read_text().strip()


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///…`` URL (already made absolute), or None (memory, others)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == "sqlite:///:memory:":
        return None
    return Path(url[len(prefix) :].split("?", 1)[0])
