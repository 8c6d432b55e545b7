"""Accountability: an agency's products replayed from its evidence (docs/vertical.md, "Accountability").

An agency that multiplies civil affairs' ciphertexts by anything but its declared clipped rows (a planted
sentinel) reads one household's residual above the noise, and nobody sees it at the time. What must hold:
every product the arbiter released is recomputed bit for bit from the agency's kept rows and civil affairs'
recorded operands; a sentinel computed while honest rows are kept, unclipped rows kept as they were used, a
substituted operand, withheld evidence and a change of one value in 10^7 are each caught; civil affairs and
the arbiter keep hashes only; `agencyfl audit replay` exits 0 or 25 and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from conftest import VerticalJob, invoke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agencyfl.alignment.sealed import (
    MessageKind,
    PartyKeys,
    PartyPublicKeys,
    certify,
    open_envelope,
    pack,
    seal,
    unpack,
)
from agencyfl.exit_codes import ExitCode
from agencyfl.federation.errors import DataFileError, LedgerError
from agencyfl.privacy.keys import load_or_create_signing_key, public_pem
from agencyfl.privacy.ledger import HEAD_FILE, LEDGER_FILE, Ledger, verify_ledger
from agencyfl.vertical import Block, LabelData, VerticalPlan
from agencyfl.vertical import train as train_module
from agencyfl.vertical.encoding import CLIP
from agencyfl.vertical.evidence import RECEIPTS, Receipt, Receipts, context_digest, receipt_signer
from agencyfl.vertical.protocol import FeatureHolder, HolderSetup, step_run
from agencyfl.vertical.replay import replay
from agencyfl.vertical.train import VerticalResult, train_vertical

PLAN = VerticalPlan(agencies=4, iterations=2, epsilon=3.0, delta=1e-5)  # block Newton: a Hessian, 2 sweeps
SENTINEL = 1000.0


class SentinelHolder(FeatureHolder):
    """HRSS keeps its honest clipped rows as evidence but multiplies by a row scaled 1000-fold (the attack the
    clip is there to bound); tax keeps and multiplies an unclipped row (it records what it did). ``target``: the
    household they single out, one HRSS holds and civil affairs trained on."""

    target = 0

    def __init__(self, block: Block, setup: HolderSetup, rng: np.random.Generator) -> None:
        if block.agency == "tax":
            x = np.array(block.x)
            x[self.target] = SENTINEL / np.sqrt(x.shape[1])  # norm 1000 against the declared 1
            block = block.with_inputs(x)
        super().__init__(block, setup, rng)
        if self.name == "hrss":
            self._inputs = self._inputs.copy()
            self._inputs[self.target] *= SENTINEL
            self._columns = self._chunked(self._inputs)


@pytest.fixture(scope="module")
def attacked(
    vertical_blocks: tuple[list[Block], Block, LabelData], tmp_path_factory: pytest.TempPathFactory
) -> tuple[VerticalResult, dict[str, Path], list[Path]]:
    """One job in which HRSS and tax cheat as ``SentinelHolder`` says and environment is honest; civil affairs
    and the arbiter sign their receipts with keys whose public halves are in ``ROOT/keyring``."""
    features, label, labels = vertical_blocks
    root = tmp_path_factory.mktemp("replay")
    evidence = {b.agency: root / b.agency for b in [*features, label]} | {"arbiter": root / "coordinator"}
    # kept (test only) where a test that plays a lying civil affairs can sign with its key
    keys = {name: load_or_create_signing_key(root / "secret" / f"{name}.key") for name in (label.agency, "arbiter")}
    (root / "keyring").mkdir()
    for name, key in keys.items():
        (root / "keyring" / f"{receipt_signer(name)}.pub").write_bytes(public_pem(key.public_key()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "FeatureHolder", SentinelHolder)
        patch.setattr(SentinelHolder, "target", int(np.flatnonzero(features[0].held & labels.train)[0]))
        result = train_vertical(features, label, labels, PLAN, validate=False, evidence=evidence, receipt_keys=keys)
    folders = {b.agency: next((root / b.agency).iterdir()) for b in features}
    receipts = [root / label.agency / RECEIPTS, root / "coordinator" / RECEIPTS]
    return result, folders, receipts


def test_an_honest_agency_s_every_product_replays_bit_for_bit(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]],
) -> None:
    _, folders, receipts = attacked
    report = replay(folders["environment"], receipts, keyring=receipts[0].parent.parent / "keyring")
    assert report.ok and report.receipts_signed, report.findings
    # the Hessian and one gradient per sweep: every product the arbiter released from it
    assert [(p.kind, p.seq) for p in report.products] == [("gradient", 0), ("gradient", 1), ("hessian", 0)]
    assert all(p.matched for p in report.products)
    assert report.max_row_norm <= CLIP * (1 + 1e-9) and report.rows_over_clip == 0


def test_a_sentinel_multiplied_while_honest_rows_are_kept_is_caught(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]],
    vertical_blocks: tuple[list[Block], Block, LabelData],
) -> None:
    result, folders, receipts = attacked
    report = replay(folders["hrss"], receipts)
    assert not report.ok
    assert report.rows_over_clip == 0  # the kept rows are clean: the products give it away
    assert {(p.kind, p.seq) for p in report.products if not p.matched} == {("gradient", 0), ("gradient", 1),
                                                                             ("hessian", 0)}  # fmt: skip
    assert all("multiplied other rows" in p.finding for p in report.products)
    # and the attack was real: every weight is 0 in the first sweep, so the honest gradient is public given the
    # labels; what HRSS's first release adds to it along its target's row reads the target's label far above
    # the noise (the DP bound the clip was there to keep)
    (hrss, *_), _, labels = vertical_blocks
    target = int(np.flatnonzero(hrss.held & labels.train)[0])
    honest = hrss.x.T @ (labels.train * (0.5 - labels.y) / len(labels.y))
    row = hrss.x[target] / np.linalg.norm(hrss.x[target])
    read = float((result.parties["hrss"].releases[0] - honest) @ row)  # type: ignore[union-attr]
    assert abs(read) > 10 * max(result.parties["arbiter"].stds["hrss"])  # type: ignore[union-attr]
    assert np.sign(read) == np.sign(0.5 - labels.y[target])


def test_rows_past_the_declared_clip_are_caught_even_when_kept_as_used(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]],
) -> None:
    _, folders, receipts = attacked
    report = replay(folders["tax"], receipts)
    assert all(p.matched for p in report.products)  # it kept what it multiplied ...
    assert report.rows_over_clip == 1 and report.max_row_norm == pytest.approx(SENTINEL)  # ... past the clip
    assert not report.ok and "exceed the declared norm" in report.findings[0]


def _copy(folder: Path, into: Path) -> Path:
    shutil.copytree(folder, into)
    return into


def test_a_substituted_operand_withheld_evidence_and_a_tiny_change_are_each_caught(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]], tmp_path: Path
) -> None:
    _, folders, receipts = attacked
    # an agency that swaps in another sweep's residual (civil affairs' envelopes of sweep 1 for sweep 2)
    swapped = _copy(folders["environment"], tmp_path / "swapped")
    first, second = (dict(np.load(swapped / f"gradient-{s:04d}.npz")) for s in (0, 1))
    sealed = {k: v for k, v in first.items() if k.startswith("envelope") or k == "step"}
    np.savez(swapped / "gradient-0001.npz", **(second | sealed))
    findings = {(p.kind, p.seq): p.finding for p in replay(swapped, receipts).products if not p.matched}
    assert list(findings) == [("gradient", 1)]
    assert "recorded for another product (reused by the agency, or civil affairs' records swapped" in findings[
        "gradient", 1]  # fmt: skip
    findings = {
        (p.kind, p.seq): p.finding
        for p in replay(swapped, receipts, keyring=receipts[0].parent.parent / "keyring").products
        if not p.matched
    }
    assert "sealed it for another step (its products' signed steps are not in order): the agency reused it" in findings[
        "gradient", 1]  # fmt: skip
    # ... or ciphertexts of its own making, in envelopes it signs itself with keys it passes off as civil
    # affairs' run keys: only the keyring (civil affairs' ledger key, which certified its real run keys) tells
    made = _copy(folders["environment"], tmp_path / "made")
    run = json.loads((made / "run.json").read_text())
    posing = PartyKeys.generate(run["sender"])
    me = PartyKeys(run["recipient"], X25519PrivateKey.from_private_bytes((made / "run-key.bin").read_bytes()),
                   Ed25519PrivateKey.generate())  # fmt: skip
    real = PartyPublicKeys(
        name=run["sender"], sealing=bytes.fromhex(run["sealing"]), signing=bytes.fromhex(run["signing"])
    )
    context = ts.context_from((made / "context.bin").read_bytes())
    for name, kind in (
        ("gradient-0000", "residuals"),
        ("gradient-0001", "residuals"),
        ("hessian-0000", "hessian-weights"),
    ):
        kept = dict(np.load(made / f"{name}.npz"))
        where = step_run(run["run"], context_digest((made / "context.bin").read_bytes())[:16], str(kept["step"]))
        envelopes = [
            unpack(kept[f"envelope_{i}"].tobytes()) for i in range(sum(k.startswith("envelope") for k in kept))
        ]
        for i, e in enumerate(envelopes):  # every envelope re-signed; only sweep 2's residual changed
            opened = open_envelope(e, recipient=me, sender=real, run=where, kind=kind)
            if name == "gradient-0001":  # a valid operand, not civil affairs'
                opened = bytes((ts.ckks_vector_from(context, opened) + 1e-3).serialize())
            sealed = seal(opened, run=where, sender=posing, recipient=me.public(), kind=kind, chunk=i,
                          chunks=len(envelopes), rows=e.rows)  # fmt: skip
            kept[f"envelope_{i}"] = np.frombuffer(pack(sealed), dtype=np.uint8)
        np.savez(made / f"{name}.npz", **kept)
    (made / "run.json").write_text(json.dumps(run | {"sealing": posing.public().sealing.hex(),
                                                     "signing": posing.public().signing.hex()}))  # fmt: skip
    keyring = receipts[0].parent.parent / "keyring"
    for ring, says in ((None, "not attributed"), (keyring, "no envelope signed by civil affairs holds them")):
        findings = {(p.kind, p.seq): p.finding for p in replay(made, receipts, keyring=ring).products if not p.matched}
        assert list(findings) == [("gradient", 1)] and says in findings["gradient", 1], findings
    # ... or keeps one product as bare operands with a step of its choosing, so that the reused residual's steps
    # would seem to rise: a step no envelope signs orders nothing, and the disagreement stays unattributed
    bare = _copy(folders["environment"], tmp_path / "bare-step")
    first = dict(np.load(bare / "gradient-0000.npz"))
    opened = _kept_operands(bare, "gradient-0000", "residuals")
    plain = {k: v for k, v in first.items() if not k.startswith("envelope")} | {"step": np.array("0")}
    np.savez(
        bare / "gradient-0000.npz",
        **plain,
        **{f"operand_{i}": np.frombuffer(v, np.uint8) for i, v in enumerate(opened)},
    )
    reused = {k: v for k, v in first.items() if k.startswith("envelope") or k == "step"}
    np.savez(bare / "gradient-0001.npz", **(second | reused))
    findings = {(p.kind, p.seq): p.finding for p in replay(bare, receipts, keyring=keyring).products if not p.matched}
    assert list(findings) == [("gradient", 1)] and "not attributed" in findings["gradient", 1], findings
    # an empty or corrupt product file is a finding, never a crash
    (bare / "hessian-0000.npz").write_bytes(b"")
    assert any(f.startswith("hessian 0: its evidence is unreadable") for f in replay(bare, receipts).findings)
    # evidence withheld for a product the arbiter released
    withheld = _copy(folders["environment"], tmp_path / "withheld")
    (withheld / "hessian-0000.npz").unlink()
    findings = {(p.kind, p.seq): p.finding for p in replay(withheld, receipts).products if not p.matched}
    assert list(findings) == [("hessian", 0)] and "kept no evidence" in findings["hessian", 0]
    # one value changed by one part in 10^7 changes every product's bytes
    nudged = _copy(folders["environment"], tmp_path / "nudged")
    x = np.load(nudged / "inputs.npy")
    row, col = np.argwhere(x != 0)[0]
    x[row, col] *= 1 - 1e-7
    np.save(nudged / "inputs.npy", x)
    report = replay(nudged, receipts)
    assert report.rows_over_clip == 0 and not any(p.matched for p in report.products)


def test_the_wrong_receipts_or_another_tenseal_are_clear_errors(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]], tmp_path: Path
) -> None:
    _, folders, receipts = attacked
    with pytest.raises(DataFileError, match="no arbiter receipt names environment"):
        replay(folders["environment"], receipts[:1])  # civil affairs' receipts only
    other = _copy(folders["environment"], tmp_path / "other")
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(meta | {"tenseal": "0.0.1"}))
    with pytest.raises(DataFileError, match="another|this install has"):
        replay(other, receipts)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFileError, match="not an agency's evidence folder"):
        replay(tmp_path / "empty", receipts)
    with pytest.raises(DataFileError, match="another|this install has"):
        replay(tmp_path, receipts)  # a job's folder holding that key folder


def test_civil_affairs_and_the_arbiter_keep_hashes_only(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]],
) -> None:
    _, _, receipts = attacked
    lines = [json.loads(line) for folder in receipts for line in (folder / LEDGER_FILE).read_text().splitlines()]
    entry = {"seq", "prev", "hash", "sig"}  # the ledger's chain and signature around each receipt
    assert {frozenset(r) for r in lines} == {frozenset(entry | {"kind", "party", "key_id", "format"}),  # genesis
                                             frozenset(entry | set(Receipt.model_fields))}  # fmt: skip
    read = [verify_ledger(folder, None, Receipt) for folder in receipts]
    assert all(check.ok for check in read) and [check.party for check in read] == ["civil-affairs", "coordinator"]
    civil, arbiter = (check.events for check in read)
    assert all(len(r.sha256) == 64 and int(r.sha256, 16) >= 0 for r in [*civil, *arbiter])
    assert {(r.agency, r.kind) for r in civil} == {(a, k) for a in ("hrss", "tax", "environment")
                                                   for k in ("residual", "hessian-weights")}  # fmt: skip
    assert {r.label_holder for r in arbiter} == {"civil-affairs"} and {r.by for r in arbiter} == {"arbiter"}
    # every party's products (civil affairs' own too), two sweeps and the Hessian each
    assert sorted((r.agency, r.kind) for r in arbiter).count(("tax", "gradient")) == PLAN.iterations
    assert len({r.context for r in [*civil, *arbiter]}) == 1


def test_agencyfl_run_keeps_evidence_that_audit_replay_accepts(vertical_job: VerticalJob, tmp_path: Path) -> None:
    paths = vertical_job.summary["evidence"]
    assert sorted(paths["agencies"]) == ["environment", "hrss", "tax"]
    for agency, folder in paths["agencies"].items():
        assert Path(folder).is_relative_to(vertical_job.work / agency)  # the rows stay in the agency's folder
    receipts = [a for path in paths["receipts"] for a in ("--receipts", path)]
    # the auditor's keyring: civil affairs' and the coordinator's ledger keys, handed over as files
    keyring = tmp_path / "keyring"
    for party, key in (("civil-affairs", "civil-affairs"), ("coordinator", "coordinator")):
        exported = invoke("audit", "keys", "export", vertical_job.work / key / "keys" / "ledger-signing.key",
                          "--out", tmp_path / f"{party}.pub")  # fmt: skip
        assert exported.exit_code == 0, exported.output
        assert invoke("audit", "keys", "import", party, tmp_path / f"{party}.pub", "--keyring", keyring).exit_code == 0
    done = invoke("audit", "replay", "--evidence", paths["agencies"]["tax"], *receipts, "--keyring", keyring,
                  "--format", "json")  # fmt: skip
    assert done.exit_code == ExitCode.OK, done.output
    report = json.loads(done.stdout)
    assert report["ok"] and report["agency"] == "tax" and len(report["products"]) == 1 + 3  # Hessian, 3 sweeps
    assert report["receipts_signed"]
    table = invoke("audit", "replay", "--evidence", paths["agencies"]["hrss"], *receipts)
    assert table.exit_code == ExitCode.OK and "every product matches its replay" in table.output


def test_audit_replay_exits_25_with_the_finding_and_4_for_a_folder_that_is_not_evidence(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]], tmp_path: Path
) -> None:
    _, folders, receipts = attacked
    args = [a for path in receipts for a in ("--receipts", path)]
    caught = invoke("audit", "replay", "--evidence", folders["hrss"], *args)
    assert caught.exit_code == ExitCode.COMPUTATION_DEVIATED
    assert "multiplied other rows" in caught.output and "Traceback" not in caught.output
    as_json = invoke("audit", "replay", "--evidence", folders["tax"], *args, "--format", "json")
    assert as_json.exit_code == ExitCode.COMPUTATION_DEVIATED and json.loads(as_json.stdout)["rows_over_clip"] == 1
    bad = invoke("audit", "replay", "--evidence", tmp_path, *args)
    assert bad.exit_code == ExitCode.DATA_UNUSABLE and "not an agency's evidence folder" in bad.output


def test_evidence_that_declares_its_own_bound_or_hides_a_row_in_integers_is_caught(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]], tmp_path: Path
) -> None:
    _, folders, receipts = attacked
    # tax kept its sentinel row as used; declaring a looser clip does not excuse it
    loose = _copy(folders["tax"], tmp_path / "loose")
    meta = json.loads((loose / "meta.json").read_text())
    (loose / "meta.json").write_text(json.dumps(meta | {"clip": 1e9}))
    report = replay(loose, receipts)
    assert report.rows_over_clip == 1 and any("declares the clip" in f for f in report.findings)
    # integers whose squares wrap around would read as a zero row; anything but finite float64 rows is a finding
    wrapped = _copy(folders["environment"], tmp_path / "wrapped")
    np.save(wrapped / "inputs.npy", np.zeros((4, 3), dtype=np.int32) + 2**16)
    assert any("not float64 rows" in f for f in replay(wrapped, receipts).findings)
    nan = _copy(folders["environment"], tmp_path / "nan")
    x = np.load(nan / "inputs.npy")
    x[3, 0] = np.nan
    np.save(nan / "inputs.npy", x)
    report = replay(nan, receipts)
    assert "1 row(s) of the kept inputs are not finite" in report.findings and np.isfinite(report.max_row_norm)
    json.dumps(report.to_json(), allow_nan=False)  # valid JSON for `--format json`
    # a scalar, or an archive under the array's name, or a product's evidence that is a bare array: findings or
    # a clear error, never a crash
    scalar = _copy(folders["environment"], tmp_path / "scalar")
    np.save(scalar / "inputs.npy", np.float64(1.0))
    assert any("not float64 rows" in f for f in replay(scalar, receipts).findings)
    archive = _copy(folders["environment"], tmp_path / "archive")
    with (archive / "inputs.npy").open("wb") as f:
        np.savez(f, x=np.load(folders["environment"] / "inputs.npy"))
    with pytest.raises(DataFileError, match="not one array"):
        replay(archive, receipts)
    bare = _copy(folders["environment"], tmp_path / "bare")
    with (bare / "hessian-0000.npz").open("wb") as f:
        np.save(f, np.zeros(3))
    findings = replay(bare, receipts).findings
    assert any(f.startswith("hessian 0: its evidence is unreadable") for f in findings), findings


def test_receipts_that_disagree_are_refused_and_a_torn_last_line_is_skipped_then_cut(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]], tmp_path: Path
) -> None:
    _, folders, (civil, arbiter) = attacked
    torn = _copy(arbiter, tmp_path / "torn")
    with (torn / LEDGER_FILE).open("ab") as f:
        f.write(b'{"agency":"environment","by":"arbiter","con')  # a job stopped mid-line, before its head moved
    report = replay(folders["environment"], [civil, torn])
    assert report.ok and [r.torn_line for r in report.receipts] == [False, True]
    # a resumed job cuts the torn line off and continues the one chain
    context = (folders["environment"] / "context.bin").read_bytes()
    key = Ed25519PrivateKey.generate()  # (a copy of the arbiter's: signed afresh, to append as its owner)
    resigned = _resign(torn, key)
    whole = (resigned / LEDGER_FILE).read_bytes()
    (resigned / LEDGER_FILE).write_bytes(whole + b'{"agency":"tax","by":"arb')
    Receipts(resigned, "arbiter", context, key, label_holder="civil-affairs").record("tax", "gradient", [b"x"])
    check = verify_ledger(resigned, key.public_key(), Receipt)
    assert check.ok and check.events[-1].agency == "tax" and (resigned / LEDGER_FILE).read_bytes().startswith(whole)
    # a second ledger that gives one of the arbiter's products another digest
    other = tmp_path / "other" / RECEIPTS
    Receipts(other, "arbiter", context, key, label_holder="civil-affairs").record("environment", "gradient", [b"x"])
    with pytest.raises(DataFileError, match="a second, different digest"):
        replay(folders["environment"], [civil, arbiter, other])


def _resign(
    folder: Path, key: Ed25519PrivateKey, out: Path | None = None, edit: Callable[[Receipt], Receipt] = lambda r: r
) -> Path:
    """``folder``'s receipts, whole lines only, each passed through ``edit``, re-chained and signed with ``key``
    into ``out`` (default: beside it, ``-resigned``), as a forger, or a party lying in its own records, would."""
    lines = (folder / LEDGER_FILE).read_bytes().split(b"\n")[:-1]
    entries = [json.loads(line) for line in lines]
    out = out or folder.parent / f"{folder.name}-resigned"
    ledger = Ledger(out, key, Receipt, party=entries[0]["party"])
    for e in entries[1:]:
        ledger.append(
            edit(Receipt.model_validate({k: v for k, v in e.items() if k not in {"seq", "prev", "hash", "sig"}}))
        )
    return out


def test_a_civil_affairs_that_records_otherwise_than_it_sealed_cannot_frame_an_agency(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]], tmp_path: Path
) -> None:
    """Civil affairs signs a receipt for environment's second residual that is not what it sealed. The agency
    kept the envelopes (signed by civil affairs' run key, which civil affairs' ledger key certified) and its
    run key that opens them: with the keyring the replay names civil affairs' record as the false one."""
    _, folders, (civil, arbiter) = attacked
    keyring = civil.parent.parent / "keyring"
    key = load_or_create_signing_key(civil.parent.parent / "secret" / "civil-affairs.key")

    def lie(r: Receipt) -> Receipt:
        mine = (r.agency, r.kind, r.number) == ("environment", "residual", 1)
        return r.model_copy(update={"sha256": "1" * 64}) if mine else r

    framing = _resign(civil, key, tmp_path / "framing" / RECEIPTS, lie)
    report = replay(folders["environment"], [framing, arbiter], keyring=keyring)
    assert report.receipts_signed and [(p.kind, p.seq) for p in report.products if not p.matched] == [("gradient", 1)]
    finding = next(p.finding for p in report.products if not p.matched)
    assert "civil affairs' record is false" in finding and "recomputes to what the arbiter released" in finding
    # an agency whose product does not recompute from what it kept gets no attribution to civil affairs out of it,
    # even where civil affairs' record also differs: HRSS multiplied a sentinel row
    lying = _resign(civil, key, tmp_path / "lying" / RECEIPTS,
                    lambda r: r.model_copy(update={"sha256": "2" * 64}) if r.agency == "hrss" else r)  # fmt: skip
    caught = replay(folders["hrss"], [lying, arbiter], keyring=keyring).findings
    assert caught and all("multiplied other rows" in f and "record is false" not in f for f in caught), caught
    # without the keyring nothing vouches for civil affairs' run keys: the disagreement stays unattributed
    assert "not attributed" in replay(folders["environment"], [framing, arbiter]).findings[0]
    # nor can it pass off an honest agency as one that reused a residual, by swapping its records of two
    digests = {r.number: r.sha256 for r in verify_ledger(civil, None, Receipt).events
               if (r.agency, r.kind) == ("environment", "residual")}  # fmt: skip

    def swap(r: Receipt) -> Receipt:
        mine = (r.agency, r.kind) == ("environment", "residual")
        return r.model_copy(update={"sha256": digests[1 - r.number]}) if mine else r

    swapping = _resign(civil, key, tmp_path / "swapping" / RECEIPTS, swap)
    report = replay(folders["environment"], [swapping, arbiter], keyring=keyring)
    assert [p.seq for p in report.products if not p.matched] == [0, 1]
    assert all("civil affairs' record is false" in f for f in report.findings), report.findings
    # nor does a run record the agency made up: a certificate civil affairs' ledger key did not sign; its own run
    # keys certified with its own ledger key (which the auditor holds) under its own name; another run's
    own = load_or_create_signing_key(tmp_path / "environment.key")
    ring = _copy(keyring, tmp_path / "ring")
    (ring / "environment.pub").write_bytes(public_pem(own.public_key()))
    run = json.loads((folders["environment"] / "run.json").read_text())
    mine = PartyKeys.generate("environment").public()
    for n, edit in enumerate([
        {"certificate": "00" * 128},
        {"sender": "environment", "sealing": mine.sealing.hex(), "signing": mine.signing.hex(),
         "certificate": certify(run["run"], mine, own).hex()},
        {"run": "vertical-another"},
    ]):  # fmt: skip
        forged = _copy(folders["environment"], tmp_path / f"forged-{n}")
        (forged / "run.json").write_text(json.dumps(run | edit))
        findings = replay(forged, [framing, arbiter], keyring=ring).findings
        assert findings and not any("civil affairs' record is false" in f for f in findings), (edit, findings)


