"""What crosses a domain in Flower's records, as one typed model per message, encoded one way for every party.

The coordinator's round request (``RoundRequest``) and an agency's answer travel as Flower
``ConfigRecord``s (the legacy client's config and metrics dicts, which SecAgg+ needs in Flower 1.41).
An answer is a ``TrainReport`` (a trained round), a ``ReleaseReport`` (the final model's releases)
or a ``Refusal`` (the refusal alone: nothing computed from records). Records hold scalars, so the
noised histograms and fairness counts travel as float64 bytes. Wire keys are
the field names in kebab case (``epsilon_job`` travels as ``epsilon-job``); the models are the only
place that spelling lives.

A reply that does not parse is a ``MessageError``: the coordinator counts it as a failed reply, an
agency refuses a request it cannot read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agencyfl.federation.errors import AgencyflError

ALIGN_MESSAGE_TYPE = "query.align"
VERTICAL_MESSAGE_TYPE = "query.vertical"  # starts a deployed vertical job (its iterations run over streams)
"""Flower message type of a ``coordinator align`` step (``agencyfl.alignment.remote``); here so that the
ClientApp routes it without importing the alignment package for every training message."""

Scalar = bool | bytes | float | int | str
"""What a Flower metric or config record holds (``flwr.common.Scalar``)."""


class MessageError(AgencyflError):
    """A message between parties is malformed (a missing or mistyped field, an unknown status)."""


def histogram_bytes(values: np.ndarray | list[float] | tuple[float, ...]) -> bytes:
    """Histogram counts as bytes (metric records hold scalars only); float64, since releases are noised."""
    return np.asarray(values, dtype=np.float64).tobytes()


def histogram_from_bytes(data: bytes) -> np.ndarray:
    """The inverse of ``histogram_bytes``."""
    return np.frombuffer(data, dtype=np.float64).astype(float)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=_kebab, populate_by_name=True)

    def _scalars(self) -> dict[str, Scalar]:
        nested = {name for name, info in type(self).model_fields.items() if _is_nested(info.annotation)}
        return {k: v for k, v in self.model_dump(by_alias=True, exclude=nested).items() if v is not None}

    @classmethod
    def _parse(cls, values: Mapping[str, Any]) -> Self:
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '-'}: {e['msg']}" for e in exc.errors())
            raise MessageError(f"malformed {cls.__name__}: {problems}") from None


def _is_nested(annotation: Any) -> bool:
    return any(isinstance(t, type) and issubclass(t, _Wire) for t in getattr(annotation, "__args__", (annotation,)))


class NoisedEvaluation(_Wire):
    """An agency's Gaussian-noised validation histograms (one per label) and squared-error sum."""

    KEYS: ClassVar[tuple[str, ...]] = ("hist-pos", "hist-neg", "brier-sum")

    hist_pos: tuple[float, ...]
    hist_neg: tuple[float, ...]
    brier_sum: float

    def to_metrics(self) -> dict[str, Scalar]:
        """The release as metric-record entries."""
        return {"hist-pos": histogram_bytes(self.hist_pos), "hist-neg": histogram_bytes(self.hist_neg),
                "brier-sum": self.brier_sum}  # fmt: skip

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Scalar]) -> Self | None:
        """The release in ``metrics``, or None when there is none."""
        if "hist-pos" not in metrics:
            return None
        pos, neg = metrics.get("hist-pos"), metrics.get("hist-neg")
        if not isinstance(pos, bytes) or not isinstance(neg, bytes) or len(pos) % 8 or len(neg) % 8:
            raise MessageError("malformed NoisedEvaluation: hist-pos and hist-neg must be float64 bytes")
        return cls._parse(
            {"hist-pos": tuple(histogram_from_bytes(pos)), "hist-neg": tuple(histogram_from_bytes(neg)),
             "brier-sum": metrics.get("brier-sum")}
        )  # fmt: skip


