"""Files that hold records: created 0600 and written atomically, never left half-written.

A quarantine file copies full rows of an agency's data and a decisions file names households, so
both are as sensitive as the data: they are created with owner-only permissions whatever the umask,
written to a temporary file in the target's folder and renamed over the target (atomic on POSIX). On
any failure the temporary file is removed, so no copy of the records is left behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

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
    """``write_private`` for a data frame as CSV (no index): ``frame.to_csv``'s bytes, by Arrow's writer where
    it writes them alike (``_csv_by_arrow``)."""
    text = _csv_by_arrow(frame)
    if text is not None:
        write_private_text(path, text)
    else:
        write_private(path, lambda handle: frame.to_csv(handle, index=False))


def _csv_by_arrow(frame: pd.DataFrame) -> str | None:
    """``frame.to_csv(index=False)``, by Arrow's writer (a quarter of a million worklist rows in a fifth of the
    time), for a frame it writes byte for byte alike: two or more distinct string column names (pandas quotes a
    lone empty value), columns of strings (None or NaN missing), int64 or float64 (formatted as pandas formats
    them: NumPy's ``str``), and no name or value that needs quotes (Arrow refuses such a value unquoted).
    None for any other frame."""
    names = list(frame.columns)
    if len(names) < 2 or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        return None
    arrays = []
    for name in names:
        col = frame[name]
        if col.dtype == np.int64:
            arrays.append(pa.array(col.to_numpy()))
        elif col.dtype == np.float64:
            values = col.to_numpy()
            arrays.append(pa.array(values.astype(str), type=pa.large_string(), mask=np.isnan(values)))
        elif isinstance(col.dtype, pd.StringDtype) or (
            col.dtype == object and pd.api.types.infer_dtype(col, skipna=True) in ("string", "empty")
        ):
            arrays.append(pa.array(col.to_numpy(dtype=object), type=pa.large_string(), from_pandas=True))
        else:
            return None
    sink = io.BytesIO()
    try:
        pacsv.write_csv(pa.table(arrays, names=names), sink,
                        pacsv.WriteOptions(quoting_style="none", quoting_header="none"))  # fmt: skip
    except pa.ArrowInvalid:  # a comma, quote or line break in a value or a name: pandas quotes it
        return None
    return sink.getvalue().decode("utf-8")
