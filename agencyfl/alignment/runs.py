"""Alignment and the duplicate check run from a spec: inputs read from each party's file, outputs kept
in each party's own folder for the spec's retention, and every run a signed entry of the coordinator.

With every party on one machine (``agencyfl align``, ``agencyfl screen duplicates``) the parties
still run the protocol of ``docs/alignment.md`` through the relay, each with its own keys; what a
party keeps goes only into its own folder, ``WORKDIR/<party>/alignment/``:

- an agency: ``alignment-positions.csv`` (``row,position``: its own row numbers and register
  positions, no id of anyone), ``alignment-quarantine.csv`` (its own rows left out, with reasons);
- civil affairs: ``alignment-sizes.json`` (sizes only) and its quarantine;
- a roster owner: ``duplicates-review.csv`` (its own rows also on a conflicting roster, and which
  roster: for a caseworker to review, never a removal) and its quarantine.

Each folder holds ``retention.json`` (run, created, expires); ``purge_expired`` deletes what has
expired. Blinding keys live only in the memory of the run that drew them and are never written, so
nothing of them outlives the run. The coordinator's record of runs is a signed hash chain of its own
(``WORKDIR/coordinator/runs-ledger``, the coordinator's ledger key): who asked, for what purpose,
the parameters' hash and each party's counts; never an id or a blinded value.
"""

from __future__ import annotations

import csv
import json
import secrets
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from agencyfl.alignment.duplicates import DuplicateCheck, check_duplicates
from agencyfl.alignment.records import AlignmentRecord, write_quarantine
from agencyfl.alignment.register import RegisterAlignment, align_register
from agencyfl.federation.errors import DataFileError, SpecError
from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
from agencyfl.privacy.keys import load_or_create_signing_key
from agencyfl.privacy.ledger import Ledger

RETENTION_FILE = "retention.json"
REVIEW_FILE = "duplicates-review.csv"
RUNS_LEDGER = Path("coordinator") / "runs-ledger"
COORDINATOR_KEY = Path("coordinator") / "keys" / "ledger-signing.key"


class ProtocolRun(BaseModel):
    """The coordinator's signed record of one alignment or duplicate-check run (counts, never ids)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["register-alignment", "duplicate-check"]
    federation: str
    run: str
    requested_by: str
    purpose: str
    parameters_sha256: str  # the spec's alignment parameters (``alignment_sha256``)
    parties: list[str]
    counts: list[AlignmentRecord]
    bytes_relayed: int  # sealed envelopes through the coordinator's relay
    time: str
    expires: str  # the outputs' retention ends

    @property
    def party(self) -> str:
        """Whose chain this event belongs in: the coordinator's."""
        return "coordinator"


def load_vertical(spec_path: Path) -> LoadedVerticalSpec:
    """The vertical spec at ``spec_path``; a horizontal one is refused (SpecError, exit 3)."""
    loaded = load_any_spec(spec_path)
    if not isinstance(loaded, LoadedVerticalSpec):
        raise SpecError(
            f'{str(spec_path)!r} is a horizontal spec: alignment needs topology = "vertical" and an [alignment] section'
        )
    return loaded


def read_ids(path: Path, column: str) -> Iterator[str]:
    """The ``column`` of a CSV file, row by row (streamed: memory stays bounded for millions of rows).

    Raises
    ------
    DataFileError
        If the file is missing or has no such column.
    """
    try:
        fh = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise DataFileError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or column not in header:
            raise DataFileError(f"{str(path)!r} has no column {column!r} (the spec's [alignment] id_column)")
        index = header.index(column)
        for row in reader:
            yield row[index] if index < len(row) else ""


def _retention(folder: Path, run: str, now: datetime, days: int) -> str:
    expires = (now + timedelta(days=days)).isoformat(timespec="seconds")
    folder.mkdir(parents=True, exist_ok=True)
    record = {"run": run, "created": now.isoformat(timespec="seconds"), "expires": expires}
    (folder / RETENTION_FILE).write_text(json.dumps(record, indent=2))
    return expires


def _record(workdir: Path, event: ProtocolRun) -> None:
    key = load_or_create_signing_key(workdir / COORDINATOR_KEY)
    Ledger(workdir / RUNS_LEDGER, key, ProtocolRun, party="coordinator").append(event)


def runs(workdir: Path) -> list[ProtocolRun]:
    """Every run the coordinator recorded under ``workdir``, verified (LedgerError if the chain does not)."""
    if not (workdir / RUNS_LEDGER).exists():
        return []
    key = load_or_create_signing_key(workdir / COORDINATOR_KEY)
    return Ledger(workdir / RUNS_LEDGER, key, ProtocolRun, party="coordinator").events()


