"""Population screening (``agencyfl screen eligible``): throughput against the CKKS floor, and who the lists find.

1. Train: a vertical synthetic population (``synthesize_vertical``) trained by ``run_vertical`` (align, DP
   gradient descent under CKKS, the model registered with each part in its agency's folder).
2. Throughput: a larger vertical population of the same spec template (another seed: other households),
   aligned (timed on its own), the trained parts registered there (``register_vertical``; the encoding is
   a function of the spec, so the weights apply), a token issued, then ``screen_eligible(realign=False)``
   timed end to end (each agency encodes its block from its file, encrypts, the coordinator adds, civil
   affairs decrypts, decides and writes the worklists and the ledgers) and ``score_register`` alone. The
   floor is the ciphertext work alone, timed in the same run just before and after: for each of the 3
   non-label agencies ceil(N / 2048) encryptions (``n4096-d0``, public context) of 2,048 random values
   and their serialization, the relay's deserialization and addition of all parts and serialization of
   the sum, the requester's deserialization and decryption. Every party runs in this process: no
   network is in the screening path. The same ciphertext bytes are then sent once through a loopback
   TCP socket (each agency's part to the relay, the sum to the requester) to say what the wire would add.
   The same screening is timed again in ``--fresh-runs`` new processes (the cold case: no page touched
   before it), and ``agencyfl screen eligible`` once as a command (imports and checks included).
3. Against the synthetic truth (``truth/households.csv``, read by benchmarks and tests only): of the truly
   eligible households not enrolled, the share the ``invite`` list finds and its precision; of the
   wrongly enrolled (enrolled, truly not eligible), the share ``review-enrolment`` finds and its precision.
   On the training population's register (its assessed households were trained on) and on the large one
   (households no model saw).
4. Beside a centralized non-private logistic regression (``benchmarks/vertical.py``'s, Adam, 2,000 steps) on
   the same assessed households with every agency's columns joined on the canonical id
   (``FeatureEncoder(spec.schema_)``), and 5. the horizontal federation (``synthesize`` + ``run_federation``,
   DP-SGD, SecAgg+, 10 rounds, a population of the same size and seed drawn by the horizontal generator),
   each scoring the same joined register: lists of the same length as the vertical ones (the top scores
   among households not enrolled; the lowest among the enrolled).

    python benchmarks/screening.py [--households 60000] [--screen-households 1000000] [--rounds 30] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import tenseal as ts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agencyfl.alignment.runs import align_from_spec  # noqa: E402
from agencyfl.federation.encoding import FeatureEncoder  # noqa: E402
from agencyfl.federation.model import predict_proba  # noqa: E402
from agencyfl.federation.resident_id import InvalidResidentId, normalize  # noqa: E402
from agencyfl.federation.spec import LoadedVerticalSpec, load_any_spec  # noqa: E402
from agencyfl.federation.table import load_table  # noqa: E402
from agencyfl.privacy.he import new_private_context, parameter_set, public_bytes  # noqa: E402
from agencyfl.runner import run_federation  # noqa: E402
from agencyfl.screening.protocol import PARAMETERS  # noqa: E402
from agencyfl.screening.run import ScreeningResult, score_register, screen_eligible  # noqa: E402
from agencyfl.server.registry import RegisteredModel  # noqa: E402
from agencyfl.server.tokens import TokenStore  # noqa: E402
from agencyfl.synth import synthesize  # noqa: E402
from agencyfl.synth_vertical import synthesize_vertical  # noqa: E402
from agencyfl.vertical.encoding import forget_tables, label_block  # noqa: E402
from agencyfl.vertical.job import run_vertical  # noqa: E402
from agencyfl.vertical.model import RegisteredVerticalModel, load_part, register_vertical  # noqa: E402
from benchmarks._common import table, write_results  # noqa: E402
from benchmarks.vertical import auc, centralized  # noqa: E402

PURPOSE = "eligibility-identification"
REQUESTER = "civil-affairs"
TARGET_RATE = 100_000
TARGET_RECALL_RATIO = 0.95
Mask = npt.NDArray[np.bool_]
Vector = npt.NDArray[np.float64]


def _loaded(spec: Path) -> LoadedVerticalSpec:
    loaded = load_any_spec(spec)
    assert isinstance(loaded, LoadedVerticalSpec)
    return loaded


def _canonical(raw: object) -> str | None:
    try:
        return normalize(str(raw))
    except InvalidResidentId:
        return None


def joined_register(loaded: LoadedVerticalSpec, households: pd.Series) -> pd.DataFrame:
    """Every agency's validated columns joined onto the register households (canonical ids, register order).

    The non-private join a centralized model needs (benchmark only): each agency's file, its ids
    normalized, rows with an invalid id or a repeated one dropped; empty where an agency lacks a household.
    """
    spec = loaded.spec
    # the register frame keeps ids as civil affairs wrote them (screening normalizes only listed ones)
    joined = pd.DataFrame(index=pd.Index(households.map(_canonical), name="household"))
    for agency in spec.agencies:
        schema = spec.block_schema(agency.name)
        valid = load_table(loaded.data_path(agency.name), schema, require_label=False, write_quarantine=False).valid
        ids = valid[schema.id].map(_canonical)
        frame = valid[[f.name for f in schema.features]].set_index(pd.Index(ids, name="household"))
        frame = frame[frame.index.notna() & ~frame.index.duplicated(keep="first")]
        joined = joined.join(frame, how="left")
    return joined[[f.name for f in spec.schema_.features]].reset_index()


def truth_of(data: Path, households: pd.Series) -> tuple[Mask, Mask, Mask]:
    """The register households' true eligibility, enrolment and special hardship, from ``truth/households.csv``."""
    columns = ["head_id", "eligible", "enrolled", "special_hardship"]
    truth = pd.read_csv(data / "truth" / "households.csv", usecols=columns, dtype={"head_id": str})
    rows = truth.set_index("head_id").loc[pd.Index(households.map(_canonical))]
    return tuple(rows[c].to_numpy(dtype=bool) for c in columns[1:])  # type: ignore[return-value]


