"""Tiny HF models built from local configs (no downloads), shared by the conversion tests."""
import torch
from transformers import (
    BertConfig,
    BertModel,
    DetrConfig,
    DetrForObjectDetection,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    ResNetConfig,
)


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def tiny_opt():
    return OPTForCausalLM(
        OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=40, num_attention_heads=2,
                  max_position_embeddings=16, word_embed_proj_dim=16)
    )


def tiny_bert():
    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=40, max_position_embeddings=16))


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))


def tiny_detr():
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                            out_features=["stage2"])
    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                        d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                        num_labels=3, activation_function="relu")
    return DetrForObjectDetection(config)


def tokens(batch=2, length=8):
    return torch.randint(0, 50, (batch, length))
