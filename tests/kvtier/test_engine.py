"""The engine over a tiny random Llama: restored-cache logits equal recomputed logits, in one
region and across regions; generation with and without the tier agrees; blocks of generated
tokens are reused by the next turn; the cost-aware choice skips slow remote copies."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_env import ByteCodec, tiny_model
from kvtier_env import Env, PartLog, kv_env, run

from kvtier.blocks import Layout, Namespace, block_hashes
from kvtier.engine import (
    Engine,
    EngineConfig,
    PrefillCostModel,
    SamplingParams,
    _BufferPool,
    block_spec_for,
    namespace_for,
)
from kvtier.placement import CostModel

BT = 4
PROMPT = [5, 17, 99, 3, 250, 31, 7, 64, 128, 200, 11, 12, 13, 14, 15, 16, 42]  # 17 tokens


async def engine_in(
    env: Env,
    region: str,
    *,
    dtype: str = "float32",
    model: object = None,
    layout: Layout = Layout.LKHTD,
    **cfg: object,
) -> tuple[Engine, Namespace]:
    model = model if model is not None else tiny_model()
    spec = block_spec_for(model.config, block_tokens=BT, dtype=dtype)  # type: ignore[attr-defined]
    spec = replace(spec, layout=layout)
    ns = namespace_for("tiny-llama@0", "bytes-v1", spec, "acme", tenant_salt=b"s")
    await env.metadata.register_namespace(ns)
    conn = await env.connector(ns, region)
    config = EngineConfig(block_tokens=BT, kv_dtype=dtype, **cfg)  # type: ignore[arg-type]
    return Engine(model, ByteCodec(), conn, config=config), ns


@pytest.mark.parametrize("cut", [8, 10, 12, 17])
def test_restored_logits_equal_recompute(tmp_path: Path, cut: int) -> None:
    """A prompt whose first `cut` tokens were stored: prefixes ending at a block boundary (8,
    12) and inside a block (10, 17: the partial tail is recomputed)."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            eng, _ = await engine_in(env, "us-east", store_generated=False)
            await eng.complete(PROMPT[:cut], SamplingParams(max_tokens=1))
            await eng.flush()
            hit = await eng.prefill(PROMPT, all_logits=True)
            full = await eng.prefill(PROMPT, all_logits=True, use_tier=False)
            cached = cut // BT * BT
            assert hit.metrics.cached_tokens == cached
            assert hit.metrics.computed_tokens == len(PROMPT) - cached
            assert hit.metrics.choice == "local" and hit.metrics.bytes_moved == 0
            n = hit.metrics.computed_tokens
            torch.testing.assert_close(hit.logits, full.logits[-n:], atol=1e-5, rtol=1e-5)
            # The caches agree too, restored part included.
            for a, b in zip(hit.cache.layers, full.cache.layers, strict=True):
                torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)

    run(body)