def share(found: int, total: int) -> float:
    return found / total if total else float("nan")


def list_figures(listed: Mask, target: Mask) -> dict[str, Any]:
    """Size of a list, how many of the target it holds, recall and precision."""
    found = int((listed & target).sum())
    return {
        "listed": int(listed.sum()),
        "target": int(target.sum()),
        "found": found,
        "recall": share(found, int(target.sum())),
        "precision": share(found, int(listed.sum())),
    }


def extreme(scores: Vector, pool: Mask, k: int, highest: bool) -> Mask:
    """The ``k`` households of ``pool`` with the highest (or lowest) scores."""
    candidates = np.flatnonzero(pool)
    order = np.argsort(-scores[candidates] if highest else scores[candidates], kind="stable")
    out = np.zeros(len(scores), dtype=bool)
    out[candidates[order[:k]]] = True
    return out


def worklist_masks(result: ScreeningResult) -> dict[str, Mask]:
    """Each category's households as a mask over register positions."""
    n = len(result.scores)
    masks = {c: np.zeros(n, dtype=bool) for c in ("invite", "review-enrolment", "human-review")}
    for row in result.rows:
        masks[row["category"]][row["position"]] = True
    return masks


def truth_figures(
    result: ScreeningResult, data: Path, joined: pd.DataFrame, references: dict[str, tuple[Any, ...]]
) -> dict[str, Any]:
    """Recall and precision of the vertical lists and of same-length lists of every reference model."""
    households = result.frame["household"]
    eligible, enrolled_truth, special = truth_of(data, households)
    enrolled = result.frame["enrolled"].to_numpy(dtype=bool)
    assert (enrolled == enrolled_truth).all(), "the register's enrolment differs from the truth's"
    missed, wrong = eligible & ~enrolled, enrolled & ~eligible
    masks = worklist_masks(result)
    out: dict[str, Any] = {
        "register": len(households),
        "truly_eligible": int(eligible.sum()),
        "eligible_not_enrolled": int(missed.sum()),
        "eligible_not_enrolled_special_hardship": int((missed & special).sum()),
        "wrongly_enrolled": int(wrong.sum()),
        "models": {},
    }
    k_invite, k_review = int(masks["invite"].sum()), int(masks["review-enrolment"].sum())
    vertical: dict[str, Any] = {
        "auc_truth": auc(result.scores, eligible.astype(np.float64)),
        "invite": list_figures(masks["invite"], missed),
        "review_enrolment": list_figures(masks["review-enrolment"], wrong),
        "invite_or_human_review": list_figures(masks["invite"] | (masks["human-review"] & ~enrolled), missed),
        "invite_without_special_hardship": list_figures(masks["invite"] & ~special, missed & ~special),
        "human_review": int(masks["human-review"].sum()),
    }
    out["models"]["vertical"] = vertical
    for name, (kind, model, encoder) in references.items():
        x = encoder.encode(joined)
        if kind == "numpy":
            scores = 1 / (1 + np.exp(-(x.astype(np.float64) @ model[:-1] + model[-1])))
        else:
            scores = predict_proba(model, x)
        out["models"][name] = {
            "auc_truth": auc(scores, eligible.astype(np.float64)),
            "invite": list_figures(extreme(scores, ~enrolled, k_invite, highest=True), missed),
            "review_enrolment": list_figures(extreme(scores, enrolled, k_review, highest=False), wrong),
        }
        for key in ("invite", "review_enrolment"):
            out["models"][name][key]["vertical_recall_ratio"] = share(
                int(vertical[key]["found"]), int(out["models"][name][key]["found"])
            )
    return out


