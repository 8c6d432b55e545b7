"""Utility on the synthetic population: test AUC of centralized, agency-alone and federated training.

(a) centralized, non-private: logistic regression fitted to optimum (L-BFGS) on the pooled agency rows;
(b) each agency alone with DP (epsilon 3), the same client code and rounds as the federation;
(c) the federation (Flower simulation engine, real ClientApps) at epsilon 1, 3 and 8, delta 1e-5.
All evaluated on the held-out test file. Targets: federated AUC at epsilon 3 >= 0.98 x centralized,
at epsilon 1 >= 0.95 x, and above every agency alone.

    python benchmarks/utility.py [--seeds 0 1 2] [--households 20000]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agencyfl.clients.rounds import TrainRequest, train_round  # noqa: E402
from agencyfl.clients.site import AgencySite  # noqa: E402
from agencyfl.federation.encoding import FeatureEncoder  # noqa: E402
from agencyfl.federation.metrics import exact_metrics  # noqa: E402
from agencyfl.federation.model import build_model, model_from_arrays, model_to_arrays, predict_proba  # noqa: E402
from agencyfl.federation.spec import LoadedSpec, load_spec  # noqa: E402
from agencyfl.federation.table import load_table  # noqa: E402
from agencyfl.runner import run_federation  # noqa: E402
from agencyfl.server.registry import RegisteredModel  # noqa: E402
from agencyfl.synth import synthesize  # noqa: E402
from benchmarks._common import table, write_results  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0)


def test_auc(model: torch.nn.Module, loaded: LoadedSpec, test: pd.DataFrame) -> float:
    x = FeatureEncoder(loaded.spec.schema).encode(test)
    return exact_metrics(predict_proba(model, x), test[loaded.spec.schema.label].to_numpy()).auc


def centralized(loaded: LoadedSpec, test: pd.DataFrame) -> float:
    frames = [
        load_table(loaded.data_path(a.name), loaded.spec.schema, write_quarantine=False).valid
        for a in loaded.spec.agencies
    ]
    pooled = pd.concat(frames, ignore_index=True)
    enc = FeatureEncoder(loaded.spec.schema)
    x = torch.as_tensor(enc.encode(pooled))
    y = torch.as_tensor(pooled[loaded.spec.schema.label].to_numpy(np.float32))
    model = build_model(loaded.spec.model, enc.width)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x).squeeze(-1), y) + 1e-5 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return test_auc(model, loaded, test)


def alone(loaded: LoadedSpec, agency: str, home: Path, test: pd.DataFrame) -> float:
    site = AgencySite(agency=agency, spec_path=loaded.path, data_path=loaded.data_path(agency), home=home)
    spec = loaded.spec
    model = build_model(spec.model, FeatureEncoder(spec.schema).width, seed=spec.training.seed)
    arrays = model_to_arrays(model)
    for r in range(1, spec.training.rounds + 1):
        arrays = train_round(site, TrainRequest("alone", r, spec.training.rounds, loaded.sha256, arrays)).arrays
    return test_auc(model_from_arrays(model, arrays), loaded, test)


def with_epsilon(spec_path: Path, epsilon: float) -> Path:
    text = spec_path.read_text()
    text = re.sub(r"(?m)^epsilon = [0-9.]+", f"epsilon = {epsilon}", text)
    text = re.sub(r"(?m)^budget = [0-9.]+", f"budget = {max(10.0, epsilon)}", text)
    out = spec_path.with_name(f"federation-eps{epsilon:g}.toml")
    out.write_text(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--households", type=int, default=20000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="agencyfl-utility-"))
    runs = []
    start = time.time()
    for seed in args.seeds:
        pop = synthesize(root / f"seed{seed}", households=args.households, seed=seed)
        loaded = load_spec(pop.spec)
        test = load_table(pop.test, loaded.spec.schema, write_quarantine=False).valid
        row: dict[str, object] = {"seed": seed, "centralized": centralized(loaded, test)}
        row["alone"] = {
            a.name: alone(loaded, a.name, root / f"alone{seed}" / a.name, test) for a in loaded.spec.agencies
        }
        row["federated"] = {}
        for eps in EPSILONS:
            summary = run_federation(with_epsilon(pop.spec, eps), root / f"fed{seed}-{eps:g}")
            model = RegisteredModel(summary["model"])
            row["federated"][f"{eps:g}"] = test_auc(model.model, loaded, test)  # type: ignore[index]
        runs.append(row)
        print(f"seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    shutil.rmtree(root, ignore_errors=True)

    central = float(np.mean([r["centralized"] for r in runs]))
    fed = {e: float(np.mean([r["federated"][e] for r in runs])) for e in runs[0]["federated"]}  # type: ignore[index]
    agencies = list(runs[0]["alone"])  # type: ignore[arg-type]
    alone_mean = {a: float(np.mean([r["alone"][a] for r in runs])) for a in agencies}  # type: ignore[index]
    rows = [["centralized, non-private (L-BFGS, pooled rows)", f"{central:.4f}", "1.000", ""]]
    for a, v in alone_mean.items():
        rows.append([f"{a} alone, DP epsilon 3", f"{v:.4f}", f"{v / central:.3f}", ""])
    targets = {"1": 0.95, "3": 0.98, "8": None}
    for e, v in fed.items():
        target = targets.get(e)
        ok = (
            "" if target is None else (f"meets >= {target:.2f}" if v / central >= target else f"MISSES >= {target:.2f}")
        )
        rows.append([f"federation, DP epsilon {e}", f"{v:.4f}", f"{v / central:.3f}", ok])
    print(table(["model", f"test AUC (mean of {len(runs)} seeds)", "x centralized", "target"], rows))
    best_alone = max(alone_mean.values())
    print(
        f"federation at epsilon 3 above every agency alone: {fed['3'] > best_alone} "
        f"({fed['3']:.4f} vs best alone {best_alone:.4f})"
    )
    path = write_results(
        "utility",
        {
            "households": args.households,
            "seeds": args.seeds,
            "runs": runs,
            "mean": {"centralized": central, "alone": alone_mean, "federated": fed},
            "seconds": time.time() - start,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
