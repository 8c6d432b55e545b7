"""`audit verify` and `audit report --format html` on a real federation run, tampered in each listed way."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import CHROMIUM, CHROMIUM_FLAGS, TrainedFederation, assert_page_is_drawn, invoke

from agencyfl.exit_codes import ExitCode
from agencyfl.privacy.audit import audit_ledger
from agencyfl.privacy.coordinator_ledger import RoundSummary
from agencyfl.privacy.keys import generate_signing_key, load_signing_key
from agencyfl.privacy.ledger import HEAD_FILE, LEDGER_FILE, Ledger, LedgerEvent, verify_ledger


def verify(ledgers: list[Path], chain: Path, keyring: Path) -> tuple[int, dict[str, Any]]:
    result = invoke("audit", "verify", *ledgers, "--coordinator", chain, "--keyring", keyring, "--format", "json")
    return result.exit_code, json.loads(result.stdout)


def lines(ledger: Path) -> list[bytes]:
    return (ledger / LEDGER_FILE).read_bytes().splitlines(keepends=True)


def test_clean_federation_verifies_and_chains_agree(trained: TrainedFederation) -> None:
    code, report = verify(trained.ledgers, trained.chain, trained.keyring)
    assert code == 0, report
    assert report["coordinator"]["verified"] and report["coordinator"]["rounds"] == 3
    assert report["cross_check"] == [] and report["notes"] == []
    chain = verify_ledger(trained.chain, event_type=RoundSummary).events
    rounds = [e for e in chain if e.kind == "round"]
    assert [e.round for e in rounds] == [1, 2, 3] and all(e.aggregated for e in rounds)
    assert [e.round for e in chain if e.kind != "round"] == [4]  # the final releases, countersigned too
    assert {a.agency for a in chain[0].agencies} == set(trained.summary["agencies"])
    card = json.loads((trained.model / "card.json").read_text())
    assert card["model_sha256"] == chain[-1].model_sha256  # the registered model is the countersigned one
    table = invoke("audit", "verify", *trained.ledgers, "--coordinator", trained.chain, "--keyring", trained.keyring)
    assert table.exit_code == 0 and "every chain verified and agrees" in table.stdout


def test_byte_flip_exits_5(copy_of_trained: TrainedFederation) -> None:
    ledgers, chain = copy_of_trained.ledgers, copy_of_trained.chain
    data = bytearray((ledgers[0] / LEDGER_FILE).read_bytes())
    data[150] ^= 0x02
    (ledgers[0] / LEDGER_FILE).write_bytes(bytes(data))
    code, report = verify(ledgers, chain, copy_of_trained.keyring)
    assert code == ExitCode.LEDGER_UNVERIFIED
    assert report["agencies"][0]["findings"][0]["kind"] == "altered"


def test_deleted_entry_exits_11(copy_of_trained: TrainedFederation) -> None:
    ledgers, chain = copy_of_trained.ledgers, copy_of_trained.chain
    kept = lines(ledgers[1])
    del kept[1]
    (ledgers[1] / LEDGER_FILE).write_bytes(b"".join(kept))
    code, _ = verify(ledgers, chain, copy_of_trained.keyring)
    assert code == ExitCode.LEDGER_ENTRY_DELETED


def test_reordered_entries_exit_12(copy_of_trained: TrainedFederation) -> None:
    ledgers, chain = copy_of_trained.ledgers, copy_of_trained.chain
    kept = lines(chain)
    kept[0], kept[1] = kept[1], kept[0]
    (chain / LEDGER_FILE).write_bytes(b"".join(kept))
    code, report = verify(ledgers, chain, copy_of_trained.keyring)
    assert code == ExitCode.LEDGER_REORDERED
    assert not report["coordinator"]["verified"]


def test_truncation_exits_13(copy_of_trained: TrainedFederation) -> None:
    ledgers, chain = copy_of_trained.ledgers, copy_of_trained.chain
    (ledgers[2] / LEDGER_FILE).write_bytes(b"".join(lines(ledgers[2])[:-1]))
    code, _ = verify(ledgers, chain, copy_of_trained.keyring)
    assert code == ExitCode.LEDGER_TRUNCATED


def resign(ledger_dir: Path, key_path: Path, events: list[Any], event_type: type[Any]) -> None:
    """Rewrite a whole chain consistently with its owner's key: what only the key holder can do."""
    (ledger_dir / LEDGER_FILE).unlink()
    (ledger_dir / HEAD_FILE).unlink()
    ledger = Ledger(ledger_dir, load_signing_key(key_path), event_type)
    for event in events:
        ledger.append(event)


def test_agency_that_rewrites_its_ledger_without_a_round_exits_14(copy_of_trained: TrainedFederation) -> None:
    # The agency holds its key, so its own chain verifies; only the coordinator's countersignature shows the gap.
    ledgers, chain = copy_of_trained.ledgers, copy_of_trained.chain
    agency = ledgers[3].parent.name
    key = copy_of_trained.work / "agencies" / agency / "keys" / "ledger-signing.key"
    events = verify_ledger(ledgers[3]).events
    last_round = max(i for i, e in enumerate(events) if e.kind == "round")
    resign(ledgers[3], key, [e for i, e in enumerate(events) if i != last_round], LedgerEvent)  # round 3 gone
    assert verify_ledger(ledgers[3]).ok
    code, report = verify(ledgers, chain, copy_of_trained.keyring)
    assert code == ExitCode.ROUND_MISSING, report
    assert report["cross_check"] == [
        {
            "party": agency,
            "kind": "missing",
            "message": f"the coordinator records round 3 of {events[last_round].job} (trained); "
            "the agency's ledger does not",
        }
    ]


