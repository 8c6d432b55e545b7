"""``agencyfl run --dry-run`` for a vertical spec: what the job would release and spend, before anything happens.

Nothing is aligned, trained, released or recorded, and nothing is written (no ledger, key, alignment
output or workdir is created). From the spec alone: the job's public plan (``job.plan_of``: T
iterations, each one ``vertical-gradient`` Gaussian release of sensitivity sqrt(K + 1) D and std
sigma sqrt(K + 1) D, after block Newton's one ``vertical-hessian`` release (sensitivity sqrt(K + 2) / 4,
std sigma times that), plus one ``fairness`` release when ``[fairness] noise_multiplier > 0`` and civil
affairs holds every fairness attribute, as ``job.release_fairness`` decides). From each agency's
existing ledger (``WORKDIR/<agency>/ledger``, verified read-only with the agency's key, else the
folder's ``ledger.pub``): its lifetime epsilon now, and the job's releases checked one by one exactly
as ``job.AgencyLedgers.account`` will check them (per-job cap, lifetime budget), so the figures are
those the real run then records: its epsilon for the job, its lifetime epsilon after it, and the first
release a cap would refuse (a refused iteration stops the job; a refused fairness release only leaves
the card without its table).

Bytes per iteration (what each party sends, as ``train_vertical`` counts it): the register size N
from the alignment output when one exists in the workdir (``alignment-sizes.json``), else civil
affairs' file rows (an upper bound: alignment quarantines malformed ids); ceil(N / 4095) ciphertexts
per vector; each ciphertext's serialized size measured with TenSEAL at the level it is sent at
(partial scores fresh, residuals after one rescale, gradients after two: every gradient input, the
intercept's and an all-zero one included, takes a plaintext product), sealed envelopes
measured by sealing them. N8192 [60, 40, 40, 60]: about 331 KB fresh, 235 KB for a residual, 131 KB
for a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agencyfl.alignment.runs import read_ids
from agencyfl.alignment.sealed import MessageKind, PartyKeys, seal
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.errors import LedgerError, SpecError
from agencyfl.federation.spec import LoadedVerticalSpec
from agencyfl.privacy.accounting import StepRecord, epsilon_for
from agencyfl.privacy.events import GaussianEvent, step_records
from agencyfl.privacy.keys import load_signing_key
from agencyfl.privacy.ledger import HEAD_FILE, LEDGER_FILE, spend_records, verify_ledger
from agencyfl.vertical.job import fairness_event, plan_of
from agencyfl.vertical.plan import VerticalPlan
from agencyfl.vertical.protocol import chunk_count

Release = Literal["vertical-hessian", "vertical-gradient", "fairness"]
RUN_NAME = "vertical-00000000"
"""A run id of the length ``train_vertical`` draws (``vertical-`` and 8 hex digits): envelope headers carry it."""
ARBITER = "arbiter"


@dataclass(frozen=True)
class CiphertextSizes:
    """Serialized CKKS ciphertexts (bytes) of one 4096-slot vector, at the level each is sent at."""

    partial_scores: int
    residuals: int
    gradient: int
    slots: int


@lru_cache(maxsize=4)
def ciphertext_sizes(parameters: str | None = None) -> CiphertextSizes:
    """Measure, with TenSEAL, the ciphertexts one iteration sends (a throwaway key; nothing is kept).

    As in ``vertical.protocol``: a fresh encryption (``Enc(u_k)``), after one plaintext product and a
    rescale (``Enc(d)``), after a second (each masked gradient; the rotate-and-sum keeps the level).
    """
    import tenseal as ts

    from agencyfl.privacy.he import new_private_context, parameter_set
    from agencyfl.vertical.protocol import PARAMETERS

    params = parameter_set(parameters or PARAMETERS)
    context = new_private_context(params)
    rng = np.random.default_rng(0)
    slots = params.slots
    scores = ts.ckks_vector(context, rng.normal(0.0, 1.0, slots).tolist())
    residual = scores * np.full(slots, 1e-4).tolist() + rng.uniform(-1e-4, 1e-4, slots).tolist()
    first = np.zeros(slots)
    first[0] = 1.0
    gradient = residual * rng.uniform(-1.0, 1.0, slots).tolist() + first.tolist()
    return CiphertextSizes(
        partial_scores=len(scores.serialize()),
        residuals=len(residual.serialize()),
        gradient=len(gradient.serialize()),
        slots=slots,
    )


def _sealed_bytes(payload: int, sender: str, recipient: str, kind: MessageKind, chunks: int, rows: int) -> int:
    """Bytes on the wire of a ``chunks``-chunk sealed message of ``payload``-byte ciphertexts (headers measured)."""
    keys, to = PartyKeys.generate(sender), PartyKeys.generate(recipient).public()
    total = 0
    for chunk in range(chunks):
        envelope = seal(b"", run=RUN_NAME, sender=keys, recipient=to, kind=kind, chunk=chunk, chunks=chunks, rows=rows)
        total += envelope.size + payload
    return total


def register_estimate(loaded: LoadedVerticalSpec, workdir: Path) -> tuple[int, str]:
    """N and where it came from: the alignment output in ``workdir`` if any, else civil affairs' file rows."""
    from agencyfl.vertical.encoding import register_size

    holder = loaded.spec.label_agency.name
    if (workdir / holder / "alignment" / "alignment-sizes.json").is_file():
        return register_size(loaded, workdir), "the alignment output in the workdir"
    rows = sum(1 for _ in read_ids(loaded.data_path(holder), loaded.spec.schema_.id))
    return rows, f"{holder}'s file rows (no alignment output yet; alignment may quarantine malformed ids)"


