"""k2_sdpa (grouped-query heads folded into the query length) computes the same attention as
transformers' SDPA with expanded KV heads, over a cached prefix with a multi-token suffix."""

from __future__ import annotations

import pytest
import torch
from engine_env import tiny_model

from kvtier.attention import K2_SDPA, use_k2_attention


@torch.inference_mode()
def _suffix_logits(model: object, prefix: list[int], suffix: list[int]) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)  # type: ignore[attr-defined]
    model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)  # type: ignore[operator]
    out = model(input_ids=torch.tensor([suffix]), past_key_values=cache, use_cache=True)  # type: ignore[operator]
    return out.logits[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("suffix_len", [1, 2, 7])
def test_folded_gqa_matches_expanded_heads(suffix_len: int) -> None:
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(suffix_len)
    ids = [int(t) for t in torch.randint(0, 256, (40 + suffix_len,), generator=g)]
    model.set_attn_implementation("sdpa")
    stock = _suffix_logits(model, ids[:40], ids[40:])
    assert use_k2_attention(model) and model.config._attn_implementation == K2_SDPA
    folded = _suffix_logits(model, ids[:40], ids[40:])
    torch.testing.assert_close(folded, stock, atol=1e-5, rtol=1e-5)
    # And against eager attention, which shares no code with either.
    model.set_attn_implementation("eager")
    eager = _suffix_logits(model, ids[:40], ids[40:])
    torch.testing.assert_close(folded, eager, atol=1e-4, rtol=1e-4)


def test_other_implementations_are_left_alone() -> None:
    model = tiny_model()
    model.set_attn_implementation("eager")
    assert not use_k2_attention(model)
    assert model.config._attn_implementation == "eager"
