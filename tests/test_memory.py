"""``keep_freed_memory``: Arrow allocates through the system allocator and glibc keeps freed heap for reuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import VerticalJob, copy_vertical, in_a_fresh_process

from agencyfl.memory import OPT_OUT
from agencyfl.screening.run import ROW_COLUMNS, worklist_csv_beside
from agencyfl.server.tokens import TokenStore

PROBE = """
import ctypes, json, pyarrow as pa
before = pa.default_memory_pool().backend_name
from agencyfl.memory import keep_freed_memory


def from_heap(size):
    # is a fresh malloc of ``size`` inside the process's [heap] (brk), rather than an mmap of its own?
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    address = libc.malloc(size)
    try:
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("[heap]"):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                if low <= address < high:
                    return True
        return False
    finally:
        libc.free(address)


heap_before = from_heap(64 << 20)
first, again = keep_freed_memory(), keep_freed_memory()
print(json.dumps({"before": before, "after": pa.default_memory_pool().backend_name, "first": first,
                  "again": again, "heap_before": heap_before, "heap_after": from_heap(64 << 20)}))
"""
ALL = {"arrow_system_pool": True, "glibc_mmap_threshold": True, "glibc_trim_threshold": True}


def _probe(**env: str) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", OPT_OUT)} | env
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, env=environ)
    assert done.returncode == 0, done.stderr
    seen: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: these machines run Linux")
def test_settings_take_in_a_fresh_process() -> None:
    seen = _probe()
    assert seen["before"] != "system"  # pyarrow's wheel starts with mimalloc (or jemalloc): the setting matters
    assert seen["after"] == "system"
    assert seen["first"] == ALL and seen["again"] == ALL  # applied once, reported the same
    # a 64 MB array: glibc's own mmap before (a fresh mapping each time), from the reused heap after
    assert seen["heap_before"] is False and seen["heap_after"] is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: these machines run Linux")
def test_a_steward_can_leave_the_allocators_alone() -> None:
    seen = _probe(**{OPT_OUT: "0"})
    assert seen["after"] == seen["before"] != "system"
    assert seen["heap_after"] is False
    assert seen["first"] == dict.fromkeys(ALL, False)


def test_a_worklist_without_its_page_is_not_left_behind(tmp_path: Path) -> None:
    """If drawing the distributions fails, the CSV written meanwhile is removed and the error raised."""

    class Failing:
        def result(self) -> tuple[dict[str, object], str]:
            raise RuntimeError("matplotlib failed")

    rows = pd.DataFrame({c: pd.Series([], dtype=object) for c in ROW_COLUMNS})
    with pytest.raises(RuntimeError, match="matplotlib failed"):
        worklist_csv_beside(tmp_path / "lists", rows, Failing())  # type: ignore[arg-type]
    assert (tmp_path / "lists").is_dir() and not (tmp_path / "lists" / "worklist.csv").exists()


SCREEN = """
import json, sys, pyarrow as pa
from agencyfl.cli import app
before = pa.default_memory_pool().backend_name
app(["screen", "eligible", "--workdir", sys.argv[1], "--model", sys.argv[2], "--out", sys.argv[3],
     "--token", sys.argv[4], "--format", "json"], standalone_mode=False)
training_side = [m for m in ("dp_accounting", "scipy", "torch", "opacus") if m in sys.modules]
print(json.dumps({"before": before, "after": pa.default_memory_pool().backend_name, "training_side": training_side}))
"""


PURPOSE = "eligibility-identification"


def test_a_screening_keeps_freed_memory(vertical_job: VerticalJob, tmp_path: Path) -> None:
    """A real ``agencyfl screen eligible`` in a fresh process switches Arrow to the system allocator before it
    reads a table (without it a million-household screening spent 3-4 s more in the kernel here), and never
    imports the training side."""
    job = copy_vertical(vertical_job, tmp_path)
    token = TokenStore(job.work / "coordinator" / "tokens.json").issue("civil-affairs-caseworkers", (PURPOSE,))
    args = [str(job.work), str(job.model), str(tmp_path / "lists"), token]
    seen = json.loads(in_a_fresh_process(SCREEN, *args, timeout=300).stdout.strip().splitlines()[-1])
    assert seen["after"] == "system" and seen["before"] != "system"
    # nor does it load the training side (the accountant's dp_accounting and SciPy, torch): they were 1.2 s
    # of the command's 1.8 s of imports
    assert seen["training_side"] == []
    assert (tmp_path / "lists" / "worklist.html").exists()
