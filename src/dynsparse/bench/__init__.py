"""Benchmarks that time dynsparse's conditional execution against dense baselines in one process."""
from .cases import SUITES, Result, Settings
from .runner import run_suites

__all__ = ["SUITES", "Result", "Settings", "run_suites"]
