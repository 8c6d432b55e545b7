"""Each agency's block of model inputs over the register positions, clipped, with its not-held input.

An agency encodes only its own columns (``FeatureEncoder(spec.block_schema(agency))``), places each of
its valid rows at the register position alignment gave it, and sets a "not held" input to 1 at every
position it has no row for (all its other inputs are 0 there). Every row is clipped to L2 norm at most
``CLIP`` (the block's declared bound), so one household moves a block's gradient by at most that norm
times its residual (``docs/vertical.md``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from agencyfl.alignment.register import POSITIONS_FILE
from agencyfl.alignment.runs import read_ids
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.errors import DataFileError
from agencyfl.federation.resident_id import InvalidResidentId, normalize
from agencyfl.federation.spec import LoadedVerticalSpec, SchemaSection
from agencyfl.federation.table import CheckResult, load_table, read_plain_csv, validation_mask
from agencyfl.screening.outcomes import outcome_labels

CLIP = 1.0
"""Every household's block is clipped to this L2 norm (the indicator included)."""
NOT_HELD = "not_held"
ENROLLED_COLUMN = "enrolled"
"""Civil affairs' column saying who receives the allowance now (1/0); it never leaves civil affairs."""
VALIDATION_FRACTION = 0.2
WORKDIR_SPEC = "federation.json"
"""In a one-machine workdir (``agencyfl run``): which spec made it, so later commands need no ``--spec``."""

Matrix = npt.NDArray[np.float64]


def clip_rows(x: Matrix, bound: float = CLIP, *, in_place: bool = False) -> Matrix:
    """``x`` with each row scaled down to L2 norm at most ``bound`` (rows within it unchanged); ``in_place``
    scales ``x`` itself (a float64 array of the caller's own), sparing a copy of a register-sized matrix."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # no N x d temporary (``np.linalg.norm`` makes one)
    scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
    if in_place:
        return np.asarray(np.multiply(x, scale[:, None], out=x), dtype=np.float64)
    return np.asarray(x * scale[:, None], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Block:
    """One agency's inputs at every register position.

    Held only as the agency's own rows, where they sit and each row's clip factor: scoring needs
    ``scores`` (one float per position), never the register-sized matrix ``x``, which training builds on
    first use (a million-household register by 20 inputs is 170 MB of float64).

    Attributes
    ----------
    agency
        Whose block.
    names
        Input names: the encoder's columns, then ``not_held``.
    held
        True at the positions the agency has a valid row for.
    rows
        The encoded inputs of each held position, not-held input excluded, not clipped.
    positions
        The register position of each of ``rows``.
    given
        ``x`` given whole instead (``with_inputs``: a test's or an attacker's rows), or None.
    """

    agency: str
    names: tuple[str, ...]
    held: npt.NDArray[np.bool_]
    rows: npt.NDArray[np.floating[Any]]
    positions: npt.NDArray[np.int64]
    given: Matrix | None = None

    def with_inputs(self, x: Matrix) -> Block:
        """This block with ``x`` as its inputs at every position, as given (not clipped again)."""
        if x.shape != (self.size, self.width):
            raise ValueError(f"inputs of shape {x.shape} for a block of {(self.size, self.width)}")
        return dataclasses.replace(self, given=x)

    @property
    def width(self) -> int:
        """Number of inputs (weights) of the block."""
        return len(self.names)

    @property
    def size(self) -> int:
        """Register positions N."""
        return len(self.held)

    @functools.cached_property
    def x(self) -> Matrix:
        """``[N, width]``: each held row at its position, 1 in ``not_held`` elsewhere, every row clipped to L2
        norm ``CLIP`` (or the inputs given whole)."""
        if self.given is not None:
            return self.given
        x = np.zeros((self.size, self.width))
        x[self.positions, :-1] = self.rows
        x[~self.held, -1] = 1.0
        return clip_rows(x, CLIP, in_place=True)

    def scores(self, weights: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``x @ weights`` without ``x``: each held row's clipped inputs times the weights, and the not-held
        weight (times the clip factor of a row holding only that 1) at every other position."""
        if weights.shape != (self.width,):
            raise ValueError(f"{len(weights)} weights for {self.width} inputs")
        if self.given is not None:
            return np.asarray(self.given @ weights, dtype=np.float64)
        out = np.full(self.size, min(1.0, CLIP) * weights[-1])
        for start in range(0, len(self.positions), _SCORING_ROWS):  # a float64 copy of a slice, not of all
            part = slice(start, start + _SCORING_ROWS)
            rows = np.asarray(self.rows[part], dtype=np.float64)
            out[self.positions[part]] = clip_rows(rows, CLIP, in_place=True) @ weights[:-1]
        return out

    def inputs_at(self, positions: npt.NDArray[np.int64] | list[int]) -> Matrix:
        """``x[positions]`` without ``x`` (the rows a disclosure explains)."""
        at = np.asarray(positions, dtype=np.int64)
        if self.given is not None:
            return np.asarray(self.given[at], dtype=np.float64)
        out = np.zeros((len(at), self.width))
        out[~self.held[at], -1] = min(1.0, CLIP)
        row_of = np.full(self.size, -1, dtype=np.int64)
        row_of[self.positions] = np.arange(len(self.positions))
        mine = np.flatnonzero(self.held[at])
        out[mine, :-1] = clip_rows(np.asarray(self.rows[row_of[at[mine]]], dtype=np.float64), CLIP, in_place=True)
        return out


