"""A pytest plugin that prints where each ``xtoken rehearse`` run of a test spends its time.

Usage (from the repository root)::

    PYTHONPATH=benchmarks .venv/bin/python -m pytest -q -n 0 -s -p rehearsal_phases \\
        "tests/test_rehearse.py::test_rehearse_shipped_config_nproc2[llama32_1b__qwen3_4b_pkl]"

After every ``nemo_xtoken.cpu.rehearse.rehearse`` call it prints one line: the report's ``seconds_by_phase``
(the three launches, export + parity), its total wall seconds and the calling process's CPU seconds.  A profiling
aid for the suite's time (docs/contributing.md), not a timing test.
"""

from __future__ import annotations

import json
import time

import nemo_xtoken.cpu.rehearse as _rehearse_module

_original = _rehearse_module.rehearse


def _timed_rehearse(*args, **kwargs):
    t0 = time.process_time()
    report = _original(*args, **kwargs)
    print(f"\nrehearsal phases (s): {json.dumps(report.get('seconds_by_phase'))}; total {report.get('seconds')} s; "
          f"calling process CPU {time.process_time() - t0:.1f} s", flush=True)
    return report


_rehearse_module.rehearse = _timed_rehearse
