"""What the memory benchmarks share (``benchmarks/losses.py``, ``benchmarks/loss_memory.py``): the peak resident
memory of one call, measured in a fresh process, and their tables' heads."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

__all__ = ["rss_bytes", "PeakRSS", "peak_rss", "run_fresh", "last_json", "print_table_head"]

#: glibc settings of a measuring process: large blocks through mmap, so that freed tensors leave the RSS at once.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def rss_bytes() -> int:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(NamedTuple):
    result: Any
    extra: int  # peak RSS during the call above ``base``, bytes
    base: int  # RSS before the call (after a garbage collection), bytes
    seconds: float


def peak_rss(fn: Callable[[], Any], interval: float = 0.0002) -> PeakRSS:
    """Run ``fn()`` while a thread samples the RSS every ``interval`` seconds (0.2 ms); the peak above the start."""
    gc.collect()
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    a = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - a
    done.set()
    th.join()
    peak[0] = max(peak[0], rss_bytes())
    return PeakRSS(out, peak[0] - base, base, dt)


def run_fresh(script: str | Path, args: list[str], root: str | Path, *, check: bool = False) -> subprocess.CompletedProcess:
    """``python script args`` in a fresh process (``root`` on its path, :data:`MALLOC_ENV`), output captured."""
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=check,
        env={**os.environ, "PYTHONPATH": str(root), **MALLOC_ENV},
    )


def last_json(proc: subprocess.CompletedProcess) -> Any:
    """The JSON object a measuring process printed last."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table_head(title: str, header: str) -> None:
    """A table's title (after a blank line), its header and a rule under it."""
    print(f"\n{title}")
    print(header)
    print("-" * len(header))
