"""Text corpora for language modelling: built-in Shakespeare, user text, BPE tokenizer, memmap tokens."""
from .sources import text_source
from .text import EOS_TEXT, SPLITS, TextSource
from .tokenizer import load_tokenizer, train_bpe
from .tokens import (TokenData, default_cache_dir, eval_windows, load_tokens, prepare_tokens, sample_windows,
                     spread_windows)

__all__ = [
    "EOS_TEXT", "SPLITS", "TextSource", "text_source", "train_bpe", "load_tokenizer",
    "TokenData", "prepare_tokens", "load_tokens", "default_cache_dir", "sample_windows", "eval_windows",
    "spread_windows",
]
