"""Issue 12 item 3 and 4: the command line on odd input, and files that hold records.

Each case feeds the input people type (markup-like names, a file where a folder goes, an unwritable
quarantine target, arbitrary text in every text option) to the real command through typer's
CliRunner, and checks one line on stderr, a documented exit code and no traceback.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import click
import pytest
import typer.main
from conftest import untrained_card
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from agencyfl.cli import app
from agencyfl.exit_codes import HELP, ExitCode
from agencyfl.federation.encoding import FeatureEncoder
from agencyfl.federation.model import build_model, model_to_arrays
from agencyfl.federation.spec import load_spec
from agencyfl.server.registry import register_model
from agencyfl.synth import SynthResult

DOCUMENTED = {int(code) for code in HELP} - {int(ExitCode.INTERNAL_ERROR)}


def run(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


def test_markup_in_an_agency_name_is_printed_as_typed(small_fed: SynthResult) -> None:
    result = run(
        "steward", "check", "--spec", small_fed.spec, "--agency", "[/x]", "--data", small_fed.agency_files["tax"]
    )
    assert result.exit_code == ExitCode.SPEC_INVALID
    assert "agency '[/x]' is not in the spec" in one_error_line(result)


def test_markup_in_a_spec_value_and_its_pattern_survive(small_fed: SynthResult, tmp_path: Path) -> None:
    text = small_fed.spec.read_text()
    name = re.search(r'\[\[agencies\]\]\nname = "([^"]+)"', text)
    assert name is not None
    spec = tmp_path / "bad.toml"
    spec.write_text(text.replace(f'name = "{name.group(1)}"', 'name = "[/bold]"', 1))
    result = run("steward", "check", "--spec", spec, "--agency", "tax", "--data", small_fed.agency_files["tax"])
    assert result.exit_code == ExitCode.SPEC_INVALID
    line = one_error_line(result)
    assert "(got '[/bold]')" in line and "pattern '^[a-z0-9]" in line  # neither eaten as markup


def test_a_workdir_that_is_a_file_is_a_usage_error(small_fed: SynthResult, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.write_text("not a folder")
    result = run("run", "--spec", small_fed.spec, "--workdir", workdir)
    assert result.exit_code == ExitCode.USAGE
    assert "is a file, not a folder" in one_error_line(result)


def dirty_copy(small_fed: SynthResult, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tax.csv"
    lines = small_fed.agency_files["tax"].read_text().splitlines()[:40]
    data.write_text("\n".join([*lines, lines[3].replace(",urban,", ",city,").replace(",rural,", ",city,")]) + "\n")
    data.chmod(0o600)
    return data


def test_quarantine_files_are_private_whatever_the_umask(small_fed: SynthResult, tmp_path: Path) -> None:
    data = dirty_copy(small_fed, tmp_path / "in")
    old = os.umask(0o022)
    try:
        result = run("steward", "check", "--spec", small_fed.spec, "--agency", "tax", "--data", data)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    quarantine = data.with_name("tax.quarantine.csv")
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o600
    assert "city" in quarantine.read_text()  # it does hold the full row
    assert sorted(p.name for p in data.parent.iterdir()) == ["tax.csv", "tax.quarantine.csv"]


def test_an_unwritable_quarantine_target_leaves_no_copy_of_the_records(small_fed: SynthResult, tmp_path: Path) -> None:
    data = dirty_copy(small_fed, tmp_path / "in")
    (data.parent / "tax.quarantine.csv").mkdir()  # the target cannot be replaced
    result = run("steward", "check", "--spec", small_fed.spec, "--agency", "tax", "--data", data)
    assert result.exit_code == ExitCode.DATA_UNUSABLE
    assert "cannot write" in one_error_line(result)
    assert sorted(p.name for p in data.parent.iterdir()) == ["tax.csv", "tax.quarantine.csv"]  # no temp file
    assert not any((data.parent / "tax.quarantine.csv").iterdir())


def test_evaluate_writes_its_decisions_file_0600(fuzz_world: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "decisions.csv"
    old = os.umask(0o022)
    try:
        result = run(
            "evaluate",
            "--model",
            fuzz_world["model"],
            "--spec",
            fuzz_world["spec"],
            "--data",
            fuzz_world["data"],
            "--out",
            out,
        )
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and len(out.read_text().splitlines()) > 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decisions.csv"]


# ---------------------------------------------------------------- arbitrary text in every text option
@pytest.fixture(scope="module")
def fuzz_world(small_fed: SynthResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    loaded = load_spec(small_fed.spec)
    model = build_model(loaded.spec.model, FeatureEncoder(loaded.spec.schema).width, seed=1)
    registered = register_model(root / "registry", loaded, model_to_arrays(model), untrained_card())
    few = root / "few.csv"
    few.write_text("\n".join(small_fed.test.read_text().splitlines()[:30]) + "\n")
    return {"root": str(root), "spec": str(small_fed.spec), "model": str(registered), "data": str(few)}


def commands() -> list[tuple[list[str], click.Command]]:
    found: list[tuple[list[str], click.Command]] = []

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
        else:
            found.append((path, command))

    walk(typer.main.get_command(app), [])
    return found


# Commands that would do long real work (train, synthesize 20,000 households, start daemons) if the
# other options were valid get values that stop them early; `demo` takes no text option but a folder.
SKIP = {("demo",), ("exit-codes",)}
SAFE = {"spec": "missing.toml", "data": "missing.csv", "model": "missing-model", "root_cert": "missing.crt"}
EXTRA = {("data", "synth"): ["--households=200"]}  # the smallest population, not 20,000
DEEP = {("steward", "check"), ("evaluate",), ("score",), ("coordinator", "issue-token")}


def base_values(path: tuple[str, ...], world: dict[str, str]) -> dict[str, str]:
    """A value for every required option: real files for commands that are quick, missing ones otherwise."""
    real = {"spec": world["spec"], "data": world["data"], "model": world["model"]}
    values = {
        "agency": "tax",
        "server": "127.0.0.1:1",
        "superlink": "127.0.0.1:1",
        "requester": "office",
        "token_id": "0123456789ab",
        "party": "tax",
        "ledgers": "missing-ledger",
        "public_key": "missing.pub",
        "key_file": "missing.pub",
        "key": "missing.key",
        "keys": "missing-keys",
        "home": "missing-home",
        "coordinator_key": "missing-coordinator.pub",
        "tokens": "tokens.json",
        "out": "out.csv",
        "out_file": "out.file",
        "out_dir": "out-dir",
        "workdir": "work-dir",
        "roster": "mla-north=missing.csv",
        "household": "51990219840302854X",
        "outcome": "disagreed",
        "evidence": "missing-evidence",
        "receipts": "missing-receipts.jsonl",
        **SAFE,
    }
    if path in DEEP:
        values.update(real)
    return values


TEXT = st.one_of(
    st.sampled_from(["[/x]", "[/bold]", "[bold red]", "[", "]", "\\[x]", "\x00", "", " ", "-", "--help", "~", "é"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),  # argv from a UTF-8 terminal
)
CASES = [
    (tuple(path), command, param)
    for path, command in commands()
    if tuple(path) not in SKIP
    for param in command.params
    if isinstance(param, click.Option) and param.name not in {"help", "fmt"}
    if isinstance(param.type, click.types.StringParamType | click.Path) or param.type.name in {"text", "path"}
]


@pytest.mark.parametrize(("path", "command", "param"), CASES, ids=[f"{' '.join(c[0])}:{c[2].name}" for c in CASES])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_arbitrary_text_in_any_text_option_gives_a_documented_exit(
    fuzz_world: dict[str, str], path: tuple[str, ...], command: click.Command, param: click.Option, text: str
) -> None:
    is_path = param.type.name == "path"
    if is_path and ".." in text:
        return  # paths stay inside the test's folder (these tests run as whoever runs the suite)
    values = base_values(path, fuzz_world)
    args = list(path)
    for other in command.params:
        if not isinstance(other, click.Option) or other.name in {"help", "fmt"}:
            continue
        name = other.opts[0]
        if other is param:
            value = f"{fuzz_world['root']}/{text}" if is_path else text
        elif other.required:
            value = values[str(other.name)]
            if other.type.name == "path" and not value.startswith("/"):
                value = f"{fuzz_world['root']}/{value}"
        else:
            continue
        args.append(f"{name}={value}")
    args += EXTRA.get(path, [])
    cwd = os.getcwd()
    os.chdir(fuzz_world["root"])
    try:
        result = CliRunner().invoke(app, args)
        if path == ("coordinator", "start") and result.exit_code == 0:
            # the text named a folder an earlier case's `coordinator init` made: its daemons really started
            CliRunner().invoke(app, ["coordinator", "stop", *[a for a in args if a.startswith("--dir=")]])
    finally:
        os.chdir(cwd)
    assert "Traceback" not in result.output, (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    assert result.exit_code == 0 or result.exit_code in DOCUMENTED, (args, result.exit_code, result.output)
    if result.exit_code not in (0, ExitCode.USAGE):  # usage errors from click itself are a short panel
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, (args, result.stderr)
