"""Cluster files: every malformed field is named; generated local clusters tile the key space."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from k2store import cluster as cluster_mod
from k2store.cluster import local_cluster
from k2store.errors import ClusterFileError, UnknownNode, UnknownShard

REGIONS = ["us-east", "eu-west", "ap-southeast"]


def _cfg(tmp_path: Path, **kw: int) -> cluster_mod.ClusterConfig:
    npr = kw.get("nodes_per_region", 1)
    return local_cluster(REGIONS, list(range(7000, 7000 + 3 * npr)), root=tmp_path, **kw)


def _raw(tmp_path: Path) -> dict:
    return tomllib.loads(_cfg(tmp_path, nodes_per_region=2, shards_per_region=2).to_toml())


def test_round_trip_through_file(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, nodes_per_region=2, shards_per_region=3).write(tmp_path / "c.toml")
    again = cluster_mod.load(tmp_path / "c.toml")
    assert again.shards == cfg.shards
    assert again.nodes == cfg.nodes
    assert [n.data_dir for n in again.nodes] == [tmp_path.resolve() / n.name for n in again.nodes]


@pytest.mark.parametrize("shards_per_region", [1, 2, 5])
def test_local_cluster_homes_region_prefixes_in_their_region(
    tmp_path: Path, shards_per_region: int
) -> None:
    cfg = _cfg(tmp_path, nodes_per_region=2, shards_per_region=shards_per_region)
    for r in REGIONS:
        for suffix in [b"", b"a", b"\x00", b"\xff\xff", b"session/42"]:
            shard = cfg.shard_for_key(r.encode() + b"/" + suffix)
            assert shard.home_region == r
            assert cfg.node(shard.leader).region == r
    # Both nodes of a region lead something when the region has several shards.
    if shards_per_region > 1:
        assert {s.leader for s in cfg.shards if s.home_region == "eu-west"} == {
            "eu-west-1",
            "eu-west-2",
        }


@given(st.binary(max_size=24))
def test_every_key_has_exactly_one_range_shard(key: bytes) -> None:
    cfg = local_cluster(REGIONS, [1, 2, 3], root=Path("/tmp/k2-prop"), shards_per_region=3)
    owners = [s for s in cfg.shards if s.contains(key)]
    assert len(owners) == 1
    assert cfg.shard_for_key(key) == owners[0]
    assert owners[0] in cfg.shards_for_range(key, key + b"\x00")


def test_hash_partitioning_is_stable_and_spreads(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["cluster"]["partitioning"] = "hash"
    for s in raw["shards"]:
        s.pop("start", None), s.pop("end", None), s.pop("start_hex", None), s.pop("end_hex", None)
    cfg = cluster_mod.parse(raw)
    owners = {cfg.shard_for_key(f"k{i}".encode()).id for i in range(200)}
    assert len(owners) == len(cfg.shards)
    # Fixed expectation: blake2b is stable across processes (Python's hash() would not be).
    assert cfg.shard_for_key(b"k0").id == cfg.shard_for_key(b"k0").id
    assert len(cfg.shards_for_range(b"a", b"b")) == len(cfg.shards)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["nodes"][1].update(address="localhost"), "nodes[1].address"),
        (lambda r: r["nodes"][1].update(address="127.0.0.1:99999"), "nodes[1].address"),
        (lambda r: r["nodes"][2].pop("name"), "nodes[2].name"),
        (lambda r: r["nodes"][3].update(name=r["nodes"][0]["name"]), "nodes[3].name"),
        (lambda r: r["nodes"][0].update(region="mars"), "nodes[0].region"),
        (lambda r: r["nodes"][0].update(colour="red"), "nodes[0].colour"),
        (lambda r: r["regions"][0].update(oracle="eu-west-1"), "regions[0].oracle"),
        (lambda r: r["shards"][2].update(leader="nobody"), "shards[2].leader"),
        (
            lambda r: r["shards"][2].update(home_region="eu-west", leader="us-east-1"),
            "shards[2].leader",
        ),
        (lambda r: r["shards"][1].update(id=r["shards"][0]["id"]), "shards[1].id"),
        (lambda r: r["shards"][1].update(id=-1), "shards[1].id"),
        (lambda r: r["shards"].pop(3), "shards"),
        (lambda r: r["shards"][0].update(start="a"), "shards"),
        (lambda r: r["shards"][4].update(end_hex="zz"), "shards[4].end"),
        (lambda r: r["cluster"].update(epsilon_us="400"), "cluster.epsilon_us"),
        (lambda r: r["cluster"].update(epsilon_us=-5), "cluster.epsilon_us"),
        (lambda r: r["cluster"].update(partitioning="round-robin"), "cluster.partitioning"),
        (lambda r: r["cluster"].update(max_uncertainty_us=10), "cluster.max_uncertainty_us"),
        # No batch could ever be used: each lifetime must exceed the coordinator's margin.
        (lambda r: r["cluster"].update(oracle_local_ttl_us=100), "cluster.oracle_local_ttl_us"),
        (lambda r: r["cluster"].update(oracle_ttl_us=50), "cluster.oracle_ttl_us"),
        (lambda r: r.update(extra={}), "extra"),
        (lambda r: r.update(shards=[]), "shards"),
        (lambda r: r.update(nodes={"a": 1}), "nodes"),
    ],
)
def test_malformed_cluster_file_names_the_field(tmp_path: Path, mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    raw = _raw(tmp_path)
    mutate(raw)
    with pytest.raises(ClusterFileError) as e:
        cluster_mod.parse(raw, path=tmp_path / "c.toml")
    assert f"{field}" in str(e.value)
    assert str(tmp_path / "c.toml") in str(e.value)


def test_unreadable_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ClusterFileError, match="no such cluster file"):
        cluster_mod.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster\nname=")
    with pytest.raises(ClusterFileError, match="not valid TOML"):
        cluster_mod.load(bad)


def test_lookups_raise_typed_errors(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(UnknownNode, match="us-east-9"):
        cfg.node("us-east-9")
    with pytest.raises(UnknownShard, match="999"):
        cfg.shard(999)


def test_local_cluster_rejects_bad_region_names(tmp_path: Path) -> None:
    with pytest.raises(ClusterFileError, match="duplicate"):
        local_cluster(["a", "a"], [1, 2], root=tmp_path)
    with pytest.raises(ClusterFileError, match="region name"):
        local_cluster(["a/b"], [1], root=tmp_path)


def test_cluster_status_warns_of_clients_whose_clocks_read_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A node counts the transactions whose client (with client time) sent a reading ahead of
    # its clock (StatusResponse.client_clock_ahead); `k2 cluster status` names the node.
    from k2store import launcher
    from k2store.cli import main

    cfg = _cfg(tmp_path)
    path = cfg.write(tmp_path / "cluster.toml").path
    assert path is not None
    rows = [
        launcher.NodeStatus(n.name, n.region, n.address, True, pid=1, client_clock_ahead=i * 7)
        for i, n in enumerate(cfg.nodes)
    ]
    monkeypatch.setattr(launcher, "status", lambda cfg: rows)
    assert main(["cluster", "status", "--cluster", str(path)]) == 0
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert warned == [
        f"WARNING {r.name}: {r.client_clock_ahead} transactions came from clients whose clocks "
        "read ahead of this node's (client time); their commit-waits stayed at the node. Check "
        "those hosts' clock synchronisation."
        for r in rows
        if r.client_clock_ahead
    ]
    assert len(warned) == len(rows) - 1
