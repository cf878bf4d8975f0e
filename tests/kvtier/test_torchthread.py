"""One thread runs a serving process's torch work (kvtier/torchthread.py): model loading, the
engine's forward passes and sampling; frames of non-contiguous block views are packed without a
torch copy on the caller's thread, byte for byte what a contiguous copy gives."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_env import ByteCodec, tiny_model
from kvtier_env import run

from kvtier import engine as engine_mod
from kvtier import models, torchthread
from kvtier.blocks import BlockSpec, Layout, encode_block, split_blocks
from kvtier.engine import Engine, EngineConfig, SamplingParams


def test_model_loading_runs_on_the_torch_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake(*_a: Any) -> str:
        seen.append(threading.current_thread().name)
        return "loaded"

    monkeypatch.setattr(models, "_load_model", fake)
    got: object = models.load_model(Path("/nonexistent"))
    assert got == "loaded"
    assert seen and seen[0].startswith(torchthread.THREAD_NAME)
    # Called from the torch thread itself it runs inline (no deadlock on the one thread).
    again: object = torchthread.run(models.load_model, Path("/x"))
    assert again == "loaded"


def test_forward_passes_and_sampling_run_on_the_torch_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_model()
    threads: set[str] = set()
    model.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    real_sample = engine_mod._sample

    def sample(*a: Any) -> int:
        threads.add(threading.current_thread().name)
        return real_sample(*a)

    monkeypatch.setattr(engine_mod, "_sample", sample)

    async def body() -> None:
        eng = Engine(model, ByteCodec(), None, config=EngineConfig(block_tokens=4))
        assert eng._torch is torchthread.executor()
        c = await eng.complete([5, 6, 7, 8, 9], SamplingParams(max_tokens=4, stop_at_eos=False))
        assert len(c.token_ids) == 4

    run(body)
    assert threads and all(t.startswith(torchthread.THREAD_NAME) for t in threads), threads


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("layout", [Layout.LKHTD, Layout.LKTHD])
def test_frames_of_block_views_equal_frames_of_contiguous_copies(
    dtype: str, layout: Layout
) -> None:
    spec = BlockSpec(4, 3, 2, 8, dtype, layout)
    kv = torch.randn(spec.shape(12)).to(spec.torch_dtype)
    for i, view in enumerate(split_blocks(spec, kv, 3)):
        h = bytes([i]) * 32
        assert encode_block(spec, view, h) == encode_block(spec, view.contiguous(), h)