def widths(loaded: LoadedVerticalSpec) -> dict[str, int]:
    """Each party's number of weights (gradient ciphertexts per iteration): its encoded block, its not-held
    input and, for civil affairs, the intercept."""
    spec = loaded.spec
    holder = spec.label_agency.name
    return {a.name: FeatureEncoder(spec.block_schema(a.name)).width + 1 + int(a.name == holder) for a in spec.agencies}


def bytes_per_iteration(
    loaded: LoadedVerticalSpec, size: int, sizes: CiphertextSizes, plan: VerticalPlan | None = None
) -> dict[str, int]:
    """What each party sends per iteration over the job (the mean of ``IterationMetrics.sent_bytes``), arbiter
    included. In sequential sweeps each agency sends its partial scores once per sweep, after its step, and
    once more at the start of the first (and of a sweep after the projection rescaled the weights: rare, not
    counted here).

    Every gradient ciphertext is at one level (``vertical.protocol.ZERO_GUARD``): the count is the block's
    width, the intercept's included."""
    spec = loaded.spec
    holder = spec.label_agency.name
    chunks = chunk_count(size, sizes.slots)
    width = widths(loaded)
    out: dict[str, int] = {}
    for a in spec.agencies:
        own = width[a.name] * sizes.gradient + 8  # masked gradients, then its block's squared norm
        if a.name == holder:
            own += sum(
                _sealed_bytes(sizes.residuals, holder, k.name, "residuals", chunks, size)
                for k in spec.agencies
                if k.name != holder
            )
        else:
            scores = _sealed_bytes(sizes.partial_scores, a.name, holder, "partial-scores", chunks, size)
            first_sweep = scores // plan.iterations if plan is not None and plan.order == "sequential" else 0
            own += scores + first_sweep
        out[a.name] = own
    out[ARBITER] = 8 * sum(width.values())  # the masked noised values, back to each sender
    return out


