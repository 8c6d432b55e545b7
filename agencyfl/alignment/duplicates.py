"""Duplicate check (重复保): which of an owner's households are also on a conflicting roster.

Two rosters conflict when they serve the same programme, or a listed pair of mutually exclusive
programmes. Each conflicting pair runs the symmetric two-party DH-PSI with keys fresh for the pair:
each owner sends its singly blinded set sorted by value, the other returns it doubly blinded in the
same order, and each owner compares its own doubly blinded set with the other's. Each learns which
of its own ids are on the other roster, and the other roster's size. The output is a review list per
owner, never a removal (``docs/alignment.md``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from agencyfl.alignment.errors import AlignmentError, ProtocolError
from agencyfl.alignment.inputs import PreparedIds, Quarantined
from agencyfl.alignment.party import Party
from agencyfl.alignment.psi import DEFAULT_BATCH, Blinder, Values, generate_key, match, sort_order
from agencyfl.alignment.records import AlignmentRecord
from agencyfl.alignment.relay import Relay, Transport, receive_values, send_values
from agencyfl.alignment.sealed import PartyKeys, PartyPublicKeys


def conflicting_pairs(
    programmes: Mapping[str, str], exclusive: Iterable[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """The roster pairs to check: same programme, or programmes listed as mutually exclusive.

    Parameters
    ----------
    programmes
        Each roster's programme, by roster name.
    exclusive
        Pairs of programmes a household may not be enrolled in together, default none.

    Raises
    ------
    AlignmentError
        If an exclusive pair names a programme no roster serves (a typo would silently check nothing).
    """
    known = set(programmes.values())
    pairs = {frozenset(p) for p in exclusive}
    for pair in pairs:
        unknown = sorted(pair - known)
        if unknown:
            raise AlignmentError(f"exclusive programme pair names {unknown[0]!r}, which no roster serves")
    names = sorted(programmes)
    return [
        (x, y)
        for i, x in enumerate(names)
        for y in names[i + 1 :]
        if programmes[x] == programmes[y] or frozenset((programmes[x], programmes[y])) in pairs
    ]


def duplicate_check_multiplications(sizes: Mapping[str, int], pairs: Iterable[tuple[str, str]]) -> int:
    """Scalar multiplications of a duplicate check: ``2 (|X| + |Y|)`` per conflicting pair."""
    return sum(2 * (sizes[x] + sizes[y]) for x, y in pairs)


class ReviewItem(BaseModel):
    """One of an owner's own rows that is also on another roster: for a caseworker to review."""

    model_config = ConfigDict(frozen=True)

    row: int
    """The row in the owner's own roster input."""
    other_roster: str
    other_programme: str


@dataclass
class _Pair:
    blinder: Blinder
    order: npt.NDArray[np.intp] = field(default_factory=lambda: np.empty(0, np.intp))
    theirs_doubled: Values | None = None


