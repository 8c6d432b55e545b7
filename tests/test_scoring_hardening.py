"""Issue 12: the scoring service under attack (starvation, context abuse, tokens) and the decision rule.

Every test performs the attack on a real gRPC server on loopback. One server per module (small
limits, so deadlines pass in about a second); each test issues its own tokens, so no test depends on
another's contexts, counters or order. Tests that need other limits start their own short-lived server.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from conftest import untrained_card
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from agencyfl.cli import app
from agencyfl.clients.requester import ScoreSettings, ScoringClient, score_file
from agencyfl.exit_codes import ExitCode
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.errors import ScoringError
from agencyfl.federation.model import build_model, model_to_arrays
from agencyfl.federation.proto import scoring_pb2, scoring_pb2_grpc
from agencyfl.federation.spec import load_spec
from agencyfl.local_evaluation import evaluate_local
from agencyfl.privacy.he import encrypt_columns, new_private_context, parameter_set, public_bytes
from agencyfl.server.admission import Limits
from agencyfl.server.model_card import ModelCard
from agencyfl.server.registry import register_model
from agencyfl.server.scoring import MEMORY_PER_BYTE, ScoringService, TokenStore, start_server
from agencyfl.synth import SynthResult

PURPOSE = "eligibility-identification"
SERVICE = "/agencyfl.scoring.v1.Scoring/"
LIMITS = Limits(calls_per_token=2, scoring_calls=6, public_calls=4, read_timeout=1.0, call_timeout=4.0)


def register(small_fed: SynthResult, root: Path, card: ModelCard, name: str = "logistic") -> Path:
    spec = small_fed.spec.parent / f"{name}.toml"
    spec.write_text(small_fed.spec.read_text())
    loaded = load_spec(spec)
    model = build_model(loaded.spec.model, FeatureEncoder(loaded.spec.schema).width, seed=5)
    return register_model(root, loaded, model_to_arrays(model), card)


@pytest.fixture(scope="module")
def hardened(small_fed: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("hardened")
    model = register(small_fed, root, untrained_card())
    tokens = TokenStore(root / "tokens.json")
    server, port = start_server(model, 0, tokens, limits=LIMITS)
    yield {"model": model, "address": f"127.0.0.1:{port}", "tokens": tokens, "server": server}
    server.stop(0)


def meta(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def never_sends(release: threading.Event) -> Iterator[bytes]:
    """A request body that never comes: the call's headers go out, then nothing until ``release``."""
    release.wait()
    yield from ()


def slow_loris(channel: grpc.Channel, method: str, release: threading.Event, metadata: Any = None) -> Any:
    """Start a call to ``method`` whose request never finishes sending; returns a future of its outcome."""
    call = channel.stream_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return call.future(never_sends(release), metadata=metadata, timeout=30)


def idle_stream(channel: grpc.Channel, release: threading.Event, token: str) -> dict[str, Any]:
    """An admitted-or-not ScoreStream that never sends a request; its status is recorded when it ends."""
    outcome: dict[str, Any] = {}
    call = channel.stream_stream(SERVICE + "ScoreStream", lambda b: b, lambda b: b)
    responses = call(never_sends(release), metadata=meta(token), timeout=30)

    def wait() -> None:
        start = time.perf_counter()
        try:
            list(responses)
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()
        outcome["seconds"] = time.perf_counter() - start

    outcome["thread"] = threading.Thread(target=wait, daemon=True)
    outcome["thread"].start()
    return outcome


def legit_answers_quickly(address: str, token: str) -> dict[str, float]:
    """A legitimate requester's GetModelInfo, health check and a 3-household score, each timed."""
    channel = grpc.insecure_channel(address)
    times = {}
    t = time.perf_counter()
    info = scoring_pb2_grpc.ScoringStub(channel).GetModelInfo(
        scoring_pb2.ModelInfoRequest(), metadata=meta(token), timeout=5
    )
    times["model_info"] = time.perf_counter() - t
    assert info.purpose == PURPOSE
    t = time.perf_counter()
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    times["health"] = time.perf_counter() - t
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    t = time.perf_counter()
    client = ScoringClient(address, token=token)
    logits, _ = client.score_encoded(np.zeros((3, len(client.encoder.names))), False, PURPOSE)
    times["score"] = time.perf_counter() - t
    assert logits.shape == (3,)
    client.close()
    channel.close()
    return times


