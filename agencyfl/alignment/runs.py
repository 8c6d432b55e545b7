"""Alignment and the duplicate check run from a spec: inputs read from each party's file, outputs kept
in each party's own folder for the spec's retention, and every run a signed entry of the coordinator.

With every party on one machine (``agencyfl align``, ``agencyfl screen duplicates``) the parties
still run the protocol of ``docs/alignment.md`` through the relay, each with its own keys; what a
party keeps goes only into its own folder (created 0700, files 0600):

- an agency, ``WORKDIR/<agency>/alignment/``: ``alignment-positions.csv`` (``row,position``: its own
  row numbers and register positions, no id of anyone), ``alignment-quarantine.csv`` (its own rows
  left out, with reasons), ``alignment-record.json`` (its own counts);
- civil affairs, the same folder: ``alignment-sizes.json`` (sizes only), its quarantine and record;
- a roster owner, ``OUT/<owner>/duplicates/<roster>/``: ``duplicates-review.csv`` (its own rows also on
  a conflicting roster, and which roster: for a caseworker to review, never a removal), its
  quarantine and record.

Each folder holds ``retention.json`` (run, created, expires, the files it wrote); ``purge_expired``
deletes those files when the retention has ended. Blinding keys live only in the memory of the run
that drew them and are never written. The coordinator's record of runs is a signed hash chain of its
own (``WORKDIR/coordinator/runs-ledger``, the coordinator's ledger key) holding only what the relay
sees anyway: who asked, for what purpose, the parameters' hash, each party's input size and which
pairs talked; never an id, a blinded value, a match count or a quarantine count.

A run is all or nothing: the chain is verified before any id is read, outputs are written to staging
folders, and they replace the previous run's only after the chain has recorded the run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import secrets
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from agencyfl.alignment.duplicates import DuplicateCheck, check_duplicates, conflicting_pairs
from agencyfl.alignment.errors import ProtocolError
from agencyfl.alignment.inputs import Quarantined
from agencyfl.alignment.records import AlignmentRecord, write_quarantine
from agencyfl.alignment.register import (
    QUARANTINE_FILE,
    SIZES_FILE,
    AgencyAlignment,
    RegisterAlignment,
    RegisterView,
    align_register,
)
from agencyfl.federation.errors import AlignmentError, DataFileError, SpecError
from agencyfl.federation.fingerprint import file_fingerprint
from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec
from agencyfl.privacy.keys import load_or_create_signing_key
from agencyfl.privacy.ledger import Ledger

RETENTION_FILE = "retention.json"
RECORD_FILE = "alignment-record.json"
INPUT_FILE = "alignment-input.json"
REVIEW_FILE = "duplicates-review.csv"
RUNS_LEDGER = Path("coordinator") / "runs-ledger"
COORDINATOR_KEY = Path("coordinator") / "keys" / "ledger-signing.key"
_KEPT = {"alignment", "duplicates"}  # the folder names purge looks under


class ProtocolRun(BaseModel):
    """The coordinator's signed record of one alignment or duplicate-check run: what the relay saw.

    ``sizes`` is each party's number of valid input rows (the relay sees it from the envelopes);
    ``pairs`` who aligned with whom. Match and quarantine counts stay with each party.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["register-alignment", "duplicate-check"]
    federation: str
    run: str
    requested_by: str
    purpose: str
    parameters_sha256: str  # the spec's alignment parameters (``alignment_sha256``)
    parties: list[str]
    sizes: dict[str, int]
    pairs: list[tuple[str, str]]
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
            f"{str(spec_path)!r} is a horizontal spec: alignment needs topology = 'vertical' and [alignment]"
        )
    return loaded


def _header(path: Path, column: str) -> int:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
    except OSError as exc:
        raise DataFileError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataFileError(f"{str(path)!r} is not a UTF-8 CSV file: {exc}") from None
    if header is None or column not in header:
        raise DataFileError(f"{str(path)!r} has no column {column!r} (the spec's id column)")
    return header.index(column)


def read_ids(path: Path, column: str) -> Iterator[str]:
    """The ``column`` of a CSV file, row by row (streamed: memory stays bounded for millions of rows).

    The header is checked when called, before any row is read.

    Raises
    ------
    DataFileError
        If the file is missing, not UTF-8 CSV, or has no such column.
    """
    index = _header(path, column)

    def rows() -> Iterator[str]:
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                next(reader, None)
                for row in reader:
                    yield row[index] if index < len(row) else ""
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataFileError(f"{str(path)!r} line {reader.line_num}: not UTF-8 CSV ({exc})") from None

    return rows()


