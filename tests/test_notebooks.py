"""Every notebook in notebooks/ runs top to bottom (their cells assert what they show)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert any(p.name == "01-quickstart.ipynb" for p in NOTEBOOKS)


def _stop_processes_under(folder: Path) -> list[int]:
    """Stop every process whose command line names ``folder`` (SIGTERM, then SIGKILL): the daemons a notebook
    started and, having failed before its last cell, did not stop. Left running they would hold ports and
    CPU through the rest of the suite."""
    mark = str(folder).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        if sig == signal.SIGTERM and found:
            time.sleep(2)
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two notebooks need more than 60 s, because what they show costs that for a first-time reader too:
    04 starts a real SuperLink and four SuperNodes and trains a SecAgg+ round (~90 s); 03 trains two
    jobs and runs the empirical attack with and without DP, each as the CLI commands an auditor types
    (~80 s). Each notebook says how to run its full size."""
    notebook = nbformat.read(path, as_version=4)
    # the kernel's temporary folders (each notebook's tempfile.mkdtemp) in a folder of its own: whatever it starts
    # there is stopped afterwards, also when a cell fails before the notebook stops its own daemons
    # (a short path: Ray, under the quickstart's simulation, puts Unix sockets there, 107 bytes at most)
    scratch = Path(tempfile.mkdtemp(prefix="nb-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(scratch))
    try:
        NotebookClient(
            notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        _stop_processes_under(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") == "stream" for o in outputs)
