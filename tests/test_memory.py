"""``keep_freed_memory``: Arrow allocates through the system allocator and glibc keeps freed heap for reuse."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import VerticalJob, copy_vertical, in_a_fresh_process

from agencyfl.server.tokens import TokenStore

PROBE = """
import json, pyarrow as pa
before = pa.default_memory_pool().backend_name
from agencyfl.memory import keep_freed_memory
first, again = keep_freed_memory(), keep_freed_memory()
print(json.dumps({"before": before, "after": pa.default_memory_pool().backend_name, "first": first, "again": again}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: these machines run Linux")
def test_settings_take_in_a_fresh_process() -> None:
    seen = json.loads(in_a_fresh_process(PROBE).stdout.strip().splitlines()[-1])
    assert seen["before"] != "system"  # pyarrow's wheel starts with mimalloc (or jemalloc): the setting matters
    assert seen["after"] == "system"
    assert seen["first"] == {"arrow_system_pool": True, "glibc_malloc": True}
    assert seen["again"] == seen["first"]  # applied once, reported the same


SCREEN = """
import json, sys, pyarrow as pa
from agencyfl.cli import app
before = pa.default_memory_pool().backend_name
app(["screen", "eligible", "--workdir", sys.argv[1], "--model", sys.argv[2], "--out", sys.argv[3],
     "--token", sys.argv[4], "--format", "json"], standalone_mode=False)
print(json.dumps({"before": before, "after": pa.default_memory_pool().backend_name}))
"""


PURPOSE = "eligibility-identification"


def test_a_screening_keeps_freed_memory(vertical_job: VerticalJob, tmp_path: Path) -> None:
    """A real ``agencyfl screen eligible`` in a fresh process switches Arrow to the system allocator before it
    reads a table (without it a million-household screening spent 3-4 s more in the kernel here)."""
    job = copy_vertical(vertical_job, tmp_path)
    token = TokenStore(job.work / "coordinator" / "tokens.json").issue("civil-affairs-caseworkers", (PURPOSE,))
    args = [str(job.work), str(job.model), str(tmp_path / "lists"), token]
    seen = json.loads(in_a_fresh_process(SCREEN, *args, timeout=300).stdout.strip().splitlines()[-1])
    assert seen == {"before": seen["before"], "after": "system"} and seen["before"] != "system"
    assert (tmp_path / "lists" / "worklist.html").exists()