def test_unauthenticated_slow_loris_calls_and_raw_connections_starve_nothing(hardened: Any) -> None:
    release = threading.Event()
    sockets: list[socket.socket] = []
    channels = [grpc.insecure_channel(hardened["address"]) for _ in range(4)]
    try:
        # 12 calls without a token that never finish sending (3 per scoring method, more than all workers),
        # 8 health checks that never send their request (more than the public cap), 8 TCP connections
        # stuck in the HTTP/2 preface.
        methods = ["ScoreBatch", "RegisterContext", "GetModelInfo", "ScoreStream"]
        unauth = [slow_loris(channels[i % 4], SERVICE + methods[i % 4], release) for i in range(12)]
        public = [slow_loris(channels[i % 4], "/grpc.health.v1.Health/Check", release) for i in range(8)]
        host, port = hardened["address"].rsplit(":", 1)
        for _ in range(8):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"PRI * HTTP/2.0\r\n")  # half a connection preface, then silence
            sockets.append(sock)
        t = time.perf_counter()
        for future in unauth:  # refused from the headers alone, though the body never comes
            assert future.exception(timeout=5).code() == grpc.StatusCode.UNAUTHENTICATED
        assert time.perf_counter() - t < 2.0
        times = legit_answers_quickly(hardened["address"], hardened["tokens"].issue("street-office"))
        assert times["model_info"] < 1.0 and times["health"] < 1.0 and times["score"] < 3.0, times
        for future in public:  # a health check is answered without waiting for its request
            reply = health_pb2.HealthCheckResponse.FromString(future.result(timeout=1))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = channels[0].stream_stream("/grpc.health.v1.Health/Watch", lambda b: b, lambda b: b)
        watchers = [watch(never_sends(release), timeout=30) for _ in range(LIMITS.public_calls + 2)]
        times = legit_answers_quickly(hardened["address"], hardened["tokens"].issue("street-office"))
        assert times["model_info"] < 1.0 and times["health"] < 1.0 and times["score"] < 3.0, times
        codes = []
        for w in watchers:  # health watches that never send: capped, then cut at the read deadline
            with pytest.raises(grpc.RpcError) as caught:
                list(w)
            codes.append(caught.value.code().name)
        assert sorted(codes) == ["CANCELLED"] * LIMITS.public_calls + ["RESOURCE_EXHAUSTED"] * 2
    finally:
        release.set()
        for sock in sockets:
            sock.close()
        for channel in channels:
            channel.close()


