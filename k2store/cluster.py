"""Cluster files: the one description of a K2 cluster that nodes, clients and tools share.

A cluster file is TOML::

    [cluster]
    name = "local"
    partitioning = "range"          # "range" (default) or "hash"
    epsilon_us = 400                # assumed clock error when the clock reports none
    max_uncertainty_us = 5000       # a node refuses to issue timestamps beyond this
    unsafe_ignore_clock_bound = false   # test only (K2_ALLOW_UNSAFE_SETTINGS=1): see below
    oracle_ttl_us = 5000            # K2-TB batch lifetime (fetched over the network)
    oracle_local_ttl_us = 200       # ... and issued to a coordinator on the oracle's node
    max_key_bytes = 4096
    max_value_bytes = 67108864
    request_timeout_s = 10.0

    [[regions]]
    name = "us-east"
    oracle = "us-east-1"            # the node that runs this region's time oracle

    [[nodes]]
    name = "us-east-1"
    region = "us-east"
    address = "127.0.0.1:7001"
    data_dir = "us-east-1"          # relative to the cluster file's directory

    [[shards]]
    id = 0
    start = ""                      # keys are bytes; boundaries are UTF-8 strings, or
    end = "eu-west/"                # start_hex / end_hex for arbitrary bytes; no end = unbounded
    home_region = "us-east"
    leader = "us-east-1"

    [network]                       # wide-area emulation (k2store/wan.py); off if absent
    enabled = true
    intra_region_rtt_ms = 1.0
    jitter_ms = 0.0
    bandwidth_mbit = 1000.0         # per inter-region link and direction; 0 = unlimited

    [network.rtt_ms]                # round trips per region pair (DESIGN.md's by default)
    us-east = { eu-west = 75.0, ap-southeast = 210.0 }

    [security]                      # off if absent; `k2 certs init` writes it (k2store/security.py)
    tls = true                      # mutual TLS between nodes; TLS + bearer tokens for clients
    ca_file = "certs/ca.pem"
    certs_dir = "certs"             # certs/<node>.pem and certs/<node>.key
    client_cert = "certs/client.pem"
    client_key = "certs/client.key"
    client_token_file = "certs/tokens/operator.token"   # tools' token when K2_TOKEN is unset
    rate_limit_rps = 0.0            # per principal; 0 = unlimited
    allow_test_settings = false     # admin RPCs that break guarantees on purpose

    [[security.principals]]         # keys under <region>/t/<tenant>/, or `prefixes`
    name = "acme"
    tenant = "acme"
    token_sha256 = "..."            # SHA-256 of the token, never the token
    roles = []                      # ["admin"]: every key and the admin RPCs

Range shards must tile the key space exactly (sorted, no gaps, no overlap, first starts at b"",
last unbounded) so that every key has exactly one shard. Hash shards need no bounds: a key belongs
to shard ``blake2b(key) mod n`` (stable across processes; never Python's ``hash()``).

Every error names the file and the field (``shards[2].leader: node 'x' is not in [[nodes]]``).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from k2store.errors import ClusterFileError, UnknownNode, UnknownShard
from k2store.security import SecuritySettings, parse_security, security_to_toml
from k2store.wan import NetworkSettings, network_to_toml, parse_network
from truetime import SAFETY_MARGIN_NS

DEFAULT_REGIONS = ("us-east", "eu-west", "ap-southeast")
TXN_PROTOCOLS = ("k2-mvto", "d2pl-ttc", "mvto-hlc")


@dataclass(frozen=True, slots=True)
class RegionConfig:
    name: str
    oracle: str
    """Name of the node that serves this region's K2-TB timestamp batches."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    region: str
    address: str
    """host:port the node serves gRPC on (loopback for local clusters)."""
    data_dir: Path
    """Absolute; relative paths in the file are resolved against the file's directory."""


@dataclass(frozen=True, slots=True)
class ShardConfig:
    id: int
    start: bytes
    end: bytes | None
    """Exclusive; None means unbounded. Unused (None) under hash partitioning."""
    home_region: str
    leader: str

    def contains(self, key: bytes) -> bool:
        return self.start <= key and (self.end is None or key < self.end)


