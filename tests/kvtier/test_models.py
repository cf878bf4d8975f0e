"""Random weights in a known model's shape (`kvtier.models.random_model`, `k2 bench engine
--architecture`): the shape is the published one, the revision keeps its blocks apart from any
other model's, and the engine serves it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from k2store import cli, launcher
from k2store.errors import InvalidArgument
from kvtier import enginebench
from kvtier.engine import Engine, EngineConfig, SamplingParams, block_spec_for
from kvtier.models import ARCHITECTURES, ByteTokens, check_device, load_model, random_model


def test_random_smollm2_has_the_published_shape_and_size() -> None:
    loaded = random_model("smollm2-135m", device="cpu")
    model = loaded.model
    spec = block_spec_for(model.config, block_tokens=64, dtype="float16")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
    # SmolLM2-135M's parameter count (embeddings tied to the output layer).
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32 and loaded.device == "cpu"
    assert loaded.revision == "random-smollm2-135m-float32@seed0"
    assert not model.training


def test_the_revision_names_dtype_and_seed_and_the_seed_fixes_the_weights() -> None:
    a = random_model("smollm2-135m", device="cpu", seed=1)
    b = random_model("smollm2-135m", device="cpu", seed=1)
    c = random_model("smollm2-135m", device="cpu", seed=2, dtype="bfloat16")
    wa, wb, wc = (next(m.model.parameters()) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc.float())
    assert a.revision == b.revision != c.revision
    assert c.revision == "random-smollm2-135m-bfloat16@seed2" and wc.dtype == torch.bfloat16


def test_unknown_architecture_or_dtype_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown architecture 'gpt-5'.*smollm2-135m"):
        random_model("gpt-5", device="cpu")
    with pytest.raises(InvalidArgument, match="unknown dtype 'int8'"):
        random_model("smollm2-135m", device="cpu", dtype="int8")
    # The CLI: one of --model and --architecture, and only known shapes.
    parser = cli._parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "engine", "--model", "x", "--architecture", "llama-1b"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "engine", "--architecture", "gpt-5"])
    args = parser.parse_args(["bench", "engine", "--architecture", "llama-8b", "--device", "cpu"])
    assert args.architecture == "llama-8b" and args.device == "cpu"
    assert set(ARCHITECTURES) == {"smollm2-135m", "llama-1b", "llama-8b"}


def test_a_device_torch_cannot_use_is_refused_before_anything_loads() -> None:
    with pytest.raises(InvalidArgument, match="unknown device 'gpu'"):
        random_model("smollm2-135m", device="gpu")
    with pytest.raises(InvalidArgument, match="cuda:99"):
        random_model("smollm2-135m", device="cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="sees no CUDA device"):
            load_model(device="cuda")
    check_device(None)
    check_device("cpu")


def test_byte_tokens_round_trip_and_template() -> None:
    t = ByteTokens("bytes@x")
    text = "naïve café ✓"
    assert t.decode(t.encode(text)) == text
    assert all(3 <= i < 259 for i in t.encode(text))
    ids = t.chat_ids([{"role": "user", "content": "hi"}])
    assert ids[0] == ByteTokens.BOS and ids.count(ByteTokens.START) == 2
    assert ids.count(ByteTokens.END) == 1 and t.eos_ids == {ByteTokens.EOS, ByteTokens.END}
    assert t.decode(ids).endswith("assistant\n")


def test_the_engine_serves_a_random_model() -> None:
    """No tier: greedy decoding is repeatable and the logits cover the vocabulary, finite (the
    engine's cache handling on this shape: 30 layers, 3 KV heads, 9 query heads)."""
    loaded = random_model("smollm2-135m", device="cpu")
    eng = Engine(loaded.model, loaded.tokenizer, None, config=EngineConfig(block_tokens=16))
    prompt = loaded.tokenizer.encode("the quick brown fox jumps over the lazy dog")

    async def body() -> None:
        greedy = SamplingParams(max_tokens=4, stop_at_eos=False)
        a = await eng.complete(prompt, greedy)
        b = await eng.complete(prompt, greedy)
        assert a.token_ids == b.token_ids and len(a.token_ids) == 4
        full = await eng.prefill(prompt, all_logits=True, use_tier=False)
        assert full.logits.shape == (len(prompt), 49152)
        assert torch.isfinite(full.logits).all()

    asyncio.run(body())


def test_the_engine_benchmark_sizes_its_block_stores_to_hold_what_it_stores() -> None:
    """A hit `k2 bench engine` measures is a memory hit: the block stores' memory tier holds
    the run's blocks (the default 256 MB held a third less than a Llama-3.1-8B-shaped 2,048-token
    prefix), passed to each `k2 blockstore` as --memory-mb."""
    big = SimpleNamespace(model=SimpleNamespace(config=LlamaConfig(**ARCHITECTURES["llama-8b"])))
    small = SimpleNamespace(
        model=SimpleNamespace(config=LlamaConfig(**ARCHITECTURES["smollm2-135m"]))
    )
    mb = enginebench._store_memory_mb(big, [2048], 64, "bfloat16")
    assert mb * (1 << 20) >= 2 * 2048 * 131072  # 128 KiB per token, twice over
    assert enginebench._store_memory_mb(small, [256], 64, "float16") == 256  # the floor
    cmd = launcher.blockstore_command(Path("c.toml"), "us-east", 1, Path("d"), mb)
    assert cmd[-2:] == ["--memory-mb", str(mb)]
    assert "--memory-mb" not in launcher.blockstore_command(Path("c.toml"), "us-east", 1, Path("d"))
