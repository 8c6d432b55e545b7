"""One party's ids, read in batches: normalized, quarantined, checked for duplicates, hashed.

Validate first, then commit: a party's ids are all read and checked before any is blinded, and
nothing leaves the party until its input is known to be good. Only 32 bytes per id are kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from agencyfl.alignment.errors import DuplicateIdError
from agencyfl.alignment.psi import DEFAULT_BATCH, VALUE_BYTES, Values, hash_to_u, sort_order
from agencyfl.federation.resident_id import InvalidResidentId, normalize

_SHOWN = 5


class Quarantined(BaseModel):
    """A row whose id is not a valid resident id: kept out of the protocol, with the reason."""

    model_config = ConfigDict(frozen=True)

    row: int
    """0-based row number in the party's input."""
    reason: str


@dataclass(frozen=True)
class PreparedIds:
    """A party's valid ids as hashes, in input order, and the rows it quarantined.

    Attributes
    ----------
    hashes
        ``u(id)`` per valid row, shape ``(n, 32)``.
    rows
        The input row number of each hash.
    quarantine
        The rows left out, each with its reason.
    """

    hashes: Values
    rows: npt.NDArray[np.int64]
    quarantine: tuple[Quarantined, ...]

    def __len__(self) -> int:
        return len(self.rows)


def prepare_ids(ids: Iterable[str], salt: bytes, *, party: str, batch_size: int = DEFAULT_BATCH) -> PreparedIds:
    """Normalize and hash ``ids`` (one per row), ``batch_size`` at a time.

    Parameters
    ----------
    ids
        The party's ids in row order; read once, lazily.
    salt
        The alignment salt.
    party
        The party's name, for error messages.
    batch_size
        Rows read per batch, default ``DEFAULT_BATCH``.

    Raises
    ------
    DuplicateIdError
        If two rows normalize to the same id (the message names the rows, not the id).
    """
    chunks: list[bytes] = []
    rows: list[npt.NDArray[np.int64]] = []
    quarantine: list[Quarantined] = []
    source = iter(ids)
    start = 0
    while batch := list(itertools.islice(source, batch_size)):
        hashed = bytearray()
        kept: list[int] = []
        for offset, raw in enumerate(batch):
            try:
                hashed += hash_to_u(salt, normalize(raw))
            except InvalidResidentId as err:
                quarantine.append(Quarantined(row=start + offset, reason=str(err)))
            else:
                kept.append(start + offset)
        chunks.append(bytes(hashed))
        rows.append(np.asarray(kept, dtype=np.int64))
        start += len(batch)
    hashes = np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(-1, VALUE_BYTES).copy()
    prepared = PreparedIds(hashes, np.concatenate(rows) if rows else np.empty(0, np.int64), tuple(quarantine))
    _refuse_duplicates(prepared, party)
    return prepared


def _refuse_duplicates(prepared: PreparedIds, party: str) -> None:
    # Equal hashes are equal normalized ids (SHA-256 collisions aside), so one sort finds them all.
    order = sort_order(prepared.hashes)
    ordered = prepared.hashes.view(f"S{VALUE_BYTES}").ravel()[order]
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(repeated) == 0:
        return
    pairs = [
        f"rows {prepared.rows[order[i]]} and {prepared.rows[order[i + 1]]}"
        for i in repeated[:_SHOWN]  # the rows, not the id: error messages travel further than the data
    ]
    more = f" and {len(repeated) - _SHOWN} more" if len(repeated) > _SHOWN else ""
    raise DuplicateIdError(
        f"{party}: {len(repeated)} duplicate resident ids after normalization ({'; '.join(pairs)}{more}); "
        "each household must appear once"
    )
