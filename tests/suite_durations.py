"""Seconds per test file and per long test, from ``make test TEST_WORKERS=2 PYTEST_ARGS="--durations=0"`` of 176b927
(2026-12-07 20:52-21:02 UTC, this 2-core machine, two workers, nothing else running): the order in which ``make test``'s
workers take them, longest first (tests/conftest.py).  Order only — a stale or missing entry changes no result; every
test runs.
"""

#: Files run whole on one worker (their tests share module fixtures), by the sum of their tests' seconds.
FILE_SECONDS: dict[str, float] = {
    "test_docs.py": 71,
    "test_packing_equivalence.py": 72,
    "test_bridge_real.py": 50,
    "test_demo_fast.py": 37,
    "test_integration_tp_exchange.py": 33,
    "test_parallel.py": 31,
    "test_offline_cache.py": 29,
    "test_integration_learnable_w.py": 25,
    "test_offline_distill.py": 25,
    "test_integration_e2e.py": 23,
    "test_tokenizer_families.py": 21,
    "test_losses_fidelity.py": 19,
    "test_parallel_summary.py": 18,
    "test_suite_scheduling.py": 15,
    "test_losses_reference_options.py": 14,
    "test_bad_inputs.py": 13,
    "test_vocab_families.py": 12,
    "test_chat_bridge.py": 12,
    "test_data_config.py": 11,
    "test_chat_data.py": 9,
    "test_demo_memo.py": 6,
    "test_chat_megatron.py": 5,
    "test_chat.py": 5,
    "test_partition_kl.py": 5,
    "test_vocab.py": 5,
    "test_cli_vocab.py": 4,
    "test_preprocess.py": 4,
    "test_align.py": 3,
    "test_integration_config.py": 3,
    "test_losses_blocked.py": 3,
}

#: Files whose tests are independent (SPLIT in tests/conftest.py): each long test on its own.
TEST_SECONDS: dict[str, float] = {
    "test_rehearse.py::test_rehearse_shipped_config_nproc2[llama32_1b__phi4mini_hkl]": 80,
    "test_rehearse.py::test_rehearse_tp2_dp2": 67,
    "test_rehearse.py::test_rehearse_shipped_config_nproc2[llama32_1b__phi4mini_llama32_3b]": 64,
    "test_rehearse.py::test_rehearse_learnable_w_bf16": 56,
    "test_offline_smollm2.py::test_student_distils_from_cached_smollm2": 41,
    "test_gpu_check_script.py::test_gpu_check_script_cpu_path": 38,
    "test_rehearse.py::test_rehearse_shipped_config_nproc2[llama32_1b__qwen3_4b_pkl]": 31,
    "test_rehearse.py::test_launcher_forks_ranks_in_their_own_session_env_and_log_and_reports_a_failing_rank": 28,
    "test_learnable_tp.py::test_learnable_w_tensor_parallel_equals_reference[4-True-False]": 16,
    "test_launch.py::test_example_script_prints_the_sbatch_script": 10,
    "test_partition_kl_tp.py::test_tensor_parallel_equals_reference[4]": 10,
    "test_learnable_tp.py::test_learnable_w_tensor_parallel_equals_reference[2-False-True]": 9,
    "test_learnable_tp.py::test_learnable_w_tensor_parallel_equals_reference[2-False-False]": 8,
    "test_learnable_tp.py::test_learnable_w_tensor_parallel_equals_reference[2-True-False]": 7,
    "test_partition_kl_tp.py::test_tensor_parallel_equals_reference[2]": 7,
}
