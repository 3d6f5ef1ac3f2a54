"""Question answering data for fine-tuning: a JSONL of {"context", "question", "answer"} records.

Each record becomes "<context>\\nQuestion: <question>\\nAnswer: <answer><eos>"; the loss covers only the
answer (and eos) tokens: the prompt's targets are -100, as are the right padding's. Every 10th record
(i % 10 == 0) is held out for validation.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FIELDS = ("context", "question", "answer")
IGNORE = -100


def load_qa(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in FIELDS):
                raise ValueError(f'{path}:{n}: each QA record needs string fields {", ".join(FIELDS)}')
            records.append(rec)
    if len(records) < 2:
        raise ValueError(f"{path}: need at least 2 QA records (one is held out for validation), got {len(records)}")
    return records


def prompt_of(rec: dict) -> str:
    return f"{rec['context']}\nQuestion: {rec['question']}\nAnswer:"


class QAData:
    """Tokenized QA examples as fixed-length rows (x, y) with the loss masked to the answers."""

    def __init__(self, path: str | Path, tokenizer, seq_len: int):
        records = load_qa(path)
        eos = tokenizer.eos_token_id
        rows = {"train": [], "val": []}
        for i, rec in enumerate(records):
            prompt = tokenizer(prompt_of(rec), add_special_tokens=False)["input_ids"]
            answer = tokenizer(" " + rec["answer"], add_special_tokens=False)["input_ids"] + [eos]
            if len(answer) > seq_len:
                raise ValueError(f"QA record {i + 1}: answer has {len(answer)} tokens, more than --seq-len {seq_len}")
            prompt = prompt[-(seq_len + 1 - len(answer)) :]  # keep the end of a long context
            ids = prompt + answer
            targets = [IGNORE] * len(prompt) + answer
            pad = seq_len + 1 - len(ids)
            ids, targets = ids + [eos] * pad, targets + [IGNORE] * pad
            rows["val" if i % 10 == 0 else "train"].append((ids[:-1], targets[1:]))
        if not rows["train"]:
            raise ValueError(f"{path}: no training records left after holding out validation")
        self.splits = {s: (torch.tensor([r[0] for r in v]), torch.tensor([r[1] for r in v])) for s, v in rows.items()}

    def sample(self, batch: int, seed: int, step: int):
        """``batch`` training rows drawn from (seed, step) alone (resume- and DDP-safe like LM windows)."""
        x, y = self.splits["train"]
        idx = torch.from_numpy(np.random.default_rng([seed, step]).integers(0, len(x), size=batch))
        return x[idx], y[idx]
