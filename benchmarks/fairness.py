"""Fairness with a planted disparity: coverage gaps before and after per-group thresholds, and their cost.

The synthetic population with rural households' recorded income carrying extra log-normal error of
sigma ``--rural-income-noise`` (farm income estimated, not documented), while their eligibility
follows their true income: the model then finds eligible rural households less reliably. A control
population plants nothing. Each is trained by the real federation (Flower simulation engine, default
spec: 10 rounds, epsilon 3) with
``[fairness] mitigation = "group-thresholds"`` on ``region_type``: the coordinator chooses per-group
thresholds from the agencies' pooled validation counts. Everything is then measured on held-out
households (in no agency's training file) as the agencies would record them (``test-views/``, the
same distribution the thresholds were chosen on), pooled: coverage of the eligible (TPR) per region,
the gap, the false-positive rate, accuracy and AUC, with one threshold and with the per-group
thresholds.

    python benchmarks/fairness.py [--households 20000] [--seeds 0,1] [--rural-income-noise 0.8] [--threshold 0.5]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agencyfl.federation.metrics import exact_metrics  # noqa: E402
from agencyfl.local_evaluation import evaluate_local  # noqa: E402
from agencyfl.runner import run_federation  # noqa: E402
from agencyfl.synth import synthesize  # noqa: E402
from benchmarks._common import table, write_results  # noqa: E402


def by_region(decisions: Any, regions: np.ndarray, eligible: np.ndarray) -> dict[str, dict[str, float]]:
    y = decisions["label"].to_numpy().astype(bool)
    out = {}
    for region in ("urban", "rural"):
        m = regions == region
        out[region] = {
            "tpr": float(eligible[m & y].mean()),
            "fpr": float(eligible[m & ~y].mean()),
            "auc": exact_metrics(decisions["score"].to_numpy()[m], y[m]).auc,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--households", type=int, default=20000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rural-income-noise", type=float, default=0.8)
    parser.add_argument("--threshold", type=float, default=0.5, help="decision threshold ([fairness] threshold)")
    args = parser.parse_args()

    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    import pandas as pd

    for seed in [int(s) for s in args.seeds.split(",")]:
        for factor in (0.0, args.rural_income_noise):
            with tempfile.TemporaryDirectory() as tmp:
                fed = synthesize(
                    Path(tmp) / "data",
                    households=args.households,
                    seed=seed,
                    rural_income_noise=factor,
                    test_views=True,
                )
                fed.spec.write_text(
                    re.sub(
                        r"(\[fairness\]\n)",
                        rf'\1mitigation = "group-thresholds"\nthreshold = {args.threshold}\n',
                        fed.spec.read_text(),
                    )
                )
                model = Path(run_federation(fed.spec, Path(tmp) / "work")["model"])
                views = sorted((fed.spec.parent / "test-views").glob("*.csv"))
                locals_ = [evaluate_local(model, view) for view in views]
                decisions = pd.concat([local.decisions for local in locals_], ignore_index=True)
                regions = np.concatenate([pd.read_csv(view)["region_type"].to_numpy() for view in views])
                thresholds = locals_[0].report["group_thresholds"]
                auc = exact_metrics(decisions["score"].to_numpy(), decisions["label"].to_numpy()).auc
                single = decisions["score"].to_numpy() >= args.threshold
                grouped = decisions["decision"].to_numpy() == "eligible"
                y = decisions["label"].to_numpy().astype(bool)
                for label, eligible in (("one threshold", single), ("per-group thresholds", grouped)):
                    per = by_region(decisions, regions, eligible)
                    gap = per["urban"]["tpr"] - per["rural"]["tpr"]
                    entry = {
                        "seed": seed,
                        "rural_income_noise": factor,
                        "decisions": label,
                        "thresholds": thresholds if label != "one threshold" else {"all": args.threshold},
                        "tpr_urban": per["urban"]["tpr"],
                        "tpr_rural": per["rural"]["tpr"],
                        "tpr_gap": gap,
                        "fpr_urban": per["urban"]["fpr"],
                        "fpr_rural": per["rural"]["fpr"],
                        "accuracy": float(np.mean(eligible == y)),
                        "auc": auc,
                        "auc_urban": per["urban"]["auc"],
                        "auc_rural": per["rural"]["auc"],
                    }
                    results.append(entry)
                    rows.append(
                        [
                            seed,
                            "none" if factor == 0 else f"rural income error sigma {factor:g}",
                            label,
                            f"{thresholds['rural']:.2f}" if label != "one threshold" else f"{args.threshold:.2f}",
                            f"{entry['tpr_urban']:.3f}",
                            f"{entry['tpr_rural']:.3f}",
                            f"{gap:+.3f}",
                            f"{entry['fpr_urban']:.3f} / {entry['fpr_rural']:.3f}",
                            f"{entry['accuracy']:.4f}",
                            f"{entry['auc']:.4f} ({entry['auc_urban']:.3f} / {entry['auc_rural']:.3f})",
                        ]
                    )
                    print(rows[-1], flush=True)
    headers = [
        "seed",
        "planted disparity",
        "decisions",
        "rural threshold",
        "TPR urban",
        "TPR rural",
        "TPR gap",
        "FPR urban / rural",
        "accuracy",
        "AUC (urban / rural)",
    ]
    print(table(headers, rows))
    path = write_results("fairness", {"households": args.households, "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