_SCORING_ROWS = 1 << 16


def _kept(frame: pd.DataFrame, keep: npt.NDArray[np.bool_]) -> pd.DataFrame:
    """The rows of ``frame`` where ``keep`` (the frame itself when every row is kept: no copy)."""
    return frame if keep.all() else frame.loc[keep].reset_index(drop=True)


def place_block(
    agency: str, names: list[str], values: npt.NDArray[np.floating[Any]], positions: npt.NDArray[np.int64], size: int
) -> Block:
    """Put encoded rows at their register ``positions`` of a register of ``size``, add the not-held input, clip.

    Raises
    ------
    ValueError
        If a position is outside ``0 .. size - 1`` or repeats.
    """
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"rows of {values.shape[1:]} values for {len(names)} inputs")
    if len(values) != len(positions):
        raise ValueError(f"{len(values)} rows but {len(positions)} positions")
    if len(positions) and (positions.min() < 0 or positions.max() >= size):
        raise ValueError(f"positions must lie in 0..{size - 1}")
    if len(positions) and np.bincount(positions, minlength=size).max() > 1:  # O(N): no sort of a million
        raise ValueError("a register position repeats")
    held = np.zeros(size, dtype=bool)
    held[positions] = True
    return Block(agency, (*names, NOT_HELD), held, values, np.asarray(positions, dtype=np.int64))


@dataclass(frozen=True)
class PartyFiles:
    """Where one party's own file and folder are (its data, ``alignment/``, outcomes): on one machine
    ``WORKDIR/<agency>/`` and the spec's data path; in a deployment the steward's ``--data`` and ``HOME``."""

    data: Path
    folder: Path

    @classmethod
    def of(cls, loaded: LoadedVerticalSpec, agency: str, workdir: Path, files: PartyFiles | None) -> PartyFiles:
        """``files``, or the one-machine layout of ``workdir``."""
        return files if files is not None else cls(loaded.data_path(agency), workdir / agency)


def _own_table(path: Path, schema: SchemaSection) -> CheckResult:
    """The party's validated table, loaded once for consecutive uses (civil affairs' block, then its register
    frame, in one screening): keyed by the file's identity and size and the schema. One table per party of
    a federation is kept, since a screening on one machine loads every party's at once (``MAX_PARTIES``)."""
    stat = path.stat()
    return _table(str(path.resolve()), stat.st_mtime_ns, stat.st_size, schema.model_dump_json())


MAX_PARTIES = 8
"""The most agencies a screening's masks allow (``screening.protocol.MAX_MASKED_PEERS`` + 1)."""


@lru_cache(maxsize=MAX_PARTIES)
def _table(path: str, mtime_ns: int, size: int, schema: str) -> CheckResult:
    return load_table(
        Path(path), SchemaSection.model_validate_json(schema), require_label=False, write_quarantine=False
    )


def forget_tables() -> None:
    """Drop the tables and columns kept for consecutive uses (a benchmark timing a cold read, a test)."""
    _table.cache_clear()
    _column.cache_clear()


def _own_ids(path: Path, column: str) -> tuple[str, ...]:
    """One column of the party's file as written (ids, enrolment), read once for consecutive uses."""
    stat = path.stat()
    return _column(str(path.resolve()), stat.st_mtime_ns, stat.st_size, column)


@lru_cache(maxsize=2)
def _column(path: str, mtime_ns: int, size: int, column: str) -> tuple[str, ...]:
    """The column as ``read_ids`` reads it (the rows alignment numbered: blank lines included, values as
    written): a plain file by Arrow's threaded reader (``read_plain_csv``), another by pandas' C parser (both
    about 5x faster than ``read_ids`` at a million rows); any file neither reads the same way (not UTF-8,
    no such column, a malformed line) goes through ``read_ids`` itself."""
    plain = read_plain_csv(Path(path), [column], blank_lines_are_rows=True)  # most files: Arrow, threaded
    if plain is not None and plain.num_columns == 1:
        return tuple(plain.column(0).to_pylist())
    try:
        frame = pd.read_csv(path, usecols=[column], dtype=str, keep_default_na=False, na_filter=False,
                            skip_blank_lines=False, encoding="utf-8")  # fmt: skip
        return tuple(frame[column].tolist())
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError):
        return tuple(read_ids(Path(path), column))