def test_a_token_holders_idle_streams_are_capped_and_cut(hardened: Any) -> None:
    abuser = hardened["tokens"].issue("abusive-office")
    release = threading.Event()
    channel = grpc.insecure_channel(hardened["address"])
    try:
        streams = []
        for _ in range(4):  # four idle ScoreStream calls, as in the review
            streams.append(idle_stream(channel, release, abuser))
            time.sleep(0.05)
        hanging = slow_loris(channel, SERVICE + "ScoreBatch", release, meta(abuser))  # a fifth, unary
        times = legit_answers_quickly(hardened["address"], hardened["tokens"].issue("street-office"))
        assert times["model_info"] < 1.0 and times["health"] < 1.0 and times["score"] < 3.0, times
        for s in streams:
            s["thread"].join(timeout=10)
        codes = sorted(s["code"].name for s in streams)
        # two admitted (the per-token cap), cut after the 1 s read deadline; the others refused at once
        assert codes == ["CANCELLED", "CANCELLED", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
        cut = [s["seconds"] for s in streams if s["code"] is grpc.StatusCode.CANCELLED]
        refused = [s["seconds"] for s in streams if s["code"] is grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert all(0.8 < x < 3.0 for x in cut) and all(x < 0.5 for x in refused), (cut, refused)
        assert hanging.exception(timeout=5).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the holder's slots are free again once its calls ended
        client = ScoringClient(hardened["address"], token=abuser)
        assert client.score_encoded(np.zeros((1, len(client.encoder.names))), False, PURPOSE)[0].shape == (1,)
    finally:
        release.set()
        channel.close()


def test_a_stream_that_keeps_sending_is_cut_at_the_call_deadline(hardened: Any) -> None:
    client = ScoringClient(hardened["address"], token=hardened["tokens"].issue("chatty-office"))
    columns = encrypt_columns(client.context, np.zeros((1, len(client.encoder.names))))
    request = scoring_pb2.ScoreRequest(
        purpose=PURPOSE, key_fingerprint=client.key_fingerprint, count=1, feature_columns=columns
    )

    def trickle() -> Iterator[Any]:
        for _ in range(40):  # one request every 0.3 s: never idle for the 1 s read deadline
            yield request
            time.sleep(0.3)

    start, replies = time.perf_counter(), 0
    with pytest.raises(grpc.RpcError) as caught:
        for _ in client.stub.ScoreStream(trickle(), metadata=client.metadata, timeout=30):
            replies += 1
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert 3.5 < time.perf_counter() - start < 6.0 and replies >= 5


def test_contexts_belong_to_the_token_that_registered_them(hardened: Any) -> None:
    owner = ScoringClient(hardened["address"], token=hardened["tokens"].issue("office-a"))
    thief_token = hardened["tokens"].issue("office-b")
    width = len(owner.encoder.names)
    request = scoring_pb2.ScoreRequest(
        purpose=PURPOSE,
        key_fingerprint=owner.key_fingerprint,
        count=2,
        feature_columns=encrypt_columns(owner.context, np.zeros((2, width))),
    )
    with pytest.raises(grpc.RpcError) as caught:
        owner.stub.ScoreBatch(request, metadata=meta(thief_token), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # many registrations by another holder evict only that holder's own contexts
    for _ in range(LIMITS.contexts_per_token + 2):
        ScoringClient(hardened["address"], token=thief_token)
    assert owner.score_encoded(np.zeros((2, width)), False, PURPOSE)[0].shape == (2,)


def test_contexts_are_deduplicated_by_key_and_quota_and_budget_hold(small_fed: SynthResult, tmp_path: Path) -> None:
    model = register(small_fed, tmp_path, untrained_card())
    tokens = TokenStore(tmp_path / "tokens.json")
    ctx = new_private_context(parameter_set("n8192-d1"))
    raw = public_bytes(ctx)
    # room for two contexts of this size on the whole server, two per token
    limits = Limits(contexts_per_token=2, context_budget_bytes=int(2.5 * MEMORY_PER_BYTE * len(raw)))
    server, port = start_server(model, 0, tokens, limits=limits)
    service: ScoringService = server.agencyfl_service
    try:
        stub = scoring_pb2_grpc.ScoringStub(
            grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 1 << 26)])
        )
        first, second = tokens.issue("office-a"), tokens.issue("office-b")

        def register_ctx(blob: bytes, token: str) -> Any:
            return stub.RegisterContext(scoring_pb2.RegisterContextRequest(public_context=blob), metadata=meta(token))

        fp = register_ctx(raw, first).key_fingerprint
        # the same key with an unknown protobuf field appended (field 15, varint 1): same entry, no new cost
        for junk in (bytes([0x78, 0x01]), bytes([0x7A, 0x03]) + b"abc"):
            assert register_ctx(raw + junk, first).key_fingerprint == fp
        assert service.contexts.count() == 1
        assert service.contexts.used_bytes == MEMORY_PER_BYTE * len(raw)
        register_ctx(public_bytes(new_private_context(parameter_set("n8192-d1"))), second)
        with pytest.raises(grpc.RpcError) as caught:  # the server's budget is spent: refused, nobody evicted
            register_ctx(public_bytes(new_private_context(parameter_set("n8192-d1"))), second)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert service.contexts.count() == 2 and service.contexts.count(tokens_hash(first)) == 1
    finally:
        server.stop(0)


def tokens_hash(token: str) -> str:
    from agencyfl.server.tokens import token_hash

    return token_hash(token)


def test_tokens_are_bound_to_purposes_expire_and_can_be_revoked(hardened: Any, tmp_path: Path) -> None:
    store: TokenStore = hardened["tokens"]
    address = hardened["address"]
    other_purpose = store.issue("fraud-unit", purposes=["fraud-detection"])
    with pytest.raises(ScoringError, match="PERMISSION_DENIED.*issued for \\['fraud-detection'\\]"):
        client = ScoringClient(address, token=other_purpose)
        client.score_encoded(np.zeros((1, len(client.encoder.names))), False, PURPOSE)
    right = ScoringClient(address, token=store.issue("office"))
    with pytest.raises(ScoringError, match="PERMISSION_DENIED"):
        right.score_encoded(np.zeros((1, len(right.encoder.names))), False, "marketing")
    short = store.issue("temp-office", days=5.0 / 86400)  # five seconds
    ScoringClient(address, token=short)
    expires = dt.datetime.fromisoformat(next(r for r in store.records() if r.requester == "temp-office").expires)
    time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 0.2)
    with pytest.raises(ScoringError, match="UNAUTHENTICATED"):
        ScoringClient(address, token=short)
    revoked = store.issue("leaving-office")
    client = ScoringClient(address, token=revoked)
    record = next(r for r in store.records() if r.requester == "leaving-office")
    cli = CliRunner().invoke(app, ["coordinator", "revoke-token", "--tokens", str(store.path), "--id", record.id])
    assert cli.exit_code == 0, cli.output
    with pytest.raises(ScoringError, match="UNAUTHENTICATED"):  # takes effect in the running server at once
        client.score_encoded(np.zeros((1, len(client.encoder.names))), False, PURPOSE)
    listed = CliRunner().invoke(app, ["coordinator", "tokens", "--tokens", str(store.path), "--format", "json"])
    assert listed.exit_code == 0
    rows = {r["requester"]: r for r in json.loads(listed.stdout)}
    assert rows["leaving-office"]["state"] == "revoked" and rows["temp-office"]["state"] == "expired"
    assert rows["fraud-unit"]["purposes"] == ["fraud-detection"] and rows["office"]["state"] == "active"
    assert revoked not in listed.stdout and tokens_hash(revoked) not in listed.stdout  # ids only
    unknown = CliRunner().invoke(app, ["coordinator", "revoke-token", "--tokens", str(store.path), "--id", "deadbeef"])
    assert unknown.exit_code == ExitCode.USAGE and len(unknown.stderr.strip().splitlines()) == 1


