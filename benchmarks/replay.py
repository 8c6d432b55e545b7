"""What accountability costs: a vertical job with and without the evidence a replay needs, and the replay.

The same population, plan and noise seed are trained twice in this process (``train_vertical``): once
keeping nothing, once keeping each agency's evidence and civil affairs' and the arbiter's receipts
(``docs/vertical.md``, "Accountability"). Reported: training seconds both ways and their ratio, the
evidence's bytes per agency, and each agency's replay (``agencyfl.vertical.replay``) in seconds against the
CKKS seconds that agency spent in the job. Receipts are signed as in ``agencyfl run``.

    python benchmarks/replay.py [--households 60000] [--iterations 20] [--epsilon 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agencyfl.alignment.runs import align_from_spec, load_vertical  # noqa: E402
from agencyfl.synth_vertical import synthesize_vertical  # noqa: E402
from agencyfl.vertical import VerticalPlan, feature_block, label_block, train_vertical  # noqa: E402
from agencyfl.vertical.evidence import RECEIPTS  # noqa: E402
from agencyfl.vertical.protocol import FeatureHolder  # noqa: E402
from agencyfl.vertical.replay import replay  # noqa: E402
from benchmarks._common import table, write_results  # noqa: E402

NOISE_SEED = 5


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--households", type=int, default=60_000, help="population (80%% in the register)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, work, kept = Path(tmp) / "data", Path(tmp) / "work", Path(tmp) / "evidence"
        loaded = load_vertical(synthesize_vertical(data, households=args.households, seed=args.seed).spec)
        align_from_spec(loaded, work)
        others = [a.name for a in loaded.spec.agencies if not a.label]
        features = [feature_block(loaded, a, work) for a in others]
        label, labels = label_block(loaded, work)
        plan = VerticalPlan(agencies=len(others) + 1, iterations=args.iterations, epsilon=args.epsilon, delta=1e-5)

        # civil affairs' and the coordinator's ledger keys sign their receipts, as in `agencyfl run`
        signers = {label.agency: Ed25519PrivateKey.generate(), "arbiter": Ed25519PrivateKey.generate()}

        def train(evidence: dict[str, Path] | None) -> tuple[float, Any]:
            start = time.perf_counter()
            result = train_vertical(features, label, labels, plan, noise_rng=np.random.default_rng(NOISE_SEED),
                                    mask_seed=1, validate=False, evidence=evidence,
                                    receipt_keys=signers if evidence else None)  # fmt: skip
            return time.perf_counter() - start, result

        bare_seconds, bare = train(None)
        folders = {a: kept / a for a in [*others, label.agency]} | {"arbiter": kept / "coordinator"}
        kept_seconds, result = train(folders)
        # the same noise and masks; fresh CKKS encryptions differ in their error only
        apart = max(float(np.abs(bare.weights[a] - result.weights[a]).max()) for a in bare.weights)
        receipts = [folders[label.agency] / RECEIPTS, folders["arbiter"] / RECEIPTS]
        rows: list[list[Any]] = []
        agencies: dict[str, Any] = {}
        for name in others:
            holder = result.parties[name]
            assert isinstance(holder, FeatureHolder) and holder.evidence is not None
            start = time.perf_counter()
            report = replay(holder.evidence.folder, receipts)
            seconds = time.perf_counter() - start
            agencies[name] = {
                "evidence_bytes": _bytes(holder.evidence.folder), "replay_seconds": seconds,
                "job_he_seconds": holder.he_seconds, "products": len(report.products), "ok": report.ok,
            }  # fmt: skip
            rows.append([name, f"{agencies[name]['evidence_bytes'] / 1e6:.1f}", len(report.products),
                         "yes" if report.ok else "NO", f"{seconds:.1f}", f"{holder.he_seconds:.1f}",
                         f"{seconds / holder.he_seconds:.2f}"])  # fmt: skip
        receipt_bytes = sum(f.stat().st_size for p in receipts for f in p.iterdir())
    results = {
        "households": args.households, "register": len(label.x), "trained_on": int(labels.train.sum()),
        "iterations": args.iterations, "epsilon": args.epsilon, "training_seconds_bare": bare_seconds,
        "training_seconds_kept": kept_seconds, "ratio": kept_seconds / bare_seconds, "weights_apart": apart,
        "receipt_bytes": receipt_bytes, "agencies": agencies,
    }  # fmt: skip
    print(f"training (Hessian + {args.iterations} sweeps, register {len(label.x)}): {bare_seconds:.1f} s keeping "
          f"nothing, {kept_seconds:.1f} s keeping the evidence (x {kept_seconds / bare_seconds:.2f}); weights at most "
          f"{apart:.2g} apart (CKKS error, and a household it tips across a clip); receipts {receipt_bytes} "
          "bytes in all")  # fmt: skip
    print(table(["agency", "evidence MB", "products", "all match", "replay s", "agency's CKKS s in the job",
                 "replay / job CKKS"], rows))  # fmt: skip
    print(write_results("replay", results))


if __name__ == "__main__":
    main()