def runs_chain(workdir: Path, key_path: Path | None = None) -> Ledger[ProtocolRun]:
    """The runs chain, verified now (LedgerError if it does not): a run never starts on a broken record.

    ``key_path`` is the coordinator's ledger signing key; default ``WORKDIR/coordinator/keys/`` (one machine).
    """
    key = load_or_create_signing_key(key_path or workdir / COORDINATOR_KEY)
    ledger = Ledger(workdir / RUNS_LEDGER, key, ProtocolRun, party="coordinator")
    ledger.events()
    return ledger


def runs(workdir: Path) -> list[ProtocolRun]:
    """Every run the coordinator recorded under ``workdir``, verified (LedgerError if the chain does not)."""
    if not (workdir / RUNS_LEDGER).exists():
        return []
    return runs_chain(workdir).events()


def staging_folder(final: Path, run: str) -> Path:
    """Where a run's output for ``final`` is written before the run is recorded."""
    return final.with_name(f".{final.name}.{run}")


def stage(final: Path, run: str, created: datetime, expires: str, write: Callable[[Path], list[str]]) -> None:
    """Write one party's output aside (0700 folder, 0600 files) with its ``retention.json``."""
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = staging_folder(final, run)
    if staging.exists():
        shutil.rmtree(staging)  # a step retried in the same run
    staging.mkdir(mode=0o700)
    files = write(staging)
    record = {"run": run, "created": created.isoformat(timespec="seconds"), "expires": expires,
              "files": [*files, RETENTION_FILE]}  # fmt: skip
    (staging / RETENTION_FILE).write_text(json.dumps(record, indent=2))
    for path in staging.iterdir():
        path.chmod(0o600)


def add_to_staged(final: Path, run: str, name: str, content: str) -> None:
    """Add one file to a run's staged output (owner-only), listed in its ``retention.json``."""
    staging = staging_folder(final, run)
    if not (staging / RETENTION_FILE).exists():
        raise ProtocolError(f"no output of run {run} is staged at {str(final)!r}")
    path = staging / name
    path.write_text(content)
    path.chmod(0o600)
    retention = json.loads((staging / RETENTION_FILE).read_text())
    retention["files"] = [*retention["files"], name]
    (staging / RETENTION_FILE).write_text(json.dumps(retention, indent=2))


