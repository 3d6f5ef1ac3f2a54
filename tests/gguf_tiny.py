"""A tiny Llama-architecture GGUF file written with the gguf package (random F32 weights, a small
byte-level BPE vocabulary), so the GGUF conversion path runs in seconds without the real model."""
from pathlib import Path

import numpy as np

VOCAB = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ġt", "th", "the", "Ġthe"]
MERGES = ["Ġ t", "t h", "th e", "Ġ the"]
D, FF, LAYERS, HEADS, KV_HEADS = 16, 40, 2, 2, 1


def write_tiny_gguf(path, arch: str = "llama", seed: int = 0) -> Path:
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(D // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(VOCAB))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(VOCAB)
    w.add_token_types([3, 3, 3] + [1] * (len(VOCAB) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def t(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * (0.3 if len(shape) > 1 else 1.0))

    t("token_embd.weight", len(VOCAB), D)
    head = D // HEADS
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D, np.float32))
        t(f"blk.{i}.attn_q.weight", D, D)
        t(f"blk.{i}.attn_k.weight", KV_HEADS * head, D)
        t(f"blk.{i}.attn_v.weight", KV_HEADS * head, D)
        t(f"blk.{i}.attn_output.weight", D, D)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D, np.float32))
        t(f"blk.{i}.ffn_gate.weight", FF, D)
        t(f"blk.{i}.ffn_up.weight", FF, D)
        t(f"blk.{i}.ffn_down.weight", D, FF)
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