def test_token_file_is_private_and_a_damaged_one_fails_closed(hardened: Any, tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "t.json")
    token = store.issue("office")
    assert (tmp_path / "t.json").stat().st_mode & 0o777 == 0o600
    assert token not in (tmp_path / "t.json").read_text()
    (tmp_path / "t.json").write_text("[1, 2]")
    result = CliRunner().invoke(app, ["coordinator", "tokens", "--tokens", str(tmp_path / "t.json")])
    assert result.exit_code == ExitCode.DATA_UNUSABLE and "not a JSON object" in result.stderr


def test_model_info_sends_what_a_requester_needs_and_not_the_spec(hardened: Any, small_fed: SynthResult) -> None:
    info = scoring_pb2_grpc.ScoringStub(grpc.insecure_channel(hardened["address"])).GetModelInfo(
        scoring_pb2.ModelInfoRequest(), metadata=meta(hardened["tokens"].issue("office")), timeout=5
    )
    wire = info.SerializeToString()
    spec = load_spec(small_fed.spec).spec
    for agency in spec.agencies:  # neither the agencies' names nor where their data lives
        assert agency.data.encode() not in wire and agency.name.encode() not in wire
    assert b"[privacy]" not in wire and b"epsilon" not in wire
    assert json.loads(info.schema_json)["id"] == spec.schema_.id
    threshold = spec.fairness.threshold if spec.fairness else 0.5
    assert json.loads(info.decision_json)["threshold"] == pytest.approx(threshold)


@pytest.mark.parametrize("attribute", ["region_type", "head_age"])
def test_score_applies_the_cards_group_thresholds_as_evaluate_does(
    small_fed: SynthResult, tmp_path: Path, attribute: str
) -> None:
    groups = {"region_type": ["urban", "rural"], "head_age": ["<40", "40-65", ">=65"]}[attribute]
    cuts = dict(zip(groups, [0.35, 0.6, 0.5], strict=False))
    card = untrained_card(mitigation={"attribute": attribute, "thresholds": cuts, "after": {}})
    model = register(small_fed, tmp_path, card, name=f"mitigated-{attribute}")
    server, port = start_server(model, 0, None)
    try:
        client = ScoringClient(f"127.0.0.1:{port}")
        assert client.rule.thresholds == cuts and client.rule.attribute == attribute
        report = score_file(client, small_fed.test, tmp_path / "scored.csv", ScoreSettings())
        scored = pd.read_csv(tmp_path / "scored.csv")
        evaluated = evaluate_local(model, small_fed.test).decisions
        assert report["scored"] == len(evaluated) > 100
        far = (np.abs(evaluated["score"].to_numpy()[:, None] - np.array(list(cuts.values()))[None, :]) > 1e-3).all(1)
        same = scored["decision"].to_numpy() == evaluated["decision"].to_numpy()
        assert same[far].all() and far.mean() > 0.95
        # the per-group cuts changed decisions compared with one threshold of 0.5
        assert (scored["decision"].eq("eligible") != (scored["score"] >= 0.5)).sum() > 0
        with pytest.raises(ScoringError, match="per-group thresholds"):
            score_file(client, small_fed.test, tmp_path / "other.csv", ScoreSettings(threshold=0.5))
        cli = CliRunner().invoke(
            app,
            ["score", "--server", f"127.0.0.1:{port}", "--data", str(small_fed.test), "--out", str(tmp_path / "c.csv")]
            + ["--threshold", "0.5"],
        )
        assert cli.exit_code == ExitCode.USAGE and "per-group thresholds" in cli.stderr
        assert not (tmp_path / "c.csv").exists()
    finally:
        server.stop(0)