class FairnessRelease(_Wire):
    """An agency's noised per-group counts (``federation.fairness`` layout), or why it released none."""

    status: Literal["noised", "refused"]
    reason: str = ""
    counts: tuple[float, ...] = ()

    def to_metrics(self) -> dict[str, Scalar]:
        """The release as metric-record entries."""
        return {"fairness-status": self.status, "fairness-reason": self.reason,
                "fairness-counts": histogram_bytes(self.counts)}  # fmt: skip

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Scalar]) -> Self | None:
        """The release in ``metrics``, or None when there is none."""
        if "fairness-status" not in metrics:
            return None
        counts = metrics.get("fairness-counts", b"")
        if not isinstance(counts, bytes) or len(counts) % 8:
            raise MessageError("malformed FairnessRelease: fairness-counts must be float64 bytes")
        return cls._parse(
            {"status": metrics["fairness-status"], "reason": metrics.get("fairness-reason", ""),
             "counts": tuple(histogram_from_bytes(counts))}
        )  # fmt: skip


class _Report(_Wire):
    """What every answer states: who answered, and its ledger's epsilons and origin after the request."""

    agency: str
    reason: str = ""
    epsilon_job: Annotated[float, Field(ge=0)] = 0.0
    epsilon_lifetime: Annotated[float, Field(ge=0)] = 0.0
    # the same lifetime by RDP alone (0: not reported), the figure the coordinator's "never down" check compares:
    # unlike the enforced one, it never falls below a figure recorded for a prefix of the ledger under either
    # accountant (a ledger of Gaussian releases recorded by RDP alone counts lower now by the exact figure)
    epsilon_lifetime_rdp: Annotated[float, Field(ge=0)] = 0.0
    origin: Annotated[str, Field(alias="ledger-origin")] = ""


class Refusal(_Report):
    """A refused request, answered alone: nothing computed from records travels with it."""

    status: Literal["refused"] = "refused"
    reason: str

    def to_metrics(self) -> dict[str, Scalar]:
        """The refusal as metric-record entries."""
        return self._scalars()


class TrainReport(_Report):
    """A trained round: the spend, the dataset fingerprint, and the noised evaluation of the model received."""

    status: Literal["trained"] = "trained"
    dataset: str
    steps: Annotated[int, Field(gt=0)]
    noise_multiplier: Annotated[float, Field(gt=0)]
    evaluation: NoisedEvaluation | None = None

    def to_metrics(self) -> dict[str, Scalar]:
        """The report as metric-record entries (the update itself travels as the reply's arrays)."""
        return self._scalars() | (self.evaluation.to_metrics() if self.evaluation else {})

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Scalar]) -> TrainReport | Refusal:
        """A fit reply's metrics as the report or refusal they state.

        Raises
        ------
        MessageError
            If the metrics are neither.
        """
        if metrics.get("status") == "refused":
            return Refusal._parse(metrics)
        scalars = {k: v for k, v in metrics.items() if k not in NoisedEvaluation.KEYS}
        return cls._parse(scalars | {"evaluation": NoisedEvaluation.from_metrics(metrics)})


class ReleaseReport(_Report):
    """The final model's releases: its noised evaluation and, if the spec asks, fairness counts."""

    status: Literal["released"] = "released"
    evaluation: NoisedEvaluation | None = None
    fairness: FairnessRelease | None = None

    def to_metrics(self) -> dict[str, Scalar]:
        """The report as metric-record entries."""
        metrics = self._scalars() | (self.evaluation.to_metrics() if self.evaluation else {})
        return metrics | (self.fairness.to_metrics() if self.fairness else {})

    @property
    def releases(self) -> list[Literal["evaluation", "fairness"]]:
        """Which noised releases the reply carries."""
        released: list[Literal["evaluation", "fairness"]] = []
        if self.evaluation is not None:
            released.append("evaluation")
        if self.fairness is not None:
            released.append("fairness")
        return released

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Scalar]) -> ReleaseReport | Refusal:
        """An evaluate reply's metrics as the report or refusal they state.

        Raises
        ------
        MessageError
            If the metrics are neither.
        """
        if metrics.get("status") == "refused":
            return Refusal._parse(metrics)
        keys = {*NoisedEvaluation.KEYS, "fairness-status", "fairness-reason", "fairness-counts"}
        scalars = {k: v for k, v in metrics.items() if k not in keys}
        evaluation, fairness = NoisedEvaluation.from_metrics(metrics), FairnessRelease.from_metrics(metrics)
        return cls._parse(scalars | {"evaluation": evaluation, "fairness": fairness})


