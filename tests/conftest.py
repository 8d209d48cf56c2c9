"""Shared fixtures: the real tokenizers (fetched once into $XTOKEN_CACHE) and built projections.

Megatron-Bridge imports on this CPU machine (no transformer_engine) through a scoped import hook
installed here, before any test imports it (``nemo_xtoken/cpu/bridge_te_shim.py``; a no-op
where transformer_engine is installed).
"""

from __future__ import annotations

import pytest

from nemo_xtoken.assets import tokenizer_path
from nemo_xtoken.cpu import bridge_te_shim

bridge_te_shim.install()


@pytest.fixture(scope="session")
def llama3_path():
    return str(tokenizer_path("llama3"))


@pytest.fixture(scope="session")
def qwen3_path():
    return str(tokenizer_path("qwen3"))


@pytest.fixture(scope="session")
def o200k_path():
    return str(tokenizer_path("o200k"))


@pytest.fixture(scope="session")
def llama3(llama3_path):
    from nemo_xtoken.vocab import load_tokenizer

    return load_tokenizer(llama3_path)


@pytest.fixture(scope="session")
def qwen3(qwen3_path):
    from nemo_xtoken.vocab import load_tokenizer

    return load_tokenizer(qwen3_path)


@pytest.fixture(scope="session")
def o200k(o200k_path):
    from nemo_xtoken.vocab import load_tokenizer

    return load_tokenizer(o200k_path)


@pytest.fixture(scope="session")
def w_llama3_qwen3(llama3, qwen3):
    """W for Llama-3 (student) → Qwen3 (teacher): numerals split on the teacher side."""
    from nemo_xtoken.vocab import build_projection

    return build_projection(llama3, qwen3)


@pytest.fixture(scope="session")
def w_llama3_o200k(llama3, o200k):
    """W for Llama-3 (student) → o200k (Phi-4-mini's base): numerals whole on both sides."""
    from nemo_xtoken.vocab import build_projection

    return build_projection(llama3, o200k)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny random HF checkpoints (tests/bridge_tiny.py): Llama-3 student (tied), Qwen3 teacher (untied), Phi3 teacher
    (tied), Llama teacher; read, never written, by tests/test_bridge_real.py and tests/test_rehearse.py."""
    from bridge_tiny import write_tiny

    d = tmp_path_factory.mktemp("hf")
    return {
        "student": write_tiny("llama", d / "student_llama", seed=1),
        "qwen3": write_tiny("qwen3", d / "teacher_qwen3", seed=2, tied=False),
        "phi3": write_tiny("phi3", d / "teacher_phi3", seed=3, tied=True),
        "llama_t": write_tiny("llama", d / "teacher_llama", seed=4, tied=False),
    }


@pytest.fixture(scope="session")
def w_files(tmp_path_factory, w_llama3_qwen3, w_llama3_o200k):
    """The two W files of the tiny runs (Llama-3 → Qwen3, Llama-3 → o200k); modules with other W files define their own."""
    d = tmp_path_factory.mktemp("w")
    return {"qwen3": str(w_llama3_qwen3.save(d / "llama3__qwen3.safetensors")),
            "phi3": str(w_llama3_o200k.save(d / "llama3__o200k.safetensors"))}


# ---- parallel runs (make test: pytest-xdist, one worker per core, at most 4) --------------------------------

#: Files whose tests share no costly module fixture and include long ones: their tests are spread over the workers.
#: Every other file runs whole on one worker (xdist_group = the file), so a module fixture is built once.
# Not test_docs.py: its snippet tests run in the repository root and each removes the files that appeared there while it
# ran, so two of them on two workers deleted each other's W.safetensors (fresh clone of 7cd44eb, 2026-12-07).
SPLIT = {"test_rehearse.py", "test_learnable_tp.py", "test_partition_kl_tp.py", "test_gpu_losses_script.py",
         "test_gpu_check_script.py", "test_launch.py", "test_offline_smollm2.py"}


def pytest_configure(config):
    import os

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # one core's worth of torch threads per worker: two workers on two cores, not four threads
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def _group(nodeid: str) -> tuple[str, float]:
    """A test's scheduling group under ``make test`` (its file; the test itself in SPLIT files) and its seconds."""
    from suite_durations import FILE_SECONDS, TEST_SECONDS

    path, _, rest = nodeid.partition("::")
    file = path.split("/")[-1]
    if file in SPLIT:
        name = f"{file}::{rest}"
        return name, TEST_SECONDS.get(name, 0.0)
    return file, FILE_SECONDS.get(file, 0.0)


def pytest_collection_modifyitems(session, config, items):
    """Under ``make test`` (xdist workers): the groups longest first (tests/suite_durations.py), so that no worker is
    left alone with a long one at the end; the scheduler below keeps a group on one worker.  The order must be set
    where the tests are collected, on each worker (whose options say numprocesses=None: xdist resets it there)."""
    if not (getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput")):
        return  # a plain run keeps the file order
    keyed = sorted(((-_group(item.nodeid)[1], i, item) for i, item in enumerate(items)), key=lambda k: (k[0], k[1]))
    items[:] = [k[2] for k in keyed]  # stable: a file's tests stay together and in order


def pytest_xdist_make_scheduler(config, log):
    """xdist's load-scope scheduling with our groups: a file's tests on one worker (its module fixtures built once),
    SPLIT files test by test, in the order collected (``--no-loadscope-reorder``).  Not ``--dist loadgroup`` with
    ``xdist_group`` marks: with pytest 9.2 and xdist 3.8 the ``@group`` suffix xdist writes into ``item._nodeid``
    never reaches ``item.nodeid``, so every test became its own group (measured: module fixtures built on both
    workers, the rehearsals last)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)[0]

    return FileGroups(config, log)
