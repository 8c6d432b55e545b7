"""The auditor's view of a ledger: verify it, recompute the spend from its events, compare to caps.

Lifetime epsilon is reported by both the enforcing accountant (RDP, or the exact GDP figure when every
release is a Gaussian without sampling: ``privacy.accounting``) and PRV (numerical), side by side.

Recorded epsilons are not trusted: the spend is recomputed from the recorded mechanisms with the
accountant each entry names (RDP alone for entries written before they named one) and must agree with
what the agency wrote.

``audit_federation`` adds what one ledger alone cannot show: each key taken from the auditor's own
keyring (not from the folder an adversary may have rewritten), the coordinator's countersigned chain
verified, and both sides cross-checked (``privacy.crosscheck``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agencyfl.privacy.accounting import ACCOUNTANT, SpendTally, StepRecord, epsilon_for, epsilon_prv, epsilon_rdp
from agencyfl.privacy.coordinator_ledger import RoundSummary
from agencyfl.privacy.crosscheck import cross_check, unknown_jobs
from agencyfl.privacy.events import UnaccountedMechanism, same_records
from agencyfl.privacy.independent import recompute, relation_findings
from agencyfl.privacy.keys import keyring_key, keyring_parties
from agencyfl.privacy.ledger import (
    FINDING_ORDER,
    LEDGER_FILE,
    Finding,
    FindingKind,
    LedgerEvent,
    verify_ledger,
)

_AGREE = 1e-6


@dataclass
class AgencyAudit:
    """One row of the audit report."""

    agency: str
    ledger: str
    last_job: str | None
    epsilon_last_job: float
    epsilon_lifetime: float
    epsilon_lifetime_prv: float
    budget: float | None
    epsilon_job_cap: float | None
    delta: float | None
    rounds_last_job: int
    rounds_total: int
    jobs: int
    refusals: int
    last_entry: str | None
    chain_ok: bool
    signatures_ok: bool
    head_ok: bool
    key_id: str
    origin: str = ""  # hash of the ledger's entry 0 (its signed genesis)
    legacy: bool = False  # entries but no genesis: written before ledgers had one
    findings: list[Finding] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)  # every entry with recomputed epsilons
    # each headline epsilon beside dp_accounting's RDP and PLD recomputation of it (``privacy.independent``)
    independent: dict[str, dict[str, float]] = field(default_factory=dict)
    events: list[LedgerEvent] = field(default_factory=list, repr=False)

    @property
    def problems(self) -> list[str]:
        """What makes the ledger unverified (everything but overspend)."""
        return [f.message for f in self.findings if f.kind != "overspend"]

    @property
    def overspend(self) -> list[str]:
        """Caps crossed."""
        return [f.message for f in self.findings if f.kind == "overspend"]

    @property
    def verified(self) -> bool:
        """Chain, signatures and head verify, and recorded epsilons agree with the recomputation."""
        return self.chain_ok and self.signatures_ok and self.head_ok and not self.problems

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data."""
        row = {k: v for k, v in vars(self).items() if k not in {"findings", "events"}}
        return {
            **row,
            "problems": self.problems,
            "overspend": self.overspend,
            "findings": [vars(f) for f in self.findings],
            "verified": self.verified,
            "within_budget": self.within_budget,
        }

    @property
    def within_budget(self) -> bool:
        """No cap is exceeded (lifetime budget, and each job's cap)."""
        if self.budget is None:
            return not self.overspend
        return self.epsilon_lifetime <= self.budget + _AGREE and not self.overspend