def _kept_operands(folder: Path, product: str, kind: MessageKind) -> list[bytes]:
    """What an agency's kept envelopes of ``product`` open to, with its kept run key."""
    run = json.loads((folder / "run.json").read_text())
    me = PartyKeys(run["recipient"], X25519PrivateKey.from_private_bytes((folder / "run-key.bin").read_bytes()),
                   Ed25519PrivateKey.generate())  # fmt: skip
    sender = PartyPublicKeys(name=run["sender"], sealing=bytes.fromhex(run["sealing"]),
                             signing=bytes.fromhex(run["signing"]))  # fmt: skip
    with np.load(folder / f"{product}.npz") as kept:
        where = step_run(run["run"], context_digest((folder / "context.bin").read_bytes())[:16], str(kept["step"]))
        envelopes = [kept[f"envelope_{i}"].tobytes() for i in range(sum(k.startswith("envelope") for k in kept.files))]
    return [open_envelope(unpack(e), recipient=me, sender=sender, run=where, kind=kind) for e in envelopes]


def test_the_agency_s_rows_and_masks_are_readable_by_it_alone(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]],
) -> None:
    _, folders, receipts = attacked
    folder = folders["environment"]
    assert folder.stat().st_mode & 0o777 == 0o700 and folder.parent.stat().st_mode & 0o777 == 0o700
    assert {f.stat().st_mode & 0o777 for f in folder.iterdir()} == {0o600}
    assert {p.stat().st_mode & 0o777 for p in receipts} == {0o700}  # the receipts' folders
    other = invoke("audit", "replay", "--evidence", folder, "--agency", "tax",
                   *[a for p in receipts for a in ("--receipts", p)])  # fmt: skip
    assert other.exit_code == ExitCode.DATA_UNUSABLE and "the evidence of 'environment', not of 'tax'" in other.output


