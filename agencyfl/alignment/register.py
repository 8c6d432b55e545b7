"""Register alignment: each agency learns the civil-affairs register position of each of its rows.

The register holder R blinds every register entry once with its run key ``r`` and sends the list, by
position, to each agency A; A sends its rows blinded with its fresh key ``a``; R blinds them again and
returns them in order; A blinds R's list and matches. R learns each agency's row count, A learns the
register size and the positions of its own households (``docs/alignment.md``).

``RegisterHolder`` and ``RegisterAgency`` are the two roles, one per party's process, step by step;
``align_register`` runs a whole alignment in one process (tests, benchmark).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from agencyfl.alignment.errors import EmptyIntersectionError, ProtocolError
from agencyfl.alignment.inputs import Quarantined, prepare_and_blind
from agencyfl.alignment.party import Party
from agencyfl.alignment.psi import DEFAULT_BATCH, Blinder, Values, generate_key, match
from agencyfl.alignment.records import AlignmentRecord, write_quarantine
from agencyfl.alignment.relay import Relay, Transport, receive_values, send_values
from agencyfl.alignment.sealed import PartyKeys, PartyPublicKeys

POSITIONS_FILE = "alignment-positions.csv"
QUARANTINE_FILE = "alignment-quarantine.csv"
SIZES_FILE = "alignment-sizes.json"


def register_multiplications(register_size: int, agency_rows: Iterable[int]) -> int:
    """Scalar multiplications of one register alignment: ``N (1 + K) + 2 sum(m)``.

    R blinds the register once (``N``); per agency, the agency blinds its ``m`` rows, R blinds them
    again, and the agency blinds R's list (``N``). Sealing adds three per envelope (not counted).
    """
    rows = list(agency_rows)
    return register_size * (1 + len(rows)) + 2 * sum(rows)


class RegisterView(BaseModel):
    """All the register holder learns from an alignment: sizes."""

    model_config = ConfigDict(frozen=True)

    holder: str
    """The register holder's name."""
    register_size: int
    """Valid register entries (positions ``0 .. register_size - 1``)."""
    quarantined: int
    query_sizes: dict[str, int]
    """Each agency's number of valid rows, as its query showed."""