def audit_ledger(directory: str | Path, public_key: Ed25519PublicKey | None = None) -> AgencyAudit:
    """Verify one agency's ledger folder and summarise its spend.

    Parameters
    ----------
    directory
        The agency's ledger folder.
    public_key
        The agency's key as the auditor holds it; by default the folder's own ``ledger.pub``.
    """
    check = verify_ledger(directory, public_key)
    events = check.events
    findings = list(check.findings)
    timeline: list[dict[str, Any]] = []
    agencies = sorted({e.agency for e in events})
    if len(agencies) > 1:
        findings.append(Finding("altered", f"entries of several agencies in one ledger: {agencies!r}"))
    if check.genesis is not None and any(e.agency != check.genesis.party for e in events):
        findings.append(Finding("party", f"the genesis names {check.genesis.party!r}, entries name {agencies!r}"))
    jobs: list[str] = []
    for e in events:
        if e.job not in jobs:
            jobs.append(e.job)
    last_job = jobs[-1] if jobs else None
    delta = events[-1].delta if events else None
    lifetime, per_job = SpendTally(), dict[str, SpendTally]()  # running compositions: one addition per entry (linear)
    audited: list[tuple[str, StepRecord]] = []  # what the tallies composed, by job
    for index, e in enumerate(events):
        tally = per_job.setdefault(e.job, SpendTally())
        if e.kind != "refusal":
            try:
                records = e.step_records()
            except UnaccountedMechanism as exc:
                findings.append(Finding("epsilon", f"entry {index}: {exc}; read off its flat fields instead"))
                records = [e.flat_record()]
            if e.mechanism is not None and not same_records(records, [e.flat_record()]):
                findings.append(
                    Finding("epsilon", f"entry {index}: its mechanism event disagrees with its flat fields")
                )
            for record in records:
                lifetime.add(record)
                tally.add(record)
                audited.append((e.job, record))
        # checked against the recorded figures under the accountant that wrote them (an entry written before
        # entries named one: RDP alone); the timeline shows them as today's accountant counts them
        life, job = lifetime.epsilon(e.delta), tally.epsilon(e.delta)
        life_then, job_then = (
            (life, job)
            if e.accountant == ACCOUNTANT
            else (lifetime.epsilon(e.delta, e.accountant), tally.epsilon(e.delta, e.accountant))
        )
        timeline.append(
            {
                "seq": index,
                "kind": e.kind,
                "job": e.job,
                "round": e.round,
                "epsilon_job": job,
                "epsilon_lifetime": life,
                "epsilon_job_cap": e.epsilon_job_cap,
                "budget": e.budget,
                "time": e.time,
                "reason": e.reason,
            }
        )
        if e.kind == "refusal":
            continue
        if not (
            math.isclose(life_then, e.epsilon_lifetime, rel_tol=_AGREE, abs_tol=_AGREE)
            and math.isclose(job_then, e.epsilon_job, rel_tol=_AGREE, abs_tol=_AGREE)
        ):
            findings.append(
                Finding(
                    "epsilon",
                    f"entry {index}: recorded epsilon ({e.epsilon_job:.6f} job, {e.epsilon_lifetime:.6f} "
                    f"lifetime) disagrees with the recomputed ({job_then:.6f}, {life_then:.6f}; "
                    f"accountant {e.accountant})",
                )
            )
        if job > e.epsilon_job_cap + _AGREE:
            findings.append(
                Finding(
                    "overspend",
                    f"entry {index}: job {e.job} at epsilon {job:.4f} exceeds its per-job cap {e.epsilon_job_cap:g}",
                )
            )
    spent = [record for _, record in audited]
    eps_job = epsilon_for([r for job, r in audited if job == last_job], delta) if last_job and delta else 0.0
    eps_life = epsilon_for(spent, delta) if delta else 0.0
    findings += relation_findings(events)
    job_records = [r for job, r in audited if job == last_job]
    job_rdp = epsilon_rdp(job_records, delta) if last_job and delta else 0.0
    job_check = recompute([e for e in events if e.job == last_job], eps_job, job_rdp, delta)
    life_check = recompute(events, eps_life, epsilon_rdp(spent, delta) if delta else 0.0, delta)
    findings += job_check.findings(f"job {last_job}") + life_check.findings("lifetime")
    budget = events[-1].budget if events else None
    if budget is not None and eps_life > budget + _AGREE:
        findings.append(Finding("overspend", f"lifetime epsilon {eps_life:.4f} exceeds the budget {budget:g}"))
    return AgencyAudit(
        agency=check.party or (agencies[0] if agencies else Path(directory).resolve().parent.name),
        ledger=str(directory),
        last_job=last_job,
        epsilon_last_job=eps_job,
        epsilon_lifetime=eps_life,
        epsilon_lifetime_prv=epsilon_prv(spent, delta) if delta else 0.0,
        budget=budget,
        epsilon_job_cap=events[-1].epsilon_job_cap if events else None,
        delta=delta,
        rounds_last_job=sum(1 for e in events if e.kind == "round" and e.job == last_job),
        rounds_total=sum(1 for e in events if e.kind == "round"),
        jobs=len(jobs),
        refusals=sum(1 for e in events if e.kind == "refusal"),
        last_entry=events[-1].time if events else None,
        chain_ok=check.chain_ok,
        signatures_ok=check.signatures_ok,
        head_ok=check.head_ok,
        key_id=check.key_id,
        origin=check.origin,
        legacy=check.legacy,
        findings=findings,
        timeline=timeline,
        independent={"epsilon_last_job": vars(job_check), "epsilon_lifetime": vars(life_check)},
        events=events,
    )