def test_a_receipt_forged_taken_out_cut_off_or_signed_by_another_key_is_refused(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]], tmp_path: Path
) -> None:
    """Receipts may come through the agency itself: with the keyring, the only receipts the replay accepts are
    civil affairs' and the coordinator's, whole to their signed heads and in order."""
    _, folders, (civil, arbiter) = attacked
    keyring = civil.parent.parent / "keyring"
    lines = (arbiter / LEDGER_FILE).read_text().splitlines()
    mine = [i for i, line in enumerate(lines) if json.loads(line).get("agency") == "hrss"]

    def edited(name: str, kept: list[str]) -> Path:
        folder = _copy(arbiter, tmp_path / name)
        (folder / LEDGER_FILE).write_text("\n".join(kept) + "\n")
        return folder

    # HRSS rewrites the arbiter's digests of its products to those of its honest replay: the hashes fail
    forged = edited("forged", [json.dumps(json.loads(line) | {"sha256": "1" * 64}) if i in mine else line
                               for i, line in enumerate(lines)])  # fmt: skip
    with pytest.raises(LedgerError, match="do not verify: line .*altered"):
        replay(folders["hrss"], [civil, forged], keyring=keyring)
    # ... or takes its receipts out: the chain names each line's predecessor
    dropped = edited("dropped", [line for i, line in enumerate(lines) if i not in mine])
    with pytest.raises(LedgerError, match="do not verify"):
        replay(folders["hrss"], [civil, dropped])
    # ... or cuts the file after its last honest product: the signed head says where it ends
    cut = edited("cut", lines[: mine[-1]])
    with pytest.raises(LedgerError, match="head.json says the last entry is seq"):
        replay(folders["hrss"], [civil, cut])
    (cut / HEAD_FILE).unlink()
    with pytest.raises(LedgerError, match="nothing signed says where the ledger ends"):
        replay(folders["hrss"], [civil, cut])
    # ... or re-signs the cut file, head and all, with a key of its own: the keyring knows whose key is whose
    own = Ed25519PrivateKey.generate()
    resigned = _resign(cut, own)
    assert replay(folders["hrss"], [civil, resigned]).receipts[1].key_id != replay(
        folders["hrss"], [civil, arbiter]).receipts[1].key_id  # without a keyring: only the key id tells  # fmt: skip
    with pytest.raises(LedgerError, match="the keyring holds .* for 'coordinator'"):
        replay(folders["hrss"], [civil, resigned], keyring=keyring)
    stranger = tmp_path / "keyring"
    stranger.mkdir()
    (stranger / "coordinator.pub").write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    (stranger / "civil-affairs.pub").write_bytes((keyring / "civil-affairs.pub").read_bytes())
    with pytest.raises(LedgerError, match="the keyring holds .* for 'coordinator'"):
        replay(folders["hrss"], [civil, arbiter], keyring=stranger)
    done = invoke("audit", "replay", "--evidence", folders["hrss"], "--receipts", civil, "--receipts", cut)
    assert done.exit_code == ExitCode.LEDGER_UNVERIFIED and "Traceback" not in done.output