class _OddParameters(scoring_pb2_grpc.ScoringServicer):
    """A real server whose model offers only a CKKS parameter set the requester does not know."""

    def __init__(self, model: Path) -> None:
        self.real = ScoringService(model)

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        info = self.real.GetModelInfo(request, context)
        del info.parameter_sets[:]
        info.parameter_sets.add(poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40], global_scale_bits=20)
        return info


def test_a_model_without_a_known_parameter_set_exits_9(small_fed: SynthResult, tmp_path: Path) -> None:
    from concurrent import futures

    model = register(small_fed, tmp_path, untrained_card())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    scoring_pb2_grpc.add_ScoringServicer_to_server(_OddParameters(model), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        args = ["score", "--server", f"127.0.0.1:{port}", "--data", str(small_fed.test), "--out", str(tmp_path / "o")]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == ExitCode.SCORING_REFUSED, result.output
        assert "no CKKS parameter set" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    "given",
    [
        ["--tls-cert"],
        ["--tls-key"],
        ["--tls-client-ca"],
        ["--tls-cert", "--tls-client-ca"],
        ["--tls-key", "--tls-client-ca"],
    ],
)
def test_serve_refuses_an_incomplete_tls_option_set(hardened: Any, tmp_path: Path, given: list[str]) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    args = ["serve", "--model", str(hardened["model"]), "--port", "0", "--tokens", str(tmp_path / "t.json")]
    for option in given:
        args += [option, str(pem)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "refusing to serve in plaintext" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_decisions_file_is_private(hardened: Any, small_fed: SynthResult, tmp_path: Path) -> None:
    client = ScoringClient(hardened["address"], token=hardened["tokens"].issue("office"))
    head = "\n".join(small_fed.test.read_text().splitlines()[:30]) + "\n"
    data = tmp_path / "few.csv"
    data.write_text(head)
    score_file(client, data, tmp_path / "decisions.csv", ScoreSettings())
    assert (tmp_path / "decisions.csv").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if re.search(r"\.tmp$", p.name)] == []


class _SlowScoring(ScoringService):
    """The real service, 0.3 s slower per batch, recording when each ScoreBatch ran."""

    def __init__(self, model: Path) -> None:
        super().__init__(model)
        self.calls: list[tuple[float, float]] = []

    def ScoreBatch(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        start = time.perf_counter()
        time.sleep(0.3)
        reply = super().ScoreBatch(request, context)
        self.calls.append((start, time.perf_counter()))
        return reply


def test_score_file_encrypts_the_next_batch_while_the_server_scores(
    small_fed: SynthResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent import futures

    import agencyfl.clients.requester as requester
    from agencyfl.server.admission import Admission

    model = register(small_fed, tmp_path, untrained_card())
    service = _SlowScoring(model)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[Admission(None, Limits())],
        options=[("grpc.max_receive_message_length", 1 << 26), ("grpc.max_send_message_length", 1 << 26)],
    )
    scoring_pb2_grpc.add_ScoringServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    encryptions: list[tuple[float, float]] = []
    real = requester.encrypt_columns

    def timed(ctx: Any, x: np.ndarray) -> list[bytes]:  # the real encryption, timed
        start = time.perf_counter()
        out = real(ctx, x)
        encryptions.append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(requester, "encrypt_columns", timed)
    frame = pd.read_csv(small_fed.test, dtype=str)
    copies = [frame.assign(household_id=frame["household_id"] + f"-{k}") for k in range(-(-9000 // len(frame)))]
    data = tmp_path / "many.csv"
    pd.concat(copies).head(9000).to_csv(data, index=False)
    try:
        client = ScoringClient(f"127.0.0.1:{port}")
        report = score_file(client, data, tmp_path / "out.csv", ScoreSettings())
        assert report["scored"] == 9000 and len(service.calls) == 3 == len(encryptions)  # one pass, 3 batches
        # batches 2 and 3 were being encrypted before the server had finished batches 1 and 2 (a loop that waits
        # for each answer starts the next encryption only after the call ends). Not compared with the server's
        # start: the next encryption may finish while the previous batch is still in transit.
        for (enc_start, _), (_, call_end) in zip(encryptions[1:], service.calls[:-1], strict=True):
            assert enc_start < call_end
    finally:
        server.stop(0)
