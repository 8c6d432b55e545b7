"""Vertical training under CKKS: utility against a centralized non-private LR, time and bytes per iteration.

The vertical synthetic population (``synthesize_vertical``), aligned (``align_from_spec``); every party
runs in this process with its own keys (``agencyfl.vertical.train_vertical``). Evaluated on the
held-out joined households of ``test.csv`` (all of them, and the complete ones: held by every agency),
the blocks assembled here only (benchmark): AUC, coverage of the recorded eligible at score 0.5 and the
mean score. The centralized baseline is a non-private logistic regression (numpy, Adam, 2,000 full-batch
steps) on the same encoded, clipped inputs of the same training households. Time per iteration is put
against the CKKS floor: the time the parties spend in ciphertext operations alone (encryption,
evaluation, decryption and ciphertext (de)serialization; not sealing or plaintext work), summed.

    python benchmarks/vertical.py [--households 75000] [--iterations 100] [--epsilons 1 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agencyfl.alignment.runs import align_from_spec, load_vertical  # noqa: E402
from agencyfl.federation.encoding import FeatureEncoder  # noqa: E402
from agencyfl.federation.spec import VerticalFederationSpec  # noqa: E402
from agencyfl.federation.table import load_table  # noqa: E402
from agencyfl.synth_vertical import synthesize_vertical  # noqa: E402
from agencyfl.vertical import VerticalPlan, feature_block, label_block, train_vertical  # noqa: E402
from agencyfl.vertical.encoding import clip_rows  # noqa: E402
from agencyfl.vertical.optim import BlockOptimizer, clip_scores  # noqa: E402
from benchmarks._common import table, write_results  # noqa: E402


def model_logits(
    tests: dict[str, np.ndarray], weights: dict[str, np.ndarray], label_agency: str, clip: float | None
) -> np.ndarray:
    """The vertical model's score of the held-out rows: each agency's part (civil affairs' with the intercept)
    clipped at ``clip``, as its holder clips it, then summed."""
    parts = {a: x @ weights[a][: x.shape[1]] for a, x in tests.items()}
    parts[label_agency] = parts[label_agency] + weights[label_agency][-1]
    return np.asarray(sum(clip_scores(u, clip)[0] for u in parts.values()))


def test_blocks(spec: VerticalFederationSpec, data: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Each agency's block of the test households (not-held from ``truth/``), the labels, and who is complete."""
    loaded = load_table(data / "test.csv", spec.schema_, require_label=True, write_quarantine=False)
    frame = loaded.valid
    truth = pd.read_csv(data / "truth" / "households.csv", dtype={"head_id": str}).set_index("head_id")
    held_all = np.ones(len(frame), dtype=bool)
    out: dict[str, np.ndarray] = {}
    for agency in spec.agencies:
        encoder = FeatureEncoder(spec.block_schema(agency.name))
        column = f"in_{agency.name}"
        held = (
            truth.loc[frame["head_id"], column].to_numpy(dtype=bool) if column in truth else np.ones(len(frame), bool)
        )
        values = encoder.encode(frame).astype(np.float64)
        x = np.column_stack([np.where(held[:, None], values, 0.0), (~held).astype(np.float64)])
        out[agency.name] = clip_rows(x)
        held_all &= held
    return out, frame[spec.schema_.label].to_numpy(dtype=np.float64), held_all


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """AUC by the rank statistic."""
    ranks = pd.Series(scores).rank().to_numpy()
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def metrics(z: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """AUC, coverage of the eligible at 0.5, mean score."""
    p = 1 / (1 + np.exp(-z))
    return {"auc": auc(z, y), "coverage": float((p[y == 1] >= 0.5).mean()), "mean_score": float(p.mean())}


def centralized(inputs: list[np.ndarray], y: np.ndarray, train: np.ndarray, steps: int = 2000) -> np.ndarray:
    """Non-private LR on the joined inputs (each block's ``x`` or a joined matrix; last weight the intercept)."""
    x = np.column_stack([*(a[train] for a in inputs), np.ones(train.sum())])
    w = np.zeros(x.shape[1])
    opt = BlockOptimizer("adam", 0.05, x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        w = opt.step(w, x.T @ (p - y[train]) / len(x))
    return w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--households", type=int, default=75_000, help="population (80%% in the register)")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, work = Path(tmp) / "data", Path(tmp) / "work"
        synth = synthesize_vertical(data, households=args.households, seed=args.seed)
        loaded = load_vertical(synth.spec)
        align_from_spec(loaded, work)
        spec = loaded.spec
        others = [a.name for a in spec.agencies if not a.label]
        features = [feature_block(loaded, a, work) for a in others]
        label, labels = label_block(loaded, work)
        tests, y_test, complete = test_blocks(spec, data)
    order = [*others, label.agency]
    rows: list[list[Any]] = []
    results: dict[str, Any] = {
        "households": args.households, "register": len(label.x), "trained_on": int(labels.train.sum()),
        "iterations": args.iterations, "test": len(y_test), "test_complete": int(complete.sum()), "runs": [],
    }  # fmt: skip
    w = centralized([b.x for b in (*features, label)], labels.y, labels.train)
    widths = np.cumsum([0] + [tests[a].shape[1] for a in order])
    z = sum(tests[a] @ w[widths[i] : widths[i + 1]] for i, a in enumerate(order)) + w[-1]
    base: dict[str, dict[str, float]] = {}
    for subset, mask in (("all", np.ones_like(complete)), ("complete", complete)):
        m = metrics(np.asarray(z)[mask], y_test[mask])
        base[subset] = m
        results["runs"].append({"model": "centralized non-private LR", "subset": subset, **m})
        rows.append(
            [
                "centralized non-private LR",
                subset,
                f"{m['auc']:.4f}",
                f"{m['coverage']:.3f}",
                f"{m['mean_score']:.3f}",
                "",
                "",
                "",
                "",
            ]
        )
    for eps in args.epsilons:
        plan = VerticalPlan(agencies=len(order), iterations=args.iterations, epsilon=eps, delta=1e-5)
        result = train_vertical(features, label, labels, plan)
        per_iter = float(np.mean([m.seconds for m in result.iterations]))
        floor = float(np.mean([m.he_seconds for m in result.iterations]))
        sent = {
            k: float(np.mean([m.sent_bytes[k] for m in result.iterations])) for k in result.iterations[0].sent_bytes
        }
        zt = model_logits(tests, result.weights, label.agency, plan.score_clip)
        name = f"vertical {plan.optimizer} eps {eps:g}, T {args.iterations} (sigma {plan.noise_multiplier:.1f})"
        hessian = result.hessian
        if hessian is not None:
            sent_h = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in hessian.sent_bytes.items())
            print(f"eps {eps}: the Hessian release took {hessian.seconds:.2f} s ({hessian.he_seconds:.2f} s in CKKS "
                  f"operations), bytes sent: {sent_h}", flush=True)  # fmt: skip
        job_seconds = per_iter * args.iterations + (hessian.seconds if hessian else 0.0)
        for subset, mask in (("all", np.ones_like(complete)), ("complete", complete)):
            m = metrics(np.asarray(zt)[mask], y_test[mask])
            results["runs"].append({
                "model": name, "subset": subset, "epsilon": eps, "sigma": plan.noise_multiplier, **m,
                "seconds_per_iteration": per_iter, "he_floor_seconds": floor, "ratio_to_floor": per_iter / floor,
                "bytes_per_iteration": sent, "validation_auc": result.validation_auc,
                "hessian_seconds": hessian.seconds if hessian else None,
                "hessian_he_seconds": hessian.he_seconds if hessian else None,
                "hessian_bytes": hessian.sent_bytes if hessian else None, "training_seconds": job_seconds,
                "auc_ratio": m["auc"] / base[subset]["auc"], "coverage_ratio": m["coverage"] / base[subset]["coverage"],
            })  # fmt: skip
            rows.append([name, subset, f"{m['auc']:.4f} ({m['auc'] / base[subset]['auc']:.3f})",
                         f"{m['coverage']:.3f} ({m['coverage'] / base[subset]['coverage']:.3f})",
                         f"{m['mean_score']:.3f}", f"{per_iter:.2f}", f"{per_iter / floor:.2f}",
                         f"{max(sent.values()) / 1e6:.1f}", f"{job_seconds:.0f}"])  # fmt: skip
        print(
            f"eps {eps}: per-iteration bytes sent: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sent.items()),
            flush=True,
        )
    print(
        table(
            [
                "model",
                "test",
                "AUC (ratio)",
                "coverage@0.5 (ratio)",
                "mean score",
                "s/iter",
                "ratio to HE floor",
                "max MB/iter",
                "training s (Hessian + T iterations)",
            ],
            rows,
        )
    )
    print(write_results("vertical", results))


if __name__ == "__main__":
    main()