@dataclass(frozen=True, slots=True)
class TxnSettings:
    """Transaction protocol and its knobs: the `[txn]` table of a cluster file.

    The refinement switches exist for the ablation benchmark.
    """

    protocol: str = "k2-mvto"
    """k2-mvto (default), or a baseline: d2pl-ttc (Spanner-like 2PL + 2PC + commit-wait) or
    mvto-hlc (MVTO on hybrid logical clocks with uncertainty restarts, CockroachDB-like)."""

    wait_for_lower: bool = True
    """Wait on an intent of a lower-timestamp transaction instead of aborting (refinement)."""
    one_shot: bool = True
    """Send independent operations to their shards in one parallel round (refinement)."""
    record_at_home: bool = True
    """Keep the record on the shard of the first written key (refinement); else on a shard led
    by the coordinator, wherever the transaction writes."""
    async_resolve: bool = True
    """Acknowledge the commit before resolving intents (refinement, with record_at_home)."""
    early_resolve: bool = True
    """K2-MVTO: resolve a transaction's intents as soon as its record is durable, and
    commit-wait only the reply, instead of holding the intents through the commit-wait as
    Spanner holds its locks. Every read that hands a version to a client already waits until
    the version's timestamp has certainly passed (a read-write transaction commit-waits its own
    larger timestamp, a read-only one the newest version it returned; replica reads serve sealed
    timestamps only), so real-time order holds; a hot row is held the commit-wait less per
    writer (refinement; Coordinator._commit, Participant._commit_here)."""
    future_ts: bool = True
    """Transactions that declare keys of other regions get ts = now().latest + the largest
    measured one-way delay to their leaders, and each operation is held back to reach its
    leader at about ts (refinement: aligned dispatch)."""
    late_stamping: bool = True
    """Local transactions take their timestamp when their first operation is dispatched, not at
    begin, so the time between stamping and arriving at the leader, in which a later reader of
    the same key can overtake a write, is as short as it can be (refinement)."""
    wait_places: bool = True
    """A request that waits holds a place in line on every key it still has to write (while the
    line is short), so a later reader queues there instead of read-marking the key under the
    waiting write (refinement; `Participant.exec`, `PLACE_MAX_LINE`)."""
    for_update: bool = True
    """Reads marked for update (a read-modify-write: `get_many(keys, for_update=True)`) keep
    the transaction's place in the key's line at its leader until it writes the key, so a later
    reader queues behind it there instead of read-marking the key under the coming write
    (refinement; `Participant._reserve`). A read for update of a key already read at a later
    timestamp, or with a newer committed version, fails at once (`MvtoRules.doomed_write`): its
    write could never succeed; so does one of a transaction that may wait on the wide area at
    a key whose line is already full (rule line-full, `Participant._crowded`).
    d2PL-TTC takes the exclusive lock at the read."""
    for_update_hold_s: float = 1.0
    """The longest a for-update place is held without the write arriving (a transaction that
    died or went elsewhere); after it, later transactions go ahead."""
    commit_with_writes: bool = True
    """K2-MVTO and MVTO-HLC: writes wait at the coordinator until the transaction next reads or
    commits. At commit they go first to every shard but one; the last (the farthest, which
    holds the record) gets its writes with the commit folded in, records it once they are laid
    and resolves them at once. A key written from another region is then held one round trip
    less (the Resolve that would follow the commit), and a transaction on one shard commits in
    one request (refinement; d2PL-TTC keeps its write round and two-phase commit)."""
    restamp: bool = True
    """K2-MVTO and MVTO-HLC: a transaction's first request, when it goes to one shard (no
    scans), may be restamped by that shard's leader instead of aborted: where a rule would
    abort it (read-mark, newer-version; uncertainty under MVTO-HLC) the leader drops what the
    request laid there, takes a fresh timestamp above the conflict from its own node (K2-MVTO:
    just above it, from the node's restamp slot; MVTO-HLC: its clock's next; see
    `Coordinator.restamp_timestamp`) and runs the request again, at most `MAX_RESTAMPS` times
    (CockroachDB's server-side retry of a transaction's first batch). The client has seen
    nothing of the transaction yet, so this is the retry it would make, without the round
    trip, the backoff and the loss of its place. Counted apart from aborts (`restamps` in a
    node's counters and the benchmarks' reports) (refinement; `Participant._exec`)."""
    unsafe_skip_commit_wait: bool = False
    """BREAKS real-time order, for proving the checkers (jepsen_tests) catch it: acknowledge
    commits without commit-wait. Refused unless K2_ALLOW_UNSAFE_SETTINGS=1."""
    unsafe_ignore_read_marks: bool = False
    """BREAKS serializability, for the checkers: writes skip the read-mark rule. Refused unless
    K2_ALLOW_UNSAFE_SETTINGS=1."""
    heartbeat_s: float = 1.0
    expiry_s: float = 5.0
    """A pending transaction whose record heard no heartbeat for this long is aborted."""
    push_after_s: float = 0.25
    """How long a waiter waits for a resolution before asking the record itself."""
    client_timeout_s: float = 30.0
    """A coordinator aborts a transaction whose client went silent for this long."""