@dataclass
class CoordinatorAudit:
    """The coordinator's countersigned chain: verification and what it records."""

    ledger: str
    key_id: str
    verified: bool
    jobs: list[str]
    rounds: int
    findings: list[Finding]
    entries: list[RoundSummary] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data (entries summarised by job and round)."""
        return {
            "ledger": self.ledger,
            "key_id": self.key_id,
            "verified": self.verified,
            "jobs": self.jobs,
            "rounds": self.rounds,
            "findings": [vars(f) for f in self.findings],
        }


@dataclass
class FederationAudit:
    """Every agency's ledger, the coordinator's chain, and the cross-check between them."""

    agencies: list[AgencyAudit]
    coordinator: CoordinatorAudit | None
    cross: list[tuple[str, Finding]]
    notes: list[str]

    def all_findings(self) -> list[tuple[str, Finding]]:
        """Every finding with the party it concerns."""
        found = [(row.agency, f) for row in self.agencies for f in row.findings]
        if self.coordinator is not None:
            found += [("coordinator", f) for f in self.coordinator.findings]
        return found + self.cross

    def worst(self) -> FindingKind | None:
        """The most serious kind of finding (``FINDING_ORDER``), or None when all is well."""
        kinds = {f.kind for _, f in self.all_findings()}
        return next((k for k in FINDING_ORDER if k in kinds), None)


def _claimed_party(directory: Path) -> str:
    """The party a ledger folder's entry 0 names (the genesis' party, a legacy ledger's first agency).

    Read before anything is verified, only to choose which of the keyring's keys to verify with: the
    verification then proves that the named party's key signed the name.
    """
    try:
        with (directory / LEDGER_FILE).open("rb") as handle:
            first = json.loads(handle.readline())
        if isinstance(first, dict):
            name = first.get("party") if first.get("kind") == "genesis" else first.get("agency")
            if isinstance(name, str) and name:
                return name
    except (OSError, ValueError):
        pass
    return directory.resolve().parent.name


def _signed_by_other(directory: Path, keyring: Path, claimed: str) -> str | None:
    """Which other keyring party's key signs this ledger, if one does."""
    for party in keyring_parties(keyring):
        if party == claimed:
            continue
        key = keyring_key(keyring, party)
        if key is not None and verify_ledger(directory, key).signatures_ok:
            return party
    return None


def _bind_parties(
    rows: list[AgencyAudit], expected: set[str] | None, where: str, exhaustive: bool
) -> list[tuple[str, Finding]]:
    """A ledger per expected agency, none twice, none unknown: ``party`` findings otherwise."""
    found: list[tuple[str, Finding]] = []
    names = [r.agency for r in rows]
    for name in sorted({n for n in names if names.count(n) > 1}):
        folders = [r.ledger for r in rows if r.agency == name]
        found.append((name, Finding("party", f"{len(folders)} ledgers belong to {name!r}: {folders}")))
    keys = [r.key_id for r in rows if r.key_id]
    for key in sorted({k for k in keys if keys.count(k) > 1}):
        owners = sorted({r.agency for r in rows if r.key_id == key})
        if len(owners) > 1:
            found.append((owners[0], Finding("party", f"ledgers of {owners} are signed with one key ({key})")))
    if expected is not None:
        for name in sorted(expected - set(names)):
            found.append((name, Finding("party", f"no ledger was given for {name!r}, which {where} names")))
        for name in sorted(set(names) - expected) if exhaustive else []:
            found.append((name, Finding("party", f"a ledger of {name!r}, which {where} does not name")))
    return found


def _restarts(rows: list[AgencyAudit], chain: list[RoundSummary]) -> list[tuple[str, Finding]]:
    """Ledgers whose origin differs from the one the chain last recorded; replies the coordinator refused."""
    found: list[tuple[str, Finding]] = []
    recorded: dict[str, str] = {}
    for entry in chain:
        for report in entry.agencies:
            if not report.accepted:
                message = f"the coordinator refused its reply in round {entry.round} of {entry.job}: {report.reason}"
                found.append((report.agency, Finding("restarted", message)))
            elif report.origin:
                recorded[report.agency] = report.origin
    for row in rows:
        origin = recorded.get(row.agency)
        if origin and row.origin and origin != row.origin:
            message = (
                f"the ledger begins at {row.origin[:12]}, the coordinator's chain records {origin[:12]} "
                "(restarted or replaced)"
            )
            found.append((row.agency, Finding("restarted", message)))
    return found


