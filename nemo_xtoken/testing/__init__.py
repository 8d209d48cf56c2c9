"""Test helpers shared by the test suite and benchmarks (no test framework dependency)."""

from nemo_xtoken.testing.dist import run_distributed

__all__ = ["run_distributed"]
