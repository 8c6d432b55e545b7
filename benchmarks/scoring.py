"""Encrypted scoring over loopback gRPC: the `agencyfl score` path, fidelity, latency, bytes, and load under attack.

The server runs as its own process (`agencyfl serve --tokens`), as in production: TenSEAL holds the
GIL, so a server in the requester's process would serialise both sides. Throughput is measured on
`score_file`, the function `agencyfl score` runs (read and validate the file, encode, encrypt and send
pipelined, decrypt, decide, write the decisions). The load figure is a legitimate requester's latency
while slow-loris connections and an abusive token holder run against the same server.

    python benchmarks/scoring.py [--households 60000] [--load-seconds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import tenseal as ts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agencyfl.clients.requester import ScoreSettings, ScoringClient, score_file  # noqa: E402
from agencyfl.federation.encoding import FeatureEncoder  # noqa: E402
from agencyfl.federation.model import build_model, model_to_arrays  # noqa: E402
from agencyfl.federation.proto import scoring_pb2, scoring_pb2_grpc  # noqa: E402
from agencyfl.federation.spec import load_spec, parse_spec  # noqa: E402
from agencyfl.federation.table import load_table  # noqa: E402
from agencyfl.privacy.he import encrypt_columns  # noqa: E402
from agencyfl.server.model_card import ModelCard  # noqa: E402
from agencyfl.server.registry import RegisteredModel, register_model  # noqa: E402

# the benchmark scores initial weights: a card without a federated job
UNTRAINED = ModelCard(
    job="untrained",
    agencies=[],
    metrics={},
    metrics_source="none (initial weights)",
    rounds_aggregated=0,
    secure_aggregation=False,
    model_sha256="",
    coordinator_ledger="",
)
from agencyfl.server.scoring import he_model  # noqa: E402
from agencyfl.server.tokens import TokenStore  # noqa: E402
from agencyfl.synth import synthesize  # noqa: E402
from benchmarks._common import table, write_results  # noqa: E402

PURPOSE = "eligibility-identification"
SERVICE = "/agencyfl.scoring.v1.Scoring/"


def serve(model: Path, port: int, tokens: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agencyfl.cli", "serve", "--model", str(model), "--port", str(port)]
        + ["--tokens", str(tokens)],
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


def score_command_path(address: str, token: str, data: Path, out: Path) -> tuple[float, dict[str, Any]]:
    """Seconds for what `agencyfl score` does after connecting, and its report."""
    client = ScoringClient(address, token=token)
    start = time.perf_counter()
    report = score_file(client, data, out, ScoreSettings())
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed, report


def _never(stop: threading.Event) -> Iterator[bytes]:
    stop.wait()
    yield from ()


def _loop(stop: threading.Event, body: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            with contextlib.suppress(grpc.RpcError):
                body()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def attack(address: str, abusive: str, client: ScoringClient, stop: threading.Event, n: int) -> dict[str, Any]:
    """Start the attackers; they run until ``stop``. Returns counters filled in as they run."""
    host, port = address.rsplit(":", 1)
    counts = {"raw_connections": 0, "unauthenticated_calls": 0, "idle_streams": 0, "abusive_batches": 0}
    sockets: list[socket.socket] = []
    for _ in range(n):  # TCP connections stuck half-way through the HTTP/2 preface
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"PRI * HTTP/2.0\r\n")
        sockets.append(sock)
        counts["raw_connections"] += 1
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 26)])
    meta = [("authorization", f"Bearer {abusive}")]

    def unauthenticated_slow_loris() -> None:  # a call without a token whose body never comes
        call = channel.stream_unary(SERVICE + "ScoreBatch", lambda b: b, lambda b: b)
        counts["unauthenticated_calls"] += 1
        call.future(_never(stop), timeout=60).exception()
        time.sleep(0.05)

    def idle_stream() -> None:  # a token holder's ScoreStream that never sends
        call = channel.stream_stream(SERVICE + "ScoreStream", lambda b: b, lambda b: b)
        counts["idle_streams"] += 1
        list(call(_never(stop), metadata=meta, timeout=60))

    batch = np.random.default_rng(0).uniform(-1, 1, (int(client.info.max_batch), len(client.encoder.names)))
    request = scoring_pb2.ScoreRequest(
        purpose=PURPOSE,
        key_fingerprint=client.key_fingerprint,
        count=len(batch),
        feature_columns=encrypt_columns(client.context, batch),
    )
    stub = scoring_pb2_grpc.ScoringStub(channel)

    def flood() -> None:  # full batches as fast as the server takes them
        counts["abusive_batches"] += 1
        stub.ScoreBatch(request, metadata=meta, timeout=60)

    threads = [_loop(stop, unauthenticated_slow_loris) for _ in range(n)]
    threads += [_loop(stop, idle_stream) for _ in range(4)]
    threads += [_loop(stop, flood) for _ in range(4)]

    def close() -> None:
        stop.wait()
        for sock in sockets:
            sock.close()

    threading.Thread(target=close, daemon=True).start()
    return counts


def legit_latencies(address: str, token: str, x: np.ndarray, seconds: float) -> dict[str, Any]:
    """A legitimate requester scoring 10 households at a time, one call after another, for ``seconds``."""
    client = ScoringClient(address, token=token)
    lat: list[float] = []
    errors: list[str] = []
    stop_at = time.time() + seconds
    i = 0
    while time.time() < stop_at:
        block = x[(10 * i) % (len(x) - 10) :][:10]
        t = time.perf_counter()
        try:
            client.score_encoded(block, False, PURPOSE)
            lat.append(time.perf_counter() - t)
        except Exception as exc:  # noqa: BLE001 (counted and reported)
            errors.append(str(exc)[:80])
        i += 1
    health = grpc.insecure_channel(address)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t = time.perf_counter()
    health_pb2_grpc.HealthStub(health).Check(health_pb2.HealthCheckRequest(), timeout=5)
    health_ms = 1000 * (time.perf_counter() - t)
    t = time.perf_counter()
    client.stub.GetModelInfo(scoring_pb2.ModelInfoRequest(), metadata=client.metadata, timeout=5)
    info_ms = 1000 * (time.perf_counter() - t)
    client.close()
    return {
        "requests": len(lat),
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1000 * float(np.percentile(lat, 99)) if lat else float("nan"),
        "max_ms": 1000 * max(lat) if lat else float("nan"),
        "health_check_ms": health_ms,
        "model_info_ms": info_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--households", type=int, default=60000)
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--attackers", type=int, default=16, help="slow-loris calls and raw connections each")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="agencyfl-scoring-"))
    pop = synthesize(work / "data", households=args.households, seed=0)
    loaded = load_spec(pop.spec)
    enc = FeatureEncoder(loaded.spec.schema)
    logistic = register_model(
        work / "reg", loaded, model_to_arrays(build_model(loaded.spec.model, enc.width, seed=1)), UNTRAINED
    )
    mlp_text = loaded.text.replace(
        '[model]\nkind = "logistic"', '[model]\nkind = "mlp"\nhidden = [16]\nactivation = "square"'
    )
    mlp_spec = pop.spec.with_name("mlp.toml")
    mlp_spec.write_text(mlp_text)
    mlp_loaded = load_spec(mlp_spec)
    mlp = register_model(
        work / "reg", mlp_loaded, model_to_arrays(build_model(parse_spec(mlp_text).model, enc.width, seed=1)), UNTRAINED
    )
    test = load_table(pop.test, loaded.spec.schema, require_label=False).valid
    x = enc.encode(test)
    store = TokenStore(work / "tokens.json")
    tokens = {name: store.issue(name) for name in ("office", "fast-office", "legit-office", "abusive-office")}
    results: dict[str, object] = {"households": len(x), "inputs": enc.width}

    proc = serve(logistic, 50871, store.path)
    address = "127.0.0.1:50871"
    try:
        elapsed, report = score_command_path(address, tokens["office"], pop.test, work / "decisions.csv")
        plain = he_model(RegisteredModel(logistic)).plaintext_logits(x)
        ref = 1 / (1 + np.exp(-plain))
        score = pd.read_csv(work / "decisions.csv")["score"].to_numpy()
        outside = np.abs(ref - 0.5) > 1e-3
        decided = pd.read_csv(work / "decisions.csv")["decision"].eq("eligible").to_numpy()
        results["logistic"] = {
            "path": "agencyfl.clients.requester.score_file (agencyfl score)",
            "seconds": elapsed,
            "per_second": report["scored"] / elapsed,
            "max_abs_score_error": float(np.abs(score - ref).max()),  # scores are written rounded to 1e-6
            "decisions_differing_outside_band": int((decided != (ref >= 0.5))[outside].sum()),
        }
        client = ScoringClient(address, token=tokens["office"])
        start = time.perf_counter()
        client.score_encoded(x, False, PURPOSE)  # the same pipeline without reasons (no contributions)
        results["logistic"]["no_reasons_per_second"] = len(x) / (time.perf_counter() - start)  # type: ignore[index]
        batch = x[: client.info.max_batch]
        request = scoring_pb2.ScoreRequest(
            purpose=PURPOSE,
            key_fingerprint=client.key_fingerprint,
            count=len(batch),
            feature_columns=encrypt_columns(client.context, batch),
        )
        reply = client.stub.ScoreBatch(request, metadata=client.metadata)
        results["bytes_per_household"] = {
            "request": request.ByteSize() / len(batch),
            "response": reply.ByteSize() / len(batch),
            "context_once": len(client.context.serialize(save_secret_key=False)),
        }
        latencies, column_latencies = [], []
        fast = ScoringClient(address, token=tokens["fast-office"], low_latency=True)  # one ciphertext per household
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
        results["per_household_baseline_per_second"] = per_household_baseline(RegisteredModel(logistic), x)
        # Load: a legitimate requester alone, then with slow-loris connections and an abusive holder.
        results["load_quiet"] = legit_latencies(address, tokens["legit-office"], x, args.load_seconds / 3)
        stop = threading.Event()
        abuser = ScoringClient(address, token=tokens["abusive-office"])
        counts = attack(address, tokens["abusive-office"], abuser, stop, args.attackers)
        time.sleep(1.0)
        results["load_attacked"] = {
            **legit_latencies(address, tokens["legit-office"], x, args.load_seconds),
            "attack": {**counts, "seconds": args.load_seconds},
        }
        stop.set()
    finally:
        proc.terminate()
        proc.wait()

    proc = serve(mlp, 50872, store.path)
    try:
        n = min(len(x), 3 * 4096)
        part = work / "mlp-households.csv"
        pd.read_csv(pop.test).head(n).to_csv(part, index=False)
        elapsed, report = score_command_path("127.0.0.1:50872", tokens["office"], part, work / "mlp-decisions.csv")
        results["mlp"] = {"households": report["scored"], "per_second": report["scored"] / elapsed}
        results["mlp"]["parameter_set"] = report["parameter_set"]  # type: ignore[index]
    finally:
        proc.terminate()
        proc.wait()

    lg, quiet, loud = results["logistic"], results["load_quiet"], results["load_attacked"]
    assert isinstance(lg, dict) and isinstance(quiet, dict) and isinstance(loud, dict)
    one = results["one_household_latency_ms"]
    assert isinstance(one, dict)
    base = float(results["per_household_baseline_per_second"])  # type: ignore[arg-type]
    mlp_row = results["mlp"]
    assert isinstance(mlp_row, dict)
    bph = results["bytes_per_household"]
    assert isinstance(bph, dict)
    attack_counts = loud["attack"]
    rows = [
        ["`agencyfl score` path (score_file) households/s, logistic N=8192", f"{lg['per_second']:.0f}", ">= 20,000"],
        [
            "the same pipeline without reasons (score_encoded, no contributions) households/s",
            f"{lg['no_reasons_per_second']:.0f}",
            "",
        ],
        ["one ciphertext per household (.dot) households/s", f"{base:.1f}", ""],
        ["ratio score path / per-household", f"{lg['per_second'] / base:.0f}", ">= 250"],
        [f"MLP 40-16-x^2-1 households/s (score_file, {mlp_row['parameter_set']})", f"{mlp_row['per_second']:.0f}", ""],
        ["one household p50 latency ms (row-packed, Galois keys)", f"{one['p50']:.1f}", "<= 50"],
        ["one household p50 latency ms (column-packed)", f"{one['column_packed_p50']:.1f}", ""],
        [
            f"max |score error| over {len(x)} households (written to 1e-6)",
            f"{lg['max_abs_score_error']:.2e}",
            "<= 1e-3",
        ],
        ["decisions differing outside +-1e-3", str(lg["decisions_differing_outside_band"]), "0"],
        ["request / response bytes per household (full batch)", f"{bph['request']:.0f} / {bph['response']:.1f}", ""],
        [
            "legitimate requester alone: 10-household calls, p50 / p99 ms",
            f"{quiet['p50_ms']:.0f} / {quiet['p99_ms']:.0f} ({quiet['requests']} calls, {quiet['errors']} errors)",
            "",
        ],
        [
            "legitimate requester under attack: p50 / p99 / max ms",
            f"{loud['p50_ms']:.0f} / {loud['p99_ms']:.0f} / {loud['max_ms']:.0f} "
            f"({loud['requests']} calls, {loud['errors']} errors)",
            "p99 < 2,000",
        ],
        [
            "under attack: health check / GetModelInfo ms",
            f"{loud['health_check_ms']:.0f} / {loud['model_info_ms']:.0f}",
            "",
        ],
        [
            "attack: raw connections, slow-loris calls, idle streams, abusive full batches",
            f"{attack_counts['raw_connections']}, {attack_counts['unauthenticated_calls']}, "
            f"{attack_counts['idle_streams']}, {attack_counts['abusive_batches']}",
            "",
        ],
    ]
    print(table(["measure", "value", "target"], rows))
    print(f"results: {write_results('scoring', results)}")


if __name__ == "__main__":
    main()