def _fairness_plan(loaded: LoadedVerticalSpec) -> tuple[GaussianEvent | None, str]:
    """The fairness release the job will account (as ``release_fairness`` decides), and why (not)."""
    spec = loaded.spec
    section = spec.fairness
    if section is None:
        return None, "no [fairness] section"
    if section.noise_multiplier == 0:
        return None, "noise_multiplier = 0: exact counts are not released"
    own = {f.name for f in spec.block_schema(spec.label_agency.name).features}
    absent = [a for a in section.attributes if a not in own]
    if absent:
        return None, f"{absent!r} are not held by {spec.label_agency.name}: no counts are released"
    return fairness_event(section), "released (noised), accounted in every ledger"


def _existing_spend(workdir: Path, agency: str) -> tuple[list[StepRecord], int, str]:
    """The agency's recorded spend (verified, read-only), its number of entries, and the ledger's state.

    Raises
    ------
    LedgerError
        If the ledger does not verify (the real run would stop on it too).
    """
    folder = workdir / agency / "ledger"
    if not (folder / LEDGER_FILE).exists() and not (folder / HEAD_FILE).exists():
        return [], 0, "none yet (the job would start it)"
    key_file = workdir / agency / "keys" / "ledger-signing.key"
    public = load_signing_key(key_file).public_key() if key_file.exists() else None
    check = verify_ledger(folder, public)
    if not check.ok:
        raise LedgerError(f"{agency}'s ledger {str(folder)!r} does not verify: {check.problems[0]}")
    return spend_records(check.events), len(check.events), "verified"


