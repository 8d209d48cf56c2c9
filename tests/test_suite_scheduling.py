"""`make test`'s scheduling (tests/conftest.py): a file's tests run on one worker, the longest groups first.

Two defects every test passed through: the ordering hook read ``numprocesses``, which xdist resets on its workers
(where the tests are collected), so nothing was ordered; and ``xdist_group`` marks never grouped anything (with
pytest 9.2 and xdist 3.8 the ``@group`` suffix stays in ``item._nodeid``): every test was its own scope, module
fixtures were built on both workers and the rehearsals ran last.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import conftest

ROOT = Path(__file__).resolve().parents[1]


def _make_test_flags() -> list[str]:
    """The pytest flags of the Makefile's ``test`` recipe (workers fixed at 2)."""
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if "-m pytest" in x and "TEST_WORKERS" in x)
    flags = shlex.split(line.split("-m pytest", 1)[1].replace("$(PYTEST_ARGS)", ""))
    return ["2" if f == "$(TEST_WORKERS)" else f for f in flags]


def test_the_scheduler_keeps_a_file_on_one_worker_and_splits_split_files():
    sched = conftest.pytest_xdist_make_scheduler(SimpleNamespace(option=SimpleNamespace(loadscopereorder=False),
                                                                 getvalue=lambda name: ["popen"] * 2 if name == "tx" else None), None)
    split = sorted(conftest.SPLIT)[0]
    assert sched._split_scope("tests/test_vocab.py::test_a[x]") == sched._split_scope("tests/test_vocab.py::test_b") == "test_vocab.py"
    assert sched._split_scope(f"tests/{split}::test_a") != sched._split_scope(f"tests/{split}::test_b")


def test_workers_order_the_groups_longest_first():
    from suite_durations import FILE_SECONDS

    short, long_ = sorted(FILE_SECONDS, key=FILE_SECONDS.get)[0], max(FILE_SECONDS, key=FILE_SECONDS.get)
    items = [SimpleNamespace(nodeid=f"tests/{short}::t1"), SimpleNamespace(nodeid=f"tests/{long_}::t1"),
             SimpleNamespace(nodeid=f"tests/{short}::t2"), SimpleNamespace(nodeid=f"tests/{long_}::t2")]
    worker = SimpleNamespace(option=SimpleNamespace(numprocesses=None), workerinput={"workerid": "gw0"})  # as xdist sets it
    conftest.pytest_collection_modifyitems(None, worker, items)
    assert [i.nodeid for i in items] == [f"tests/{long_}::t1", f"tests/{long_}::t2", f"tests/{short}::t1", f"tests/{short}::t2"]
    plain = list(items[::-1])
    conftest.pytest_collection_modifyitems(None, SimpleNamespace(option=SimpleNamespace(numprocesses=None)), plain)
    assert plain == items[::-1]  # a plain run keeps the order


def test_make_tests_flags_run_a_file_on_one_worker():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", *_make_test_flags(), "-vv", "-p", "no:cacheprovider",
         "tests/test_layers.py", "tests/test_suite_scheduling.py", "-k", "not make_tests_flags"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    passed = [line for line in out.stdout.splitlines() if " PASSED" in line]
    workers = {re.match(r"\[(gw\d+)\]", line).group(1) for line in passed if "test_layers.py::" in line}
    assert len(workers) == 1 and sum("test_layers.py::" in line for line in passed) >= 8, "\n".join(passed)


def test_split_files_are_known():
    tests = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert conftest.SPLIT <= tests, conftest.SPLIT - tests


def test_snippet_tests_that_share_the_repository_root_share_a_worker():
    """tests/test_docs.py's snippets run in the repository root and each test removes what appeared there meanwhile: on
    two workers one deleted the other's W.safetensors between two blocks (fresh clone of 7cd44eb, 2026-12-07)."""
    sched = conftest.pytest_xdist_make_scheduler(SimpleNamespace(option=SimpleNamespace(loadscopereorder=False),
                                                                 getvalue=lambda name: ["popen"] * 2 if name == "tx" else None), None)
    groups = {sched._split_scope(f"tests/test_docs.py::test_runnable_snippets[{page}]") for page in ("README.md", "docs/python-api.md")}
    assert len(groups) == 1, groups
