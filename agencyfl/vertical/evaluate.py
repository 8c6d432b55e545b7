"""A registered vertical model applied to a joined, labelled file: for benchmarks and audits.

``agencyfl evaluate --model WORKDIR/registry/<federation>/vNNNN`` on a file that has every agency's
columns for each household (the synthetic population's ``test.csv``: held-out households, each
agency's block empty where that agency does not know the household). Every part is read from its
agency's own folder of the workdir the model was registered in (``load_part``: checked against the
manifest's hash), so this runs where every agency's folder is reachable, as ``agencyfl run`` does on
one machine; it is not a deployment path (screening scores the register under encryption, and there
no party sees another's part).

Each household is scored exactly as training and screening score a register position: each agency's
block encoded with ``FeatureEncoder(spec.block_schema(agency))``, the agency's "not held" input 1
where it holds nothing about the household (in a joined file: every one of its columns empty; its
other inputs are then 0) and 0 otherwise, each block row clipped (``clip_rows``); the logit is the sum
over the blocks of block @ part, plus the intercept (the last weight of the label holder's part).
A known household whose every field of a block happens to be unrecorded is indistinguishable from one
the agency does not hold, and is scored as not held.

Decisions follow the model card's rule (``DecisionRule.for_model``: the spec's threshold, the card's
per-group thresholds), as screening applies it. Besides the horizontal evaluation's figures: coverage
of the eligible (the true positive rate at that rule), the mean score and the eligible rate, for all
scored households and for the complete ones (held by every agency).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from agencyfl.federation.decision import DecisionRule
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.errors import ModelError
from agencyfl.federation.metrics import exact_metrics
from agencyfl.federation.spec import LoadedVerticalSpec, VerticalFederationSpec, load_any_spec
from agencyfl.federation.table import load_table
from agencyfl.local_evaluation import LocalEvaluation, fairness_on_file
from agencyfl.vertical.encoding import NOT_HELD, clip_rows
from agencyfl.vertical.model import INTERCEPT, RegisteredVerticalModel, load_part
from agencyfl.vertical.optim import clip_scores

Vector = npt.NDArray[np.float64]


def model_workdir(model: RegisteredVerticalModel) -> Path:
    """The workdir the model was registered in: ``WORKDIR/registry/<federation>/vNNNN`` -> ``WORKDIR``.

    Raises
    ------
    ModelError
        If the folder is not at that place in a workdir, or the workdir lacks an agency's folder.
    """
    folder = model.directory.resolve()
    federation = model.manifest.federation
    version = model.manifest.model_version.rsplit("/", 1)[-1]
    where = f"WORKDIR/registry/{federation}/{version}"
    parents = folder.parents
    if len(parents) < 3 or folder.name != version or parents[0].name != federation or parents[1].name != "registry":
        raise ModelError(
            f"{str(model.directory)!r} is not a vertical model folder inside a workdir ({where}): "
            "its parts are read from the agencies' folders of that workdir"
        )
    workdir = parents[2]
    missing = [holder for holder in model.manifest.parts if not (workdir / holder).is_dir()]
    if missing:
        raise ModelError(f"{str(workdir)!r} has no folder of {missing!r}, which hold parts of {model.version!r}")
    return workdir


def _check_spec(loaded: LoadedVerticalSpec, model: RegisteredVerticalModel) -> None:
    if loaded.spec.federation.name != model.manifest.federation:
        raise ModelError(f"model {model.version!r} is not of federation {loaded.spec.federation.name!r}")
    if loaded.spec.feature_blocks() != model.loaded.spec.feature_blocks():
        raise ModelError(f"model {model.version!r} was trained with other feature blocks than the spec declares")


def block_inputs(spec: VerticalFederationSpec, agency: str) -> list[str]:
    """The input names of ``agency``'s part, as the manifest lists them."""
    names = [*FeatureEncoder(spec.block_schema(agency)).names, NOT_HELD]
    return [*names, INTERCEPT] if agency == spec.label_agency.name else names