def abandon_stale(final: Path, keep: str) -> list[Path]:
    """Remove staged outputs of runs other than ``keep`` (runs that never committed nor abandoned)."""
    stale = [p for p in final.parent.glob(f".{final.name}.*") if p.is_dir() and p != staging_folder(final, keep)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def commit_staged(final: Path, run: str) -> None:
    """Move a recorded run's output into place, replacing the previous run's.

    Raises
    ------
    ProtocolError
        If nothing was staged for this run (a commit without the steps before it).
    """
    staging = staging_folder(final, run)
    if not staging.is_dir():
        raise ProtocolError(f"no output of run {run} is staged at {str(final)!r}: nothing to commit")
    if final.exists():
        shutil.rmtree(final)  # the previous run's output of this party, superseded
    staging.rename(final)


def abandon_staged(final: Path, run: str) -> None:
    """Remove a run's staged output (the run failed somewhere)."""
    shutil.rmtree(staging_folder(final, run), ignore_errors=True)


def expiry(now: datetime, days: int) -> str:
    """When outputs made ``now`` stop being kept."""
    return (now + timedelta(days=days)).isoformat(timespec="seconds")


class _Staging:
    """Output folders written aside and moved into place only once the run is recorded."""

    def __init__(self, run: str, now: datetime, days: int) -> None:
        self.run, self.now = run, now
        self.expires = expiry(now, days)
        self.finals: list[Path] = []

    def folder(self, final: Path, write: Callable[[Path], list[str]]) -> None:
        self.finals.append(final)
        stage(final, self.run, self.now, self.expires, write)

    def commit(self) -> None:
        for final in self.finals:
            commit_staged(final, self.run)

    def abandon(self) -> None:
        for final in self.finals:
            abandon_staged(final, self.run)


def _json(path: Path, obj: object) -> str:
    path.write_text(json.dumps(obj, indent=2))
    return path.name


def _records(path: Path, records: list[AlignmentRecord]) -> str:
    return _json(path, [r.model_dump() for r in records])


def align_from_spec(
    loaded: LoadedVerticalSpec, workdir: Path, *, requested_by: str = "coordinator", workers: int | None = None
) -> tuple[RegisterAlignment, ProtocolRun]:
    """Align every agency of a vertical spec to the label agency's register; keep each party's output.

    Raises
    ------
    DataFileError, AlignmentError, LedgerError
        For an unreadable file, duplicate ids within a file, an empty intersection, mismatched
        parameters, a runs chain that does not verify (nothing is written for a run that fails).
    """
    spec = loaded.spec
    column, register = spec.alignment.id_column, spec.label_agency.name
    others = [a.name for a in spec.agencies if a.name != register]
    chain = runs_chain(workdir)
    fingerprints = {name: file_fingerprint(loaded.data_path(name)) for name in [register, *others]}
    inputs = {name: read_ids(loaded.data_path(name), column) for name in [register, *others]}
    run = f"align-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
    result = align_register(
        inputs[register],
        {name: inputs[name] for name in others},
        salt=bytes.fromhex(spec.alignment.salt),
        register=register,
        run=run,
        workers=workers,
        batch_size=spec.alignment.batch_size,
        max_rows={a.name: a.max_rows for a in spec.agencies if a.max_rows is not None},
    )
    now = datetime.now(UTC)
    staging = _Staging(run, now, spec.alignment.retention_days)
    own: dict[str, list[AlignmentRecord]] = {}
    for record in result.records:
        own.setdefault(record.party, []).append(record)

    def agency_files(name: str) -> Callable[[Path], list[str]]:
        return lambda folder: write_agency_files(
            folder, result.agencies[name], own.get(name, []), fingerprints[name], spec.alignment_sha256(), run
        )

    def holder_files(folder: Path) -> list[str]:
        return write_holder_files(
            folder, result.holder_quarantine, result.view, own.get(register, []), fingerprints[register],
            spec.alignment_sha256(), run,
        )  # fmt: skip

    event = ProtocolRun(
        kind="register-alignment", federation=spec.federation.name, run=run, requested_by=requested_by,
        purpose=spec.federation.purpose, parameters_sha256=spec.alignment_sha256(), parties=[register, *others],
        sizes={register: result.view.register_size, **result.view.query_sizes},
        pairs=[(register, name) for name in others], bytes_relayed=result.bytes_sent,
        time=now.isoformat(timespec="seconds"), expires=staging.expires,
    )  # fmt: skip
    _write_record_commit(staging, chain, event, [
        (workdir / register / "alignment", holder_files),
        *((workdir / name / "alignment", agency_files(name)) for name in others),
    ])  # fmt: skip
    return result, event


def write_agency_files(
    folder: Path,
    alignment: AgencyAlignment,
    records: list[AlignmentRecord],
    file_sha256: str,
    parameters_sha256: str,
    run: str,
) -> list[str]:
    """An agency's output: its positions and quarantine, its record, its input note; returns the file names."""
    positions = alignment.write(folder).name
    return [positions, QUARANTINE_FILE, _records(folder / RECORD_FILE, records),
            _input(folder, file_sha256, parameters_sha256, run)]  # fmt: skip


def write_holder_files(
    folder: Path,
    quarantine: tuple[Quarantined, ...],
    view: RegisterView,
    records: list[AlignmentRecord],
    file_sha256: str,
    parameters_sha256: str,
    run: str,
) -> list[str]:
    """Civil affairs' output: sizes, its quarantine, its record, its input note; returns the file names."""
    write_quarantine(folder / QUARANTINE_FILE, quarantine)
    sizes = _json(folder / SIZES_FILE, view.model_dump())
    return [sizes, QUARANTINE_FILE, _records(folder / RECORD_FILE, records),
            _input(folder, file_sha256, parameters_sha256, run)]  # fmt: skip


def _input(folder: Path, file_sha256: str, parameters_sha256: str, run: str) -> str:
    """A party's note of what it aligned: its own file's SHA-256 and the parameters (``alignment_is_current``)."""
    return _json(folder / INPUT_FILE, {"file_sha256": file_sha256, "parameters_sha256": parameters_sha256, "run": run})


def alignment_is_current(loaded: LoadedVerticalSpec, workdir: Path) -> bool:
    """Whether every party's alignment output was made from its file as it is now, with these parameters.

    Each party checks only its own file against its own note; any missing note or output means no.
    """
    spec = loaded.spec
    for agency in spec.agencies:
        note = workdir / agency.name / "alignment" / INPUT_FILE
        try:
            recorded = json.loads(note.read_text())
            current = file_fingerprint(loaded.data_path(agency.name))
        except (OSError, ValueError):
            return False
        if recorded.get("file_sha256") != current or recorded.get("parameters_sha256") != spec.alignment_sha256():
            return False
    return True


def _write_record_commit(
    staging: _Staging,
    chain: Ledger[ProtocolRun],
    event: ProtocolRun,
    outputs: list[tuple[Path, Callable[[Path], list[str]]]],
) -> None:
    """Write every output aside, record the run, then move the outputs into place (all or nothing)."""
    try:
        for final, write in outputs:
            staging.folder(final, write)
        chain.append(event)
    except BaseException:
        staging.abandon()
        raise
    staging.commit()


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

    Every roster file is checked before the run; a roster that conflicts with none of the others is
    refused rather than silently reported clean.

    Raises
    ------
    SpecError
        If a roster is not in the spec, or fewer than two rosters are given.
    AlignmentError
        If a roster conflicts with none of the others given (exit 22).
    DataFileError, LedgerError
        As ``align_from_spec``.
    """
    spec = loaded.spec
    if len(rosters) < 2:
        raise SpecError("the duplicate check needs at least two rosters (--roster NAME=FILE, repeated)")
    sections = {name: spec.roster(name) for name in rosters}
    given = {s.programme for s in sections.values()}  # the spec checked that its pairs name real programmes
    exclusive = [pair for pair in (spec.duplicates.exclusive if spec.duplicates else []) if set(pair) <= given]
    pairs = conflicting_pairs({name: s.programme for name, s in sections.items()}, exclusive)
    lonely = sorted(set(rosters) - {n for pair in pairs for n in pair})
    if lonely:
        raise AlignmentError(
            f"roster {lonely[0]!r} ({sections[lonely[0]].programme}) conflicts with none of the other rosters given: "
            "nothing would be checked for it"
        )
    chain = runs_chain(out)
    inputs = {name: read_ids(path, sections[name].id_column) for name, path in rosters.items()}
    run = f"dups-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
    result = check_duplicates(
        inputs,
        {name: section.programme for name, section in sections.items()},
        salt=bytes.fromhex(spec.alignment.salt),
        exclusive=exclusive,
        run=run,
        workers=workers,
        batch_size=spec.alignment.batch_size,
    )
    now = datetime.now(UTC)
    staging = _Staging(run, now, spec.alignment.retention_days)

    def roster_files(name: str) -> Callable[[Path], list[str]]:
        def write(folder: Path) -> list[str]:
            with (folder / REVIEW_FILE).open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["row", "other_roster", "other_programme", "action"])
                writer.writerows((i.row, i.other_roster, i.other_programme, "review") for i in result.review[name])
            write_quarantine(folder / QUARANTINE_FILE, result.quarantine[name])
            mine = [r for r in result.records if r.party == name]
            return [REVIEW_FILE, QUARANTINE_FILE, _records(folder / RECORD_FILE, mine)]

        return write

    event = ProtocolRun(
        kind="duplicate-check", federation=spec.federation.name, run=run, requested_by=requested_by, purpose=purpose,
        parameters_sha256=spec.alignment_sha256(), parties=[sections[n].owner for n in rosters],
        sizes={r.party: r.own_rows for r in result.records}, pairs=list(result.pairs),
        bytes_relayed=result.bytes_sent, time=now.isoformat(timespec="seconds"), expires=staging.expires,
    )  # fmt: skip
    outputs = [(out / sections[name].owner / "duplicates" / name, roster_files(name)) for name in rosters]
    _write_record_commit(staging, chain, event, outputs)
    return result, event


def purge_expired(workdir: Path, *, everything: bool = False, now: datetime | None = None) -> list[Path]:
    """Delete the files of alignment outputs whose retention has ended (all with ``everything``).

    Only the files each folder's ``retention.json`` lists are deleted (then the folder, if empty);
    returns the folders purged.

    Raises
    ------
    DataFileError
        If ``workdir`` is not a folder, or a ``retention.json`` is unreadable (nothing is deleted).
    """
    if not workdir.is_dir():
        raise DataFileError(f"{str(workdir)!r} is not a folder")
    moment = now or datetime.now(UTC)
    due: list[tuple[Path, list[str]]] = []
    for marker in sorted(workdir.rglob(RETENTION_FILE)):
        folder = marker.parent
        if not _KEPT & set(folder.relative_to(workdir).parts) or folder.is_symlink():
            continue
        try:
            record = json.loads(marker.read_text())
            expires = datetime.fromisoformat(record["expires"])
            files = [str(f) for f in record["files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataFileError(f"{str(marker)!r} is not a retention record ({exc}); nothing was removed") from None
        if everything or expires <= moment:
            due.append((folder, files))
    for folder, files in due:
        for name in files:
            if "/" not in name and name not in {".", ".."}:
                (folder / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if nothing else is in it
    return [folder for folder, _ in due]
