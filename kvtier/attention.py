"""Grouped-query attention over a cached prefix without copying the cache.

Purpose
    A request that loads a 2,048-token prefix from the tier and prefills a short suffix runs
    attention with a mask (the suffix's queries see the whole prefix but not each other's
    future). transformers' SDPA path then expands the keys and values of every layer from the
    model's KV heads to its query heads (`repeat_kv`): for SmolLM2 (9 query heads over 3 KV
    heads) that writes 3x the cache, about 280 MB at 2,048 tokens, for a 16-token suffix.

    `k2_sdpa` avoids it: the query heads that share a KV head are folded into the query length
    (`[batch, kv_heads, groups * q_len, dim]`), the mask is repeated along that axis, and one
    SDPA call attends over the cache as it is. The result is the same attention (the same dot
    products and softmax rows, in another order); tests compare logits with the stock path.
    Everything else (no mask, one query token, no grouping) goes to transformers' own SDPA.

Use
    `use_k2_attention(model)` switches a model whose attention is "sdpa" to "k2_sdpa"
    (registered with transformers' attention and mask interfaces on first use); other
    implementations are left alone.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["K2_SDPA", "use_k2_attention"]

K2_SDPA = "k2_sdpa"
_registered: list[bool] = []


def _k2_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1))
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    foldable = (
        groups > 1
        and t > 1
        and attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and hq == hkv * groups
        and kwargs.get("position_bias") is None
        and not kwargs.get("output_attentions", False)
    )
    if not foldable:
        out: tuple[torch.Tensor, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
        return out
    assert attention_mask is not None
    # Query head h uses KV head h // groups (transformers' repeat_kv order), so the heads of
    # one group are contiguous: [b, hkv, groups, t, d] -> [b, hkv, groups * t, d].
    q = query.reshape(b, hkv, groups * t, d)
    mask = attention_mask[:, :, :, : key.shape[-2]].repeat(1, 1, groups, 1)
    o = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return o.reshape(b, hq, t, d).transpose(1, 2).contiguous(), None


def use_k2_attention(model: Any) -> bool:
    """Switch model from "sdpa" to "k2_sdpa"; True if it now uses it."""
    config = model.config
    if getattr(config, "_attn_implementation", None) == K2_SDPA:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(K2_SDPA, _k2_sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(K2_SDPA, sdpa_mask)
        _registered.append(True)
    model.set_attn_implementation(K2_SDPA)
    return getattr(config, "_attn_implementation", None) == K2_SDPA
