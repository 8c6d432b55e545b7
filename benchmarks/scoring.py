"""Encrypted scoring over loopback gRPC: throughput, fidelity, latency, bytes and a load test.

The server runs as its own process (`agencyfl serve`), as in production: TenSEAL holds the GIL, so a
server in the requester's process would serialise both sides.

    python benchmarks/scoring.py [--households 60000] [--load-seconds 60] [--load-clients 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import tenseal as ts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agencyfl.synth import synthesize  # noqa: E402
from benchmarks._common import table, write_results  # noqa: E402
from clients.requester import ScoringClient  # noqa: E402
from federation.encoding import FeatureEncoder  # noqa: E402
from federation.model import build_model, model_to_arrays  # noqa: E402
from federation.proto import scoring_pb2  # noqa: E402
from federation.spec import load_spec, parse_spec  # noqa: E402
from federation.table import load_table  # noqa: E402
from privacy.he import encrypt_columns  # noqa: E402
from server.registry import RegisteredModel, register_model  # noqa: E402
from server.scoring import he_model  # noqa: E402

PURPOSE = "eligibility-identification"


def serve(model: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agencyfl.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--insecure-no-auth",
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=1)
            return proc
        except grpc.FutureTimeoutError:
            continue
    raise RuntimeError("server did not start")


def per_household_baseline(model: RegisteredModel, x: np.ndarray, n: int = 100) -> float:
    """Households per second with one ciphertext per household and an encrypted dot product."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    ctx.global_scale = 2**40
    ctx.generate_galois_keys()
    w, b = he_model(model).layers[0]
    start = time.perf_counter()
    for row in x[:n]:
        enc = ts.ckks_vector_from(ctx, ts.ckks_vector(ctx, row.tolist()).serialize())
        out = ts.ckks_vector_from(ctx, (enc.dot(w[0].tolist()) + float(b[0])).serialize())
        out.decrypt()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--households", type=int, default=60000)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--load-clients", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="agencyfl-scoring-"))
    pop = synthesize(work / "data", households=args.households, seed=0)
    loaded = load_spec(pop.spec)
    enc = FeatureEncoder(loaded.spec.schema)
    logistic = register_model(
        work / "reg", loaded, model_to_arrays(build_model(loaded.spec.model, enc.width, seed=1)), {}
    )
    mlp_text = loaded.text.replace(
        '[model]\nkind = "logistic"', '[model]\nkind = "mlp"\nhidden = [16]\nactivation = "square"'
    )
    mlp_spec = pop.spec.with_name("mlp.toml")
    mlp_spec.write_text(mlp_text)
    mlp_loaded = load_spec(mlp_spec)
    mlp = register_model(
        work / "reg", mlp_loaded, model_to_arrays(build_model(parse_spec(mlp_text).model, enc.width, seed=1)), {}
    )
    test = load_table(pop.test, loaded.spec.schema, require_label=False).valid
    x = enc.encode(test)
    results: dict[str, object] = {"households": len(x), "inputs": enc.width}

    proc = serve(logistic, 50871)
    try:
        client = ScoringClient("127.0.0.1:50871")
        start = time.perf_counter()
        logits, _ = client.score_encoded(x, False, PURPOSE)
        elapsed = time.perf_counter() - start
        plain = he_model(RegisteredModel(logistic)).plaintext_logits(x)
        score, ref = 1 / (1 + np.exp(-logits)), 1 / (1 + np.exp(-plain))
        outside = np.abs(ref - 0.5) > 1e-3
        results["logistic"] = {
            "seconds": elapsed,
            "per_second": len(x) / elapsed,
            "max_abs_score_error": float(np.abs(score - ref).max()),
            "max_abs_logit_error": float(np.abs(logits - plain).max()),
            "decisions_differing_outside_band": int(((score >= 0.5) != (ref >= 0.5))[outside].sum()),
        }
        batch = x[: client.info.max_batch]
        columns = encrypt_columns(client.context, batch)
        request = scoring_pb2.ScoreRequest(
            purpose=PURPOSE, key_fingerprint=client.key_fingerprint, count=len(batch), feature_columns=columns
        )
        reply = client.stub.ScoreBatch(request)
        results["bytes_per_household"] = {
            "request": request.ByteSize() / len(batch),
            "response": reply.ByteSize() / len(batch),
            "context_once": len(client.context.serialize(save_secret_key=False)),
        }
        latencies, column_latencies = [], []
        fast = ScoringClient("127.0.0.1:50871", low_latency=True)  # one ciphertext per household
        for row in x[:60]:
            t = time.perf_counter()
            fast.score_encoded(row[None, :], False, PURPOSE)
            latencies.append(time.perf_counter() - t)
        for row in x[:20]:
            t = time.perf_counter()
            client.score_encoded(row[None, :], False, PURPOSE)
            column_latencies.append(time.perf_counter() - t)
        results["one_household_latency_ms"] = {
            "p50": 1000 * statistics.median(latencies[10:]),
            "p99": 1000 * float(np.percentile(latencies[10:], 99)),
            "column_packed_p50": 1000 * statistics.median(column_latencies[5:]),
        }
        baseline = per_household_baseline(RegisteredModel(logistic), x)
        results["per_household_baseline_per_second"] = baseline
        # Load: concurrent requesters sending pre-encrypted single households for a fixed time.
        one = scoring_pb2.ScoreRequest(
            purpose=PURPOSE,
            key_fingerprint=client.key_fingerprint,
            count=1,
            feature_columns=encrypt_columns(client.context, x[:1]),
        )
        lat: list[float] = []
        errors = [0]
        stop_at = time.time() + args.load_seconds
        lock = threading.Lock()

        def worker() -> None:
            stub = ScoringClient.__new__(ScoringClient)
            channel = grpc.insecure_channel("127.0.0.1:50871", options=[("grpc.max_send_message_length", 1 << 26)])
            from federation.proto import scoring_pb2_grpc

            stub = scoring_pb2_grpc.ScoringStub(channel)
            while time.time() < stop_at:
                t = time.perf_counter()
                try:
                    stub.ScoreBatch(one, timeout=60)
                    with lock:
                        lat.append(time.perf_counter() - t)
                except grpc.RpcError:
                    with lock:
                        errors[0] += 1

        threads = [threading.Thread(target=worker) for _ in range(args.load_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results["load"] = {
            "clients": args.load_clients,
            "seconds": args.load_seconds,
            "requests": len(lat),
            "errors": errors[0],
            "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * float(np.percentile(lat, 99)),
        }
    finally:
        proc.terminate()
        proc.wait()

    proc = serve(mlp, 50872)
    try:
        client = ScoringClient("127.0.0.1:50872")
        n = min(len(x), 3 * client.info.max_batch)
        start = time.perf_counter()
        logits, _ = client.score_encoded(x[:n], False, PURPOSE)
        elapsed = time.perf_counter() - start
        plain = he_model(RegisteredModel(mlp)).plaintext_logits(x[:n])
        results["mlp"] = {
            "households": n,
            "per_second": n / elapsed,
            "parameter_set": client.params.name,
            "max_abs_logit_error": float(np.abs(logits - plain).max()),
        }
    finally:
        proc.terminate()
        proc.wait()

    lg, load = results["logistic"], results["load"]  # type: ignore[index]
    rows = [
        ["logistic households/s end to end (N=8192)", f"{lg['per_second']:.0f}", ">= 20,000"],  # type: ignore[index]
        ["one ciphertext per household (.dot) households/s", f"{results['per_household_baseline_per_second']:.1f}", ""],
        [
            "ratio column-packed / per-household",
            f"{lg['per_second'] / results['per_household_baseline_per_second']:.0f}",
            ">= 250",
        ],  # type: ignore[index,operator]
        ["MLP 40-16-x^2-1 households/s", f"{results['mlp']['per_second']:.0f}", ">= 2,500"],  # type: ignore[index]
        [
            "one household p50 latency ms (row-packed, Galois keys)",
            f"{results['one_household_latency_ms']['p50']:.1f}",
            "<= 50",
        ],
        [
            "one household p50 latency ms (column-packed)",
            f"{results['one_household_latency_ms']['column_packed_p50']:.1f}",
            "",
        ],  # type: ignore[index]
        [f"max |score error| over {len(x)} households", f"{lg['max_abs_score_error']:.2e}", "<= 1e-3"],  # type: ignore[index]
        ["decisions differing outside +-1e-3", str(lg["decisions_differing_outside_band"]), "0"],  # type: ignore[index]
        [
            "request / response bytes per household (full batch)",
            f"{results['bytes_per_household']['request']:.0f} / {results['bytes_per_household']['response']:.1f}",
            "",
        ],  # type: ignore[index]
        [
            f"load {load['clients']} clients x {load['seconds']:.0f} s: requests, errors",  # type: ignore[index]
            f"{load['requests']}, {load['errors']}",
            "0 errors",
        ],  # type: ignore[index]
        ["load p50 / p99 ms", f"{load['p50_ms']:.0f} / {load['p99_ms']:.0f}", ""],  # type: ignore[index]
    ]
    print(table(["measure", "value", "target"], rows))
    print(f"results: {write_results('scoring', results)}")


if __name__ == "__main__":
    main()