def align_from_spec(
    loaded: LoadedVerticalSpec, workdir: Path, *, requested_by: str = "coordinator", workers: int | None = None
) -> tuple[RegisterAlignment, ProtocolRun]:
    """Align every agency of a vertical spec to the label agency's register; keep each party's output.

    Raises
    ------
    DataFileError, AlignmentError
        For an unreadable file, duplicate ids within a file, an empty intersection, mismatched
        parameters (nothing is written for a run that fails).
    """
    spec = loaded.spec
    column, register = spec.alignment.id_column, spec.label_agency.name
    others = [a.name for a in spec.agencies if a.name != register]
    run = f"align-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
    result = align_register(
        read_ids(loaded.data_path(register), column),
        {name: read_ids(loaded.data_path(name), column) for name in others},
        salt=bytes.fromhex(spec.alignment.salt),
        register=register,
        run=run,
        workers=workers,
        batch_size=spec.alignment.batch_size,
    )
    now = datetime.now(UTC)
    expires = ""
    for name, alignment in result.agencies.items():
        folder = workdir / name / "alignment"
        alignment.write(folder)
        expires = _retention(folder, run, now, spec.alignment.retention_days)
    holder = workdir / register / "alignment"
    holder.mkdir(parents=True, exist_ok=True)
    write_quarantine(holder / "alignment-quarantine.csv", result.holder_quarantine)
    (holder / "alignment-sizes.json").write_text(json.dumps(result.view.model_dump(), indent=2))
    expires = _retention(holder, run, now, spec.alignment.retention_days)
    event = ProtocolRun(
        kind="register-alignment", federation=spec.federation.name, run=run, requested_by=requested_by,
        purpose=spec.federation.purpose, parameters_sha256=spec.alignment_sha256(), parties=[register, *others],
        counts=list(result.records), bytes_relayed=result.bytes_sent, time=now.isoformat(timespec="seconds"),
        expires=expires,
    )  # fmt: skip
    _record(workdir, event)
    return result, event


def duplicates_from_spec(
    loaded: LoadedVerticalSpec,
    rosters: dict[str, Path],
    out: Path,
    *,
    requested_by: str = "coordinator",
    purpose: str = "duplicate-coverage-review",
    workers: int | None = None,
) -> tuple[DuplicateCheck, ProtocolRun]:
    """The duplicate check over ``rosters`` (roster name -> file), each owner's review list in its folder.

    Raises
    ------
    SpecError
        If a roster is not in the spec, or fewer than two rosters are given.
    DataFileError, AlignmentError
        As ``align_from_spec``.
    """
    spec = loaded.spec
    if len(rosters) < 2:
        raise SpecError("the duplicate check needs at least two rosters (--roster NAME=FILE, repeated)")
    sections = {name: spec.roster(name) for name in rosters}
    run = f"dups-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
    result = check_duplicates(
        {name: read_ids(path, sections[name].id_column) for name, path in rosters.items()},
        {name: section.programme for name, section in sections.items()},
        salt=bytes.fromhex(spec.alignment.salt),
        exclusive=list(spec.duplicates.exclusive) if spec.duplicates else [],
        run=run,
        workers=workers,
        batch_size=spec.alignment.batch_size,
    )
    now = datetime.now(UTC)
    expires = ""
    for name, section in sections.items():
        folder = out / section.owner / "alignment" / name
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / REVIEW_FILE).open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["row", "other_roster", "other_programme", "action"])
            writer.writerows((i.row, i.other_roster, i.other_programme, "review") for i in result.review[name])
        write_quarantine(folder / "alignment-quarantine.csv", result.quarantine[name])
        expires = _retention(folder, run, now, spec.alignment.retention_days)
    event = ProtocolRun(
        kind="duplicate-check", federation=spec.federation.name, run=run, requested_by=requested_by, purpose=purpose,
        parameters_sha256=spec.alignment_sha256(), parties=[sections[n].owner for n in rosters],
        counts=list(result.records), bytes_relayed=result.bytes_sent, time=now.isoformat(timespec="seconds"),
        expires=expires,
    )  # fmt: skip
    _record(out, event)
    return result, event


def purge_expired(workdir: Path, *, everything: bool = False, now: datetime | None = None) -> list[Path]:
    """Delete alignment outputs whose retention has ended (all of them with ``everything``); returns them."""
    moment = now or datetime.now(UTC)
    removed = []
    for marker in sorted(workdir.rglob(RETENTION_FILE)):
        folder = marker.parent
        if "alignment" not in folder.relative_to(workdir).parts:
            continue
        expires = datetime.fromisoformat(json.loads(marker.read_text())["expires"])
        if everything or expires <= moment:
            shutil.rmtree(folder)
            removed.append(folder)
    return removed