def test_whole_prompt_cached_recomputes_the_last_token(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            eng, _ = await engine_in(env, "us-east", store_generated=False)
            prompt = PROMPT[:12]
            await eng.complete(prompt, SamplingParams(max_tokens=1))
            await eng.flush()
            hit = await eng.prefill(prompt)
            full = await eng.prefill(prompt, use_tier=False)
            assert hit.metrics.cached_tokens == 12 and hit.metrics.computed_tokens == 1
            torch.testing.assert_close(hit.logits, full.logits, atol=1e-5, rtol=1e-5)

    run(body)


def test_cross_region_hit_float16_blocks(tmp_path: Path) -> None:
    """Blocks stored in us-east load in eu-west (bytes moved counted); float16 blocks give
    logits within float16 rounding of the float32 recompute, and the same greedy tokens."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            model = tiny_model()
            east, _ = await engine_in(env, "us-east", dtype="float16", model=model)
            west, _ = await engine_in(env, "eu-west", dtype="float16", model=model)
            params = SamplingParams(max_tokens=6)
            first = await east.complete(PROMPT, params)
            await east.flush()
            assert first.metrics.choice == "miss" and first.metrics.stored_blocks == 5
            hit = await west.prefill(PROMPT, all_logits=True)
            full = await west.prefill(PROMPT, all_logits=True, use_tier=False)
            m = hit.metrics
            assert m.cached_tokens == 16 and m.choice == "remote"
            assert m.cached_by_region == {"us-east": 4}
            assert m.bytes_moved > 4 * east.spec.nbytes
            torch.testing.assert_close(hit.logits, full.logits[-1:], atol=2e-2, rtol=1e-2)
            again = await west.complete(PROMPT, params)
            assert again.token_ids == first.token_ids
            await west.flush()
            # eu-west kept a copy of what it loaded: the next request there is local.
            local = await west.prefill(PROMPT)
            assert local.metrics.choice == "local" and local.metrics.bytes_moved == 0

    run(body)


def test_generated_blocks_serve_the_next_turn(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            eng, _ = await engine_in(env, "us-east")
            c = await eng.complete(PROMPT, SamplingParams(max_tokens=9, stop_at_eos=False))
            await eng.flush()
            turn2 = [*PROMPT, *c.token_ids, 1, 2, 3]
            hit = await eng.prefill(turn2)
            # prompt (17) + 8 generated tokens fed back = 25 tokens: 6 full blocks.
            assert hit.metrics.cached_tokens == 24

    run(body)


def test_streaming_metrics_and_seeded_sampling(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            eng, _ = await engine_in(env, "us-east")
            params = SamplingParams(
                max_tokens=5, temperature=0.8, top_p=0.9, seed=7, stop_at_eos=False
            )
            events = [ev async for ev in eng.generate(PROMPT, params)]
            assert [e.index for e in events] == list(range(5))
            assert [e.finish_reason for e in events] == [None] * 4 + ["length"]
            m = events[-1].metrics
            assert m is not None and m.ttft_s > 0 and len(m.inter_token_s) == 4
            assert m.completion_tokens == 5 and m.prompt_tokens == len(PROMPT)
            again = await eng.complete(PROMPT, params)
            assert again.token_ids == [e.token_id for e in events]
            greedy_tier = await eng.complete(PROMPT, SamplingParams(max_tokens=5))
            plain = Engine(tiny_model(), ByteCodec(), None)
            greedy_plain = await plain.complete(PROMPT, SamplingParams(max_tokens=5))
            assert greedy_tier.token_ids == greedy_plain.token_ids

    run(body)


def test_cost_model_skips_remote_blocks_slower_than_recompute(tmp_path: Path) -> None:
    async def body() -> None:
        async with kv_env(tmp_path) as env:
            model = tiny_model()
            east, _ = await engine_in(env, "us-east", model=model)
            west, _ = await engine_in(env, "eu-west", model=model)
            await east.complete(PROMPT, SamplingParams(max_tokens=1))
            await east.flush()
            assert west.connector is not None
            west.connector.cost.prefill_tokens_per_s = 1e12  # recomputing is free, as if measured
            r = await west.prefill(PROMPT)
            assert r.metrics.choice == "recompute" and r.metrics.cached_tokens == 0
            assert r.metrics.offered_tokens == 16 and r.metrics.bytes_moved == 0
            # Once the engine has measured passes, the connector weighs fetches against the
            # engine's fit (without its per-pass constant), not the rate.
            west._observe_prefill(64, 0.010)
            west._observe_prefill(256, 0.020)
            m = west.prefill_cost.marginal(256)
            assert m is not None and m > 0
            assert west.connector.cost.recompute_s(256) == m

    run(body)


def test_prefill_cost_model_fits_measurements() -> None:
    cm = PrefillCostModel()
    assert cm.estimate(100) is None
    for n in (128, 256, 512, 1024, 2048):
        cm.observe(0, n, 1e-3 * n + 1e-7 * n * n / 2)
    est = cm.estimate(4096)
    assert est is not None and est == pytest.approx(1e-3 * 4096 + 1e-7 * 4096**2 / 2, rel=1e-3)
    assert cm.estimate(64, past=4096) == pytest.approx(
        1e-3 * 64 + 1e-7 * 64 * (4096 + 32), rel=1e-2
    )


def test_the_cost_model_weighs_a_fetch_against_what_recomputing_the_prefix_adds_to_a_pass() -> None:
    """On a GPU a pass costs ~20 ms whatever its length (kernel launches), plus little per token:
    an 8B-shaped model's 8,192 tokens prefill in 0.25 s, while loading their 1.07 GB from this
    region's store takes 0.47 s (session 20, H200). A rate from whole prefills (tokens /
    seconds of the calibration's short passes) made every long prefix look dear to recompute,
    so the connector loaded it; the engine's fit without its per-pass constant recomputes."""
    fit = PrefillCostModel()
    assert fit.marginal(1024) is None  # nothing measured yet
    gpu = CostModel("us-east", local_bytes_per_s=2.3e9)
    for n in (64, 256, 512):  # what `k2 serve` calibrates with, GPU-like timings
        t = 0.020 + 25e-6 * n
        fit.observe(0, n, t)
        gpu.observe_prefill(n, t)
    block = 131072 * 64  # one 64-token block of the 8B shape, bfloat16
    blocks = [{"us-east": block}] * 128  # 8,192 tokens
    assert gpu.plan(blocks, 64).num_blocks == 128  # the rate: 8,192 tokens look like 1.1 s
    gpu.prefill_model = fit.marginal
    m = fit.marginal(8192)
    assert m is not None and m == pytest.approx(25e-6 * 8192, rel=0.05)  # no 20 ms in it
    assert gpu.recompute_s(8192) == m
    assert gpu.plan(blocks, 64).num_blocks == 0  # 0.47 s to load against 0.2 s: recompute
    # Where loading is the cheaper (a slow pass: the CPU), the fit keeps loading.
    cpu = PrefillCostModel()
    for n in (64, 256, 512):
        cpu.observe(0, n, 0.002 + 1.5e-3 * n)
    gpu.prefill_model = cpu.marginal
    assert gpu.plan(blocks, 64).num_blocks == 128


def test_pooled_cache_buffers_are_reused_only_after_the_store_read_them(tmp_path: Path) -> None:
    """Caches loaded from the tier are built in pooled buffers (no fresh 100 MB of page faults
    per request). A buffer goes back to the pool only once the request's background store has
    exported from it; greedy outputs stay the same whichever buffer a request got."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            eng, _ = await engine_in(env, "us-east")
            plain = Engine(eng.model, ByteCodec(), None, config=EngineConfig(block_tokens=BT))
            greedy = SamplingParams(max_tokens=6, stop_at_eos=False)
            first = await eng.complete(PROMPT, greedy)  # a miss: nothing pooled
            await eng.flush()
            assert eng._buffers == []
            want = (await plain.complete([*PROMPT, 1, 2, 3, 4], greedy)).token_ids
            leased: list[int] = []
            real_lease = eng._lease_buffer

            def lease(numel: int) -> torch.Tensor:
                b = real_lease(numel)
                leased.append(b.data_ptr())
                return b

            eng._lease_buffer = lease  # type: ignore[method-assign]
            # Each hit stores its new blocks (the prompt goes past the cached prefix): its
            # buffer must not come back before that store is done.
            for extra in ([1, 2, 3, 4], [5, 6, 7, 8]):
                c = await eng.complete([*PROMPT, *extra], greedy)
                assert c.metrics.cached_tokens == 16
                pooled = [b.data_ptr() for b in eng._buffers]
                assert eng._stores and leased[-1] not in pooled
                await eng.flush()
                assert leased[-1] in [b.data_ptr() for b in eng._buffers]
            assert leased[0] == leased[1]  # the second hit reused the first one's buffer
            again = await eng.complete([*PROMPT, 1, 2, 3, 4], greedy)
            assert again.token_ids == want
            assert first.token_ids == (await plain.complete(PROMPT, greedy)).token_ids

    run(body)


def test_layerwise_prefill_computes_first_layers_while_the_last_are_on_the_wire(
    tmp_path: Path,
) -> None:
    """eu-west loads us-east's blocks in two parts (layer 0, layer 1); the second parts are
    held back until decoder layer 0 has run. Only a pass that starts on the first parts can
    finish (otherwise the hold times out and says so); its logits equal the recompute."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            await check_layerwise_hit(env, tiny_model())

    run(body)


async def check_layerwise_hit(env: Env, model: Any) -> None:
    """The layer-wise test's body, for any tiny model (test_engine_cuda runs it on a GPU)."""
    east, _ = await engine_in(env, "us-east", dtype="float16", model=model)
    await east.complete(PROMPT, SamplingParams(max_tokens=1))
    await east.flush()
    west, _ = await engine_in(env, "eu-west", dtype="float16", model=model)
    assert west.connector is not None
    loop = asyncio.get_running_loop()
    layer0_ran = asyncio.Event()
    held: list[bool] = []

    def ran(*_: object) -> None:  # (a forward hook that returns something replaces
        loop.call_soon_threadsafe(layer0_ran.set)  # the layer's output)

    hook = model.model.layers[0].register_forward_hook(ran)
    for c in west.connector.stores["us-east"]:
        real = c.get_range

        async def get_range(key: bytes, start: int, length: int, real=real):  # type: ignore[no-untyped-def]
            if start > 0:  # layer 1's part
                try:
                    await asyncio.wait_for(layer0_ran.wait(), 10)
                except TimeoutError:
                    held.append(False)
                else:
                    held.append(True)
            return await real(key, start, length)

        c.get_range = get_range  # type: ignore[method-assign]
    try:
        hit = await west.prefill(PROMPT, all_logits=True)
    finally:
        hook.remove()
    assert held == [True] * 4
    full = await west.prefill(PROMPT, all_logits=True, use_tier=False)
    assert hit.metrics.cached_tokens == 16 and hit.metrics.choice == "remote"
    torch.testing.assert_close(hit.logits, full.logits[-1:], atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("copies", [("us-east",), ("us-east", "ap-southeast")])
def test_a_pass_on_a_part_that_fails_its_checksum_is_not_kept(
    tmp_path: Path, copies: tuple[str, ...]
) -> None:
    """Block 2's last layer arrives damaged (large values) and the pass runs on it before the
    checksum fails. The pass is thrown away: computed again from block 2 on (one copy) or after
    block 2 is reloaded whole from the other region (two); the logits match the recompute."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            model = tiny_model()
            for region in copies:  # each computes and stores its own copy
                eng, ns = await engine_in(env, region, dtype="float16", model=model)
                pre = await eng.prefill(PROMPT, use_tier=False)
                assert await eng.store(PROMPT, pre.cache) == 4
            west, _ = await engine_in(env, "eu-west", dtype="float16", model=model)
            assert west.connector is not None
            bad = block_hashes(ns, PROMPT)[2]
            # Parts are damaged from either region; a whole block (a reload) is not.
            PartLog(west.connector, damage={(r, bad) for r in copies})
            hit = await west.prefill(PROMPT, all_logits=True)
            full = await west.prefill(PROMPT, all_logits=True, use_tier=False)
            m = hit.metrics
            assert m.cached_tokens == (16 if len(copies) == 2 else 8)
            n = m.computed_tokens
            torch.testing.assert_close(hit.logits, full.logits[-n:], atol=2e-2, rtol=1e-2)

    run(body)


@pytest.mark.parametrize("layout", [Layout.LKHTD, Layout.LKTHD])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_gpu_host_mirror_path_gives_the_recompute(
    tmp_path: Path, layout: Layout, dtype: str
) -> None:
    """The GPU path of cache building, run on the CPU (`_host_mirror`; on a GPU the mirror is
    pinned): blocks are put as they are into a host mirror in the tier's layout and dtype, and
    each layer is converted into the cache by `upload` before it runs. Local hits (the pass
    waiting per layer, or after every block) and a cross-region layer-wise hit (parts, the
    pass running meanwhile) give the logits of a recompute, in both layouts; the mirror goes
    back to the pool."""

    async def body() -> None:
        async with kv_env(tmp_path) as env:
            model = tiny_model()
            east, _ = await engine_in(env, "us-east", dtype=dtype, model=model, layout=layout)
            west, _ = await engine_in(env, "eu-west", dtype=dtype, model=model, layout=layout)
            # (and one that loads every block before the pass: `finish` uploads)
            whole, _ = await engine_in(
                env, "us-east", dtype=dtype, model=model, layout=layout, layerwise=False
            )
            for eng in (east, west, whole):
                eng._host_mirror = True
            await east.complete(PROMPT, SamplingParams(max_tokens=1))
            await east.flush()
            tol = 1e-5 if dtype == "float32" else 2e-2
            for eng, choice in ((east, "local"), (west, "remote"), (whole, "local")):
                hit = await eng.prefill(PROMPT, all_logits=True)
                full = await eng.prefill(PROMPT, all_logits=True, use_tier=False)
                assert hit.metrics.cached_tokens == 16 and hit.metrics.choice == choice
                assert hit.metrics.convert_s > 0
                torch.testing.assert_close(hit.logits, full.logits[-1:], atol=tol, rtol=tol)
                for a, b in zip(hit.cache.layers, full.cache.layers, strict=True):
                    torch.testing.assert_close(a.keys, b.keys, atol=tol, rtol=tol)
                    torch.testing.assert_close(a.values, b.values, atol=tol, rtol=tol)
                assert len(eng._hosts) == 1 and eng._hosts[0].dtype == eng.spec.torch_dtype

    run(body)


def test_buffer_pool_hands_out_the_smallest_that_fits_and_keeps_two() -> None:
    """Two freed buffers of different sizes, the smaller one leased: `list.remove` compared
    the larger with it element by element and raised; the pool takes it by position."""
    made: list[int] = []

    def make(n: int) -> torch.Tensor:
        made.append(n)
        return torch.zeros(n)

    pool = _BufferPool(make)
    a, b, c = pool.lease(10), pool.lease(20), pool.lease(30)
    for t in (a, b, c):
        pool.give_back(t)
    assert [t.numel() for t in pool] == [30, 20]  # the two largest kept
    assert pool.lease(5) is b and pool.lease(25) is c and len(pool) == 0
    assert pool.lease(1).numel() == 1 and made == [10, 20, 30, 1]
