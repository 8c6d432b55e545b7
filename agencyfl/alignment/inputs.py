"""One party's ids, read in batches: normalized, quarantined, hashed, checked for duplicates.

Validate first, then commit: a party's ids are all read and checked before any blinded value is sent,
and nothing leaves the party until its input is known to be good. Only 32 bytes per id are kept.
This process computes the SHA-256 digest of each id (about 0.4 us); mapping it into the group (about
25 us, ``psi.to_curve``) runs in the blinding workers when the party blinds its ids (``prepare_and_blind``),
and in ``prepare_ids``'s pool if it is given one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from agencyfl.alignment.errors import DuplicateIdError
from agencyfl.alignment.psi import (
    DEFAULT_BATCH,
    VALUE_BYTES,
    Blinder,
    Values,
    as_values,
    digest_id,
    sort_order,
    to_curve,
)
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


def _batches(ids: Iterable[str], salt: bytes, batch_size: int) -> Iterator[tuple[bytes, list[int], list[Quarantined]]]:
    source = iter(ids)
    start = 0
    while batch := list(itertools.islice(source, batch_size)):
        hashed = bytearray()
        kept: list[int] = []
        quarantine: list[Quarantined] = []
        for offset, raw in enumerate(batch):
            try:
                hashed += digest_id(salt, normalize(raw))
            except InvalidResidentId as err:
                quarantine.append(Quarantined(row=start + offset, reason=str(err)))
            else:
                kept.append(start + offset)
        yield bytes(hashed), kept, quarantine
        start += len(batch)


class _Collector:
    """Keeps the rows and quarantine of what ``_batches`` yields while passing the digests on."""

    def __init__(self, ids: Iterable[str], salt: bytes, batch_size: int) -> None:
        self._source = _batches(ids, salt, batch_size)
        self._rows: list[int] = []
        self._quarantine: list[Quarantined] = []

    def __iter__(self) -> Iterator[Values]:
        for hashed, kept, quarantine in self._source:
            self._rows.extend(kept)
            self._quarantine.extend(quarantine)
            yield as_values(hashed)

    def result(self, points: Values, party: str) -> PreparedIds:
        prepared = PreparedIds(points, np.asarray(self._rows, dtype=np.int64), tuple(self._quarantine))
        _refuse_duplicates(prepared, party)
        return prepared


def prepare_ids(
    ids: Iterable[str], salt: bytes, *, party: str, batch_size: int = DEFAULT_BATCH, pool: Blinder | None = None
) -> PreparedIds:
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
    pool
        Workers that map the digests into the group (``Blinder.hash_batches``), overlapped with the
        reading; default none: this process does (about 25 us per id).

    Raises
    ------
    DuplicateIdError
        If two rows normalize to the same id (the message names the rows, not the id).
    """
    collector = _Collector(ids, salt, batch_size)
    if pool is None:
        points = as_values(b"".join(to_curve(digests.tobytes()) for digests in collector))
    else:
        points = pool.hash_batches(collector)
    return collector.result(points, party)


def prepare_and_blind(
    ids: Iterable[str], salt: bytes, blinder: Blinder, *, party: str, batch_size: int = DEFAULT_BATCH
) -> tuple[PreparedIds, Values]:
    """``prepare_ids`` and ``blinder.blind`` of the hashes, overlapped: batch k+1 is read while k is hashed
    into the group and blinded, both in ``blinder``'s workers.

    Nothing leaves the party here; the duplicate check runs on the complete input before the caller
    can send anything.

    Raises
    ------
    DuplicateIdError
        As ``prepare_ids``.
    """
    collector = _Collector(ids, salt, batch_size)
    points, blinded = blinder.hash_and_blind_batches(collector)
    return collector.result(points, party), blinded


def _refuse_duplicates(prepared: PreparedIds, party: str) -> None:
    # Equal points are equal normalized ids (collisions of SHA-256, or of the map into a group of order
    # about 2^252, aside: probability about n^2 / 2^250), so one sort finds them all.
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
