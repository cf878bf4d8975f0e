"""Malformed input, fuzzed with hypothesis: the gRPC request decoders and the cluster-file parser.

Every METHODS request type gets random bytes: decoding either yields a message or raises
InvalidArgument, never anything else; over the wire, bytes that do not decode are answered
INVALID_ARGUMENT (with the ``k2-error`` trailer) and write nothing; on a secured node, random
bytes without credentials are answered UNAUTHENTICATED, whatever they are. The cluster-file
parser, given random TOML-shaped structures or mutations of a valid file, either succeeds or
raises ClusterFileError.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2store import cluster as cluster_mod
from k2store.certs import channel_credentials, secure_cluster
from k2store.cluster import ClusterConfig, local_cluster
from k2store.errors import ERROR_METADATA_KEY, ClusterFileError, InvalidArgument
from k2store.launcher import free_ports
from k2store.memengine import MemoryEngine
from k2store.node import Node
from k2store.service import METHODS, Method, decode_request
from truetime import ManualClock, SystemClock

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _decodes(method: Method, data: bytes) -> bool:
    try:
        decode_request(method, data)
    except InvalidArgument:
        return False
    return True


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.path)
@FUZZ
@given(data=st.binary(max_size=512))
def test_decoders_yield_a_message_or_invalid_argument(method: Method, data: bytes) -> None:
    try:
        msg = decode_request(method, data)
    except InvalidArgument as e:
        assert method.request.DESCRIPTOR.name in str(e)
    else:
        assert isinstance(msg, method.request)


class BackgroundNode:
    """One node serving from an event loop on a thread, so sync hypothesis tests can call it."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.node: Node = self._run(self._start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _start(self) -> Node:
        name = self.cfg.nodes[0].name
        node = Node(self.cfg, name, clock=ManualClock(), engine_factory=lambda _: MemoryEngine())
        await node.start()
        return node

    def writes(self) -> tuple[int, int]:
        leaders = self.node.leaders.values()
        return (
            sum(ld.counters.writes for ld in leaders),
            sum(ld.store.key_count_estimate() for ld in leaders),
        )

    def close(self) -> None:
        self._run(self.node.stop(grace_s=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def _one_node(root: Path) -> ClusterConfig:
    return local_cluster(["us-east"], free_ports(1), root=root).write(root / "cluster.toml")


@pytest.fixture(scope="module")
def plain_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundNode]:
    n = BackgroundNode(_one_node(tmp_path_factory.mktemp("plain")))
    yield n
    n.close()


@pytest.fixture(scope="module")
def secure_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundNode]:
    root = tmp_path_factory.mktemp("secure")
    secure_cluster(_one_node(root), now_ns=SystemClock().now_ns())
    n = BackgroundNode(cluster_mod.load(root / "cluster.toml"))
    yield n
    n.close()


def _call(channel: grpc.Channel, path: str, data: bytes) -> grpc.RpcError | None:
    stub: Any = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        stub(data, timeout=5)
    except grpc.RpcError as e:
        return e
    return None


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.path)
@FUZZ
@given(data=st.binary(min_size=1, max_size=256))
def test_malformed_requests_get_invalid_argument_and_write_nothing(
    plain_node: BackgroundNode, method: Method, data: bytes
) -> None:
    if _decodes(method, data):
        return  # a well-formed request: its handler's own business, not this test's
    before = plain_node.writes()
    with grpc.insecure_channel(plain_node.cfg.nodes[0].address) as ch:
        err = _call(ch, method.path, data)
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.trailing_metadata() or ())[ERROR_METADATA_KEY] == "invalid-argument"
    assert plain_node.writes() == before


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.path)
@settings(FUZZ, max_examples=15)
@given(data=st.binary(max_size=256))
def test_random_requests_without_credentials_are_unauthenticated(
    secure_node: BackgroundNode, method: Method, data: bytes
) -> None:
    cfg = secure_node.cfg
    before = secure_node.writes()
    creds = channel_credentials(cfg.settings.security, None)
    with grpc.secure_channel(cfg.nodes[0].address, creds) as ch:
        err = _call(ch, method.path, data)
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert secure_node.writes() == before


# -- the cluster-file parser --------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "us-east", "us-east-1", "127.0.0.1:7001", "range", "hash", "x/y"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["name", "id", "tls"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)
SECTIONS = ["cluster", "regions", "nodes", "shards", "txn", "network", "replication", "security"]


def _valid() -> dict[str, Any]:
    raw = tomllib.loads(
        local_cluster(["us-east", "eu-west"], [7001, 7002], root=Path("/x")).to_toml()
    )
    raw["security"] = {"tls": False, "rate_limit_rps": 5.0}
    return raw


def _parse(raw: Any) -> None:
    with contextlib.suppress(ClusterFileError):
        cluster_mod.parse(raw, path=Path("/x/cluster.toml"))


@settings(max_examples=300, deadline=None)
@given(raw=st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=6), VALUES, max_size=6))
def test_cluster_parser_random_structures(raw: dict[str, Any]) -> None:
    _parse(raw)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid cluster file with a few values (at any depth) replaced by random ones."""
    raw = _valid()
    for _ in range(draw(st.integers(1, 3))):
        node: Any = raw
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            k = draw(st.sampled_from(keys))
            child = node[k]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            node[k] = draw(VALUES)
            break
    return raw


@settings(max_examples=400, deadline=None)
@given(raw=mutated())
def test_cluster_parser_mutated_files(raw: dict[str, Any]) -> None:
    _parse(raw)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200) | st.sampled_from(["[security]\ntls = 1", "[[security]]"]))
def test_cluster_file_loader_random_text(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    p = tmp_path_factory.getbasetemp() / "fuzz.toml"
    p.write_text(text)
    with contextlib.suppress(ClusterFileError):
        cluster_mod.load(p)
