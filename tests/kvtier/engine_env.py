"""Fixtures of the engine and serving tests: a tiny randomly initialised Llama (2 layers, a
vocabulary of 300: 256 bytes and a few special tokens) and a byte-level tokenizer with a chat
template, so the tests run in seconds without any downloaded model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

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


class ByteCodec:
    """UTF-8 bytes as token ids; a ChatML-like template with special ids."""

    name = "bytes-v1"
    eos_ids = frozenset({EOS, IM_END})

    def chat_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        ids = [BOS]
        for m in messages:
            ids += [IM_START, *self.encode(m["role"] + "\n"), *self.encode(m["content"]), IM_END]
        return [*ids, IM_START, *self.encode("assistant\n")]

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")
