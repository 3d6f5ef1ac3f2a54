"""Evaluation: perplexity and measured FF cost, reports and plots, the lm-evaluation-harness bridge."""
from .perplexity import EvalResult, evaluate_lm

__all__ = ["EvalResult", "evaluate_lm"]