def _registry_rollback(models: list[dict[str, Any]], chain: list[RoundSummary]) -> list[tuple[str, Finding]]:
    """Registered models of the chain's federation whose hash the chain does not countersign."""
    signed = {e.model_sha256 for e in chain}
    federations = {e.federation for e in chain}
    found: list[tuple[str, Finding]] = []
    for card in models:
        if federations and card.get("federation") not in (None, *federations):
            continue
        digest = str(card.get("model_sha256", ""))
        if digest not in signed:
            message = (
                f"registered model {card.get('model_version')} (job {card.get('job')}, {digest[:12]}) is not in "
                "the chain (rolled back, or registered without a countersigned round)"
            )
            found.append(("coordinator", Finding("rollback", message)))
    return found


def audit_federation(
    ledgers: list[Path],
    coordinator: Path | None = None,
    keyring: Path | None = None,
    expected: list[str] | None = None,
    models: list[dict[str, Any]] | None = None,
) -> FederationAudit:
    """Verify agencies' ledgers (and the coordinator's chain), bind them to parties, cross-check them.

    Parameters
    ----------
    ledgers
        Agency ledger folders.
    coordinator
        The coordinator's chain folder (``WORKDIR/coordinator/ledger``), if the auditor has it.
    keyring
        The auditor's folder of public keys (``NAME.pub``, ``coordinator.pub``; see ``audit keys``).
        Without it each folder's own ``ledger.pub`` is used, which only proves internal consistency.
    expected
        The agencies that must each have exactly one ledger (e.g. the spec's); by default those the
        coordinator's chain names, if given.
    models
        Registered models' cards (``server.registry.list_models``): each must be in the chain.
    """
    notes: list[str] = []
    rows: list[AgencyAudit] = []
    for directory in ledgers:
        name = _claimed_party(Path(directory))
        key = keyring_key(keyring, name) if keyring else None
        row = audit_ledger(directory, key)
        if keyring and key is None:
            row.signatures_ok = False
            row.findings.insert(0, Finding("altered", f"the keyring holds no key for {name!r}"))
        elif keyring and not row.signatures_ok and (other := _signed_by_other(Path(directory), keyring, name)):
            row.findings.insert(0, Finding("party", f"the ledger names {name!r} but is signed with {other!r}'s key"))
        if row.legacy:
            notes.append(
                f"{row.agency}: the ledger has no signed genesis (written before ledgers had one); its party is "
                "taken from its entries' signed agency field"
            )
        rows.append(row)
    if keyring is None:
        notes.append("no keyring: each ledger was checked against the public key in its own folder")
    chain_audit = None
    cross: list[tuple[str, Finding]] = []
    where = "the spec"
    if coordinator is not None:
        key = keyring_key(keyring, "coordinator") if keyring else None
        check = verify_ledger(coordinator, key, RoundSummary)
        findings = list(check.findings)
        if keyring and key is None:
            findings.insert(0, Finding("altered", "the keyring holds no key for 'coordinator'"))
        if check.party not in (None, "coordinator"):
            findings.append(Finding("party", f"the coordinator's chain names {check.party!r} as its party"))
        jobs = list(dict.fromkeys(e.job for e in check.events))
        chain_audit = CoordinatorAudit(
            str(coordinator),
            check.key_id,
            not findings,
            jobs,
            sum(e.kind == "round" for e in check.events),  # round entries (not the final evaluations')
            findings,
            check.events,
        )
        cross = cross_check({row.agency: row.events for row in rows}, check.events)
        cross += _restarts(rows, check.events)
        federation = next((e.federation for e in check.events), None)
        cross += unknown_jobs({row.agency: row.events for row in rows}, check.events, federation)
        if expected is None:
            expected = sorted({r.agency for e in check.events for r in e.agencies})
            where = "the coordinator's chain"
        if models is not None:
            cross += _registry_rollback(models, check.events)
    elif models:
        notes.append("registered models were not checked: no coordinator's chain was given")
    cross += _bind_parties(rows, set(expected) if expected is not None else None, where, where == "the spec")
    return FederationAudit(rows, chain_audit, cross, notes)