def score_joined(
    spec: VerticalFederationSpec, parts: dict[str, Vector], frame: pd.DataFrame, score_clip: float | None
) -> tuple[Vector, dict[str, npt.NDArray[np.bool_]]]:
    """Each row's logit (each part's score clipped at ``score_clip``, as its holder clips it), and per agency
    whether it holds the row (any of its columns non-empty).

    ``frame`` holds validated rows of the whole schema (``load_table``: missing values are NaN/None).
    """
    logits = np.zeros(len(frame))
    held: dict[str, npt.NDArray[np.bool_]] = {}
    for agency in spec.agencies:
        schema = spec.block_schema(agency.name)
        columns = [f.name for f in schema.features]
        encoder = FeatureEncoder(schema)
        values = encoder.encode(frame[columns]).astype(np.float64)  # as feature_block / label_block
        holds = np.asarray(~frame[columns].isna().all(axis=1).to_numpy(), dtype=bool)
        x = np.zeros((len(frame), encoder.width + 1))
        x[holds, :-1] = values[holds]
        x[~holds, -1] = 1.0  # the not-held input; its other inputs are 0 (as place_block)
        weights = parts[agency.name]
        part = clip_rows(x) @ weights[: encoder.width + 1]
        if agency.name == spec.label_agency.name:
            part = part + weights[-1]
        logits += clip_scores(part, score_clip)[0]
        held[agency.name] = holds
    return logits, held


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def figures(scores: Vector, y: npt.NDArray[np.int64], eligible: npt.NDArray[np.bool_]) -> dict[str, Any]:
    """Metrics of a set of scored households: AUC, accuracy, Brier, and at the decision rule coverage of the
    eligible (TPR), mean score and eligible rate (None where undefined)."""
    metrics = exact_metrics(scores, y)
    positive = y.astype(bool)
    n = len(scores)
    return {
        **{k: (_number(v) if isinstance(v, float) else v) for k, v in metrics.as_dict().items()},
        "eligible": int(eligible.sum()),
        "accuracy_at_decisions": float(np.mean(eligible == positive)) if n else None,
        "coverage_of_eligible": float(eligible[positive].mean()) if positive.any() else None,
        "mean_score": float(scores.mean()) if n else None,
        "eligible_rate": float(eligible.mean()) if n else None,
    }


def evaluate_vertical(
    model_dir: Path, data: Path, spec: Path | None = None, review_band: float = 0.1
) -> LocalEvaluation:
    """Score a joined labelled file with a registered vertical model (see the module's docstring).

    Raises
    ------
    ModelError
        Not a registered vertical model in a workdir, a part missing or not matching the manifest, or a
        spec that does not match the model (exit 8).
    SpecError, DataFileError
        An invalid spec, an unusable data file.
    """
    model = RegisteredVerticalModel(model_dir)
    if spec is not None:
        loaded = load_any_spec(spec)
        if not isinstance(loaded, LoadedVerticalSpec):
            raise ModelError(f"{str(model_dir)!r} is a vertical model; the spec {str(spec)!r} is not vertical")
        _check_spec(loaded, model)
    else:
        loaded = model.loaded
    workdir = model_workdir(model)
    vspec = loaded.spec
    parts: dict[str, Vector] = {}
    for agency in vspec.agencies:
        part = model.manifest.parts.get(agency.name)
        if part is not None and part.inputs != block_inputs(vspec, agency.name):
            raise ModelError(f"{agency.name}'s part of {model.version!r} has other inputs than the spec's block")
        parts[agency.name] = load_part(workdir, agency.name, model.manifest)
    check = load_table(data, vspec.schema_)
    frame = check.valid
    y = frame[vspec.schema_.label].to_numpy(dtype=np.int64)
    logits, held = score_joined(vspec, parts, frame, model.manifest.score_clip)
    scores = np.asarray(1.0 / (1.0 + np.exp(-logits)), dtype=np.float64)
    rule = DecisionRule.for_model(model.loaded.spec, model.card.mitigation)
    decided = rule.decide(scores, frame, vspec.schema_, review_band)
    eligible = np.asarray(decided.eligible, dtype=bool)
    complete = np.logical_and.reduce([held[a.name] for a in vspec.agencies])
    not_held = [";".join(a.name for a in vspec.agencies if not held[a.name][i]) for i in range(len(frame))]
    decisions = pd.DataFrame(
        {
            vspec.schema_.id: frame[vspec.schema_.id].to_numpy(),
            "label": y,
            "score": np.round(scores, 6),
            "decision": np.where(eligible, "eligible", "not eligible"),
            "review": decided.review,
            "cutoff": decided.cutoff,
            "complete": complete.astype(int),
            "not_held_by": not_held,
        }
    )
    fairness, mitigated = fairness_on_file(scores, y, eligible, frame, vspec.fairness, vspec.schema_, rule, data)
    report: dict[str, Any] = {
        "model": str(model_dir),
        "model_version": model.version,
        "topology": "vertical",
        "workdir": str(workdir),
        "data": str(data),
        "rows": check.total,
        "scored": len(frame),
        "quarantined": len(check.quarantined),
        **figures(scores, y, eligible),
        "threshold": rule.threshold,
        "group_thresholds": rule.thresholds or None,
        "held": {a.name: int(held[a.name].sum()) for a in vspec.agencies},
        "complete": {"households": int(complete.sum()), **figures(scores[complete], y[complete], eligible[complete])},
    }
    return LocalEvaluation(report, decisions, fairness, mitigated)
