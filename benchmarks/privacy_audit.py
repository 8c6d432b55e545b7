"""Empirical privacy audit: canary membership inference against DP models and a non-private control.

A default demo population (synthetic, 20,000 households), one federated run through the Flower
simulation engine to register a model (the default spec: 10 rounds, sample rate 0.02), then
``agencyfl.empirical_audit.run_canary_audit`` on each agency's records: the model's recipe re-run with
canaries at per-job epsilon 1, 3 and 8, and without DP (the control). Each row reports the claimed
epsilon beside the empirical lower bound (95% confidence) and the attack's accuracy with its interval.

    python benchmarks/privacy_audit.py [--runs 15] [--households 20000] [--agencies tax,civil-affairs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agencyfl.empirical_audit import run_canary_audit  # noqa: E402
from agencyfl.runner import run_federation  # noqa: E402
from agencyfl.synth import synthesize  # noqa: E402
from benchmarks._common import table, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="training runs per audit (one canary per input each)")
    parser.add_argument("--households", type=int, default=20000)
    parser.add_argument("--agencies", default="tax,civil-affairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fed = synthesize(Path(tmp) / "data", households=args.households, seed=args.seed)
        started = time.monotonic()
        model = Path(run_federation(fed.spec, Path(tmp) / "work")["model"])
        print(f"registered {model.name} in {time.monotonic() - started:.0f} s", flush=True)
        for agency in args.agencies.split(","):
            for setting in [{"epsilon": 1.0}, {"epsilon": 3.0}, {"epsilon": 8.0}, {"non_private": True}]:
                result = run_canary_audit(
                    model,
                    fed.agency_files[agency],
                    runs=args.runs,
                    seed=args.seed,
                    **setting,  # type: ignore[arg-type]
                )
                claim = "none (non-private)" if result.epsilon_claimed is None else f"{result.epsilon_claimed:g}"
                lo, hi = result.accuracy_interval
                rows.append(
                    [
                        agency,
                        claim,
                        f"{result.noise_multiplier:.3f}",
                        result.canaries,
                        f"{result.correct}/{result.guesses}",
                        f"{result.accuracy:.3f} [{lo:.3f}, {hi:.3f}]",
                        f"{result.epsilon_lower_bound:.3f}",
                        "REFUTED" if result.refutes_claim else ("holds" if result.epsilon_claimed else "-"),
                        f"{result.seconds:.0f}",
                    ]
                )
                results.append({"agency": agency, **result.as_dict()})
                print(rows[-1], flush=True)
    headers = [
        "agency",
        "claimed epsilon",
        "noise multiplier",
        "canaries",
        "correct/guesses",
        "attack accuracy [95% CI]",
        "epsilon lower bound (95%)",
        "claim",
        "s",
    ]
    print(table(headers, rows))
    path = write_results("privacy_audit", {"runs": args.runs, "households": args.households, "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
