"""Cross-checking the agencies' ledgers against the coordinator's countersigned chain.

Both sides record every round an agency answered: the agency writes a ``round`` (it trained and spent)
or a ``refusal`` entry; the coordinator writes the agency's reply (``trained`` or ``refused`` with the
epsilon it reported). Releases (the noised validation histograms of each round and of the final model,
the fairness counts) are compared too: the agency's ``release`` entries against the releases the
coordinator's chain says each reply carried. The two are compared as multisets keyed by (agency, job,
round, outcome), so a round replayed after a coordinator crash (refused by the agency, recorded twice
by both) still matches.

Rounds are compared for the jobs the coordinator's chain knows. A job an agency's ledger records for
the chain's federation (entries carry the spec's federation name) that the chain lacks entirely is a
``rollback`` finding (``unknown_jobs``): the chain was cut back, or the job was hidden from it. Jobs of
other federations, and entries written before ledgers recorded the federation, cannot be vouched for
by this chain and are not compared.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from agencyfl.privacy.coordinator_ledger import RoundSummary
from agencyfl.privacy.ledger import Finding, LedgerEvent

_AGREE = 1e-9  # both sides write the same float: only a change makes them differ

Key = tuple[str, str, int, str]  # (agency, job, round, "trained" | "refused" | "release:evaluation" | ...)


def _agency_side(ledgers: Mapping[str, Iterable[LedgerEvent]]) -> dict[Key, list[float | None]]:
    side: dict[Key, list[float | None]] = defaultdict(list)
    for agency, events in ledgers.items():
        for e in events:
            if e.kind == "release":
                if e.federation is not None:  # releases the coordinator's chain records (not older fairness ones)
                    side[(agency, e.job, e.round, f"release:{e.release or 'fairness'}")].append(None)
                continue
            side[(agency, e.job, e.round, "trained" if e.kind == "round" else "refused")].append(e.epsilon_job)
    return side


def _coordinator_side(chain: Iterable[RoundSummary], agencies: set[str]) -> dict[Key, list[float | None]]:
    side: dict[Key, list[float | None]] = defaultdict(list)
    for entry in chain:
        for report in entry.agencies:
            if report.agency not in agencies:
                continue
            if report.status != "released":
                side[(report.agency, entry.job, entry.round, report.status)].append(report.epsilon_job)
            for name in report.releases:
                side[(report.agency, entry.job, entry.round, f"release:{name}")].append(None)
    return side


def cross_check(ledgers: Mapping[str, Iterable[LedgerEvent]], chain: list[RoundSummary]) -> list[tuple[str, Finding]]:
    """Compare each agency's ledger with the coordinator's chain.

    Parameters
    ----------
    ledgers
        Each agency's verified events, by agency name.
    chain
        The coordinator's verified round summaries.

    Returns
    -------
    list of (party, Finding)
        ``missing``: a round one side records and the other does not; ``epsilon``: both record it
        but with different epsilons. The party is the agency concerned.
    """
    ours = _agency_side(ledgers)
    theirs = _coordinator_side(chain, set(ledgers))
    jobs = {entry.job for entry in chain}
    findings: list[tuple[str, Finding]] = []
    for key in sorted(set(ours) | set(theirs)):
        agency, job, round_, outcome = key
        mine = sorted(x for x in ours.get(key, []) if x is not None) or ours.get(key, [])
        coordinators = sorted(x for x in theirs.get(key, []) if x is not None) or theirs.get(key, [])
        what = f"round {round_} of {job} ({outcome})"
        if len(coordinators) > len(mine):
            findings.append(
                (agency, Finding("missing", f"the coordinator records {what}; the agency's ledger does not"))
            )
        elif len(mine) > len(coordinators) and job in jobs:
            findings.append(
                (agency, Finding("missing", f"the agency's ledger records {what}; the coordinator's chain does not"))
            )
        for a, c in zip(mine, coordinators, strict=False):
            if a is None or c is None:
                continue  # releases are compared by count: both sides record that one was made
            if abs(a - c) > _AGREE * max(1.0, abs(a)):
                message = f"{what}: the agency recorded epsilon {a:.6f}, the coordinator {c:.6f}"
                findings.append((agency, Finding("epsilon", message)))
    return findings


def unknown_jobs(
    ledgers: Mapping[str, Iterable[LedgerEvent]], chain: list[RoundSummary], federation: str | None
) -> list[tuple[str, Finding]]:
    """Jobs an agency's ledger records for ``federation`` (the chain's) that the chain does not know.

    Parameters
    ----------
    ledgers
        Each agency's verified events, by agency name.
    chain
        The coordinator's verified round summaries.
    federation
        The chain's federation name (None: the chain is empty, every job of the ledgers is unknown
        unless its entries name no federation).
    """
    known = {entry.job for entry in chain}
    findings: list[tuple[str, Finding]] = []
    for agency, events in ledgers.items():
        missing: dict[str, int] = {}
        for e in events:
            if e.federation is None or e.job in known or e.kind != "round":
                continue
            if federation is not None and e.federation != federation:
                continue
            missing[e.job] = missing.get(e.job, 0) + 1
        for job, rounds in missing.items():
            message = (
                f"the agency's ledger records {rounds} trained round(s) of job {job}; the coordinator's chain "
                "has no entry of that job (rolled back, or the job was run without it)"
            )
            findings.append((agency, Finding("rollback", message)))
    return findings
