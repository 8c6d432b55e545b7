"""``agencyfl screen eligible`` with every party on one machine, each in its own role and folder.

The coordinator checks the token and the purpose; alignment runs again (the agencies' files as they
are today); civil affairs draws the screening's CKKS key; each agency scores its own block with its
own part of the model and encrypts it under that key; the coordinator adds the ciphertexts; civil
affairs decrypts, applies the model card's decision rule and writes the worklists. Agencies whose
steward chose to ``explain`` disclose reasons for listed households only, each disclosure recorded
in their own uses ledger first. Every use is recorded (``screening.records``). ``docs/screening.md``.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd

from agencyfl.alignment.runs import align_from_spec, alignment_is_current
from agencyfl.alignment.sealed import Envelope, PartyKeys, PartyPublicKeys
from agencyfl.federation.decision import DecisionRule
from agencyfl.federation.errors import ModelError, ScreeningRefusedError
from agencyfl.federation.fairness import group_labels
from agencyfl.federation.files import write_private_csv, write_private_text
from agencyfl.federation.spec import LoadedVerticalSpec
from agencyfl.memory import keep_freed_memory
from agencyfl.privacy.ledger import Ledger
from agencyfl.screening.outcomes import latest_outcomes
from agencyfl.screening.protocol import (
    Contributor,
    PartialScores,
    Relay,
    Requester,
    open_positions,
    open_reasons,
    plain_labeller,
    reasons_capacity,
    seal_positions,
    seal_reasons,
)
from agencyfl.screening.records import COORDINATOR, ModelUse, now_iso, uses_ledger
from agencyfl.screening.worklist import (
    CATEGORIES,
    COLUMNS,
    PreviousWorklist,
    categorize,
    cause_of,
    change_of,
    read_worklist,
)
from agencyfl.server.tokens import TokenStore, token_hash
from agencyfl.vertical.encoding import (
    Block,
    canonical_ids,
    feature_block,
    register_block,
    register_frame,
    register_size,
)
from agencyfl.vertical.model import RegisteredVerticalModel, load_part

P = ParamSpec("P")
R = TypeVar("R")


def cycle_collection_paused(build: Callable[P, R]) -> Callable[P, R]:
    """Run ``build`` with the cyclic garbage collector paused: it makes one small object per listed household
    (a million-household register lists about a quarter of a million), and each automatic collection would
    rescan everything alive (the register's frames): about three times the building itself. Reference
    counting still frees everything; any cycle waits for the next collection."""

    @functools.wraps(build)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return build(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused


BINS = 20
PAGE_ROWS = 2000
"""Rows per list on the worklist page (highest priority first); ``worklist.csv`` holds every row."""
Progress = Callable[[str], None]


@dataclass
class Parties:
    """Every party's state for one screening (each object holds only its own party's data and keys)."""

    requester: Requester
    contributors: dict[str, Contributor]
    relay: Relay = field(default_factory=Relay)


def new_screening() -> str:
    """A screening id: UTC time and 4 random hex digits."""
    return f"scr-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(2)}"


class TokenRefused(ScreeningRefusedError):
    """A refusal of a known token: carries its id and holder, for the record."""

    def __init__(self, message: str, token_id: str, holder: str) -> None:
        super().__init__(message)
        self.token_id, self.holder = token_id, holder


def check_use(tokens_path: Path, token: str, purpose: str, model: RegisteredVerticalModel) -> tuple[str, str]:
    """The coordinator's check before anything is scored; returns (token id, requester name).

    Raises
    ------
    ScreeningRefusedError
        The token is unknown, expired or revoked, not issued for ``purpose``, or the card does not list it
        (``TokenRefused``, with the token's id and holder, when the token is known).
    """
    store = TokenStore(tokens_path)
    record = store.lookup(token) if token else None
    if record is None:
        known = next((r for r in store.records() if token and r.id == token_hash(token)[: len(r.id)]), None)
        if known is not None:
            raise TokenRefused(f"token {known.id} is {known.state()}", known.id, known.requester)
        raise ScreeningRefusedError("the token is not active (unknown, expired or revoked)")
    if purpose not in record.purposes:
        raise TokenRefused(
            f"token {record.id} was issued for {list(record.purposes)!r}, not {purpose!r}", record.id, record.requester
        )
    if purpose != model.card.purpose:
        raise TokenRefused(
            f"model {model.version!r} is registered for purpose {model.card.purpose!r}, not {purpose!r}",
            record.id, record.requester,
        )  # fmt: skip
    return record.id, record.requester


def record_refusal(
    workdir: Path, model: RegisteredVerticalModel, screening: str, purpose: str, refusal: ScreeningRefusedError
) -> None:
    """A refused screening in the coordinator's uses ledger (nothing was scored), with the token's id and
    holder when the token is known (the requester is then the token's holder)."""
    _append_refusal(uses_ledger(workdir, COORDINATOR), model, screening, purpose, refusal)


def record_refusal_at(
    folder: Path, key_path: Path, model: RegisteredVerticalModel, screening: str, purpose: str,
    refusal: ScreeningRefusedError,
) -> None:  # fmt: skip
    """A refused screening in the uses ledger at ``folder`` (a deployment's coordinator folder)."""
    from agencyfl.screening.records import uses_ledger_at

    _append_refusal(uses_ledger_at(folder, key_path, COORDINATOR), model, screening, purpose, refusal)


def _append_refusal(
    ledger: Ledger[ModelUse], model: RegisteredVerticalModel, screening: str, purpose: str,
    refusal: ScreeningRefusedError,
) -> None:  # fmt: skip
    ledger.append(
        ModelUse(kind="refusal", owner=COORDINATOR, screening=screening, federation=model.manifest.federation,
                 model_version=model.version, purpose=purpose,
                 requester=refusal.holder if isinstance(refusal, TokenRefused) else "(unknown token)",
                 token_id=refusal.token_id if isinstance(refusal, TokenRefused) else None,
                 time=now_iso(), reason=str(refusal))
    )  # fmt: skip


def _check_spec(loaded: LoadedVerticalSpec, model: RegisteredVerticalModel) -> None:
    if loaded.spec.federation.name != model.manifest.federation:
        raise ModelError(f"model {model.version!r} is not of federation {loaded.spec.federation.name!r}")
    if loaded.spec.feature_blocks() != model.loaded.spec.feature_blocks():
        raise ModelError(f"model {model.version!r} was trained with other feature blocks than this spec declares")


def score_register(
    loaded: LoadedVerticalSpec, workdir: Path, model: RegisteredVerticalModel, screening: str, purpose: str
) -> tuple[npt.NDArray[np.float64], Parties]:
    """Every register position's logit, through the encrypted path (each party with its own part)."""
    logits, parties, _ = _score(loaded, workdir, model, screening, purpose, frame=False)
    return logits, parties


def _score(
    loaded: LoadedVerticalSpec, workdir: Path, model: RegisteredVerticalModel, screening: str, purpose: str,
    *, frame: bool,
) -> tuple[npt.NDArray[np.float64], Parties, pd.DataFrame | None]:  # fmt: skip
    """``score_register``, and civil affairs' register frame when ``frame``.

    The parties are independent until the relay adds their ciphertexts, so on one machine they work at
    once, as they would on their own machines: civil affairs draws the key pair and sends the request
    first (it needs only the register's size), then each agency reads, encodes and encrypts its block
    while civil affairs reads its own (threads: the CSV reader, Arrow, NumPy and SEAL run partly outside
    the GIL).
    """
    spec = loaded.spec
    holder = spec.label_agency.name
    names = [a.name for a in spec.agencies if a.name != holder]
    clip = model.manifest.score_clip  # every part's score is clipped by its holder, as in training
    requester = Requester(holder, register_size(loaded, workdir), load_part(workdir, holder, model.manifest), clip)
    request = requester.request(screening, spec.federation.name, model.version, purpose)

    def civil_affairs() -> tuple[Block, pd.DataFrame | None]:
        block = register_block(loaded, workdir)
        return block, register_frame(loaded, workdir, canonical=False) if frame else None

    def agency(name: str) -> tuple[Contributor, PartialScores]:
        contributor = Contributor(feature_block(loaded, name, workdir), load_part(workdir, name, model.manifest), clip)
        return contributor, contributor.partial_scores(request)

    with ThreadPoolExecutor(max_workers=max(1, min(len(names) + 1, os.cpu_count() or 1))) as pool:
        own = pool.submit(civil_affairs)
        answers = {n: pool.submit(agency, n) for n in names}
        label, register = own.result()
        requester.hold(label)
        contributors = {n: a.result()[0] for n, a in answers.items()}
        parts = [a.result()[1] for a in answers.values()]
    parties = Parties(requester, contributors)
    return requester.logits(parties.relay.sum(request, parts)), parties, register


def disclose(
    workdir: Path,
    loaded: LoadedVerticalSpec,
    contributor: Contributor,
    requester_keys: PartyKeys,
    screening: str,
    model_version: str,
    purpose: str,
    positions: list[int],
) -> dict[int, str]:
    """One agency's reasons for the listed ``positions``, at the level its own spec sets, recorded first
    (every party on one machine: the sealed list and reasons go straight between the two objects).

    Raises
    ------
    ScreeningRefusedError
        If the agency does not explain, or the list exceeds its ``explain_max`` share of the register
        (the refusal is recorded in its uses ledger; nothing is disclosed).
    """
    own_keys = PartyKeys.generate(contributor.name)
    size = contributor.block.size
    sealed = seal_positions(requester_keys, own_keys.public(), screening, positions, size)  # R -> k through C
    envelope = answer_disclosure(
        uses_ledger(workdir, contributor.name), loaded, contributor, own_keys, requester_keys.public(), sealed,
        screening, model_version, purpose,
    )  # fmt: skip
    return open_reasons(envelope, requester_keys, own_keys.public(), screening)


def answer_disclosure(
    ledger: Ledger[ModelUse],
    loaded: LoadedVerticalSpec,
    contributor: Contributor,
    own_keys: PartyKeys,
    requester: PartyPublicKeys,
    sealed: Envelope,
    screening: str,
    model_version: str,
    purpose: str,
) -> Envelope:
    """At the agency: open the requester's sealed list, refuse or record the disclosure, seal the reasons.

    Raises
    ------
    ScreeningRefusedError
        If the agency does not explain, or the list exceeds its ``explain_max`` share of the register
        (the refusal is recorded in ``ledger``; nothing is disclosed).
    """
    section = loaded.spec.agency(contributor.name)
    level = section.explain
    size = contributor.block.size
    listed = open_positions(sealed, own_keys, requester, screening, size)
    base = ModelUse(
        kind="disclosure", owner=contributor.name, screening=screening, federation=loaded.spec.federation.name,
        model_version=model_version, purpose=purpose, requester=loaded.spec.label_agency.name, time=now_iso(),
        households=len(listed),
    )  # fmt: skip
    capacity = reasons_capacity(section.explain_max, size)
    if level == "none" or len(listed) > capacity:
        # the reason says nothing of the list's length: it travels back through the coordinator
        reason = (
            f"{contributor.name} does not disclose reasons (explain = 'none')"
            if level == "none"
            else f"{contributor.name} explains at most {section.explain_max:.0%} of the register "
            f"({capacity} households); the list was longer"
        )
        ledger.append(base.model_copy(update={"kind": "refusal", "reason": reason}))
        raise ScreeningRefusedError(reason)
    # recorded before anything is sent
    ledger.append(base.model_copy(update={"level": level, "positions": listed}))
    reasons = contributor.reasons(listed, level, plain_labeller(loaded.spec.schema_))
    return seal_reasons(own_keys, requester, screening, reasons, capacity)


def _histograms(scores: npt.NDArray[np.float64], frame: pd.DataFrame, loaded: LoadedVerticalSpec) -> dict[str, Any]:
    edges = np.linspace(0.0, 1.0, BINS + 1)
    out: dict[str, Any] = {"bins": edges.tolist(), "overall": np.histogram(scores, edges)[0].tolist(), "attributes": {}}
    spec = loaded.spec
    section = spec.fairness
    if section is None:
        return out
    own = {f.name for f in spec.block_schema(spec.label_agency.name).features}
    held = [a for a in section.attributes if a in own]
    labels = group_labels(frame, section.model_copy(update={"attributes": held}), spec.schema_)
    # np.histogram's bins ([a, b), the last [a, b]) by position, then every group's counts in one bincount
    where = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, BINS - 1)
    inside = (scores >= 0.0) & (scores <= 1.0)
    for name, groups in labels.items():
        codes, names = pd.factorize(pd.Series(groups, dtype=object).astype(str), sort=True)
        counts = np.bincount(codes[inside] * BINS + where[inside], minlength=len(names) * BINS).reshape(-1, BINS)
        out["attributes"][name] = {
            "label": spec.schema_.plain_label(name),
            "groups": {str(g): counts[i].tolist() for i, g in enumerate(names)},
        }
    return out


class Distributions:
    """The report's score distributions by group (``groups``) and the page's plots of them, drawn on a thread
    of their own from the moment the lists are decided: they need only the scores and the register frame,
    so they overlap the reasons, the worklist's rows and its CSV (at a million households about a second:
    the histograms 0.5 s, matplotlib's import and four SVG figures 0.8 s, mostly outside the other work's
    way on the second core)."""

    def __init__(self, lists: Lists, loaded: LoadedVerticalSpec, review_band: float) -> None:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distributions")
        self._drawn = pool.submit(self._draw, lists, loaded, review_band)
        pool.shutdown(wait=False)  # the drawing goes on; its thread ends with it

    @staticmethod
    def _draw(lists: Lists, loaded: LoadedVerticalSpec, review_band: float) -> tuple[dict[str, Any], str]:
        from agencyfl.screening.page import score_plots

        groups = _histograms(lists.scores, lists.frame, loaded)
        return groups, score_plots({"groups": groups, "threshold": lists.rule.threshold, "review_band": review_band})

    def result(self) -> tuple[dict[str, Any], str]:
        """``(groups, plots)``, waiting for them; an error in drawing is raised here."""
        return self._drawn.result()


def _sigmoid(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)


@dataclass(frozen=True)
class ScreeningResult:
    """What one screening produced: the report (``screening.json``), each listed household's row (``table``:
    ``worklist_table``'s columns), the files, every register household's score and civil affairs' frame."""

    report: dict[str, Any]
    table: pd.DataFrame
    files: dict[str, str]
    scores: npt.NDArray[np.float64]
    frame: pd.DataFrame

    @functools.cached_property
    def rows(self) -> list[dict[str, Any]]:
        """Each listed household's row as a dict (``ROW_COLUMNS``), made when first asked for."""
        return row_dicts(self.table)


def _previous_categories(
    loaded: LoadedVerticalSpec, workdir: Path, previous: PreviousWorklist, current: RegisteredVerticalModel,
    screening: str, purpose: str, frame: pd.DataFrame, band: float,
) -> npt.NDArray[np.str_] | None:  # fmt: skip
    """Today's categories under the previous worklist's model (None when that model is gone)."""
    folder = workdir / "registry" / previous.model_version
    if not previous.model_version or not (folder / "manifest.json").exists():
        return None
    old = RegisteredVerticalModel(folder)
    logits, _ = score_register(loaded, workdir, old, screening, purpose)
    return categories_under(loaded, old, logits, frame, band)


def categories_under(
    loaded: LoadedVerticalSpec, model: RegisteredVerticalModel, logits: npt.NDArray[np.float64], frame: pd.DataFrame,
    band: float,
) -> npt.NDArray[np.str_]:  # fmt: skip
    """Each register household's category under ``model``'s decision rule, from that model's logits."""
    scores = _sigmoid(logits)
    rule = DecisionRule.for_model(model.loaded.spec, model.card.mitigation)
    decisions = rule.decide(scores, frame, loaded.spec.schema_, band)
    return categorize(scores, decisions.cutoff, frame["enrolled"].to_numpy(dtype=bool), band)


def screen_eligible(
    loaded: LoadedVerticalSpec,
    workdir: Path,
    model_dir: Path,
    out: Path,
    *,
    token: str,
    purpose: str | None = None,
    tokens_path: Path | None = None,
    since: Path | None = None,
    review_band: float = 0.1,
    realign: bool = True,
    progress: Progress | None = None,
) -> ScreeningResult:
    """Screen civil affairs' whole register and write ``worklist.csv``, ``worklist.html`` and ``screening.json``.

    Alignment runs again first when any party's file changed since the last one (each party compares its
    own file's SHA-256 with the note its alignment output keeps); ``realign=False`` skips that check, for a
    caller that has just aligned.

    Raises
    ------
    ScreeningRefusedError
        Token or purpose refused (recorded in the coordinator's uses ledger; nothing scored).
    ModelError
        The model is not a registered vertical model of this federation, or a part fails its hash.
    """
    step = progress or (lambda _: None)
    keep_freed_memory()  # a screening's register-sized temporaries reuse pages (agencyfl.memory)
    model = RegisteredVerticalModel(model_dir)
    _check_spec(loaded, model)
    purpose = purpose or model.card.purpose
    screening = new_screening()
    try:
        token_id, token_holder = check_use(tokens_path or workdir / COORDINATOR / "tokens.json", token, purpose, model)
    except ScreeningRefusedError as exc:
        record_refusal(workdir, model, screening, purpose, exc)
        raise
    previous = read_worklist(since) if since is not None else None
    spec = loaded.spec
    holder = spec.label_agency.name
    aligned = realign and not alignment_is_current(loaded, workdir)  # a party's file changed: align again
    if aligned:
        step("aligning the agencies to the register")
        align_from_spec(loaded, workdir, requested_by=holder)
    step("scoring under encryption")
    logits, parties, frame = _score(loaded, workdir, model, screening, purpose, frame=True)
    assert frame is not None  # frame=True
    lists = decide_lists(loaded, model, logits, frame, review_band)
    distributions = Distributions(lists, loaded, review_band)

    step("asking the agencies that chose to explain")
    reasons: dict[int, list[dict[str, str]]] = {}
    refusals: dict[str, str] = {}
    requester_keys = PartyKeys.generate(holder)
    for name, contributor in parties.contributors.items():
        level = spec.agency(name).explain
        if level == "none" or not len(lists.listed):
            continue
        try:
            given = disclose(workdir, loaded, contributor, requester_keys, screening, model.version, purpose,
                             lists.listed.tolist())  # fmt: skip
        except ScreeningRefusedError as exc:
            refusals[name] = str(exc)
            continue
        add_reasons(reasons, name, level, given)

    old_categories = None
    if previous is not None and previous.model_version != model.version:
        step("re-scoring with the previous model, to tell facts from model changes")
        old_categories = _previous_categories(loaded, workdir, previous, model, screening, purpose, frame, review_band)
    outcomes = latest_outcomes(workdir, holder)
    rows, left = worklist_table(lists, model, screening, reasons, outcomes, previous, old_categories)

    step("recording the screening")
    requester_use = ModelUse(
        kind="screening", owner=holder, screening=screening, federation=spec.federation.name,
        model_version=model.version, purpose=purpose, requester=holder, time=now_iso(), token_id=token_id,
        households=len(lists.scores), counts=dict(lists.counts),
    )  # fmt: skip
    requester_entry = uses_ledger(workdir, holder).append(requester_use)
    for name, contributor in parties.contributors.items():
        uses_ledger(workdir, name).append(
            ModelUse(kind="screening-contribution", owner=name, screening=screening, federation=spec.federation.name,
                     model_version=model.version, purpose=purpose, requester=holder, time=now_iso(),
                     households=contributor.block.size)
        )  # fmt: skip
    uses_ledger(workdir, COORDINATOR).append(
        ModelUse(kind="screening", owner=COORDINATOR, screening=screening, federation=spec.federation.name,
                 model_version=model.version, purpose=purpose, requester=holder, time=now_iso(), token_id=token_id,
                 households=len(lists.scores), requester_entry_sha256=requester_entry)
    )  # fmt: skip
    sent = {**{n: c.sent_bytes for n, c in parties.contributors.items()}, "coordinator": parties.relay.sent_bytes,
            holder: parties.requester.sent_bytes}  # fmt: skip
    ledgers = {"requester": str(workdir / holder / "uses-ledger"),
               "coordinator": str(workdir / COORDINATOR / "uses-ledger")}  # fmt: skip
    groups, plots = worklist_csv_beside(out, rows, distributions)
    report = screening_report(loaded, model, lists, screening, purpose, (token_id, token_holder), previous, rows,
                              left, refusals, aligned=aligned, out=out, sent=sent, ledgers=ledgers,
                              review_band=review_band, groups=groups)  # fmt: skip
    files = write_worklist_page(out, rows, report, plots)
    return ScreeningResult(report, rows, files, lists.scores, frame)


@dataclass(frozen=True)
class Lists:
    """The decision on every register household: scores, the card's cutoffs, categories, who is listed."""

    scores: npt.NDArray[np.float64]
    frame: pd.DataFrame
    rule: DecisionRule
    cutoff: npt.NDArray[np.float64]
    categories: npt.NDArray[np.str_]
    listed: npt.NDArray[np.int64]
    counts: dict[str, int]


def decide_lists(
    loaded: LoadedVerticalSpec, model: RegisteredVerticalModel, logits: npt.NDArray[np.float64], frame: pd.DataFrame,
    review_band: float,
) -> Lists:  # fmt: skip
    """Apply the model card's decision rule (``DecisionRule``, shared with evaluate and score) to the scores."""
    scores = _sigmoid(logits)
    enrolled = frame["enrolled"].to_numpy(dtype=bool)
    rule = DecisionRule.for_model(model.loaded.spec, model.card.mitigation)
    decisions = rule.decide(scores, frame, loaded.spec.schema_, review_band)
    categories = categorize(scores, decisions.cutoff, enrolled, review_band)
    listed = np.flatnonzero(categories != "")
    counts: dict[str, int] = {str(c): int((categories == c).sum()) for c in CATEGORIES}
    return Lists(scores, frame, rule, np.asarray(decisions.cutoff, dtype=np.float64), categories, listed, counts)


def add_reasons(reasons: dict[int, list[dict[str, str]]], agency: str, level: str, given: dict[int, str]) -> None:
    """File one agency's disclosed reasons under each listed position."""
    for position, text in given.items():
        reasons.setdefault(position, []).append({"agency": agency, "level": level, "text": text})


def worklist_table(
    lists: Lists, model: RegisteredVerticalModel, screening: str, reasons: dict[int, list[dict[str, str]]],
    outcomes: dict[str, str], previous: PreviousWorklist | None, old_categories: npt.NDArray[np.str_] | None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:  # fmt: skip
    """One row per listed household in register order (``ROW_COLUMNS``: ``worklist.csv``'s columns and the
    register ``position``; ``reasons`` a list of disclosed reasons, or None), with the change since
    ``previous``; and the households that left the lists.

    Built column by column: a million-household register lists about a quarter of a million households,
    and one dict per row (about 250 MB and a second here) is made only for the rows a page shows
    (``page_rows``) or a caller asks for (``ScreeningResult.rows``).
    """
    same_model = previous is not None and previous.model_version == model.version
    listed = lists.listed
    households = canonical_ids([str(h) for h in lists.frame["household"].to_numpy(dtype=object)[listed]])
    categories = lists.categories[listed].tolist()
    nothing: list[str | None] = [None] * len(listed)
    change, previous_category, cause = nothing, nothing, list(nothing)
    review_status = [outcomes.get(h) for h in households]
    if previous is not None:
        previous_category = [previous.categories.get(h) for h in households]
        change = [change_of(h, c, previous) for h, c in zip(households, categories, strict=True)]
        for i in (i for i, c in enumerate(change) if c != "unchanged"):
            old = None if old_categories is None else str(old_categories[listed[i]])
            cause[i] = cause_of(previous_category[i] or "", categories[i], old, same_model)
        review_status = [
            "open" if status is None and before is not None else status
            for status, before in zip(review_status, previous_category, strict=True)
        ]

    def objects(values: list[Any]) -> pd.Series:
        return pd.Series(values, dtype=object)  # Python strings and None, as the rows have always held

    table = pd.DataFrame(
        {
            "household": objects(households), "position": listed.astype(np.int64), "category": objects(categories),
            "score": [round(v, 4) for v in lists.scores[listed].tolist()],  # Python's rounding, as the CSV had
            "cutoff": lists.cutoff[listed], "enrolled": lists.frame["enrolled"].to_numpy(dtype=bool)[listed],
            "change": objects(change), "previous_category": objects(previous_category), "cause": objects(cause),
            "review_status": objects(review_status), "reasons": objects([reasons.get(p) for p in listed.tolist()]),
            "model_version": objects([model.version] * len(listed)), "screening": objects([screening] * len(listed)),
        },
        columns=list(ROW_COLUMNS),
    )  # fmt: skip
    left: list[dict[str, Any]] = []
    if previous is not None:
        now_listed = set(households)
        left = [
            {"household": h, "previous_category": c, "review_status": outcomes.get(h, "open")}
            for h, c in sorted(previous.categories.items())
            if h not in now_listed
        ]
    return table, left


ROW_COLUMNS = (
    "household", "position", "category", "score", "cutoff", "enrolled", "change", "previous_category", "cause",
    "review_status", "reasons", "model_version", "screening",
)  # fmt: skip
"""A worklist row as ``ScreeningResult.rows`` and the page hold it: the CSV's columns and the register position."""


def row_dicts(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of a ``worklist_table`` as dicts of plain Python values (``reasons`` a list, empty when none)."""
    records = [{str(k): v for k, v in r.items()} for r in table.to_dict("records")]
    for record in records:
        record["reasons"] = record["reasons"] or []
    return records


def page_rows(table: pd.DataFrame, per_category: int) -> list[dict[str, Any]]:
    """``page.top_rows`` of the table, without a dict per row: each list's rows whose sort key is within its
    ``per_category`` smallest (ties included, so the page's own order picks exactly as over every row)."""
    from agencyfl.screening.page import top_rows

    score, cutoff = table["score"].to_numpy(dtype=np.float64), table["cutoff"].to_numpy(dtype=np.float64)
    keys = {"invite": -score, "review-enrolment": score, "human-review": np.abs(score - cutoff)}
    category = table["category"].to_numpy(dtype=object)
    chosen = np.zeros(len(table), dtype=bool)
    for name, key in keys.items():
        inside = np.flatnonzero(category == name)
        if len(inside) > per_category > 0:
            bound = np.partition(key[inside], per_category - 1)[per_category - 1]
            inside = inside[key[inside] <= bound]
        chosen[inside] = per_category > 0
    return top_rows(row_dicts(table.loc[chosen]), per_category)


@cycle_collection_paused
def screening_report(
    loaded: LoadedVerticalSpec, model: RegisteredVerticalModel, lists: Lists, screening: str, purpose: str,
    token: tuple[str, str], previous: PreviousWorklist | None, rows: pd.DataFrame, left: list[dict[str, Any]],
    refusals: dict[str, str], *, aligned: bool, out: Path, sent: dict[str, int], ledgers: dict[str, str],
    review_band: float, groups: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """``screening.json``: what was screened, with which model and token (id, holder), counts, changes, files;
    ``groups`` the score distributions by group (``Distributions``)."""
    spec = loaded.spec
    holder = spec.label_agency.name
    files = {"worklist_csv": str(out / "worklist.csv"), "worklist_html": str(out / "worklist.html"),
             "report": str(out / "screening.json")}  # fmt: skip
    changes = {k: int((rows["change"] == k).sum()) for k in ("new", "changed", "unchanged")}
    return {
        "screening": screening, "created": now_iso(), "federation": spec.federation.name, "purpose": purpose,
        "model_version": model.version, "requester": holder, "token_id": token[0], "token_holder": token[1],
        "households_scored": len(lists.scores), "threshold": lists.rule.threshold, "review_band": review_band,
        "aligned_again": aligned,
        "counts": lists.counts, "since": None if previous is None else {
            "worklist": str(previous.path), "model_version": previous.model_version,
            "screening": previous.screening, "changes": changes, "left": len(left)},
        "left": left, "disclosures": {a.name: a.explain for a in spec.agencies if a.name != holder},
        "explain_refused": refusals, "groups": groups, "labels": {},
        "files": files, "bytes": sent, "ledgers": ledgers,
    }  # fmt: skip


def worklist_csv_beside(out: Path, rows: pd.DataFrame, distributions: Distributions) -> tuple[dict[str, Any], str]:
    """Write ``worklist.csv`` while the distributions are drawn, then wait for them; if drawing failed, the CSV
    is removed again (no worklist without its page and report) and the error raised."""
    write_worklist_csv(out, rows)
    try:
        return distributions.result()
    except BaseException:
        (out / "worklist.csv").unlink(missing_ok=True)
        raise


def write_worklist_csv(out: Path, rows: pd.DataFrame) -> None:
    """``worklist.csv``, every row of a ``worklist_table``, 0600 (in a folder of its own, 0700)."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    table = rows[list(COLUMNS)].copy(deep=False)
    table["enrolled"] = rows["enrolled"].astype(int)
    table["reasons"] = [" | ".join(x["text"] for x in r) if r else "" for r in rows["reasons"].tolist()]
    write_private_csv(out / "worklist.csv", table)


def write_worklist_page(
    out: Path, rows: pd.DataFrame, report: dict[str, Any], plots: str | None = None
) -> dict[str, str]:
    """``worklist.html`` (the first rows of each list) and ``screening.json``, 0600; the report's files."""
    from agencyfl.screening.page import render_worklist_html

    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    page = {**report, "rows": page_rows(rows, PAGE_ROWS)}  # a page people read; the CSV has every row
    write_private_text(out / "worklist.html", render_worklist_html(page, plots))
    write_private_text(out / "screening.json", json.dumps(report, indent=2, default=str))
    files: dict[str, str] = report["files"]
    return files