def _valid_rows(quarantined: pd.DataFrame, total: int) -> npt.NDArray[np.int64]:
    """File rows (0-based) of the rows that passed validation, in order."""
    bad = np.zeros(total, dtype=bool)
    if len(quarantined):
        bad[quarantined["row"].to_numpy(dtype=np.int64) - 1] = True
    return np.flatnonzero(~bad).astype(np.int64)


def _register_rows(
    loaded: LoadedVerticalSpec, workdir: Path, total: int, files: PartyFiles | None = None
) -> npt.NDArray[np.int64]:
    """Civil affairs' file rows in register order: its rows alignment did not quarantine."""
    own = PartyFiles.of(loaded, loaded.spec.label_agency.name, workdir, files)
    path = own.folder / "alignment" / "alignment-quarantine.csv"
    bad = np.zeros(total, dtype=bool)
    if path.exists():
        rows = pd.read_csv(path)["row"].to_numpy(dtype=np.int64)
        bad[rows] = True
    return np.flatnonzero(~bad).astype(np.int64)


def register_size(loaded: LoadedVerticalSpec, workdir: Path, files: PartyFiles | None = None) -> int:
    """N, as alignment showed every party (``alignment-sizes.json`` at civil affairs)."""
    import json

    sizes = (
        PartyFiles.of(loaded, loaded.spec.label_agency.name, workdir, files).folder
        / "alignment"
        / "alignment-sizes.json"
    )
    try:
        return int(json.loads(sizes.read_text())["register_size"])
    except (OSError, KeyError, ValueError) as exc:
        raise DataFileError(f"no alignment sizes at {str(sizes)!r}: run alignment first ({exc})") from None


def feature_block(
    loaded: LoadedVerticalSpec, agency: str, workdir: Path, files: PartyFiles | None = None, size: int | None = None
) -> Block:
    """A non-label agency's block, from its own file and its own ``alignment-positions.csv``.

    ``size``: the register size N when this party has no civil affairs' folder to read it from (a
    deployment: the coordinator's signed plan carries it).

    Raises
    ------
    DataFileError
        If its file or its alignment output cannot be read.
    """
    spec = loaded.spec
    encoder = FeatureEncoder(spec.block_schema(agency))
    own = PartyFiles.of(loaded, agency, workdir, files)
    table = _own_table(own.data, spec.block_schema(agency))
    file_rows = _valid_rows(table.quarantined, table.total)
    path = own.folder / "alignment" / POSITIONS_FILE
    try:
        aligned = pd.read_csv(path)
    except OSError as exc:
        raise DataFileError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    rows, at = aligned["row"].to_numpy(dtype=np.int64), aligned["position"].to_numpy(dtype=np.int64)
    inside = (rows >= 0) & (rows < table.total)  # a row number outside the file matches no row
    position_of_row = np.full(table.total, -1, dtype=np.int64)
    position_of_row[rows[inside]] = at[inside]
    keep = position_of_row[file_rows] >= 0
    positions = position_of_row[file_rows[keep]]
    values = encoder.encode(_kept(table.valid, keep))  # float32, widened as it is placed
    n = size if size is not None else register_size(loaded, workdir)
    try:
        return place_block(agency, encoder.names, values, positions, n)
    except ValueError as exc:
        raise DataFileError(f"{agency}'s alignment output does not fit a register of {n}: {exc}") from None


@dataclass(frozen=True)
class LabelData:
    """What only civil affairs holds besides its block: labels, who is assessed, its validation split.

    Attributes
    ----------
    y
        The label at each register position (0 where not assessed).
    assessed
        True where civil affairs has assessed the household.
    validation
        True at assessed positions held out for validation (never trained on).
    """

    y: Matrix
    assessed: npt.NDArray[np.bool_]
    validation: npt.NDArray[np.bool_]

    @property
    def train(self) -> npt.NDArray[np.bool_]:
        """Positions whose residual enters the gradient: assessed and not held out."""
        return np.asarray(self.assessed & ~self.validation)


def register_block(loaded: LoadedVerticalSpec, workdir: Path, files: PartyFiles | None = None) -> Block:
    """Civil affairs' block over its register, without its labels (what scoring needs, and all it needs)."""
    spec = loaded.spec
    return _register_block(loaded, workdir, PartyFiles.of(loaded, spec.label_agency.name, workdir, files))[0]


