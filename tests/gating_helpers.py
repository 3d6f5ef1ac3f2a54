"""Tiny HF models and token batches shared by the gating tests (SIBS, MGS, reordering, gated MLPs)."""
import torch
from transformers import GPT2Config, GPT2Model, OPTConfig, OPTModel

VOCAB = 60


def tiny_opt():  # ReLU MLPs, d_ff 128
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=128, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTModel(cfg).eval()


def tiny_gpt2():  # GELU MLPs (compensation), Conv1D weights, d_ff 128
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


def calib(n=12, b=4, s=16):
    """``n`` calibration batches of random token ids, the same for every call."""
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (b, s), generator=g)} for _ in range(n)]


TEST = {"input_ids": torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))}


def out(model):
    """The model's last hidden state on the fixed TEST batch."""
    with torch.no_grad():
        return model(**TEST).last_hidden_state
