"""`k2 bench etcd` (k2store/bench/etcd.py): its HTTP gateway client against a scripted server,
the links it asks the proxy for, its report; and (slow) a `--quick` run against a real etcd
cluster, skipped where the etcd binary is absent (CI installs Debian's etcd-server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from k2store.bench import etcd as bench
from k2store.cli import main
from k2store.cluster import DEFAULT_REGIONS
from k2store.errors import InvalidArgument
from k2store.wan import NetworkSettings


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await fn()

    asyncio.run(bounded())


async def _scripted_server(
    replies: list[bytes], seen: list[bytes]
) -> tuple[asyncio.Server, list[int]]:
    """Answers each request (head and Content-Length body) with the next reply; a reply of
    b"" closes the connection instead. Counts connections."""
    conns = [0]

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns[0] += 1
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                seen.append(head + await r.readexactly(length))
                reply = replies.pop(0)
                if not reply:
                    return
                w.write(reply)
                await w.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), conns


def _ok(body: dict[str, object], *, chunked: bool = False) -> bytes:
    data = json.dumps(body).encode()
    if chunked:
        half = len(data) // 2
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{half:x}\r\n".encode()
            + data[:half]
            + f"\r\n{len(data) - half:x}\r\n".encode()
            + data[half:]
            + b"\r\n0\r\n\r\n"
        )
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


def test_the_gateway_reads_base64_values_over_one_connection() -> None:
    async def main_() -> None:
        seen: list[bytes] = []
        replies = [
            _ok({"kvs": [{"key": "YQ==", "value": "aGVsbG8="}], "count": "1"}),
            _ok({"kvs": [{"key": "YQ==", "value": "aGVsbG8="}]}, chunked=True),
            _ok({"header": {}}),  # no kvs: the key is absent
        ]
        server, conns = await _scripted_server(replies, seen)
        async with server:
            g = bench.EtcdGateway(server.sockets[0].getsockname()[1])
            assert await g.range(b"a") == b"hello"
            assert await g.range(b"a", serializable=True) == b"hello"
            assert await g.range(b"a") is None
            await g.close()
        assert conns[0] == 1
        bodies = [json.loads(s.split(b"\r\n\r\n", 1)[1]) for s in seen]
        assert bodies[0] == {"key": "YQ=="}
        assert bodies[1] == {"key": "YQ==", "serializable": True}
        assert seen[0].startswith(b"POST /v3/kv/range HTTP/1.1\r\n")

    _run(main_)


def test_the_gateway_redials_a_connection_the_server_closed_and_reports_errors() -> None:
    async def main_() -> None:
        seen: list[bytes] = []
        error = {"error": "etcdserver: request timed out", "code": 14}
        replies = [_ok({}), b"", _ok({"kvs": []}), _ok(error)]
        server, conns = await _scripted_server(replies, seen)
        async with server:
            g = bench.EtcdGateway(server.sockets[0].getsockname()[1])
            await g.put(b"k", b"v")
            assert await g.range(b"k") is None  # the kept-alive connection was closed: redial
            with pytest.raises(bench.EtcdError, match="request timed out"):
                await g.range(b"k")
            await g.close()
        assert conns[0] == 2

    _run(main_)


def test_the_gateway_gives_up_on_a_port_nobody_serves() -> None:
    async def main_() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        g = bench.EtcdGateway(port, timeout_s=2)
        with pytest.raises(bench.EtcdError, match=f"127.0.0.1:{port}"):
            await g.range(b"k")

    _run(main_)


def test_peer_links_charge_each_sender_its_own_rtt(tmp_path: Path) -> None:
    net = NetworkSettings(enabled=True)
    c = bench.EtcdCluster("etcd", DEFAULT_REGIONS, net, tmp_path)
    spec = c.link_spec()
    links = {link["name"]: link for link in spec["links"]}
    into_ap = links["peers -> ap-southeast"]
    m = c.members
    assert into_ap["target_port"] == m["ap-southeast"].peer_port
    assert into_ap["listen_port"] == m["ap-southeast"].peer_link_port
    assert into_ap["route_header"] == "X-PeerURLs"
    assert into_ap["routes"] == {m["us-east"].peer_url: 105.0, m["eu-west"].peer_url: 80.0}
    assert into_ap["one_way_ms"] == 105.0  # a request naming no sender: the longest link
    local = links["clients in eu-west -> eu-west"]
    assert local["one_way_ms"] == net.intra_region_rtt_ms / 2
    assert local["target_port"] == m["eu-west"].client_port
    cmd = c.member_command(m["eu-west"], "tok")
    assert f"--initial-advertise-peer-urls={m['eu-west'].peer_url}" in cmd
    assert f"--advertise-client-urls=http://127.0.0.1:{m['eu-west'].client_link_port}" in cmd
    assert all("127.0.0.1" in a for a in cmd if "-urls=" in a or "cluster=" in a)


def _result(region: str, rtt: float, lin: float, replica: float) -> bench.RegionResult:
    lat = {k: bench.KindLatency.of([5.0, 6.0], 0) for k in bench.KINDS}
    lat["etcd-linearizable"] = bench.KindLatency.of([lin], 0)
    lat["k2-replica"] = bench.KindLatency.of([replica], 1, "Unavailable: node down")
    return bench.RegionResult(region, rtt, lat)


def test_the_report_judges_the_margin_against_the_rtt_to_the_leader(tmp_path: Path) -> None:
    run = bench.EtcdRun(
        bench.EtcdBenchConfig.quick(),
        "3.4.23",
        list(DEFAULT_REGIONS),
        "us-east",
        "eu-west",
        NetworkSettings(enabled=True),
        results=[
            _result("us-east", 1.0, 80.0, 5.0),
            _result("eu-west", 75.0, 150.0, 80.0),  # margin 70 < 75
        ],
        leader_after="us-east",
    )
    assert [r.target_met for r in run.results] == [True, False]
    text = bench.format_run(run)
    assert "leader us-east (moved from eu-west)" in text
    assert "PASS (75.0 vs 1)" in text and "FAIL (70.0 vs 75)" in text
    assert "target met in 1 of 2 regions" in text
    assert "us-east k2-replica: 1 (Unavailable: node down)" in text
    json_path, _ = bench.write_results(run, tmp_path)
    doc = json.loads(json_path.read_text())
    assert doc["all_targets_met"] is False
    assert doc["results"][1]["margin_ms"] == 70.0
    assert doc["network"]["rtt_ms"]["us-east<->ap-southeast"] == 210.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="etcd-leader"):
        bench.EtcdBenchConfig(etcd_leader="mars").validate(DEFAULT_REGIONS)
    with pytest.raises(InvalidArgument, match="election-ms"):
        bench.EtcdBenchConfig(election_ms=100).validate(DEFAULT_REGIONS)
    assert main(["bench", "etcd", "--reads", "0"]) == 2


@pytest.mark.slow
def test_bench_etcd_quick(tmp_path: Path) -> None:
    if bench.find_etcd() is None:
        pytest.skip("etcd binary not found: apt-get install etcd-server (CI does, as root)")
    rc = main(["bench", "etcd", "--quick", "--reads", "8", "--out", str(tmp_path)])
    assert rc == 0
    (out,) = tmp_path.glob("etcd-*.json")
    doc = json.loads(out.read_text())
    assert doc["leader"] == doc["leader_after"] == "us-east"
    rows = {r["region"]: r for r in doc["results"]}
    assert set(rows) == set(DEFAULT_REGIONS)
    for region, r in rows.items():
        for kind in bench.KINDS:
            assert r["latency"][kind]["count"] >= 4, (region, kind, r["latency"][kind])
        # The emulated links are really there: a follower's linearizable read pays at least
        # its round trip to the leader, and a serializable read stays in the region.
        lin = r["latency"]["etcd-linearizable"]["p50_ms"]
        assert lin >= r["rtt_to_leader_ms"], (region, lin)
        assert r["latency"]["etcd-serializable"]["p50_ms"] < 60
    assert rows["ap-southeast"]["rtt_to_leader_ms"] == 210.0
    assert doc["all_targets_met"], doc["results"]
    # Every member's raft streams were told apart by sender.
    peers = {k: v for k, v in doc["links"].items() if k.startswith("peers")}
    assert all(sum(k.startswith("http://") for k in v["routed"]) == 2 for v in peers.values())