def _register_block(
    loaded: LoadedVerticalSpec, workdir: Path, own: PartyFiles
) -> tuple[Block, npt.NDArray[np.object_], npt.NDArray[np.int64]]:
    """Civil affairs' block, the ids of its file rows, and its register's file rows."""
    spec = loaded.spec
    agency = spec.label_agency.name
    schema = spec.block_schema(agency)
    encoder = FeatureEncoder(schema)
    table = _own_table(own.data, schema)
    ids = np.array(_own_ids(own.data, schema.id), dtype=object)
    register = _register_rows(loaded, workdir, len(ids), own)
    size = register_size(loaded, workdir, own)
    if len(register) != size:
        raise DataFileError(f"{len(register)} register rows but alignment recorded {size}")
    position_of_row = np.full(len(ids), -1, dtype=np.int64)
    position_of_row[register] = np.arange(size)
    file_rows = _valid_rows(table.quarantined, table.total)
    keep = position_of_row[file_rows] >= 0
    values = encoder.encode(_kept(table.valid, keep))  # float32, widened as it is placed
    return place_block(agency, encoder.names, values, position_of_row[file_rows[keep]], size), ids, register


def label_block(loaded: LoadedVerticalSpec, workdir: Path, files: PartyFiles | None = None) -> tuple[Block, LabelData]:
    """Civil affairs' block and its labels over its register (its valid rows in file order).

    Review outcomes a caseworker recorded (``agencyfl screen record-outcome``) override the file's label:
    confirmed eligible is 1, found not eligible is 0 (``screening.outcomes``).

    Raises
    ------
    DataFileError
        If its file cannot be read.
    """
    spec = loaded.spec
    own = PartyFiles.of(loaded, spec.label_agency.name, workdir, files)
    block, ids, register = _register_block(loaded, workdir, own)
    labels = np.array([v.strip().lower() for v in read_ids(own.data, spec.schema_.label)], dtype=object)
    reg_labels = labels[register]
    is_true = np.isin(reg_labels, ["1", "true", "yes", "t", "y"])
    is_false = np.isin(reg_labels, ["0", "false", "no", "f", "n"])
    confirmed = outcome_labels(
        own.folder.parent, own.folder.name
    )  # caseworkers' confirmed review outcomes override the file
    if confirmed:
        for position, raw in enumerate(ids[register]):
            try:
                label = confirmed.get(normalize(str(raw)))
            except InvalidResidentId:
                continue
            if label is not None:
                is_true[position], is_false[position] = label == 1, label == 0
    assessed = (is_true | is_false) & block.held
    held_out = validation_mask(pd.Series(ids[register]), VALIDATION_FRACTION, f"{spec.federation.name}:vertical")
    return block, LabelData(y=is_true.astype(np.float64), assessed=assessed, validation=assessed & held_out)


def canonical_ids(raws: list[str]) -> list[str]:
    """``canonical_id`` of each (valid ids checked together: ``resident_id.canonical_or_none``)."""
    from agencyfl.federation.resident_id import canonical_or_none

    return [c if c is not None else r.strip() for c, r in zip(canonical_or_none(raws), raws, strict=True)]


def canonical_id(raw: str) -> str:
    """A resident id in its canonical form (as written, stripped, when it is not a valid one)."""
    try:
        return normalize(raw)
    except InvalidResidentId:
        return raw.strip()


def register_frame(
    loaded: LoadedVerticalSpec, workdir: Path, canonical: bool = True, files: PartyFiles | None = None
) -> pd.DataFrame:
    """Civil affairs' register in register order: its id, enrolled, and its validated features (typed as the
    loader types them; missing, NaN or None, where its row failed validation).

    ``canonical=False`` keeps each id as written (normalizing a million ids costs seconds; a screening
    normalizes only the ids it lists).
    """
    spec = loaded.spec
    holder = spec.label_agency.name
    own = PartyFiles.of(loaded, holder, workdir, files)
    path = own.data
    schema = spec.block_schema(holder)
    ids = list(_own_ids(path, schema.id))
    try:
        enrolled_raw = list(_own_ids(path, ENROLLED_COLUMN))
    except Exception:
        enrolled_raw = ["0"] * len(ids)  # no enrolment column: every household counts as not enrolled
    register = _register_rows(loaded, workdir, len(ids), own)
    table = _own_table(path, schema)
    valid = _valid_rows(table.quarantined, table.total)
    # each register row's validated values, typed as the loader typed them (no Python object per number);
    # a row that failed validation has none (NaN), like a row of missing values
    slot = np.full(len(ids), -1, dtype=np.int64)
    slot[valid] = np.arange(len(valid))
    names = [f.name for f in schema.features]
    frame = table.valid[names].reset_index(drop=True).reindex(slot[register]).reset_index(drop=True)

    written = [ids[r] for r in register]
    frame.insert(0, "household", [canonical_id(i) for i in written] if canonical else written)
    frame.insert(1, "enrolled", [enrolled_raw[r].strip().lower() in {"1", "true", "yes"} for r in register])
    return frame
