"""Crash-safe file writing: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import S2FTError


def read_json(path: Path, advice: str):
    """The JSON value in ``path``; a file that does not parse is a user error that names
    it and ends with ``advice``."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise S2FTError(f"{path} is not valid JSON ({err}); {advice}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_path(path: Path, write: Callable[[Path], None]) -> None:
    """Replace ``path`` with the file ``write(tmp_path)`` writes at a temporary path beside
    it (for writers that open the file themselves), so that readers see the old or the new
    file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_file(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Replace ``path`` with what ``write(file)`` writes (a binary file if ``binary``), so
    that readers see the old or the new file, never half."""

    def written(tmp: Path) -> None:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write_path(path, written)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never half."""
    atomic_write_file(path, lambda f: f.write(text))


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Build a directory under a temporary name with ``write(tmp_dir)``, then swap it in.

    An existing ``path`` is replaced only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give normal permissions
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