def test_coordinator_that_changes_an_epsilon_exits_15(copy_of_trained: TrainedFederation) -> None:
    ledgers, chain = copy_of_trained.ledgers, copy_of_trained.chain
    entries = verify_ledger(chain, event_type=RoundSummary).events
    first = entries[0]
    changed = first.model_copy(
        update={"agencies": [first.agencies[0].model_copy(update={"epsilon_job": 0.5}), *first.agencies[1:]]}
    )
    key = copy_of_trained.work / "coordinator" / "keys" / "ledger-signing.key"
    resign(chain, key, [changed, *entries[1:]], RoundSummary)
    code, report = verify(ledgers, chain, copy_of_trained.keyring)
    assert code == ExitCode.EPSILON_MISMATCH
    assert [c["party"] for c in report["cross_check"]] == [first.agencies[0].agency]


def test_ledger_resigned_by_a_key_the_auditor_does_not_hold_exits_5(
    copy_of_trained: TrainedFederation, tmp_path: Path
) -> None:
    # Replacing ledger.pub with the forger's key fools a check against the folder, not the keyring.
    ledgers, chain = copy_of_trained.ledgers, copy_of_trained.chain
    events = verify_ledger(ledgers[0]).events
    (ledgers[0] / "ledger.pub").unlink()
    generate_signing_key(tmp_path / "forger.key")
    resign(ledgers[0], tmp_path / "forger.key", events, LedgerEvent)
    # with folder keys only the forgery verifies as a chain, but the coordinator's chain recorded the real
    # ledger's origin: the forged one reads as a restarted ledger
    assert invoke("audit", "verify", *ledgers, "--coordinator", chain).exit_code == ExitCode.LEDGER_RESTARTED
    code, report = verify(ledgers, chain, copy_of_trained.keyring)
    assert code == ExitCode.LEDGER_UNVERIFIED
    assert report["agencies"][0]["signatures_ok"] is False


def test_keyring_refuses_to_replace_a_key(copy_of_trained: TrainedFederation, tmp_path: Path) -> None:
    generate_signing_key(tmp_path / "other.key")
    invoke("audit", "keys", "export", tmp_path / "other.key", "--out", tmp_path / "other.pub")
    result = invoke("audit", "keys", "import", "tax", tmp_path / "other.pub", "--keyring", copy_of_trained.keyring)
    assert result.exit_code == ExitCode.LEDGER_UNVERIFIED and "different key" in result.stderr
    listed = json.loads(
        invoke("audit", "keys", "list", "--keyring", copy_of_trained.keyring, "--format", "json").stdout
    )
    assert set(listed) == {*copy_of_trained.summary["agencies"], "coordinator"}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_report_renders_in_a_headless_browser(copy_of_trained: TrainedFederation, tmp_path: Path) -> None:
    ledgers, chain = copy_of_trained.ledgers, copy_of_trained.chain
    page = tmp_path / "report.html"
    result = invoke(
        "audit", "report", *ledgers, "--coordinator", chain, "--keyring", copy_of_trained.keyring,
        "--registry", copy_of_trained.work / "registry", "--format", "html", "--out", page,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert not re.search(r"<script|<link|(src|href)=\"(https?:)?//", html)  # self-contained: nothing to fetch
    assert CHROMIUM is not None
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "All ledgers verified, no cap exceeded." in dom
    for agency in copy_of_trained.summary["agencies"]:
        assert f'data-agency="{agency}"' in dom
    assert dom.count("<svg") == 4 and "lifetime budget" in dom
    for ledger in ledgers:  # each agency's epsilons beside dp_accounting's RDP and PLD recomputation of them
        row = audit_ledger(ledger)
        section = dom[dom.index(f'<section class="agency" data-agency="{row.agency}"') :]
        section = section[: section.index("</section>")]
        assert "Independent recomputation (Google dp_accounting)" in section and "Agrees" in section
        for key in ("epsilon_last_job", "epsilon_lifetime"):
            figures = row.independent[key]
            assert 0 < figures["dp_accounting_pld"] <= figures["ours"]
            line = section[section.index(f'<tr data-figure="{key}">') :]
            line = line[: line.index("</tr>")]
            for name in ("ours", "dp_accounting_rdp", "dp_accounting_pld"):
                assert f"<td>{figures[name]:.4f}</td>" in line, (row.agency, key, name, line)
    assert "NOT IN CHAIN" not in dom and ">yes</td>" in dom  # the model version is countersigned
    assert_page_is_drawn(page, tmp_path / "report.png", profile)

    (ledgers[0] / LEDGER_FILE).write_bytes(b"".join(lines(ledgers[0])[:-1]))
    tampered = invoke(
        "audit", "report", *ledgers, "--coordinator", chain, "--format", "html", "--out", page,
    )  # fmt: skip
    assert tampered.exit_code == ExitCode.LEDGER_UNVERIFIED
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert 'data-kind="truncated"' in dom and "NOT VERIFIED" in dom
