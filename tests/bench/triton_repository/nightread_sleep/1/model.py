"""Triton model nightread_sleep: see tests/bench/sleep_model.py (PYTHONPATH must reach the repository root)."""

from tests.bench.sleep_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