REPLICATION_POLICIES = ("vcr", "watermark", "closed-ts")


@dataclass(frozen=True, slots=True)
class ReplicationSettings:
    """Log shipping to replicas and visibility control: the `[replication]` table.

    Every shard has one asynchronous replica in each region other than its home (on a node of
    that region); reads at a region's visible timestamp are served there (see replication/)."""

    enabled: bool = True
    policy: str = "vcr"
    """How leaders seal: vcr (K2-VCR epochs), watermark (oldest in-flight write, with a maximum
    transaction lifetime) or closed-ts (a fixed target lag, CockroachDB's closed timestamps)."""
    epoch_ms: float = 100.0
    """K2-VCR epoch length L."""
    grace_ms: float = 25.0
    """How long after an epoch's end its leader still accepts writes into it. Future timestamps
    make writes arrive before their timestamp; the grace covers a local transaction's own
    duration, so it rarely has to retry across an epoch boundary."""
    max_txn_lifetime_ms: float = 1000.0
    """watermark: a transaction older than this cannot write any more (it is refused)."""
    closed_ts_lag_ms: float = 3000.0
    """closed-ts: the target lag (CockroachDB's default is 3 s)."""
    tick_ms: float = 5.0
    """How often leaders step their sealer and nodes recompute their region's visible ts."""
    pull_wait_ms: float = 200.0
    """Long-poll: how long a leader holds a replica's pull when it has nothing new."""
    pull_max_entries: int = 512
    max_log_entries: int = 200_000
    """A leader keeps at most this many log entries; a replica further behind gets a snapshot."""
    unsafe_seal_before_resolve: bool = False
    """BREAKS atomic visibility, for the checkers: seal without waiting for intents. Refused
    unless K2_ALLOW_UNSAFE_SETTINGS=1."""


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    name: str = "k2"
    partitioning: str = "range"
    epsilon_us: int = 400
    """Clock error assumed when the clock source reports no bound of its own."""
    max_uncertainty_us: int = 5_000
    """Above this uncertainty a node refuses to issue timestamps rather than risk order."""
    unsafe_ignore_clock_bound: bool = False
    """BREAKS real-time order, for proving the checkers (jepsen_tests) catch it: the uncertainty
    is epsilon whatever the clock reports, so a node whose clock is known to be off beyond the
    bound (the clock nemesis, truetime/skew.py) keeps serving. Refused unless
    K2_ALLOW_UNSAFE_SETTINGS=1."""
    oracle_ttl_us: int = 5_000
    """Lifetime of a K2-TB batch: timestamps are this far ahead of the oracle's latest, and a
    coordinator must receive and use the batch within it. Commit-wait grows with it; 5 ms leaves
    room for a loaded 2-core machine's scheduling and an occasional fsync of the oracle's
    ceiling (2 ms expired about one batch in ten in `k2 bench txn` here)."""
    oracle_local_ttl_us: int = 200
    """Lifetime of a batch the oracle issues to a coordinator on its own node, which has no
    round trip to cover (at most `oracle_ttl_us`, more than the coordinator's 100 us safety
    margin). Timestamps lead true time by up to the lifetime and every read-write transaction
    commit-waits that lead away, so shorter is faster: a local transaction in the simulator
    (one in-region round trip to the shard leaders, one for the commit record) outlasts the
    2 x epsilon + 200 us it must wait and so never waits, while at 1 ms it waited 0.8 ms and
    K2-MVTO ran at 0.94x MVTO-HLC with one client per region (1.00x at 200 us). Such a batch is
    issued in-line (`BatchClient(fetch_now=...)`), so it cannot lapse on its way, and running
    out only costs another issue; the oracle's durable ceiling is written ahead in a worker
    thread (k2store/datadir.py), so an issue seldom waits for an fsync (the first after a start
    does, outlasts the lifetime, and is issued again)."""
    max_key_bytes: int = 4096
    max_value_bytes: int = 64 * 1024 * 1024
    request_timeout_s: float = 10.0
    scan_page_rows: int = 1000
    """Rows per scan page when the request asks for no limit."""
    group_commit: bool = True
    """A node syncs its write-ahead logs once for all the writes made since the last sync,
    before the first reply or outgoing call after them, instead of once per write
    (k2store/groupcommit.py). Off: every durable write pays its own fsync."""
    txn: TxnSettings = field(default_factory=lambda: TxnSettings())
    replication: ReplicationSettings = field(default_factory=lambda: ReplicationSettings())
    network: NetworkSettings = field(default_factory=lambda: NetworkSettings())
    """Wide-area emulation between regions (the `[network]` table; k2store/wan.py)."""
    security: SecuritySettings = field(default_factory=lambda: SecuritySettings())
    """TLS, client tokens and tenants (the `[security]` table; k2store/security.py)."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    settings: ClusterSettings
    regions: tuple[RegionConfig, ...]
    nodes: tuple[NodeConfig, ...]
    shards: tuple[ShardConfig, ...]
    path: Path | None = None
    _range_starts: tuple[bytes, ...] = field(default=(), repr=False, compare=False)

    # -- lookups -------------------------------------------------------------------------------

    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        raise UnknownNode(f"unknown node {name!r}; the cluster has {[n.name for n in self.nodes]}")

    def region(self, name: str) -> RegionConfig:
        for r in self.regions:
            if r.name == name:
                return r
        raise UnknownNode(f"unknown region {name!r}; the cluster has {self.region_names()}")

    def region_names(self) -> list[str]:
        return [r.name for r in self.regions]

    def nodes_in(self, region: str) -> list[NodeConfig]:
        return [n for n in self.nodes if n.region == region]

    def shard(self, shard_id: int) -> ShardConfig:
        for s in self.shards:
            if s.id == shard_id:
                return s
        raise UnknownShard(
            f"unknown shard {shard_id}; the cluster has shards {[s.id for s in self.shards]}"
        )

    def shards_led_by(self, node: str) -> list[ShardConfig]:
        return [s for s in self.shards if s.leader == node]

    def replica_node(self, shard: ShardConfig, region: str) -> str | None:
        """The node that holds `shard`'s replica in `region` (None: the shard is homed there
        and its leader serves the region; or the region has no nodes). Replicas spread over a
        region's nodes by shard id."""
        if region == shard.home_region:
            return None
        nodes = sorted(n.name for n in self.nodes if n.region == region)
        return nodes[shard.id % len(nodes)] if nodes else None

    def replicas_on(self, node: str) -> list[ShardConfig]:
        """Shards whose replica for node's region lives on `node`."""
        region = self.node(node).region
        return [s for s in self.shards if self.replica_node(s, region) == node]

    def local_holder(self, shard: ShardConfig, region: str) -> str:
        """Who serves replica reads of `shard` in `region`: its replica there, or its leader."""
        return self.replica_node(shard, region) or shard.leader

    def shard_for_key(self, key: bytes) -> ShardConfig:
        if self.settings.partitioning == "hash":
            digest = hashlib.blake2b(key, digest_size=8).digest()
            return self.shards[int.from_bytes(digest, "big") % len(self.shards)]
        starts = self._range_starts or tuple(s.start for s in self.shards)
        return self.shards[bisect.bisect_right(starts, key) - 1]

    def shards_for_range(self, start: bytes, end: bytes | None) -> list[ShardConfig]:
        """Shards that may hold keys in [start, end), in key order (all shards under hash)."""
        if self.settings.partitioning == "hash":
            return list(self.shards)
        return [
            s
            for s in self.shards
            if (end is None or s.start < end) and (s.end is None or start < s.end)
        ]

    # -- serialisation ------------------------------------------------------------------------

    def to_toml(self) -> str:
        base = self.path.parent if self.path else None
        st = self.settings
        out = [
            "# K2 cluster file (see k2store/cluster.py for every field).",
            "[cluster]",
            f"name = {_q(st.name)}",
            f"partitioning = {_q(st.partitioning)}",
            f"epsilon_us = {st.epsilon_us}",
            f"max_uncertainty_us = {st.max_uncertainty_us}",
            *(["unsafe_ignore_clock_bound = true"] if st.unsafe_ignore_clock_bound else []),
            f"oracle_ttl_us = {st.oracle_ttl_us}",
            f"oracle_local_ttl_us = {st.oracle_local_ttl_us}",
            f"max_key_bytes = {st.max_key_bytes}",
            f"max_value_bytes = {st.max_value_bytes}",
            f"request_timeout_s = {st.request_timeout_s}",
            f"scan_page_rows = {st.scan_page_rows}",
            f"group_commit = {_toml_value(st.group_commit)}",
            "",
            "[txn]",
            *(f"{k} = {_toml_value(getattr(st.txn, k))}" for k in _TXN_FIELDS),
            "",
            "[replication]",
            *(f"{k} = {_toml_value(getattr(st.replication, k))}" for k in _REPL_FIELDS),
            "",
            *network_to_toml(st.network, self.region_names()),
        ]
        if st.security != SecuritySettings():
            out += ["", *security_to_toml(st.security, base)]
        for r in self.regions:
            out += ["", "[[regions]]", f"name = {_q(r.name)}", f"oracle = {_q(r.oracle)}"]
        for n in self.nodes:
            data_dir = n.data_dir
            if base is not None and data_dir.is_relative_to(base):
                data_dir = data_dir.relative_to(base)
            out += [
                "",
                "[[nodes]]",
                f"name = {_q(n.name)}",
                f"region = {_q(n.region)}",
                f"address = {_q(n.address)}",
                f"data_dir = {_q(str(data_dir))}",
            ]
        for s in self.shards:
            out += ["", "[[shards]]", f"id = {s.id}"]
            out.append(_bound_line("start", s.start))
            if s.end is not None:
                out.append(_bound_line("end", s.end))
            out += [f"home_region = {_q(s.home_region)}", f"leader = {_q(s.leader)}"]
        return "\n".join(out) + "\n"

    def write(self, path: Path) -> ClusterConfig:
        path = path.resolve()
        cfg = replace(self, path=path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(cfg.to_toml())
        tmp.replace(path)
        return cfg


_TXN_FIELDS = [f.name for f in fields(TxnSettings)]
_REPL_FIELDS = [f.name for f in fields(ReplicationSettings)]


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return _q(v)
    return repr(v)


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bound_line(name: str, value: bytes) -> str:
    try:
        text = value.decode("utf-8")
        if text.isprintable():
            return f"{name} = {_q(text)}"
    except UnicodeDecodeError:
        pass
    return f"{name}_hex = {_q(value.hex())}"


# -- parsing ------------------------------------------------------------------------------------


def load(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster file; ClusterFileError names the file and the field."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ClusterFileError(f"{p}: no such cluster file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ClusterFileError(f"{p}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ClusterFileError(f"{p}: not valid TOML: {e}") from None
    return parse(raw, path=p.resolve())


def parse(raw: Mapping[str, Any], *, path: Path | None = None) -> ClusterConfig:
    where = f"{path}: " if path else ""

    def fail(field_name: str, msg: str) -> ClusterFileError:
        return ClusterFileError(f"{where}{field_name}: {msg}")

    base = path.parent if path else Path.cwd()
    known_top = {
        *("cluster", "regions", "nodes", "shards", "txn", "network", "replication", "security"),
    }
    for k in raw:
        if k not in known_top:
            raise fail(k, f"unknown section; expected one of {sorted(known_top)}")

    settings = _parse_settings(raw.get("cluster", {}), fail)
    settings = replace(settings, txn=_parse_txn(raw.get("txn", {}), fail))
    settings = replace(settings, replication=_parse_replication(raw.get("replication", {}), fail))
    settings = replace(settings, security=parse_security(raw.get("security", {}), base, fail))
    regions_raw = _table_list(raw, "regions", fail)
    nodes_raw = _table_list(raw, "nodes", fail)
    shards_raw = _table_list(raw, "shards", fail)

    nodes: list[NodeConfig] = []
    for i, t in enumerate(nodes_raw):
        f = f"nodes[{i}]"
        _no_unknown(t, {"name", "region", "address", "data_dir"}, f, fail)
        name = _req_str(t, "name", f, fail)
        address = _req_str(t, "address", f, fail)
        _check_address(address, f"{f}.address", fail)
        data_dir = Path(str(t.get("data_dir", name)))
        nodes.append(
            NodeConfig(
                name=name,
                region=_req_str(t, "region", f, fail),
                address=address,
                data_dir=(base / data_dir).resolve() if not data_dir.is_absolute() else data_dir,
            )
        )
    _unique([n.name for n in nodes], "nodes", "name", fail)
    _unique([n.address for n in nodes], "nodes", "address", fail)
    node_names = {n.name for n in nodes}

    declared = {_req_str(t, "name", f"regions[{i}]", fail) for i, t in enumerate(regions_raw)}
    for i, n in enumerate(nodes):
        if n.region not in declared:
            raise fail(f"nodes[{i}].region", f"region {n.region!r} is not in [[regions]]")
    regions: list[RegionConfig] = []
    for i, t in enumerate(regions_raw):
        f = f"regions[{i}]"
        _no_unknown(t, {"name", "oracle"}, f, fail)
        name = _req_str(t, "name", f, fail)
        in_region = [n.name for n in nodes if n.region == name]
        if not in_region:
            raise fail(f"{f}.name", f"region {name!r} has no node in [[nodes]]")
        oracle = str(t.get("oracle", in_region[0]))
        if oracle not in in_region:
            raise fail(
                f"{f}.oracle", f"node {oracle!r} is not a node of region {name!r} ({in_region})"
            )
        regions.append(RegionConfig(name=name, oracle=oracle))
    _unique([r.name for r in regions], "regions", "name", fail)
    region_names = {r.name for r in regions}
    if not regions:
        raise fail("regions", "a cluster needs at least one [[regions]] entry")
    network = parse_network(raw.get("network", {}), regions=region_names, fail=fail)
    settings = replace(settings, network=network)

    shards: list[ShardConfig] = []
    for i, t in enumerate(shards_raw):
        f = f"shards[{i}]"
        _no_unknown(
            t, {"id", "start", "end", "start_hex", "end_hex", "home_region", "leader"}, f, fail
        )
        sid = t.get("id", i)
        if not isinstance(sid, int) or isinstance(sid, bool) or sid < 0 or sid >= 2**32:
            raise fail(f"{f}.id", f"must be an integer in [0, 2^32), got {sid!r}")
        leader = _req_str(t, "leader", f, fail)
        if leader not in node_names:
            raise fail(f"{f}.leader", f"node {leader!r} is not in [[nodes]]")
        home = str(t.get("home_region", next(n.region for n in nodes if n.name == leader)))
        if home not in region_names:
            raise fail(f"{f}.home_region", f"region {home!r} is not in [[regions]]")
        leader_region = next(n.region for n in nodes if n.name == leader)
        if leader_region != home:
            raise fail(
                f"{f}.leader",
                f"leader {leader!r} is in {leader_region!r}, not in the home region {home!r}",
            )
        start = _bound(t, "start", f, fail) or b""
        end = _bound(t, "end", f, fail)
        if end is not None and end <= start:
            raise fail(f"{f}.end", "must sort after start")
        shards.append(ShardConfig(id=sid, start=start, end=end, home_region=home, leader=leader))
    if not shards:
        raise fail("shards", "a cluster needs at least one [[shards]] entry")
    _unique([s.id for s in shards], "shards", "id", fail)

    if settings.partitioning == "range":
        shards.sort(key=lambda s: s.start)
        if shards[0].start != b"":
            raise fail(
                "shards",
                f"the first range shard must start at the empty key, not {shards[0].start!r}",
            )
        for a, b in itertools.pairwise(shards):
            if a.end != b.start:
                raise fail(
                    "shards",
                    f"range shards must tile the key space: shard {a.id} ends at {a.end!r} "
                    f"but the next (shard {b.id}) starts at {b.start!r}",
                )
        if shards[-1].end is not None:
            raise fail("shards", f"the last range shard (shard {shards[-1].id}) must have no end")
    else:
        shards.sort(key=lambda s: s.id)

    return ClusterConfig(
        settings=settings,
        regions=tuple(regions),
        nodes=tuple(nodes),
        shards=tuple(shards),
        path=path,
        _range_starts=tuple(s.start for s in shards),
    )


def _parse_settings(t: Any, fail: Any) -> ClusterSettings:
    if not isinstance(t, Mapping):
        raise fail("cluster", "must be a table")
    d = ClusterSettings()
    fields: dict[str, type | tuple[type, ...]] = {
        "name": str,
        "partitioning": str,
        "epsilon_us": int,
        "max_uncertainty_us": int,
        "oracle_ttl_us": int,
        "oracle_local_ttl_us": int,
        "max_key_bytes": int,
        "max_value_bytes": int,
        "request_timeout_s": (int, float),
        "scan_page_rows": int,
    }
    _no_unknown(t, {*fields, "unsafe_ignore_clock_bound", "group_commit"}, "cluster", fail)
    values: dict[str, Any] = {}
    if "group_commit" in t:
        if not isinstance(t["group_commit"], bool):
            raise fail("cluster.group_commit", f"expected true or false, got {t['group_commit']!r}")
        values["group_commit"] = t["group_commit"]
    if "unsafe_ignore_clock_bound" in t:
        flag = t["unsafe_ignore_clock_bound"]
        if not isinstance(flag, bool):
            raise fail("cluster.unsafe_ignore_clock_bound", f"expected true or false, got {flag!r}")
        values["unsafe_ignore_clock_bound"] = flag
        _check_unsafe("cluster", values, fail)
    for k, typ in fields.items():
        if k not in t:
            continue
        v: Any = t[k]
        if not _is_instance(v, typ):
            raise fail(
                f"cluster.{k}", f"expected {getattr(typ, '__name__', 'a number')}, got {v!r}"
            )
        if k not in ("name", "partitioning") and v <= 0:
            raise fail(f"cluster.{k}", f"must be positive, got {v!r}")
        values[k] = float(v) if k == "request_timeout_s" else v
    if values.get("partitioning", d.partitioning) not in ("range", "hash"):
        raise fail(
            "cluster.partitioning", f"must be 'range' or 'hash', got {values['partitioning']!r}"
        )
    s = replace(d, **values)
    if s.max_uncertainty_us < s.epsilon_us:
        raise fail("cluster.max_uncertainty_us", f"must be at least epsilon_us ({s.epsilon_us})")
    margin_us = SAFETY_MARGIN_NS // 1000
    for k in ("oracle_ttl_us", "oracle_local_ttl_us"):
        if getattr(s, k) <= margin_us:
            raise fail(
                f"cluster.{k}",
                f"must exceed the {margin_us} us safety margin a coordinator keeps from a "
                f"batch's end (no batch would ever be usable), got {getattr(s, k)}",
            )
    return s


def _parse_txn(t: Any, fail: Any) -> TxnSettings:
    if not isinstance(t, Mapping):
        raise fail("txn", "must be a table")
    d = TxnSettings()
    _no_unknown(t, set(_TXN_FIELDS), "txn", fail)
    values: dict[str, Any] = {}
    for k, v in t.items():
        default = getattr(d, k)
        if k == "protocol":
            if v not in TXN_PROTOCOLS:
                raise fail("txn.protocol", f"must be one of {list(TXN_PROTOCOLS)}, got {v!r}")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise fail(f"txn.{k}", f"expected true or false, got {v!r}")
        elif not _is_instance(v, (int, float)) or v <= 0:
            raise fail(f"txn.{k}", f"expected a positive number of seconds, got {v!r}")
        values[k] = float(v) if isinstance(default, float) and not isinstance(v, str) else v
    _check_unsafe("txn", values, fail)
    return replace(d, **values)


def _parse_replication(t: Any, fail: Any) -> ReplicationSettings:
    if not isinstance(t, Mapping):
        raise fail("replication", "must be a table")
    d = ReplicationSettings()
    _no_unknown(t, set(_REPL_FIELDS), "replication", fail)
    values: dict[str, Any] = {}
    for k, v in t.items():
        default = getattr(d, k)
        where = f"replication.{k}"
        if k == "policy":
            if v not in REPLICATION_POLICIES:
                raise fail(where, f"must be one of {list(REPLICATION_POLICIES)}, got {v!r}")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise fail(where, f"expected true or false, got {v!r}")
        elif isinstance(default, int):
            if not _is_instance(v, int) or v <= 0:
                raise fail(where, f"expected a positive integer, got {v!r}")
        elif k == "grace_ms":
            if not _is_instance(v, (int, float)) or v < 0:
                raise fail(where, f"expected a number of milliseconds >= 0, got {v!r}")
        elif not _is_instance(v, (int, float)) or v <= 0:
            raise fail(where, f"expected a positive number of milliseconds, got {v!r}")
        values[k] = float(v) if isinstance(default, float) else v
    _check_unsafe("replication", values, fail)
    return replace(d, **values)


UNSAFE_ENV = "K2_ALLOW_UNSAFE_SETTINGS"


def _check_unsafe(table: str, values: Mapping[str, Any], fail: Any) -> None:
    """Settings that break the protocol on purpose exist to prove the consistency checkers
    catch what they break; a cluster file that turns one on is refused unless the environment
    says this is a test (K2_ALLOW_UNSAFE_SETTINGS=1), so no real cluster runs with one."""
    for k, v in values.items():
        if k.startswith("unsafe_") and v is True and os.environ.get(UNSAFE_ENV) != "1":
            raise fail(
                f"{table}.{k}",
                f"breaks the protocol on purpose (for testing the checkers); refused unless "
                f"{UNSAFE_ENV}=1 is set",
            )


def _is_instance(v: object, typ: type | tuple[type, ...]) -> bool:
    # bool is an int to Python, but `epsilon_us = true` is a mistake, not 1 us.
    return not isinstance(v, bool) and isinstance(v, typ)


def _table_list(raw: Mapping[str, Any], name: str, fail: Any) -> list[Mapping[str, Any]]:
    v = raw.get(name, [])
    if not isinstance(v, list) or not all(isinstance(x, Mapping) for x in v):
        raise fail(name, f"must be an array of tables ([[{name}]])")
    return v


def _no_unknown(t: Mapping[str, Any], allowed: set[str], where: str, fail: Any) -> None:
    for k in t:
        if k not in allowed:
            raise fail(f"{where}.{k}", f"unknown field; expected one of {sorted(allowed)}")


def _req_str(t: Mapping[str, Any], key: str, where: str, fail: Any) -> str:
    v = t.get(key)
    if not isinstance(v, str) or not v:
        raise fail(
            f"{where}.{key}", "missing" if v is None else f"expected a non-empty string, got {v!r}"
        )
    return v


def _bound(t: Mapping[str, Any], key: str, where: str, fail: Any) -> bytes | None:
    if key in t and f"{key}_hex" in t:
        raise fail(f"{where}.{key}", f"give {key} or {key}_hex, not both")
    if key in t:
        if not isinstance(t[key], str):
            raise fail(f"{where}.{key}", f"expected a string, got {t[key]!r}")
        return str(t[key]).encode()
    if f"{key}_hex" in t:
        try:
            return bytes.fromhex(str(t[f"{key}_hex"]))
        except ValueError:
            raise fail(f"{where}.{key}_hex", f"not hex: {t[f'{key}_hex']!r}") from None
    return None


def _unique(values: Sequence[Any], table: str, key: str, fail: Any) -> None:
    seen: set[Any] = set()
    for i, v in enumerate(values):
        if v in seen:
            raise fail(f"{table}[{i}].{key}", f"duplicate {key} {v!r}")
        seen.add(v)


def _check_address(address: str, where: str, fail: Any) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise fail(where, f"expected host:port, got {address!r}")


# -- building local clusters --------------------------------------------------------------------


def local_cluster(
    regions: Sequence[str],
    ports: Sequence[int],
    *,
    nodes_per_region: int = 1,
    shards_per_region: int = 1,
    root: Path,
    name: str = "local",
    settings: ClusterSettings | None = None,
) -> ClusterConfig:
    """A loopback cluster: regions x nodes_per_region nodes, range shards homed by key prefix.

    Keys under ``<region>/`` are homed in that region (a session created in eu-west lives on a
    shard led there); each region's prefix is split into `shards_per_region` shards spread over the
    region's nodes. The gaps between prefixes go to the regions in turn.
    """
    if not regions:
        raise ClusterFileError("a cluster needs at least one region")
    if len(set(regions)) != len(regions):
        raise ClusterFileError(f"duplicate region names in {list(regions)}")
    for r in regions:
        if not r or "/" in r or not r.isprintable():
            raise ClusterFileError(f"region name {r!r}: use letters, digits and '-'")
    if nodes_per_region < 1 or shards_per_region < 1:
        raise ClusterFileError("nodes_per_region and shards_per_region must be at least 1")
    if len(ports) != len(regions) * nodes_per_region:
        raise ValueError("one port per node")
    st = settings or ClusterSettings()
    st = replace(st, name=name)
    root = root.resolve()
    nodes: list[NodeConfig] = []
    it = iter(ports)
    for r in regions:
        for j in range(nodes_per_region):
            nm = f"{r}-{j + 1}"
            nodes.append(NodeConfig(nm, r, f"127.0.0.1:{next(it)}", root / nm))
    region_cfgs = [RegionConfig(r, f"{r}-1") for r in regions]

    # Boundaries: for each region prefix p = "<r>/", the prefix range [p, p_end) split evenly.
    pieces: list[tuple[bytes, str]] = []  # (start, home region) in key order
    for r in sorted(regions):
        p = f"{r}/".encode()
        pieces.append((p, r))
        for k in range(1, shards_per_region):
            pieces.append((p + bytes([k * 256 // shards_per_region]), r))
        pieces.append((p[:-1] + b"0", ""))  # end of the prefix range: a gap shard follows
    bounds: list[tuple[bytes, str]] = [(b"", ""), *pieces]
    shards: list[ShardConfig] = []
    gap_turn = 0
    node_turn: dict[str, int] = dict.fromkeys(regions, 0)
    for i, (start, home) in enumerate(bounds):
        end = bounds[i + 1][0] if i + 1 < len(bounds) else None
        if end is not None and end <= start:
            continue
        if not home:
            home = list(regions)[gap_turn % len(regions)]
            gap_turn += 1
        members = [n for n in nodes if n.region == home]
        leader = members[node_turn[home] % len(members)].name
        node_turn[home] += 1
        shards.append(ShardConfig(len(shards), start, end, home, leader))
    cfg = ClusterConfig(
        settings=st,
        regions=tuple(region_cfgs),
        nodes=tuple(nodes),
        shards=tuple(shards),
        path=root / "cluster.toml",
        _range_starts=tuple(s.start for s in shards),
    )
    # Round-trip through the parser: the generated file must satisfy the same rules.
    return parse(tomllib.loads(cfg.to_toml()), path=root / "cluster.toml")
