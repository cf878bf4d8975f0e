"""`k2 bench engine` end to end on a tiny random Llama (the real model's figures are in
docs/benchmarks.md; this checks the benchmark itself works)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from engine_env import ByteCodec, tiny_model

from kvtier import enginebench


@pytest.mark.slow
def test_bench_engine_quick_on_a_tiny_model(tmp_path: Path) -> None:
    """The engine benchmark end to end (cluster processes, block stores, both serving nodes)
    on a tiny random Llama: every hit serves the whole prefix (the benchmark asserts it), each
    row has its three measurements, and the plot is drawn."""
    loaded = types.SimpleNamespace(
        model=tiny_model(), tokenizer=ByteCodec(), revision="tiny@smoke", name="tiny"
    )
    result = enginebench.run_bench([64, 128], reps=2, loaded=loaded, data=tmp_path / "c")
    assert [r["prefix_tokens"] for r in result["rows"]] == [64, 128]
    for r in result["rows"]:
        assert len(r["local_samples_s"]) == len(r["remote_samples_s"]) == 2
        assert r["recompute_ttft_s"] > 0 and r["local_hit_ttft_s"] > 0
        # A tiny model recomputes faster than a wide-area round trip: the cost model may
        # choose to recompute, and then nothing crosses the link ("miss": eu-west's replica of
        # the block rows did not show them yet).
        assert r["remote_choice"] in ("remote", "recompute", "miss")
        assert (r["remote_bytes_moved"] > 0) == (r["remote_choice"] == "remote")
    assert result["targets_met"] is None  # no row at the target length
    assert enginebench.plot(result, tmp_path / "engine.png")
    assert (tmp_path / "engine.png").stat().st_size > 0


@pytest.mark.slow
def test_crossover_shows_where_fetching_stops_paying(tmp_path: Path) -> None:
    """`k2 bench engine --rtts` on a tiny random Llama: the link change reaches the fetches (a
    3 s round trip makes fetching take seconds), recomputing a tiny model's prompt takes
    milliseconds, and the cost model, which samples the link's round trip, stops fetching
    there; the summary and the plot say so."""
    loaded = types.SimpleNamespace(
        model=tiny_model(), tokenizer=ByteCodec(), revision="tiny@smoke", name="tiny"
    )
    result = enginebench.run_crossover([64], [3000], reps=1, loaded=loaded, data=tmp_path / "c")
    (row,) = result["rows"]
    assert row["fetch_ttft_s"] > 3.0 and row["fetch_bytes_moved"] > 0
    assert row["recompute_ttft_s"] < 1.0 and row["best"] == "recompute"
    assert row["model_cached_tokens"] < 64 and row["model_ttft_s"] < 1.0
    assert result["crossover"]["64"] == {
        "fetch_loses_from_ms": 3000,
        "model_stops_fetching_from_ms": 3000,
    }
    assert enginebench.plot_crossover(result, tmp_path / "cross.png")
