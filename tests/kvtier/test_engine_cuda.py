"""The engine on a CUDA device (skipped where torch sees none; run them on a GPU machine with
`scripts/gpu-check.sh`): blocks restored into device memory through the pinned staging pool give
the logits of a recompute on the device; blocks cross between a CPU engine and a GPU engine in
either direction (one namespace: the model's revision and the block spec, not the device); the
layer-wise load runs its pass on the device while later layers are on the wire; pooled device
buffers are reused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_env import tiny_model
from kvtier_env import kv_env, run
from test_engine import PROMPT, check_layerwise_hit, engine_in

from kvtier.engine import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BT = 4


def on_cuda(seed: int = 0) -> Any:
    return tiny_model(seed).to("cuda")


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("float16", 2e-2)])
@pytest.mark.parametrize("cut", [10, 17])
def test_restored_logits_on_the_device_equal_recompute(
    tmp_path: Path, dtype: str, tol: float, cut: int
) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            eng, _ = await engine_in(env, "us-east", dtype=dtype, model=on_cuda(),
                                     store_generated=False)  # fmt: skip
            assert eng.device.type == "cuda"
            await eng.complete(PROMPT[:cut], SamplingParams(max_tokens=1))
            await eng.flush()
            hit = await eng.prefill(PROMPT, all_logits=True)
            full = await eng.prefill(PROMPT, all_logits=True, use_tier=False)
            cached = cut // BT * BT
            assert hit.metrics.cached_tokens == cached and hit.metrics.choice == "local"
            n = hit.metrics.computed_tokens
            assert n == len(PROMPT) - cached
            torch.testing.assert_close(hit.logits, full.logits[-n:], atol=tol, rtol=tol)
            for a, b in zip(hit.cache.layers, full.cache.layers, strict=True):
                assert a.keys.device.type == "cuda"
                torch.testing.assert_close(a.keys, b.keys, atol=tol, rtol=tol)
                torch.testing.assert_close(a.values, b.values, atol=tol, rtol=tol)
            # Blocks went through a pinned host mirror, back in the pool for the next load.
            assert hit.metrics.convert_s > 0
            assert len(eng._hosts) == 1 and eng._hosts[0].is_pinned()

    run(body)


@pytest.mark.parametrize("store_on", ["cpu", "cuda"])
def test_blocks_cross_between_a_cpu_engine_and_a_gpu_engine(tmp_path: Path, store_on: str) -> None:
    """us-east computes and stores on one device, eu-west loads on the other: the logits match
    the loading device's recompute within float16 rounding and greedy tokens agree."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            load_on = "cpu" if store_on == "cuda" else "cuda"
            east, _ = await engine_in(env, "us-east", dtype="float16",
                                      model=tiny_model().to(store_on))  # fmt: skip
            west, _ = await engine_in(env, "eu-west", dtype="float16",
                                      model=tiny_model().to(load_on))  # fmt: skip
            greedy = SamplingParams(max_tokens=6, stop_at_eos=False)
            first = await east.complete(PROMPT, greedy)
            await east.flush()
            hit = await west.prefill(PROMPT, all_logits=True)
            full = await west.prefill(PROMPT, all_logits=True, use_tier=False)
            assert hit.metrics.cached_tokens == 16 and hit.metrics.choice == "remote"
            assert hit.cache.layers[0].keys.device.type == load_on
            torch.testing.assert_close(hit.logits, full.logits[-1:], atol=2e-2, rtol=1e-2)
            again = await west.complete(PROMPT, greedy)
            assert again.token_ids == first.token_ids

    run(body)


def test_layerwise_load_runs_the_first_layers_on_the_device_while_the_rest_arrive(
    tmp_path: Path,
) -> None:
    """test_engine's layer-wise test with the pass on the device: layer 1's parts are held
    until decoder layer 0 has run on the GPU."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            await check_layerwise_hit(env, on_cuda())

    run(body)


def test_pooled_device_buffers_are_reused_and_outputs_unchanged(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            eng, _ = await engine_in(env, "us-east", model=on_cuda())
            greedy = SamplingParams(max_tokens=6, stop_at_eos=False)
            await eng.complete(PROMPT, greedy)
            await eng.flush()
            outs, ptrs = [], []
            for _ in range(3):
                # 19 tokens: no new full block, so every hit is the same 16 tokens (and the
                # same buffer sizes)
                c = await eng.complete([*PROMPT, 1, 2], greedy)
                await eng.flush()
                assert c.metrics.cached_tokens == 16
                outs.append(c.token_ids)
                assert eng._buffers and all(b.device.type == "cuda" for b in eng._buffers)
                ptrs.append(eng._buffers[0].data_ptr())
            assert outs[0] == outs[1] == outs[2]
            assert ptrs[0] == ptrs[1] == ptrs[2]
            assert len(eng._hosts) == 1 and eng._hosts[0].is_pinned()  # one mirror, reused

    run(body)
