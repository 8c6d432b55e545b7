"""Where vertical training's utility goes: the first-order Taylor residual, the weight bound, the DP noise.

The plaintext reference of the protocol (``vertical.reference.reference_train``: the same steps as the
encrypted protocol, which tests/test_vertical_training.py and tests/test_vertical_stream.py show equal
within CKKS error) on the vertical synthetic population, against the centralized non-private logistic
regression of benchmarks/vertical.py on the same assessed training households, evaluated on the
complete held-out households (held by every agency). Rows without noise separate the model the
protocol fits (least squares on the Taylor residual, weights within W) from the cost of the noise.
Rows without a clip C are the protocol before 2026-12-05 (weights held to W); rows with C clip each party's
partial score (docs/vertical.md). Rows with another residual ask what a closer approximation of the sigmoid
would give, each with the noise its own bound D needs (sensitivity sqrt(K + 1) D for |z| <= Z): a degree-3
least-squares fit on [-8, 8] (Kim et al. 2018; one more ciphertext-by-ciphertext level under CKKS) and the
exact sigmoid, which no polynomial under CKKS computes: the ceiling of every approximation.

    python benchmarks/vertical_utility.py [--households 75000] [--seed 5]
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
from agencyfl.privacy.accounting import calibrate_noise  # noqa: E402
from agencyfl.synth_vertical import synthesize_vertical  # noqa: E402
from agencyfl.vertical import VerticalPlan, feature_block, label_block  # noqa: E402
from agencyfl.vertical.optim import clip_scores  # noqa: E402
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


PRECONDITIONED: list[dict[str, Any]] = [
    {"epsilon": 1.0, "iterations": 50, "learning_rate": 0.3, "damping": 3e-4, "seed": seed} for seed in (1, 2, 3)
] + [
    {"epsilon": 1.0, "iterations": 50, "learning_rate": 0.5, "damping": 1e-3, "seed": seed} for seed in (1, 2, 3)
] + [
    {"epsilon": 3.0, "iterations": 50, "learning_rate": 0.3, "damping": 3e-4, "seed": 1},
    {"epsilon": 1.0, "iterations": 50, "learning_rate": 0.3, "damping": 3e-4, "seed": 1, "noise": False},
]


def preconditioned_train(
    features: list[Any], label: Any, labels: Any, clip: float, config: dict[str, Any]
) -> dict[str, np.ndarray]:
    """NOT the protocol yet (plaintext only): the clipped Taylor protocol plus one more DP release, each
    block's Hessian of the Taylor loss H_k = sum_i m_i x_ik x_ik^T / 4, so that each party steps with
    (H_k + damping I)^-1 times its noisy gradient (block-diagonal Newton; post-processing of the two
    releases). One household moves the joint Hessian release by at most sqrt(K + 1) / 4 in L2 (each block's
    x x^T / 4 has Frobenius norm <= 1/4, the intercept's 1/4), the iterations by sqrt(K + 1) D as now; both
    use the noise multiplier calibrated for T + 1 releases. Under CKKS an agency's H_k needs Enc(m) from civil
    affairs and d_k (d_k + 1) / 2 rotate-and-sums, noised by the arbiter like a gradient (docs/vertical.md,
    "Next")."""
    rng = np.random.default_rng(config["seed"])
    k = len(features) + 1
    iterations = config["iterations"]
    sigma = calibrate_noise(config["epsilon"], 1e-5, 1.0, iterations + 1) if config.get("noise", True) else 0.0
    bound = 0.5 + k * clip / 4  # D with |z| <= K C
    n = len(label.x)
    m = labels.train.astype(np.float64)
    inputs = {b.agency: b.x for b in features} | {label.agency: np.hstack([label.x, np.ones((n, 1))])}
    steps = {}
    for agency, x in inputs.items():
        h = (x * m[:, None]).T @ x / 4
        noise = rng.normal(0.0, sigma * np.sqrt(k + 1) / 4, h.shape)
        h = (h + np.triu(noise) + np.triu(noise, 1).T) / n  # one symmetric noisy release, scaled like d
        values, vectors = np.linalg.eigh(h)
        steps[agency] = (vectors / (np.maximum(values, 0.0) + config["damping"])) @ vectors.T
    weights = {agency: np.zeros(x.shape[1]) for agency, x in inputs.items()}
    for _ in range(iterations):
        parts = {agency: inputs[agency] @ weights[agency] for agency in inputs}
        z = sum(clip_scores(u, clip)[0] for u in parts.values())
        d = m * (0.5 + z / 4 - labels.y) / n
        for agency, x in inputs.items():
            own = d * clip_scores(parts[agency], clip)[1]
            g = x.T @ own + rng.normal(0.0, sigma * np.sqrt(k + 1) * bound / n, x.shape[1])
            weights[agency] = weights[agency] - config["learning_rate"] * steps[agency] @ g
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--households", type=int, default=75_000)
    parser.add_argument("--seed", type=int, default=5)
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
    w = centralized([*features, label], labels.y, labels.train)
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
    for config in CONFIGS:
        eps = float(config.get("epsilon", 1.0))
        kind = config.get("residual", "taylor")
        plan = VerticalPlan(agencies=len(order), iterations=config["iterations"], epsilon=eps, delta=1e-5,
                            weight_bound=config["weight_bound"],
                            learning_rate=config.get("learning_rate", 0.2),
                            score_clip=config.get("score_clip"))  # fmt: skip
        rng: Any = np.random.default_rng(config.get("seed", 1)) if config["noise"] else _NoNoise()
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
        seed = f", seed {config['seed']}" if "seed" in config else ""
        name = (f"{kind} DP-GD, T {config['iterations']}, W {config['weight_bound']:g}{clip}{seed}, "
                f"lr {plan.learning_rate:g}, D {bound:.2f}")  # fmt: skip
        result["runs"].append({**config, **m, "residual": kind, "residual_bound": bound,
                               "auc_ratio": m["auc"] / base["auc"],
                               "coverage_ratio": m["coverage"] / base["coverage"]})  # fmt: skip
        rows.append([name, noise, f"{m['auc']:.4f}", f"{m['auc'] / base['auc']:.3f}", f"{m['coverage']:.3f}",
                     f"{m['coverage'] / base['coverage']:.3f}", f"{m['mean_score']:.3f}"])  # fmt: skip
        print(rows[-1], flush=True)
    for config in PRECONDITIONED:
        clip = 1.5
        weights = preconditioned_train(features, label, labels, clip, config)
        zt = model_logits(tests, weights, label.agency, clip)
        m = metrics(np.asarray(zt)[complete], y[complete])
        noisy = config.get("noise", True)
        result["runs"].append({**config, **m, "residual": "taylor", "score_clip": clip, "preconditioned": True,
                               "auc_ratio": m["auc"] / base["auc"],
                               "coverage_ratio": m["coverage"] / base["coverage"]})  # fmt: skip
        name = (f"taylor, block Newton (not built), T {config['iterations']}, C {clip:g}, "
                f"lr {config['learning_rate']:g}, damping {config['damping']:g}, seed {config['seed']}")  # fmt: skip
        rows.append([name, f"eps {config['epsilon']:g}" if noisy else "none", f"{m['auc']:.4f}",
                     f"{m['auc'] / base['auc']:.3f}", f"{m['coverage']:.3f}", f"{m['coverage'] / base['coverage']:.3f}",
                     f"{m['mean_score']:.3f}"])  # fmt: skip
        print(rows[-1], flush=True)
    print(f"register {len(label.x):,}, trained on {int(labels.train.sum()):,} assessed households; "
          f"{int(complete.sum()):,} complete held-out households, eligible rate {y[complete].mean():.3f}")  # fmt: skip
    print(table(["model", "noise", "AUC", "AUC ratio", "coverage@0.5", "coverage ratio", "mean score"], rows))
    print(write_results(f"vertical_utility_{args.households}", result))


if __name__ == "__main__":
    main()