def dry_run(
    loaded: LoadedVerticalSpec,
    workdir: Path,
    *,
    register: tuple[int, str] | None = None,
    lifetime_now: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The job's plan, releases, each agency's epsilon now and after, refusals and bytes; writes nothing.

    ``register`` and ``lifetime_now`` are the coordinator's view in a deployment (``coordinator train
    --dry-run``): N from its runs chain, and each agency's lifetime epsilon as last reported in its
    countersigned chain instead of the agencies' ledgers, which only the agencies hold. The lifetime
    after the job is then an upper bound (basic composition: now + the job's epsilon), and each agency's
    own ledger still decides when the job runs.

    Raises
    ------
    SpecError
        If the per-job epsilon cannot be met with the planned releases.
    LedgerError
        If an agency's existing ledger does not verify.
    DataFileError
        If civil affairs' file cannot be read when there is no alignment output.
    """
    spec = loaded.spec
    privacy = spec.privacy
    plan = plan_of(loaded)
    try:
        sigma = plan.noise_multiplier
    except ValueError as exc:
        raise SpecError(f"privacy.epsilon: {exc}") from None
    gradient = plan.iteration_event()
    fairness, fairness_status = _fairness_plan(loaded)
    releases: list[tuple[Release, int, StepRecord, GaussianEvent]] = []
    if plan.releases_hessian:
        releases.append(("vertical-hessian", 0, StepRecord(sigma, 1.0, 1), plan.hessian_event()))
    releases += [("vertical-gradient", i, StepRecord(sigma, 1.0, 1), gradient) for i in range(1, plan.iterations + 1)]
    if fairness is not None and spec.fairness is not None:
        releases.append(("fairness", plan.iterations + 1, StepRecord(spec.fairness.noise_multiplier, 1.0, 1), fairness))

    names = [a.name for a in spec.agencies]
    existing: dict[str, list[StepRecord]] = {}
    ledgers: dict[str, dict[str, Any]] = {}
    for name in names:
        if lifetime_now is not None:
            existing[name] = []
            state = f"last reported {lifetime_now.get(name, 0.0):.3f} in the coordinator's chain (upper bound after)"
            ledgers[name] = {"ledger": "(on the agency's host)", "ledger_entries": None, "ledger_state": state}
            continue
        records, entries, state = _existing_spend(workdir, name)
        existing[name] = records
        ledgers[name] = {"ledger": str(workdir / name / "ledger"), "ledger_entries": entries, "ledger_state": state}
    reported = lifetime_now or {}

    # Each release checked as AgencyLedgers.account checks it: a refusal by any agency stops an iteration
    # (and the job); a refused fairness release is recorded and the job goes on without it.
    job: list[StepRecord] = []
    refused: dict[str, dict[str, Any]] = {}
    stopped: dict[str, Any] | None = None
    fairness_refused = False
    for kind, index, planned, event in releases:
        reasons = {}
        for name in names:
            job_eps = epsilon_for([*job, planned], privacy.delta)
            life_eps = epsilon_for([*existing[name], *job, planned], privacy.delta) + reported.get(name, 0.0)
            why = []
            if job_eps > privacy.epsilon:
                why.append(f"epsilon for this job would reach {job_eps:.3f} > per-job cap {privacy.epsilon:g}")
            if life_eps > privacy.budget:
                why.append(f"lifetime epsilon would reach {life_eps:.3f} > budget {privacy.budget:g}")
            if why:
                reasons[name] = "; ".join(why)
        if reasons:
            for name, reason in reasons.items():
                refused.setdefault(name, {"release": kind, "iteration": index, "reason": reason})
            if kind != "fairness":
                stopped = {"iteration": index, "refused_by": sorted(reasons), "reason": next(iter(reasons.values()))}
                break
            fairness_refused = True
            continue
        job += step_records(event)  # as the ledger entry records it (its mechanism)

    full = [r for _, _, _, event in releases for r in step_records(event)]
    size, source = register if register is not None else register_estimate(loaded, workdir)
    sizes = ciphertext_sizes()
    sent = bytes_per_iteration(loaded, size, sizes, plan)
    agencies: dict[str, Any] = {}
    for name in names:
        agencies[name] = {
            "epsilon_job_planned": epsilon_for(full, privacy.delta),
            "epsilon_job_cap": privacy.epsilon,
            "epsilon_lifetime_now": epsilon_for(existing[name], privacy.delta) + reported.get(name, 0.0),
            "epsilon_lifetime_planned": epsilon_for([*existing[name], *full], privacy.delta) + reported.get(name, 0.0),
            "budget": privacy.budget,
            "epsilon_job_after": epsilon_for(job, privacy.delta),
            "epsilon_lifetime_after": epsilon_for([*existing[name], *job], privacy.delta) + reported.get(name, 0.0),
            "refused": refused.get(name),
            "bytes_per_iteration": sent[name],
            **ledgers[name],
        }
    by_kind = [
        {"release": "vertical-gradient", "count": plan.iterations, "mechanism": "gaussian",
         "sensitivity": gradient.sensitivity, "std": gradient.std, "noise_multiplier": sigma},
    ]  # fmt: skip
    if plan.releases_hessian:
        hessian = plan.hessian_event()
        by_kind.insert(0, {"release": "vertical-hessian", "count": 1, "mechanism": "gaussian",
                           "sensitivity": hessian.sensitivity, "std": hessian.std,
                           "noise_multiplier": sigma})  # fmt: skip
    if fairness is not None and spec.fairness is not None:
        by_kind.append(
            {"release": "fairness", "count": 1, "mechanism": "gaussian", "sensitivity": fairness.sensitivity,
             "std": fairness.std, "noise_multiplier": spec.fairness.noise_multiplier}
        )  # fmt: skip
    return {
        "dry_run": True,
        "federation": spec.federation.name,
        "spec": str(loaded.path),
        "workdir": str(workdir),
        "written": "nothing: no alignment, no training, no ledger entry",
        "view": "the agencies' ledgers" if lifetime_now is None else "the coordinator's chain (lifetime: upper bound)",
        "plan": plan.public_fields(),
        "releases": {"count": len(releases), "by_kind": by_kind, "fairness": fairness_status},
        "would_run": stopped is None,
        "stops_at": stopped,
        "fairness_refused": fairness_refused,
        "agencies": agencies,
        "register": {"size": size, "source": source, "ciphertexts_per_vector": chunk_count(size, sizes.slots)},
        "ciphertext_bytes": {"partial_scores": sizes.partial_scores, "residuals": sizes.residuals,
                             "gradient": sizes.gradient},
        "bytes_per_iteration": sent,
    }  # fmt: skip