@dataclass
class Floor:
    """Seconds of the ciphertext work alone for one screening of ``households`` (one measurement)."""

    households: int
    ciphertexts_per_agency: int
    encrypt_s: float
    relay_s: float
    decrypt_s: float
    parts: list[list[bytes]]
    summed: list[bytes]
    public_context: bytes

    @property
    def total_s(self) -> float:
        return self.encrypt_s + self.relay_s + self.decrypt_s


def he_floor(households: int, agencies: int = 3, seed: int = 0) -> Floor:
    """Time the protocol's ciphertext operations alone (values drawn beforehand, not timed)."""
    params = parameter_set(PARAMETERS)
    private = new_private_context(params)
    raw_public = public_bytes(private)
    public = ts.context_from(raw_public)
    chunks = math.ceil(households / params.slots)
    rng = np.random.default_rng(seed)
    values = [rng.uniform(-3.0, 3.0, params.slots).tolist() for _ in range(chunks)]
    start = time.perf_counter()
    parts = [[bytes(ts.ckks_vector(public, v).serialize()) for v in values] for _ in range(agencies)]
    encrypt = time.perf_counter() - start
    start = time.perf_counter()
    total: list[ts.CKKSVector] | None = None
    for part in parts:
        cts = [ts.ckks_vector_from(public, raw) for raw in part]
        total = cts if total is None else [a + b for a, b in zip(total, cts, strict=True)]
    assert total is not None
    summed = [bytes(c.serialize()) for c in total]
    relay = time.perf_counter() - start
    start = time.perf_counter()
    for raw in summed:
        ts.ckks_vector_from(private, raw).decrypt()
    decrypt = time.perf_counter() - start
    return Floor(households, chunks, encrypt, relay, decrypt, parts, summed, raw_public)


