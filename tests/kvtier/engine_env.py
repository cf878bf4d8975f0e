"""Fixtures of the engine and serving tests: a tiny randomly initialised Llama (2 layers, a
vocabulary of 300: 256 bytes and a few special tokens) and a byte-level tokenizer with a chat
template, so the tests run in seconds without any downloaded model."""

from __future__ import annotations

from typing import Any

import torch

from kvtier.models import ByteTokens

BOS, EOS, IM_START, IM_END = 256, 257, 258, 259
VOCAB = 300


def tiny_model(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def ByteCodec() -> ByteTokens:
    """UTF-8 bytes as token ids 0-255; a ChatML-like template with the special ids above."""
    return ByteTokens("bytes-v1", bos=BOS, eos=EOS, start=IM_START, end=IM_END, offset=0)