def test_json_output_is_only_json_even_where_rich_draws_a_spinner(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]],
) -> None:
    """In a notebook Rich believes it has a terminal (as with FORCE_COLOR): the spinner must not reach stdout."""
    _, folders, receipts = attacked
    args = ["audit", "replay", "--evidence", folders["environment"], *[a for p in receipts for a in ("--receipts", p)]]
    env = os.environ | {"FORCE_COLOR": "1"}
    done = subprocess.run([sys.executable, "-m", "agencyfl", *map(str, args), "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"]


def test_an_agency_cannot_vouch_for_its_own_operands(
    attacked: tuple[VerticalResult, dict[str, Path], list[Path]], tmp_path: Path
) -> None:
    """The operands' receipts count only from the label holder the arbiter's (signed) receipts name: an agency
    that hands over receipts of its own making, signed with its own ledger key, is caught."""
    _, folders, (civil, arbiter) = attacked
    keyring = _copy(civil.parent.parent / "keyring", tmp_path / "keyring")
    own = Ed25519PrivateKey.generate()
    (keyring / "hrss.pub").write_bytes(public_pem(own.public_key()))  # the auditor holds every party's key
    made = tmp_path / "made" / RECEIPTS
    ledger = Receipts(made, "hrss", (folders["hrss"] / "context.bin").read_bytes(), own)
    for seq in range(PLAN.iterations):  # "civil affairs sent me these" (its own kept operands)
        ledger.record("hrss", "residual", _kept_operands(folders["hrss"], f"gradient-{seq:04d}", "residuals"))
    report = replay(folders["hrss"], [made, arbiter], keyring=keyring)
    assert report.receipts_signed and not any(p.matched for p in report.products)
    assert all("no receipt of civil affairs names" in p.finding for p in report.products)
    # civil affairs' name on a ledger the agency signed with its own key is refused outright
    posing = tmp_path / "posing" / RECEIPTS
    Receipts(posing, "civil-affairs", (folders["hrss"] / "context.bin").read_bytes(), own).record(
        "hrss", "residual", [b"x"])  # fmt: skip
    with pytest.raises(LedgerError, match="the keyring holds .* for 'civil-affairs'"):
        replay(folders["hrss"], [posing, arbiter], keyring=keyring)
    # ... as is a receipt of another party's inside civil affairs' ledger
    mixed = tmp_path / "mixed" / RECEIPTS
    Receipts(mixed, "civil-affairs", (folders["hrss"] / "context.bin").read_bytes(), own).ledger.append(
        Receipt(kind="residual", by="hrss", context="0" * 64, agency="hrss", number=0, sha256="0" * 64))  # fmt: skip
    with pytest.raises(LedgerError, match="receipts recorded by hrss in the ledger of civil-affairs"):
        replay(folders["hrss"], [mixed, arbiter])