class RosterOwner(Party):
    """The owner of one roster, checking it against each conflicting roster in turn.

    Parameters
    ----------
    keys, directory, salt, run, workers, batch_size
        As for ``Party``; the roster's name is ``keys.name``.
    programme
        The programme the roster serves.
    """

    def __init__(
        self,
        keys: PartyKeys,
        directory: Mapping[str, PartyPublicKeys],
        *,
        programme: str,
        salt: bytes,
        run: str,
        workers: int | None = None,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        super().__init__(keys, directory, salt=salt, run=run, workers=workers, batch_size=batch_size)
        self.programme = programme
        self._ids: PreparedIds | None = None
        self._pairs: dict[str, _Pair] = {}
        self._review: list[ReviewItem] = []
        self._records: list[AlignmentRecord] = []
        self.multiplications = 0

    def load(self, ids: Iterable[str], peers: Sequence[str]) -> None:
        """Read the roster (after comparing parameters with every peer).

        Raises
        ------
        ParameterMismatchError
            If parameters were not compared with every peer first.
        DuplicateIdError
            If two members normalize to the same id.
        """
        self._require_checked(peers)
        self._ids = self._prepare(ids)

    def _own(self) -> PreparedIds:
        if self._ids is None:
            raise ProtocolError(f"{self.keys.name}: load() the roster first")
        return self._ids

    def start(self, transport: Transport, peer: str) -> None:
        """Draw a key for this pair and send the roster, singly blinded, sorted by value, to ``peer``."""
        self._require_checked([peer])
        pair = _Pair(Blinder(generate_key(), workers=self.workers, batch_size=self.batch_size))
        self._pairs[peer] = pair
        blinded = pair.blinder.blind(self._own().hashes)
        pair.order = sort_order(blinded)  # a random order to the peer: a match's index says nothing of our rows
        send_values(
            transport,
            blinded[pair.order],
            run=self.run,
            sender=self.keys,
            recipient=self._peer(peer),
            kind="roster",
            batch_size=self.batch_size,
        )

    def answer(self, transport: Transport, peer: str) -> None:
        """Blind ``peer``'s roster again and return it in its order (keeping it to match against)."""
        pair = self._pairs[peer]
        theirs = receive_values(transport, run=self.run, recipient=self.keys, sender=self._peer(peer), kind="roster")
        pair.theirs_doubled = self._blind_received(pair.blinder, theirs, peer, "roster")
        send_values(
            transport,
            pair.theirs_doubled,
            run=self.run,
            sender=self.keys,
            recipient=self._peer(peer),
            kind="roster-response",
            batch_size=self.batch_size,
        )

    def finish(self, transport: Transport, peer: str, peer_programme: str) -> tuple[ReviewItem, ...]:
        """Match the own roster, doubly blinded by ``peer``, against ``peer``'s; returns the new review items.

        Raises
        ------
        ProtocolError
            If ``peer`` answered a different number of values than were sent, or its set repeats a value.
        """
        pair = self._pairs.pop(peer)
        own = self._own()
        try:
            mine = receive_values(
                transport, run=self.run, recipient=self.keys, sender=self._peer(peer), kind="roster-response"
            )
            if len(mine) != len(own) or pair.theirs_doubled is None:
                raise ProtocolError(f"{peer} answered {len(mine)} values for {len(own)} sent")
            hits = np.flatnonzero(match(mine, pair.theirs_doubled) >= 0)
        finally:
            self.multiplications += pair.blinder.multiplications
            pair.blinder.close()
        rows = np.sort(own.rows[pair.order[hits]])
        items = tuple(ReviewItem(row=int(r), other_roster=peer, other_programme=peer_programme) for r in rows)
        self._review.extend(items)
        self._records.append(
            AlignmentRecord(
                party=self.keys.name,
                purpose="duplicate-check",
                counterpart=peer,
                own_rows=len(own),
                counterpart_rows=len(pair.theirs_doubled),
                matched=len(items),
                quarantined=len(own.quarantine),
            )
        )
        return items

    def close(self) -> None:
        """Stop any pair's blinding workers."""
        for pair in self._pairs.values():
            pair.blinder.close()

    @property
    def review(self) -> tuple[ReviewItem, ...]:
        """The owner's own rows found on conflicting rosters, by row."""
        return tuple(sorted(self._review, key=lambda item: (item.row, item.other_roster)))

    @property
    def quarantine(self) -> tuple[Quarantined, ...]:
        """The roster's own invalid entries, with reasons."""
        return self._own().quarantine

    @property
    def records(self) -> tuple[AlignmentRecord, ...]:
        """The counts for the owner's ledger entries, one per checked pair."""
        return tuple(self._records)


@dataclass(frozen=True)
class DuplicateCheck:
    """The outcome of ``check_duplicates``: each owner's review list, its quarantine, and the counts."""

    pairs: tuple[tuple[str, str], ...]
    review: dict[str, tuple[ReviewItem, ...]]
    quarantine: dict[str, tuple[Quarantined, ...]]
    records: tuple[AlignmentRecord, ...]
    multiplications: int
    bytes_sent: int


def check_duplicates(
    roster_ids: Mapping[str, Iterable[str]],
    programmes: Mapping[str, str],
    *,
    salt: bytes,
    exclusive: Iterable[tuple[str, str]] = (),
    transport: Relay | None = None,
    run: str | None = None,
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> DuplicateCheck:
    """Run the duplicate check with every roster owner in this process, through one relay.

    Parameters
    ----------
    roster_ids
        Each roster's member ids, by roster name.
    programmes
        Each roster's programme, by roster name.
    salt
        The alignment salt.
    exclusive
        Pairs of mutually exclusive programmes, default none (then only same-programme rosters conflict).
    transport
        The relay, default a fresh ``Relay()``.
    run
        The run id, default 16 random bytes in hex.
    workers, batch_size
        As for ``Party``.

    Raises
    ------
    AlignmentError
        If a roster has no programme, or an exclusive pair names an unknown programme.
    ParameterMismatchError, DuplicateIdError, ProtocolError, MessageRejectedError
        As the steps do.
    """
    missing = sorted(set(roster_ids) - set(programmes))
    if missing:
        raise AlignmentError(f"no programme given for roster {missing[0]!r}")
    relay = transport if transport is not None else Relay()
    run = run or secrets.token_hex(16)
    pairs = conflicting_pairs({name: programmes[name] for name in roster_ids}, exclusive)
    peers: dict[str, list[str]] = {name: [] for name in roster_ids}
    for x, y in pairs:
        peers[x].append(y)
        peers[y].append(x)
    keys = {name: PartyKeys.generate(name) for name in roster_ids}
    directory = {name: k.public() for name, k in keys.items()}
    owners = {
        name: RosterOwner(
            keys[name],
            directory,
            programme=programmes[name],
            salt=salt,
            run=run,
            workers=workers,
            batch_size=batch_size,
        )
        for name in roster_ids
    }
    try:
        for name, owner in owners.items():
            owner.send_parameters(relay, peers[name])
        for name, owner in owners.items():
            owner.check_parameters(relay, peers[name])
        for name, owner in owners.items():
            if peers[name]:
                owner.load(roster_ids[name], peers[name])
        for x, y in pairs:
            owners[x].start(relay, y)
            owners[y].start(relay, x)
            owners[x].answer(relay, y)
            owners[y].answer(relay, x)
            owners[x].finish(relay, y, programmes[y])
            owners[y].finish(relay, x, programmes[x])
    finally:
        for owner in owners.values():
            owner.close()
    return DuplicateCheck(
        pairs=tuple(pairs),
        review={name: owner.review for name, owner in owners.items()},
        quarantine={name: owner.quarantine if peers[name] else () for name, owner in owners.items()},
        records=tuple(r for owner in owners.values() for r in owner.records),
        multiplications=sum(owner.multiplications for owner in owners.values()),
        bytes_sent=relay.bytes_sent(),
    )