def loopback_seconds(messages: list[bytes]) -> float:
    """Send ``messages`` (length-prefixed) over a loopback TCP connection; seconds until all arrived."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    expected = sum(len(m) + 4 for m in messages)
    received = [0]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while received[0] < expected and (chunk := conn.recv(1 << 20)):
                received[0] += len(chunk)

    thread = threading.Thread(target=serve)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as client:
        for m in messages:
            client.sendall(len(m).to_bytes(4, "big"))
            client.sendall(m)
        thread.join()
    elapsed = time.perf_counter() - start
    server.close()
    assert received[0] == expected
    return elapsed


def wire(floor: Floor) -> dict[str, float]:
    """Loopback time of each leg that carries ciphertexts or the public context."""
    legs = {"context to the 3 agencies": loopback_seconds([floor.public_context] * len(floor.parts))}
    legs |= {f"agency {i + 1} to the relay": loopback_seconds(part) for i, part in enumerate(floor.parts)}
    legs["relay to the requester"] = loopback_seconds(floor.summed)
    return legs


def timed_screening(
    loaded: LoadedVerticalSpec, work: Path, model_dir: Path, out: Path, token: str
) -> tuple[ScreeningResult, float, dict[str, float]]:
    """``screen_eligible`` without realignment, its wall time and the time of each of its steps."""
    marks: list[tuple[str, float]] = []
    start = time.perf_counter()
    result = screen_eligible(
        loaded, work, model_dir, out, token=token, realign=False,
        progress=lambda step: marks.append((step, time.perf_counter())),
    )  # fmt: skip
    end = time.perf_counter()
    marks = [("checks (model, token)", start), *marks, ("end", end)]
    steps = {name: t1 - t0 for (name, t0), (_, t1) in zip(marks, marks[1:], strict=False)}
    return result, end - start, steps


def train(root: Path, households: int, seed: int, rounds: int) -> tuple[LoadedVerticalSpec, Path, dict[str, Any]]:
    data, work = root / "train", root / "train-work"
    synth = synthesize_vertical(data, households=households, seed=seed, rounds=rounds)
    loaded = _loaded(synth.spec)
    start = time.perf_counter()
    summary = run_vertical(loaded, work)
    summary["wall_s"] = time.perf_counter() - start
    return loaded, work, summary


def horizontal(root: Path, households: int, seed: int) -> tuple[RegisteredModel, dict[str, Any]]:
    pop = synthesize(root / "horizontal", households=households, seed=seed)
    start = time.perf_counter()
    summary = run_federation(pop.spec, root / "horizontal-work")
    wall = time.perf_counter() - start
    model = RegisteredModel(summary["model"])
    return model, {"households": households, "rounds": model.spec.training.rounds, "wall_s": wall,
                   "validation_auc": summary.get("metrics", {}).get("auc"),
                   "epsilon": model.spec.privacy.epsilon}  # fmt: skip


def move_model(train_work: Path, model_dir: Path, work: Path, loaded: LoadedVerticalSpec) -> Path:
    """Register the trained parts in another workdir (each part read from its agency's own folder)."""
    trained = RegisteredVerticalModel(model_dir)
    manifest = trained.manifest
    weights = {agency: load_part(train_work, agency, manifest) for agency in manifest.parts}
    inputs = {agency: list(part.inputs) for agency, part in manifest.parts.items()}
    return register_vertical(work, loaded, weights, inputs, trained.card, manifest.score_clip)


def _faults_since(before: resource.struct_rusage) -> dict[str, float]:
    """Minor page faults and system seconds of this process since ``before``."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return {"minor_faults": now.ru_minflt - before.ru_minflt, "system_s": now.ru_stime - before.ru_stime}


def big_screening(
    root: Path, households: int, seed: int, rounds: int, train_work: Path, model_dir: Path
) -> tuple[dict[str, Any], ScreeningResult, LoadedVerticalSpec, Path]:
    data, work = root / "big", root / "big-work"
    out: dict[str, Any] = {"households": households, "seed": seed}
    start = time.perf_counter()
    synth = synthesize_vertical(data, households=households, seed=seed, rounds=rounds)
    out["synthesis_s"] = time.perf_counter() - start
    loaded = _loaded(synth.spec)
    start = time.perf_counter()
    alignment, _ = align_from_spec(loaded, work)
    out["alignment_s"] = time.perf_counter() - start
    out["register"] = alignment.view.register_size
    out["matched"] = {n: a.matched for n, a in alignment.agencies.items()}
    folder = move_model(train_work, model_dir, work, loaded)
    token = TokenStore(work / "coordinator" / "tokens.json").issue(REQUESTER, (PURPOSE,))
    n = alignment.view.register_size
    before = he_floor(n, seed=seed)
    faults = resource.getrusage(resource.RUSAGE_SELF)
    result, wall, steps = timed_screening(loaded, work, folder, root / "big-lists", token)
    first = _faults_since(faults)
    # The same screening again in this process, every file read again: what a long-running service sees
    # once its memory has grown (the first run pays for the pages it touches first: docs/benchmarks.md)
    forget_tables()
    faults = resource.getrusage(resource.RUSAGE_SELF)
    _, again_wall, again_steps = timed_screening(loaded, work, folder, root / "big-lists-again", token)
    again = _faults_since(faults)
    model = RegisteredVerticalModel(folder)
    forget_tables()  # score_register alone reads every party's file, as a screening does
    start = time.perf_counter()
    _, parties = score_register(loaded, work, model, "scr-benchmark", PURPOSE)
    score_s = time.perf_counter() - start
    after = he_floor(n, seed=seed + 1)
    legs = wire(after)
    floor_s = (before.total_s + after.total_s) / 2
    he_inside = sum(c.he_seconds for c in parties.contributors.values()) + parties.relay.he_seconds
    he_inside += parties.requester.he_seconds
    sent = result.report["bytes"]
    out |= {
        "households_scored": result.report["households_scored"],
        "counts": result.report["counts"],
        "screen_eligible_s": wall,
        "screen_eligible_steps_s": steps,
        "households_per_s": n / wall,
        "page_faults_and_system_s": first,
        "again": {
            "screen_eligible_s": again_wall,
            "steps_s": again_steps,
            "households_per_s": n / again_wall,
            "page_faults_and_system_s": again,
        },  # fmt: skip
        "score_register_s": score_s,
        "score_register_households_per_s": n / score_s,
        "he_seconds_inside_score_register": he_inside,
        "floor": {
            "ciphertexts_per_agency": before.ciphertexts_per_agency,
            "before": {
                "encrypt_s": before.encrypt_s,
                "relay_s": before.relay_s,
                "decrypt_s": before.decrypt_s,
                "total_s": before.total_s,
            },
            "after": {
                "encrypt_s": after.encrypt_s,
                "relay_s": after.relay_s,
                "decrypt_s": after.decrypt_s,
                "total_s": after.total_s,
            },
            "mean_s": floor_s,
            "households_per_s": n / floor_s,
        },  # fmt: skip
        "ratio_to_floor": wall / floor_s,
        "score_register_ratio_to_floor": score_s / floor_s,
        "bytes_sent": sent,
        "bytes_per_household": {k: v / n for k, v in sent.items()},
        "ciphertext_bytes": len(after.parts[0][0]),
        "loopback_s": legs,
        "loopback_total_s": sum(legs.values()),
        "households_per_s_with_loopback": n / (wall + sum(legs.values())),
    }
    return out, result, loaded, data


def screening_in_this_process(root: Path) -> dict[str, Any]:
    """``timed_screening`` of ``root``'s large register, as the first thing this process does after its imports
    (``--fresh-process``): the cold case, where every page the screening touches is new to the process."""
    loaded = _loaded(root / "big" / "federation.toml")
    work = root / "big-work"
    folder = sorted(p for p in (work / "registry").rglob("manifest.json"))[-1].parent
    token = TokenStore(work / "coordinator" / "tokens.json").issue(REQUESTER, (PURPOSE,))
    shutil.rmtree(root / "fresh-lists", ignore_errors=True)
    faults = resource.getrusage(resource.RUSAGE_SELF)
    result, wall, steps = timed_screening(loaded, work, folder, root / "fresh-lists", token)
    n = result.report["households_scored"]
    return {"screen_eligible_s": wall, "steps_s": steps, "households_per_s": n / wall} | _faults_since(faults)


def fresh_processes(root: Path, runs: int) -> list[dict[str, Any]]:
    """``screening_in_this_process`` in ``runs`` new Python processes, one after the other."""
    out = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, __file__, "--fresh-process", str(root)], capture_output=True, text=True, check=True
        )  # fmt: skip
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def command_wall(root: Path) -> float:
    """Seconds of ``agencyfl screen eligible`` on the large register as a caseworker's coordinator runs it: a
    new process, imports and the (current) alignment check included."""
    work = root / "big-work"
    folder = sorted(p for p in (work / "registry").rglob("manifest.json"))[-1].parent
    token = TokenStore(work / "coordinator" / "tokens.json").issue(REQUESTER, (PURPOSE,))
    shutil.rmtree(root / "command-lists", ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "agencyfl", "screen", "eligible", "--spec", str(root / "big" / "federation.toml"),
         "--workdir", str(work), "--model", str(folder),
         "--out", str(root / "command-lists"), "--token", token, "--format", "json"],
        capture_output=True, check=True,
    )  # fmt: skip
    return time.perf_counter() - start


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def truth_rows(label: str, figures: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, m in figures["models"].items():
        inv, rev = m["invite"], m["review_enrolment"]
        rows.append([
            label, name, fmt(m["auc_truth"], 4),
            f"{inv['listed']:,}", fmt(inv["recall"]), fmt(inv["precision"]),
            "" if name == "vertical" else fmt(inv["vertical_recall_ratio"]),
            f"{rev['listed']:,}", fmt(rev["recall"]), fmt(rev["precision"]),
            "" if name == "vertical" else fmt(rev["vertical_recall_ratio"]),
        ])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--households", type=int, default=60_000, help="training population (80%% in the register)")
    parser.add_argument("--screen-households", type=int, default=1_000_000, help="population screened for throughput")
    parser.add_argument("--rounds", type=int, default=30, help="vertical iterations T, written into the spec")
    parser.add_argument("--seed", type=int, default=7, help="training population; the large one uses seed + 1")
    parser.add_argument("--no-big-truth", action="store_true", help="skip the lists' figures on the large population")
    parser.add_argument("--keep", type=Path, default=None, help="keep every file in this folder (default: a temp one)")
    parser.add_argument("--fresh-runs", type=int, default=3, help="the large screening again, each in a new process")
    parser.add_argument("--fresh-process", type=Path, default=None, help=argparse.SUPPRESS)  # one such run
    args = parser.parse_args()
    if args.fresh_process is not None:
        print(json.dumps(screening_in_this_process(args.fresh_process)))
        return
    command = " ".join(["python", "benchmarks/screening.py", *sys.argv[1:]])
    root = args.keep or Path(tempfile.mkdtemp(prefix="agencyfl-screening-"))
    root.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    begun = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - begun:6.0f} s] {text}", flush=True)

    try:
        say(f"training: {args.households:,} households, T {args.rounds}")
        loaded, train_work, summary = train(root, args.households, args.seed, args.rounds)
        model_dir = Path(summary["registry"])
        say(f"trained {summary['model_version']} in {summary['wall_s']:.0f} s; screening its register")
        token = TokenStore(train_work / "coordinator" / "tokens.json").issue(REQUESTER, (PURPOSE,))
        small, small_wall, small_steps = timed_screening(loaded, train_work, model_dir, root / "lists", token)
        joined = joined_register(loaded, small.frame["household"])
        _, labels = label_block(loaded, train_work)
        encoder = FeatureEncoder(loaded.spec.schema_)
        x = encoder.encode(joined).astype(np.float64)
        w_central = centralized([x], labels.y, labels.train)
        say("centralized reference fitted; training the horizontal federation")
        h_model, h_info = horizontal(root, args.households, args.seed)
        references: dict[str, tuple[Any, ...]] = {
            "centralized non-private LR": ("numpy", w_central, encoder),
            f"horizontal DP-SGD eps {h_info['epsilon']:g}, {h_info['rounds']} rounds": (
                "torch", h_model.model, FeatureEncoder(h_model.spec.schema)),
        }  # fmt: skip
        train_truth = truth_figures(small, loaded.path.parent, joined, references)
        say(f"screening {args.screen_households:,} households")
        big, big_result, big_loaded, big_data = big_screening(
            root, args.screen_households, args.seed + 1, args.rounds, train_work, model_dir
        )
        say(f"the same screening in {args.fresh_runs} new processes, then as the command")
        big["fresh_processes"] = fresh_processes(root, args.fresh_runs)
        big["command_s"] = command_wall(root)
        big_truth = None
        if not args.no_big_truth:
            say("lists against the truth on the large population")
            big_joined = joined_register(big_loaded, big_result.frame["household"])
            big_truth = truth_figures(big_result, big_data, big_joined, references)
        say("done")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()

    n = big["register"]
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in big["screen_eligible_steps_s"].items())
    fl = big["floor"]
    print(
        table(
            ["throughput", "value"],
            [
                ["population / register screened", f"{big['households']:,} / {n:,}"],
                ["alignment (separately)", f"{big['alignment_s']:.1f} s"],
                ["screen_eligible, end to end", f"{big['screen_eligible_s']:.1f} s ({steps})"],
                [f"households/s end to end (target >= {TARGET_RATE:,})", f"{big['households_per_s']:,.0f}"],
                [
                    "  page faults / system seconds in it",
                    f"{big['page_faults_and_system_s']['minor_faults']:,} / "
                    f"{big['page_faults_and_system_s']['system_s']:.1f} s",
                ],
                [
                    f"the same in {len(big['fresh_processes'])} new processes (cold)",
                    ", ".join(
                        f"{r['screen_eligible_s']:.1f} s ({r['households_per_s']:,.0f}/s)"
                        for r in big["fresh_processes"]
                    ),
                ],
                ["`agencyfl screen eligible` as a command", f"{big['command_s']:.1f} s (imports and checks included)"],
                [
                    "the same screening again in this process",
                    f"{big['again']['screen_eligible_s']:.1f} s ({big['again']['households_per_s']:,.0f}/s; page "
                    f"faults {big['again']['page_faults_and_system_s']['minor_faults']:,}, system "
                    f"{big['again']['page_faults_and_system_s']['system_s']:.1f} s)",
                ],
                [
                    "score_register alone",
                    f"{big['score_register_s']:.1f} s ({big['score_register_households_per_s']:,.0f}/s)",
                ],
                ["  of which CKKS (the parties' own timers)", f"{big['he_seconds_inside_score_register']:.1f} s"],
                [
                    "HE floor (mean before/after)",
                    f"{fl['mean_s']:.2f} s ({fl['before']['total_s']:.2f} / {fl['after']['total_s']:.2f}); "
                    f"{fl['ciphertexts_per_agency']} ciphertexts per agency",
                ],
                [
                    "ratio to floor: end to end / score_register",
                    f"{big['ratio_to_floor']:.1f} / {big['score_register_ratio_to_floor']:.1f}",
                ],
                ["bytes per household", ", ".join(f"{k} {v:.1f}" for k, v in big["bytes_per_household"].items())],
                ["loopback TCP, all legs (not in the path above)", f"{big['loopback_total_s']:.2f} s"],
                [
                    "training-register screening, end to end",
                    f"{small_wall:.1f} s for {len(small.scores):,} ({len(small.scores) / small_wall:,.0f}/s)",
                ],
            ],
        )  # fmt: skip
    )
    print()
    rows = truth_rows("training register", train_truth)
    if big_truth is not None:
        rows += truth_rows("large register", big_truth)
    print(
        table(
            [
                "register",
                "model",
                "AUC vs truth",
                "invite n",
                "recall",
                "precision",
                "V/model recall",
                "review n",
                "recall",
                "precision",
                "V/model recall",
            ],
            rows,
        )  # fmt: skip
    )
    print(f"load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    path = write_results(
        "screening",
        {
            "command": command,
            "machine_note": f"{os.cpu_count()} cores shared with other work; {platform.platform()}; "
            "every party in this one process (no network in the screening path; loopback TCP measured apart)",
            "households": args.households,
            "screen_households": args.screen_households,
            "rounds": args.rounds,
            "seed": args.seed,
            "training": {
                k: summary[k]
                for k in (
                    "model_version",
                    "rounds_aggregated",
                    "metrics",
                    "noise_multiplier",
                    "seconds_per_iteration",
                    "alignment",
                )
                if k in summary
            }
            | {"wall_s": summary["wall_s"]},  # fmt: skip
            "horizontal": h_info,
            "training_register_screening": {
                "register": len(small.scores),
                "screen_eligible_s": small_wall,
                "steps_s": small_steps,
                "households_per_s": len(small.scores) / small_wall,
                "counts": small.report["counts"],
                "bytes_sent": small.report["bytes"],
            },  # fmt: skip
            "throughput": big,
            "truth_training_register": train_truth,
            "truth_large_register": big_truth,
            "load_average": [load_before[0], load_after[0]],
            "seconds": time.perf_counter() - begun,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
