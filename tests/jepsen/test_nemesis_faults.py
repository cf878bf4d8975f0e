"""The nemesis's fault shapes and the node hooks they rely on, without processes: the
majorities ring, the clock skew file as a node sees it, and the refusal of the unsafe clock
setting."""

from __future__ import annotations

import itertools
import logging
import tomllib
from pathlib import Path

import pytest

from jepsen_tests.nemesis import FAULTS, majorities_ring, parse_nemesis, ring_cuts
from jepsen_tests.runner import RunOptions, cluster_settings
from k2store import cluster as cluster_mod
from k2store import launcher
from k2store.cluster import UNSAFE_ENV, local_cluster
from k2store.errors import ClusterFileError
from k2store.node import ClockWatch
from k2store.wan import LinkModel, NetworkSettings
from truetime import ClockSkew, ManualClock, SkewedClock, TrueTime
from truetime.skew import write_clock_skews

MS = 1_000_000


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_majorities_ring_gives_every_node_a_majority_and_no_two_the_same(n: int) -> None:
    ring = [f"n{i}" for i in range(n)]
    views = majorities_ring(ring)
    majority = n // 2 + 1
    for name, heard in views.items():
        assert name in heard
        assert len(heard) == majority
    assert len(set(views.values())) == n, "two nodes hear the same majority"


def test_majorities_ring_of_five_is_each_node_and_its_neighbours() -> None:
    views = majorities_ring(["a", "b", "c", "d", "e"])
    assert views["a"] == {"e", "a", "b"}
    assert views["c"] == {"b", "c", "d"}


@pytest.mark.parametrize("n", [3, 5])
def test_ring_cuts_stop_exactly_what_a_node_does_not_hear(n: int) -> None:
    ring = [f"n{i}" for i in range(n)]
    views = majorities_ring(ring)
    model = LinkModel(NetworkSettings(), ring_cuts(views))
    for src, dst in itertools.permutations(ring, 2):
        cut = model.cut_rule("r", "r", src, dst)
        assert (cut is None) == (src in views[dst]), (src, dst, cut)


def test_clock_is_a_fault_and_part_of_all() -> None:
    assert "clock" in FAULTS
    assert "clock" in parse_nemesis("all")
    assert parse_nemesis("clock,kill") == ["clock", "kill"]
    with pytest.raises(ValueError, match="unknown nemesis"):
        parse_nemesis("clock,bogus")


def test_clock_watch_applies_the_node_entry_only_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = ManualClock()
    clock = SkewedClock(base, reported=True)
    path = tmp_path / "clock.toml"
    watch = ClockWatch(path, "eu-west-1", "eu-west", clock)
    watch.poll()
    assert clock.skew_ns() == 0
    write_clock_skews(path, {"eu-west": ClockSkew(-7 * MS, 1_000.0)})
    watch.poll()
    assert clock.skew_ns() == -7 * MS
    base.advance(1_000 * MS)
    assert clock.skew_ns() == -6 * MS
    # Another node's entry changes the file but not this node's skew: its drift runs on.
    write_clock_skews(path, {"eu-west": ClockSkew(-7 * MS, 1_000.0), "us-east-1": ClockSkew(1)})
    watch.poll()
    assert clock.skew_ns() == -6 * MS
    path.write_text("[skew.eu-west-1]\noffset_ms = 'x'\n")
    with caplog.at_level(logging.WARNING, logger="k2.node"):
        watch.poll()
    assert "ignoring clock skew file" in caplog.text
    assert clock.skew_ns() == -6 * MS
    path.unlink()
    watch.poll()
    assert clock.skew_ns() == 0
    tt = TrueTime(clock, 400_000, 5 * MS)
    tt.check()


def _cluster_file(tmp_path: Path, extra: str) -> Path:
    cfg = local_cluster(["us-east", "eu-west"], [7101, 7102], root=tmp_path)
    text = cfg.to_toml().replace("[cluster]\n", f"[cluster]\n{extra}\n", 1)
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def test_ignoring_the_clock_bound_is_refused_unless_testing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _cluster_file(tmp_path, "unsafe_ignore_clock_bound = true")
    monkeypatch.delenv(UNSAFE_ENV, raising=False)
    with pytest.raises(ClusterFileError, match=r"cluster\.unsafe_ignore_clock_bound.*refused"):
        cluster_mod.load(path)
    monkeypatch.setenv(UNSAFE_ENV, "1")
    cfg = cluster_mod.load(path)
    assert cfg.settings.unsafe_ignore_clock_bound
    assert "unsafe_ignore_clock_bound = true" in cfg.to_toml()
    assert cluster_mod.parse(tomllib.loads(cfg.to_toml())).settings.unsafe_ignore_clock_bound


def test_the_clock_setting_must_be_a_bool(tmp_path: Path) -> None:
    path = _cluster_file(tmp_path, "unsafe_ignore_clock_bound = 1")
    with pytest.raises(ClusterFileError, match="expected true or false"):
        cluster_mod.load(path)


def test_a_default_cluster_file_says_nothing_about_the_clock_setting(tmp_path: Path) -> None:
    cfg = local_cluster(["us-east"], [7103], root=tmp_path)
    assert "unsafe_ignore_clock_bound" not in cfg.to_toml()


def test_runner_settings_carry_the_clock_bounds_and_the_unsafe_flag() -> None:
    st = cluster_settings(
        "k2-mvto",
        ("cluster.unsafe_ignore_clock_bound", "txn.unsafe_skip_commit_wait"),
        epsilon_us=300_000,
        max_uncertainty_us=600_000,
    )
    assert st.unsafe_ignore_clock_bound and st.txn.unsafe_skip_commit_wait
    assert (st.epsilon_us, st.max_uncertainty_us) == (300_000, 600_000)
    with pytest.raises(ValueError, match="unknown unsafe setting"):
        cluster_settings("k2-mvto", ("cluster.epsilon_us",))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"skew": (("mars", 1.0),)}, "not a node or region"),
        ({"max_uncertainty_us": 100}, "at least epsilon"),
        ({"epsilon_us": 0}, "must be positive"),
        ({"unsafe": ("txn.not_a_setting",)}, "unknown unsafe setting"),
    ],
)
def test_run_options_refuse_bad_clock_options(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RunOptions(**kw).validate()  # type: ignore[arg-type]


def test_launcher_refuses_skews_for_unknown_names(tmp_path: Path) -> None:
    cfg = local_cluster(["us-east"], [7104], root=tmp_path)
    with pytest.raises(ClusterFileError, match="unknown region or node 'mars'"):
        launcher.write_clock_skews(cfg, {"mars": ClockSkew(1)})
    launcher.write_clock_skews(cfg, {"us-east-1": ClockSkew(1)})
    assert launcher.clock_skews_path(cfg).exists()
    launcher.write_clock_skews(cfg, {})
    assert not launcher.clock_skews_path(cfg).exists()
