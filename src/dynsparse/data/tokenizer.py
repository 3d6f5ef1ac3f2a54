"""Tokenizers: a byte-level BPE trained locally with HF ``tokenizers``, or a local HF tokenizer dir.

Either way the result is a ``PreTrainedTokenizerFast`` so it saves next to the model (``final/``) and
``AutoTokenizer.from_pretrained`` (and lm-evaluation-harness) load it back.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .text import EOS_TEXT


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: any byte sequence encodes) with one special token, EOS_TEXT."""
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + EOS + 1 merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_bounded_words(texts), trainer=trainer)
    return wrap(tok)


MAX_WORD_CHARS = 256


def _bounded_words(texts: Iterable[str]) -> Iterable[str]:
    """The training texts with every run of more than MAX_WORD_CHARS non-space characters cut into pieces
    (given to the trainer one by one): BPE training time grows with the square of a word's length, so one
    megabyte-long "word" (a line without spaces) would train for hours. Ordinary words are untouched."""
    long_run = re.compile(r"\S{%d,}" % (MAX_WORD_CHARS + 1))
    for text in texts:
        if not long_run.search(text):
            yield text
            continue
        pos = 0
        for m in long_run.finditer(text):
            yield text[pos:m.start()]
            run = m.group()
            yield from (run[i:i + MAX_WORD_CHARS] for i in range(0, len(run), MAX_WORD_CHARS))
            pos = m.end()
        yield text[pos:]


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TEXT, eos_token=EOS_TEXT, unk_token=EOS_TEXT, pad_token=EOS_TEXT
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer saved by ``save_pretrained`` (a local directory; no hub downloads)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    from ..remote_code import TOKENIZER_FILES, check_remote_code

    check_remote_code(path, False, how="tokenizers with their own code are not supported", names=TOKENIZER_FILES)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from None
    if tok.eos_token is None:
        raise ValueError(f"tokenizer in {path} has no eos_token; documents could not be separated")
    return tok
