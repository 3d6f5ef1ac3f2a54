"""Named model sizes: each preset's architecture and its training defaults, in one table.

tiny trains in CPU minutes; small is ~20M parameters; 125m and 1.3b are the published scales
(GPT-2/OPT shapes), configuration only here: train them on real hardware.
"""
from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "model": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256,
                      vocab_size=2048, tree={"depth": 7, "trees": 8}),
        "train": dict(seq_len=128, batch_size=16, lr=3e-3, max_steps=1000, warmup_steps=50),
    },
    "small": {
        "model": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, max_position_embeddings=512,
                      vocab_size=8192, tree={"depth": 8, "trees": 16}),
        "train": dict(seq_len=256, batch_size=32, lr=1e-3, max_steps=5000, warmup_steps=200),
    },
    "125m": {
        "model": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=1024,
                      vocab_size=50304, tree={"depth": 11, "trees": 8}),
        "train": dict(seq_len=1024, batch_size=256, lr=6e-4, max_steps=100_000, warmup_steps=2000),
    },
    "1.3b": {
        "model": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, max_position_embeddings=2048,
                      vocab_size=50304, tree={"depth": 11, "trees": 16}),
        "train": dict(seq_len=2048, batch_size=512, lr=2e-4, max_steps=100_000, warmup_steps=2000),
    },
}
MODEL_PRESETS = {name: p["model"] for name, p in PRESETS.items()}
TRAIN_PRESETS = {name: p["train"] for name, p in PRESETS.items()}
