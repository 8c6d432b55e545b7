"""Keep memory a process has freed, for reuse, instead of handing it back to the operating system at once.

A screening reads a million-row table per party and makes register-sized temporaries (validation, encoding,
the worklist). By default Arrow's allocator (mimalloc) gives freed pages back to the system within
milliseconds and glibc's ``malloc`` serves each large array by a fresh ``mmap``, so every temporary is new
memory to the kernel. On a virtual machine whose host reclaims the pages its guest frees (a balloon with
free page reporting, as on these machines) each such page costs a host fault when it is touched again:
about 4-5 s of system time per GB measured here, most of a cold million-household screening's system time.

``keep_freed_memory`` makes Arrow allocate through the system allocator and tells glibc to serve arrays
below ``MMAP_THRESHOLD`` from its heap and to keep up to ``TRIM_THRESHOLD`` of freed heap for reuse, so a
temporary lands on pages the process already touched (``docs/benchmarks.md``, "Population screening").
The cost is a peak resident size about 10% higher, released when the process ends; nothing is retained
beyond ``TRIM_THRESHOLD``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

MMAP_THRESHOLD = 256 << 20
"""Arrays below this come from the heap (glibc's default moves between 128 KB and 32 MB)."""
TRIM_THRESHOLD = 1 << 30
"""Freed heap kept for reuse before glibc gives the top of it back."""

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_lock = threading.Lock()
_applied: dict[str, bool] = {}


def keep_freed_memory() -> dict[str, bool]:
    """Apply both settings once per process; which of them took (glibc's ``mallopt`` exists only with glibc,
    Arrow's system pool only when pyarrow is installed). Safe to call from any thread, any number of times."""
    with _lock:
        if not _applied:
            _applied["arrow_system_pool"] = _arrow_system_pool()
            _applied["glibc_malloc"] = _glibc_thresholds()
        return dict(_applied)


def _arrow_system_pool() -> bool:
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        return False
    pa.set_memory_pool(pa.system_memory_pool())
    return True


def _glibc_thresholds() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:  # pragma: no cover - not on these machines
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a C library without mallopt (musl, macOS)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
