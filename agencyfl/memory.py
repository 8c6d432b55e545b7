"""Keep memory a screening frees for reuse, instead of handing it back to the operating system at once.

A screening reads a million-row table per party and makes register-sized temporaries (validation, encoding,
the worklist). By default Arrow's allocator (mimalloc) gives freed pages back to the system within
milliseconds and glibc's ``malloc`` serves each large array by a fresh ``mmap``, so every temporary is new
memory to the kernel. On a virtual machine whose host reclaims the pages its guest frees (a balloon with
free page reporting, as on these machines) each such page costs a host fault when it is touched again:
about 4-5 s of system time per GB measured here, most of a cold million-household screening's system time.

``keep_freed_memory`` makes Arrow allocate through the system allocator and tells glibc to serve arrays
below ``MMAP_THRESHOLD`` from its heap and to keep freed heap up to ``TRIM_THRESHOLD`` at its top, so a
temporary lands on pages the process already touched (``docs/benchmarks.md``, "Population screening").
The settings are the process's from then on (a Python process cannot scope an allocator to one call). The
processes that screen end with their screening (the ``agencyfl`` command; a deployed party's ClientApp,
one process per Flower message), so nothing is kept for long; a process that lives on (a notebook kernel,
a test worker) keeps up to ``TRIM_THRESHOLD`` free at the top of its main heap, and each thread's heap (at
most 64 MB) keeps its freed pages. Handing them back after each screening (``malloc_trim``) cost 0.2-0.3 s
of a million-household screening here, for processes that are about to exit, so it is not done. Set
``AGENCYFL_KEEP_FREED_MEMORY=0`` to leave both allocators as they are.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

MMAP_THRESHOLD = 256 << 20
"""Arrays below this come from the heap (glibc's default moves between 128 KB and 32 MB)."""
TRIM_THRESHOLD = 1 << 30
"""Freed memory at the top of the heap kept before glibc gives it back."""
OPT_OUT = "AGENCYFL_KEEP_FREED_MEMORY"

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_lock = threading.Lock()
_applied: dict[str, bool] = {}


def keep_freed_memory() -> dict[str, bool]:
    """Apply the settings once per process; which of them took (Arrow's system pool; glibc's two thresholds,
    which exist only with glibc). Safe to call from any thread, any number of times."""
    with _lock:
        if not _applied:
            if os.environ.get(OPT_OUT, "1") == "0":
                _applied.update(arrow_system_pool=False, glibc_mmap_threshold=False, glibc_trim_threshold=False)
            else:
                _applied["arrow_system_pool"] = _arrow_system_pool()
                _applied["glibc_mmap_threshold"] = _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                _applied["glibc_trim_threshold"] = _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        return dict(_applied)


def _arrow_system_pool() -> bool:
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        return False
    pa.set_memory_pool(pa.system_memory_pool())  # buffers made before keep the pool that made them
    return True


def _libc() -> Any:
    try:
        return ctypes.CDLL(None)  # the C library the interpreter is linked with: no ldconfig subprocess
    except OSError:  # pragma: no cover - not on these machines
        return None


def _mallopt(parameter: int, value: int) -> bool:
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)  # glibc's; musl and macOS have none
    if mallopt is None:  # pragma: no cover - not on these machines
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(parameter, value))