@dataclass(frozen=True)
class AgencyAlignment:
    """One agency's result: for each of its valid rows, the register position or -1.

    Attributes
    ----------
    agency, register
        The agency's and the register holder's names.
    register_size
        N, as the register list showed.
    rows
        The agency's input row number of each valid row.
    positions
        The register position of each of those rows, -1 if the household is not registered.
    quarantine
        The agency's own rows left out, with reasons.
    """

    agency: str
    register: str
    register_size: int
    rows: npt.NDArray[np.int64]
    positions: npt.NDArray[np.int64]
    quarantine: tuple[Quarantined, ...]

    @property
    def matched(self) -> int:
        """Rows with a register position."""
        return int(np.count_nonzero(self.positions >= 0))

    def record(self) -> AlignmentRecord:
        """The counts for the agency's ledger entry."""
        return AlignmentRecord(
            party=self.agency,
            purpose="register-alignment",
            counterpart=self.register,
            own_rows=len(self.rows),
            counterpart_rows=self.register_size,
            matched=self.matched,
            quarantined=len(self.quarantine),
        )

    def write(self, workdir: Path) -> Path:
        """Write ``row,position`` for every matched row (pseudonymous positions, no id) and the quarantine.

        Returns the positions file (``alignment-positions.csv``); ``alignment-quarantine.csv`` lies beside it.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        hit = self.positions >= 0
        path = workdir / POSITIONS_FILE
        table = np.column_stack([self.rows[hit], self.positions[hit]])
        np.savetxt(path, table, fmt="%d", delimiter=",", header="row,position", comments="")
        write_quarantine(workdir / QUARANTINE_FILE, self.quarantine)
        return path


class _Blinding(Party):
    def __init__(
        self,
        keys: PartyKeys,
        directory: Mapping[str, PartyPublicKeys],
        *,
        salt: bytes,
        run: str,
        workers: int | None = None,
        batch_size: int = DEFAULT_BATCH,
        key: bytes | None = None,
    ) -> None:
        super().__init__(keys, directory, salt=salt, run=run, workers=workers, batch_size=batch_size)
        # a fresh blinding key per party and run unless a test fixes one to recompute blinded values
        self._key = key or generate_key()
        self._blinder = Blinder(self._key, workers=workers, batch_size=batch_size)

    def close(self) -> None:
        """Stop the blinding workers."""
        self._blinder.close()

    @property
    def multiplications(self) -> int:
        """Scalar multiplications this party has done."""
        return self._blinder.multiplications


class HolderState(BaseModel):
    """What R carries from one deployment step to the next (the SuperNode's memory, never a file)."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    key: bytes
    checked: list[str]
    register_size: int
    quarantine: list[Quarantined]
    query_sizes: dict[str, int]


class AgencyState(BaseModel):
    """What an agency carries from one deployment step to the next (the SuperNode's memory, never a file)."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    key: bytes
    checked: list[str]
    rows: bytes  # int64 row numbers of its valid rows, in order
    quarantine: list[Quarantined]


class RegisterHolder(_Blinding):
    """Civil affairs: holds the register and one blinding key ``r`` for the run (all agencies).

    Parameters
    ----------
    keys
        Its sealing and signing keys.
    directory
        The public keys of every party it talks to, by name.
    salt
        The alignment salt.
    run
        The run id every envelope carries.
    workers
        Blinding processes, default ``os.cpu_count()``.
    batch_size
        Ids per batch, per task and per envelope, default ``DEFAULT_BATCH``.
    key
        A fixed blinding key (tests that recompute blinded values); default a fresh one, as every run needs.
    """

    def __init__(
        self,
        keys: PartyKeys,
        directory: Mapping[str, PartyPublicKeys],
        *,
        salt: bytes,
        run: str,
        workers: int | None = None,
        batch_size: int = DEFAULT_BATCH,
        key: bytes | None = None,
    ) -> None:
        super().__init__(keys, directory, salt=salt, run=run, workers=workers, batch_size=batch_size, key=key)
        self._register_size = 0
        self._quarantine: tuple[Quarantined, ...] = ()
        self._query_sizes: dict[str, int] = {}

    def send_register(self, transport: Transport, register_ids: Iterable[str], agencies: Sequence[str]) -> None:
        """Read the register, blind it once, and send the list (by position) to each agency.

        Raises
        ------
        ParameterMismatchError
            If parameters were not compared with every agency first.
        DuplicateIdError
            If two register entries normalize to the same id (nothing is sent).
        """
        self._require_checked(agencies)
        register, blinded = prepare_and_blind(
            register_ids, self._salt, self._blinder, party=self.keys.name, batch_size=self.batch_size
        )
        self._register_size, self._quarantine = len(register), register.quarantine
        del register  # the hashes are not needed again: memory stays at one list of 32-byte values
        for agency in agencies:
            send_values(
                transport,
                blinded,
                run=self.run,
                sender=self.keys,
                recipient=self._peer(agency),
                kind="register",
                batch_size=self.batch_size,
            )

    def answer(self, transport: Transport, agency: str, *, max_rows: int | None = None) -> int:
        """Blind an agency's query again and return it in order; returns its size ``m``.

        Parameters
        ----------
        max_rows
            Refuse a query longer than this (e.g. the agency's declared row count): each row is one
            membership test against the register. Default no cap.

        Raises
        ------
        ProtocolError
            If the query exceeds ``max_rows``, or holds a value of small order.
        """
        self._require_checked([agency])
        query = receive_values(
            transport, run=self.run, recipient=self.keys, sender=self._peer(agency), kind="query", max_rows=max_rows
        )
        send_values(
            transport,
            self._blind_received(self._blinder, query, agency, "query"),
            run=self.run,
            sender=self.keys,
            recipient=self._peer(agency),
            kind="response",
            batch_size=self.batch_size,
        )
        self._query_sizes[agency] = len(query)
        return len(query)

    @property
    def quarantine(self) -> tuple[Quarantined, ...]:
        """The register's own invalid entries, with reasons."""
        return self._quarantine

    def suspend(self) -> HolderState:
        """This party's state between two steps of a deployment (``clients.alignment_steps``)."""
        return HolderState(key=self._key, checked=sorted(self._checked), register_size=self._register_size,
                           quarantine=list(self._quarantine), query_sizes=dict(self._query_sizes))  # fmt: skip

    def resume(self, state: HolderState) -> None:
        """Continue from ``suspend``'s state (in a new process, with the same run keys and blinding key)."""
        if state.key != self._key:
            raise ProtocolError(f"{self.keys.name}: resumed with another blinding key than the run's")
        self._checked = set(state.checked)
        self._register_size, self._quarantine = state.register_size, tuple(state.quarantine)
        self._query_sizes = dict(state.query_sizes)

    def view(self) -> RegisterView:
        """What R learned: sizes only."""
        return RegisterView(
            holder=self.keys.name,
            register_size=self._register_size,
            quarantined=len(self.quarantine),
            query_sizes=dict(self._query_sizes),
        )

    def records(self) -> list[AlignmentRecord]:
        """The counts for R's ledger entries, one per agency (R does not learn matches)."""
        view = self.view()
        return [
            AlignmentRecord(
                party=view.holder,
                purpose="register-alignment",
                counterpart=agency,
                own_rows=view.register_size,
                counterpart_rows=m,
                quarantined=view.quarantined,
            )
            for agency, m in view.query_sizes.items()
        ]

    def write(self, workdir: Path) -> Path:
        """Write the sizes (``alignment-sizes.json``) and the register's quarantine; returns the sizes file."""
        workdir.mkdir(parents=True, exist_ok=True)
        write_quarantine(workdir / QUARANTINE_FILE, self.quarantine)
        path = workdir / SIZES_FILE
        path.write_text(json.dumps(self.view().model_dump(), indent=2))
        return path


class RegisterAgency(_Blinding):
    """An agency aligning its rows to the register, with a blinding key ``a`` fresh per run.

    Parameters are those of ``RegisterHolder``, and ``register``: the register holder's name.
    """

    def __init__(
        self,
        keys: PartyKeys,
        directory: Mapping[str, PartyPublicKeys],
        *,
        register: str,
        salt: bytes,
        run: str,
        workers: int | None = None,
        batch_size: int = DEFAULT_BATCH,
        key: bytes | None = None,
    ) -> None:
        super().__init__(keys, directory, salt=salt, run=run, workers=workers, batch_size=batch_size, key=key)
        self.register = register
        self._rows: npt.NDArray[np.int64] | None = None
        self._quarantine: tuple[Quarantined, ...] = ()

    def send_rows(self, transport: Transport, ids: Iterable[str]) -> None:
        """Read its rows, blind them, and send them to the register holder in row order.

        Raises
        ------
        ParameterMismatchError
            If parameters were not compared with the register holder first.
        DuplicateIdError
            If two rows normalize to the same id (nothing is sent).
        """
        self._require_checked([self.register])
        prepared, blinded = prepare_and_blind(
            ids, self._salt, self._blinder, party=self.keys.name, batch_size=self.batch_size
        )
        self._rows, self._quarantine = prepared.rows, prepared.quarantine
        del prepared  # keep only row numbers: the hashes are not needed again
        send_values(
            transport,
            blinded,
            run=self.run,
            sender=self.keys,
            recipient=self._peer(self.register),
            kind="query",
            batch_size=self.batch_size,
        )

    def suspend(self) -> AgencyState:
        """This party's state between two steps of a deployment (``clients.alignment_steps``)."""
        rows = b"" if self._rows is None else self._rows.astype(np.int64).tobytes()
        return AgencyState(key=self._key, checked=sorted(self._checked), rows=rows, quarantine=list(self._quarantine))

    def resume(self, state: AgencyState) -> None:
        """Continue from ``suspend``'s state (in a new process, with the same run keys and blinding key)."""
        if state.key != self._key:
            raise ProtocolError(f"{self.keys.name}: resumed with another blinding key than the run's")
        self._checked = set(state.checked)
        self._rows = np.frombuffer(state.rows, dtype=np.int64).copy()
        self._quarantine = tuple(state.quarantine)

    def finish(self, transport: Transport) -> AgencyAlignment:
        """Blind the register list, match its doubly blinded rows, and return row -> position.

        Raises
        ------
        ProtocolError
            If the response is not one value per row, or the register list repeats a value.
        EmptyIntersectionError
            If no row is in the register.
        """
        if self._rows is None:
            raise ProtocolError(f"{self.keys.name}: finish() before send_rows()")
        holder = self._peer(self.register)
        register_list = receive_values(transport, run=self.run, recipient=self.keys, sender=holder, kind="register")
        response = receive_values(transport, run=self.run, recipient=self.keys, sender=holder, kind="response")
        if len(response) != len(self._rows):
            raise ProtocolError(f"{self.register} answered {len(response)} values for {len(self._rows)} rows")
        doubled: Values = self._blind_received(self._blinder, register_list, self.register, "register list")
        del register_list
        try:
            positions = match(response, doubled)
        except ProtocolError as err:
            raise ProtocolError(f"the register list from {self.register}: {err}") from err
        result = AgencyAlignment(
            agency=self.keys.name,
            register=self.register,
            register_size=len(doubled),
            rows=self._rows,
            positions=positions,
            quarantine=self._quarantine,
        )
        if result.matched == 0:
            raise EmptyIntersectionError(
                f"none of {self.keys.name}'s {len(self._rows)} rows is in {self.register}'s register "
                f"of {len(doubled)}: check both inputs and that both use this federation's salt"
            )
        return result


@dataclass(frozen=True)
class RegisterAlignment:
    """The outcome of ``align_register``: R's view, each agency's result, and the relay's traffic."""

    view: RegisterView
    agencies: dict[str, AgencyAlignment]
    records: tuple[AlignmentRecord, ...]
    multiplications: int
    bytes_sent: int
    holder_quarantine: tuple[Quarantined, ...] = ()  # the register's own invalid entries, for R's folder


def align_register(
    register_ids: Iterable[str],
    agency_ids: Mapping[str, Iterable[str]],
    *,
    salt: bytes,
    register: str = "civil-affairs",
    transport: Relay | None = None,
    run: str | None = None,
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    max_rows: Mapping[str, int] | None = None,
    blinding_keys: Mapping[str, bytes] | None = None,
) -> RegisterAlignment:
    """Run a register alignment with every party in this process, through one relay.

    Parameters
    ----------
    register_ids
        The register, in register order.
    agency_ids
        Each agency's ids, in its row order.
    salt
        The alignment salt (every party's; ``RegisterHolder`` and ``RegisterAgency`` take their own).
    register
        The register holder's name, default ``"civil-affairs"``.
    transport
        The relay, default a fresh ``Relay()``.
    run
        The run id, default 16 random bytes in hex.
    workers, batch_size
        As for ``RegisterHolder``.
    max_rows
        A cap per agency on its query length (``RegisterHolder.answer``), default none.
    blinding_keys
        Fixed blinding keys by party name, for tests that recompute blinded values; by default every
        party draws a fresh key, as every real run must.

    Raises
    ------
    ParameterMismatchError, DuplicateIdError, EmptyIntersectionError, ProtocolError, MessageRejectedError
        As the steps do.
    """
    relay = transport if transport is not None else Relay()
    run = run or secrets.token_hex(16)
    keys = {name: PartyKeys.generate(name) for name in [register, *agency_ids]}
    directory = {name: k.public() for name, k in keys.items()}
    fixed = blinding_keys or {}
    names = list(agency_ids)
    holder = RegisterHolder(
        keys[register], directory, salt=salt, run=run, workers=workers, batch_size=batch_size, key=fixed.get(register)
    )
    agencies = {
        name: RegisterAgency(
            keys[name],
            directory,
            register=register,
            salt=salt,
            run=run,
            workers=workers,
            batch_size=batch_size,
            key=fixed.get(name),
        )
        for name in names
    }
    try:
        holder.send_parameters(relay, names)
        for agency in agencies.values():
            agency.send_parameters(relay, [register])
        holder.check_parameters(relay, names)
        for agency in agencies.values():
            agency.check_parameters(relay, [register])
        holder.send_register(relay, register_ids, names)
        for name, agency in agencies.items():
            agency.send_rows(relay, agency_ids[name])
            holder.answer(relay, name, max_rows=(max_rows or {}).get(name))
        results = {name: agency.finish(relay) for name, agency in agencies.items()}
    finally:
        holder.close()
        for agency in agencies.values():
            agency.close()
    return RegisterAlignment(
        view=holder.view(),
        agencies=results,
        records=(*holder.records(), *(r.record() for r in results.values())),
        multiplications=holder.multiplications + sum(a.multiplications for a in agencies.values()),
        bytes_sent=relay.bytes_sent(),
        holder_quarantine=holder.quarantine,
    )
