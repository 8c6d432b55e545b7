"""DP cost: local DP-SGD epoch time / non-private epoch time, same model, data and batch size.

DP-SGD here is the training path itself (``clients.trainer.dp_sgd``: Opacus per-sample gradients,
clipping, noise, Poisson sampling, accountant hook); the baseline is plain minibatch SGD with shuffled
batches of the expected DP batch size. Both single-threaded, as agencies' clients run. Target <= 2.0.

    python benchmarks/dp_cost.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from opacus.accountants import RDPAccountant

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agencyfl.clients.trainer import dp_sgd, noise_generator, plain_sgd, steps_per_epoch  # noqa: E402
from agencyfl.federation.encoding import FeatureEncoder  # noqa: E402
from agencyfl.federation.model import build_model  # noqa: E402
from agencyfl.federation.spec import ModelSection, load_spec  # noqa: E402
from agencyfl.federation.table import load_table  # noqa: E402
from agencyfl.synth import synthesize  # noqa: E402
from benchmarks._common import table, write_results  # noqa: E402


def epoch_times(x: np.ndarray, y: np.ndarray, model: ModelSection, q: float, repeats: int) -> tuple[float, float]:
    batch = max(1, round(len(x) * q))
    dp, plain = [], []
    for r in range(repeats + 1):  # the first pair warms up
        m = build_model(model, x.shape[1])
        t = time.perf_counter()
        dp_sgd(
            m,
            x,
            y,
            noise_multiplier=1.0,
            sample_rate=q,
            max_grad_norm=1.0,
            learning_rate=1.0,
            steps=steps_per_epoch(q),
            accountant=RDPAccountant(),
            generator=noise_generator(r),
        )
        dp.append(time.perf_counter() - t)
        m = build_model(model, x.shape[1])
        t = time.perf_counter()
        plain_sgd(m, x, y, batch_size=batch, learning_rate=1.0, epochs=1, generator=noise_generator(r))
        plain.append(time.perf_counter() - t)
    return statistics.median(dp[1:]), statistics.median(plain[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pop = synthesize(Path(tempfile.mkdtemp(prefix="agencyfl-cost-")), households=40000, seed=0)
    loaded = load_spec(pop.spec)
    spec = loaded.spec
    enc = FeatureEncoder(spec.schema)
    rows, results = [], []
    models = {"logistic": spec.model, "mlp 64-64": ModelSection(kind="mlp", hidden=[64, 64])}
    for agency in ("environment", "tax"):
        frame = load_table(loaded.data_path(agency), spec.schema, write_quarantine=False).valid
        x, y = enc.encode(frame), frame[spec.schema.label].to_numpy(np.float32)
        for name, model in models.items():
            for q in (0.02, 0.05, 0.1):
                dp, plain = epoch_times(x, y, model, q, args.repeats)
                ratio = dp / plain
                results.append(
                    {
                        "agency": agency,
                        "rows": len(x),
                        "model": name,
                        "sample_rate": q,
                        "expected_batch": round(len(x) * q),
                        "dp_epoch_s": dp,
                        "plain_epoch_s": plain,
                        "ratio": ratio,
                    }
                )
                rows.append(
                    [
                        agency,
                        len(x),
                        name,
                        q,
                        round(len(x) * q),
                        f"{dp * 1000:.1f}",
                        f"{plain * 1000:.1f}",
                        f"{ratio:.2f}",
                        "meets <= 2.0" if ratio <= 2.0 else "misses",
                    ]
                )
    print(table(["agency", "rows", "model", "q", "batch", "DP epoch ms", "plain epoch ms", "ratio", "target"], rows))
    print(f"results: {write_results('dp_cost', {'repeats': args.repeats, 'runs': results})}")


if __name__ == "__main__":
    main()
