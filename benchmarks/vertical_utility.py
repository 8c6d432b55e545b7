"""Where vertical training's utility goes: the first-order Taylor residual, the weight bound, the DP noise.

The plaintext reference of the protocol (``vertical.reference.reference_train``: the same steps as the
encrypted protocol, which tests/test_vertical_training.py and tests/test_vertical_stream.py show equal
within CKKS error) on the vertical synthetic population, against the centralized non-private logistic
regression of benchmarks/vertical.py on the same assessed training households, evaluated on the
complete held-out households (held by every agency). Rows without noise separate the model the
protocol fits (least squares on the Taylor residual, weights within W) from the cost of the noise.
Rows without a clip C are the protocol before 2026-12-05 (weights held to W); rows with C clip each party's
partial score (docs/vertical.md); rows marked newton are block Newton (one DP Hessian release, then T steps
with each block's step matrix: the default plan from 2026-12-06; later with each release's noise
shaped by the Hessian release, unless marked "uniform noise"), the others Adam. Rows with another residual
ask what a closer approximation of the sigmoid would give, each with the noise its own bound D needs
(sensitivity sqrt(K + 1) D for |z| <= Z): a degree-3 least-squares fit on [-8, 8] (Kim et al. 2018; one
more ciphertext-by-ciphertext level under CKKS) and the exact sigmoid, which no polynomial under CKKS
computes: the ceiling of every approximation.

    python benchmarks/vertical_utility.py [--households 75000] [--seed 5] [--rows all|newton|tuning] [--first-seed 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agencyfl.alignment.runs import align_from_spec, load_vertical  # noqa: E402
from agencyfl.synth_vertical import synthesize_vertical  # noqa: E402
from agencyfl.vertical import VerticalPlan, feature_block, label_block  # noqa: E402
from agencyfl.vertical.reference import reference_train  # noqa: E402
from benchmarks._common import table, write_results  # noqa: E402
from benchmarks.vertical import centralized, metrics, model_logits, test_blocks  # noqa: E402

CONFIGS: list[dict[str, Any]] = [
    {"noise": False, "iterations": 300, "weight_bound": 5.0},
    {"noise": False, "iterations": 300, "weight_bound": 20.0},
    {"noise": True, "epsilon": 1.0, "iterations": 30, "weight_bound": 5.0},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 5.0},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 10.0},
    {"noise": True, "epsilon": 3.0, "iterations": 100, "weight_bound": 5.0},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 5.0, "residual": "cubic", "learning_rate": 1.0},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 5.0, "residual": "exact", "learning_rate": 1.0},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 50.0, "residual": "exact", "learning_rate": 1.0},
    {"noise": True, "epsilon": 3.0, "iterations": 100, "weight_bound": 50.0, "residual": "exact", "learning_rate": 1.0},
    {"noise": False, "iterations": 300, "weight_bound": 50.0, "residual": "exact", "learning_rate": 1.0},
    # the protocol from 2026-12-05: each partial score clipped to 1.5 by its holder, W 20 (docs/vertical.md)
    {"noise": False, "iterations": 300, "weight_bound": 20.0, "score_clip": 1.5},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 20.0, "score_clip": 1.5},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 20.0, "score_clip": 1.5, "seed": 2},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 20.0, "score_clip": 1.5, "seed": 3},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 20.0, "score_clip": 1.0},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 20.0, "score_clip": 2.0},
    {"noise": True, "epsilon": 1.0, "iterations": 100, "weight_bound": 20.0, "score_clip": 1.5, "learning_rate": 0.4},
    {"noise": True, "epsilon": 3.0, "iterations": 100, "weight_bound": 20.0, "score_clip": 1.5},
    {"noise": True, "epsilon": 1.0, "iterations": 200, "weight_bound": 20.0, "score_clip": 1.5},
]
# block Newton (one DP Hessian release before T iterations), each gradient release's noise shaped by the Hessian
# release, sigma from the exact Gaussian accounting. From 2026-12-05 (the default plan) the parties step in turn
# (sequential sweeps, lr 1) and the model is the mean of the last half of the iterates; before, they stepped at
# once (simultaneous, lr 0.3) and the model was the last iterate. Each row over eight noise seeds.
_BASE: dict[str, Any] = {"optimizer": "newton", "noise": True, "weight_bound": 20.0, "score_clip": 1.5}
NEWTON: list[dict[str, Any]] = [
    {**_BASE, "epsilon": eps, "iterations": t, "order": order, "average": average, "noise_seed": seed}
    for eps, t, order, average, seeds in (
        (1.0, 20, "sequential", None, 8),  # now
        (1.0, 15, "sequential", None, 8),
        (1.0, 30, "sequential", None, 8),
        (1.0, 20, "sequential", 0.0, 8),  # the last iterate instead of the mean
        (1.0, 50, "simultaneous", None, 8),  # before
        (3.0, 20, "sequential", None, 4),
    )
    for seed in range(seeds)
] + [
    {**_BASE, "noise": False, "iterations": 20, "order": "sequential"},
    {**_BASE, "noise": False, "iterations": 50, "order": "simultaneous"},
]  # fmt: skip
ADAM_SEEDS = [{**CONFIGS[12], "seed": seed} for seed in (1, 2, 3, 4)]  # the protocol before, beside them
# ``--rows tuning``: the sequential default (T 20, the mean of the last half, damping 0.5) beside other dampings,
# averaging fractions and T, eight noise seeds each (the same draws in every row)
TUNING: list[dict[str, Any]] = [
    {**_BASE, "epsilon": 1.0, "iterations": t, "order": "sequential", "average": average, "damping": damping,
     "noise_seed": seed}
    for t, average, damping in (
        (20, None, 0.5), (20, None, 0.25), (20, None, 1.0), (20, None, 1.5), (20, None, 2.3),
        (20, 0.75, 0.5), (20, 0.9, 0.5), (30, 0.75, 0.5), (40, 0.75, 0.5),
    )
    for seed in range(8)
]  # fmt: skip


def _cubic() -> np.ndarray:
    """Coefficients (c0, c1, c3) of the least-squares cubic c0 + c1 z + c3 z^3 to the sigmoid on [-8, 8]."""
    z = np.linspace(-8.0, 8.0, 2001)
    coefficients, *_ = np.linalg.lstsq(np.stack([np.ones_like(z), z, z**3], 1), 1 / (1 + np.exp(-z)), rcond=None)
    return np.asarray(coefficients)


CUBIC = _cubic()
SIGMOIDS: dict[str, Any] = {
    "taylor": lambda z: 0.5 + z / 4,  # the protocol's
    "cubic": lambda z: CUBIC[0] + CUBIC[1] * z + CUBIC[2] * z**3,
    "exact": lambda z: 1 / (1 + np.exp(-z)),
}


def residual_bound(kind: str, score_bound: float) -> float:
    """D: the largest |f(z) - y| over |z| <= Z and y in {0, 1} (a fine grid; f is smooth)."""
    f = SIGMOIDS[kind](np.linspace(-score_bound, score_bound, 200_001))
    return float(max(np.abs(f).max(), np.abs(f - 1).max()))


class _NoNoise:
    """A generator of zero noise (the rows that show the model without DP)."""

    def normal(self, loc: float, scale: float, size: int) -> np.ndarray:
        return np.zeros(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--households", type=int, default=75_000)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--rows",
        choices=["all", "newton", "tuning"],
        default="all",
        help="newton: only the block Newton rows (the protocol as built) and one Adam row beside them; "
        "tuning: the default's damping, averaging and T against other choices",
    )
    parser.add_argument("--first-seed", type=int, default=1, help="block Newton rows' first noise seed (+0 to +7)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synth = synthesize_vertical(Path(tmp) / "data", households=args.households, seed=args.seed)
        loaded = load_vertical(synth.spec)
        align_from_spec(loaded, Path(tmp) / "work")
        others = [a.name for a in loaded.spec.agencies if not a.label]
        features = [feature_block(loaded, a, Path(tmp) / "work") for a in others]
        label, labels = label_block(loaded, Path(tmp) / "work")
        tests, y, complete = test_blocks(loaded.spec, Path(tmp) / "data")
    order = [*others, label.agency]
    w = centralized([b.x for b in (*features, label)], labels.y, labels.train)
    widths = np.cumsum([0] + [tests[a].shape[1] for a in order])
    z = sum(tests[a] @ w[widths[i] : widths[i + 1]] for i, a in enumerate(order)) + w[-1]
    base = metrics(np.asarray(z)[complete], y[complete])
    result: dict[str, Any] = {
        "households": args.households, "register": len(label.x), "trained_on": int(labels.train.sum()),
        "test_complete": int(complete.sum()), "eligible_rate_complete": float(y[complete].mean()),
        "centralized": {**base, "weight_norm": float(np.linalg.norm(w))}, "runs": [],
    }  # fmt: skip
    rows = [["centralized non-private logistic", "", f"{base['auc']:.4f}", "1.000", f"{base['coverage']:.3f}", "1.000",
             f"{base['mean_score']:.3f}"]]  # fmt: skip
    configs = {"all": [*CONFIGS, *NEWTON], "newton": [*ADAM_SEEDS, *NEWTON], "tuning": TUNING}[args.rows]
    for config in configs:
        eps = float(config.get("epsilon", 1.0))
        optimizer = config.get("optimizer", "adam")
        kind = config.get("residual", "taylor")
        plan = VerticalPlan(agencies=len(order), iterations=config["iterations"], epsilon=eps, delta=1e-5,
                            weight_bound=config["weight_bound"], optimizer=optimizer,
                            learning_rate=config.get("learning_rate"), score_clip=config.get("score_clip"),
                            noise=config.get("spread", "shaped"),
                            order=config.get("order", "simultaneous"), average=config.get("average"),
                            damping=config.get("damping", 0.5))  # fmt: skip
        seeded = args.first_seed + config["noise_seed"] if "noise_seed" in config else config.get("seed", 1)
        rng: Any = np.random.default_rng(seeded) if config["noise"] else _NoNoise()
        bound = residual_bound(kind, plan.score_bound)
        f = SIGMOIDS[kind]
        weights = reference_train(
            features, label, labels, plan, rng, residual_of=lambda z, lab, c, f=f: lab.train * c * (f(z) - lab.y),
            noise_std=plan.noise_multiplier * (plan.agencies + 1) ** 0.5 * bound,
        )  # fmt: skip
        zt = model_logits(tests, weights, label.agency, plan.score_clip)
        m = metrics(np.asarray(zt)[complete], y[complete])
        noise = f"eps {eps:g} (sigma {plan.noise_multiplier:.1f})" if config["noise"] else "none"
        clip = f", C {config['score_clip']:g}" if config.get("score_clip") else ""
        seed = f", seed {seeded}" if "seed" in config or "noise_seed" in config else ""
        seed += ", uniform noise" if config.get("spread") == "uniform" else ""
        if optimizer == "newton":
            seed += f", {plan.order}, mean of last {plan.averaged}, damping {plan.damping:g}"
        name = (f"{kind} {optimizer}, T {config['iterations']}, W {config['weight_bound']:g}{clip}{seed}, "
                f"lr {plan.learning_rate:g}, D {bound:.2f}")  # fmt: skip
        result["runs"].append({**config, **m, "optimizer": optimizer, "residual": kind, "residual_bound": bound,
                               "order": plan.order, "averaged": plan.averaged, "learning_rate": plan.learning_rate,
                               "damping": plan.damping,
                               "auc_ratio": m["auc"] / base["auc"],
                               "coverage_ratio": m["coverage"] / base["coverage"]})  # fmt: skip
        rows.append([name, noise, f"{m['auc']:.4f}", f"{m['auc'] / base['auc']:.3f}", f"{m['coverage']:.3f}",
                     f"{m['coverage'] / base['coverage']:.3f}", f"{m['mean_score']:.3f}"])  # fmt: skip
        print(rows[-1], flush=True)
    print(f"register {len(label.x):,}, trained on {int(labels.train.sum()):,} assessed households; "
          f"{int(complete.sum()):,} complete held-out households, eligible rate {y[complete].mean():.3f}")  # fmt: skip
    print(table(["model", "noise", "AUC", "AUC ratio", "coverage@0.5", "coverage ratio", "mean score"], rows))
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in result["runs"]:  # the same configuration over noise seeds
        key = ", ".join(f"{k} {run[k]}" for k in ("optimizer", "order", "epsilon", "iterations", "averaged", "damping",
                                                  "noise", "spread") if k in run)  # fmt: skip
        groups.setdefault(key, []).append(run)
    summary = [
        [
            key,
            str(len(runs)),
            f"{np.mean([r['auc_ratio'] for r in runs]):.4f}",
            f"{min(r['auc_ratio'] for r in runs):.4f}",
            f"{np.mean([r['coverage_ratio'] for r in runs]):.3f}",
            f"{min(r['coverage_ratio'] for r in runs):.3f}",
        ]
        for key, runs in groups.items()
        if len(runs) > 1
    ]
    if summary:
        print(table(["configuration", "seeds", "AUC ratio mean", "min", "coverage ratio mean", "min"], summary))
    suffix = ("" if args.rows == "all" else f"_{args.rows}") + (f"_seed{args.seed}" if args.seed != 5 else "")
    print(write_results(f"vertical_utility_{args.households}{suffix}", result))


if __name__ == "__main__":
    main()