class LedgerRecord(_Wire):
    """What the coordinator's chain last recorded of one agency's ledger (sent with every request)."""

    origin: str
    epsilon_lifetime: float
    epsilon_lifetime_rdp: float | None = None  # None: recorded before it was reported

    @classmethod
    def following(
        cls, before: LedgerRecord | None, origin: str, lifetime: float, lifetime_rdp: float | None
    ) -> LedgerRecord:
        """The record after an accepted report; a report without the RDP figure keeps the last one (still a
        floor for what the ledger must hold)."""
        if lifetime_rdp is None and before is not None:
            lifetime_rdp = before.epsilon_lifetime_rdp
        return cls(origin=origin, epsilon_lifetime=lifetime, epsilon_lifetime_rdp=lifetime_rdp)

    def lost_spend(self, lifetime: float, lifetime_rdp: float | None) -> tuple[float, float] | None:
        """``(now, recorded)`` if a ledger now holding ``lifetime`` (``lifetime_rdp`` by RDP alone, None if not
        known) spent less than this record says, else None. Like is compared with like:

        - a record with the RDP figure was written by today's accountant: its enforced figure is compared with
          the enforced one now, and its RDP figure with RDP's now (each only rises as entries are added);
        - a record without it was written when RDP alone enforced: its figure is RDP's, compared with RDP's
          now. The enforced figure now could be lower without any entry missing (the exact figure of a ledger
          of Gaussian releases), so it is not compared.
        """
        pairs: list[tuple[float, float]] = []
        if self.epsilon_lifetime_rdp is not None:
            pairs.append((lifetime, self.epsilon_lifetime))
            if lifetime_rdp is not None:
                pairs.append((lifetime_rdp, self.epsilon_lifetime_rdp))
        else:
            pairs.append((lifetime_rdp if lifetime_rdp is not None else lifetime, self.epsilon_lifetime))
        for now, recorded in pairs:
            if now + 1e-9 * max(1.0, recorded) < recorded:
                return now, recorded
        return None


class RoundRequest(_Wire):
    """The coordinator's request for one round (fit) or the final releases (evaluate) of a job.

    ``max_weight`` (fit only) caps the weight an agency may give its update; ``ledger_records`` is the
    coordinator's record of every agency's ledger; ``plan_signature`` its signature over the job's plan.
    """

    job: str
    round: Annotated[int, Field(ge=0)] = 0
    rounds: Annotated[int, Field(gt=0)]
    spec_sha256: str
    max_weight: Annotated[int, Field(gt=0)] | None = None
    epsilon: Annotated[float, Field(gt=0)] | None = None
    ledger_records: dict[str, LedgerRecord] = {}
    plan_signature: str = ""

    def to_config(self) -> dict[str, Scalar]:
        """The request as config-record entries (the ledger records as one JSON string)."""
        config = self.model_dump(by_alias=True, exclude={"ledger_records"}, exclude_none=True)
        # no null field: an agency from before the RDP figure parses the records it knows (extra keys forbidden)
        records = {name: record.model_dump(exclude_none=True) for name, record in self.ledger_records.items()}
        return config | {"ledger-records": json.dumps(records, sort_keys=True)}

    @classmethod
    def from_config(cls, config: Mapping[str, Scalar]) -> Self:
        """The request a config record states.

        Raises
        ------
        MessageError
            If a field is missing or mistyped.
        """
        values = dict(config)
        raw = values.pop("ledger-records", "{}")
        try:
            records = json.loads(raw) if isinstance(raw, str) and raw else {}
        except json.JSONDecodeError:
            raise MessageError("malformed RoundRequest: ledger-records is not JSON") from None
        return cls._parse(values | {"ledger-records": records})
