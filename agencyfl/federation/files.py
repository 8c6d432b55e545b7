"""Files that hold records: created 0600 and written atomically, never left half-written.

A quarantine file copies full rows of an agency's data and a decisions file names households, so
both are as sensitive as the data: they are created with owner-only permissions whatever the umask,
written to a temporary file in the target's folder and renamed over the target (atomic on POSIX). On
any failure the temporary file is removed, so no copy of the records is left behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pandas as pd

from agencyfl.federation.errors import DataFileError

__all__ = ["write_private", "write_private_csv", "write_private_text"]


def write_private(path: Path, write: Callable[[IO[str]], None]) -> None:
    """Write ``path`` (mode 0600) through ``write(handle)``, atomically.

    Raises
    ------
    DataFileError
        The folder is missing or unwritable, the target is a folder, or writing failed; nothing is
        left behind (the target keeps its previous content).
    """
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
        with os.fdopen(fd, "w", newline="") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        os.chmod(path, 0o600)
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise DataFileError(f"cannot write {str(path)!r}: {reason}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_private_text(path: Path, text: str) -> None:
    """``write_private`` for a string."""

    def put(handle: IO[str]) -> None:
        handle.write(text)

    write_private(path, put)


def write_private_csv(path: Path, frame: pd.DataFrame) -> None:
    """``write_private`` for a data frame as CSV (no index)."""
    write_private(path, lambda handle: frame.to_csv(handle, index=False))
