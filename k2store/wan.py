"""Wide-area link emulation: what a message between two regions costs, and which links are cut.

Purpose
    Kernel netem is not available on every machine, so a local cluster emulates its wide-area
    network in userspace: `GrpcTransport` asks a `LinkModel` how long each message takes and
    sleeps that long before sending the request and again after receiving the reply, so a call
    across regions costs one round trip (k2store/transport.py drives this). The model here is pure:
    no clock, no sockets, no files except the two functions at the end that read and atomically
    replace the overrides file.

Model
    - Latency is set per unordered region pair as a round-trip time; each direction pays half.
      Defaults are DESIGN.md's: us-east<->eu-west 75 ms, us-east<->ap-southeast 210 ms,
      eu-west<->ap-southeast 160 ms, 1 ms inside a region, `default_rtt_ms` (100 ms) for a pair
      with no entry (a made-up region in a test).
    - Jitter: extra one-way delay, uniform in [0, jitter_ms], drawn from the caller's
      `random.Random` (and only when jitter_ms > 0, so a seeded run replays exactly).
    - Bandwidth: each message pays its serialization time, ``nbytes * 8 / bandwidth``, on
      inter-region links (default 1 Gbit/s; intra-region links are unlimited unless set). HAZARD:
      there is no queueing: each process times its own messages, so concurrent messages do not
      wait behind each other as they would on a shared link (the simulator's SimNetwork does
      queue). A 94 MB KV cache still pays its ~0.75 s.
    - Partitions: directed cuts between names, where a name is a region or a node (a cut on a
      region applies to every node and client in it), and isolation of a region or a node from
      everything outside it. A cut is checked when a message is sent.

    delay(src -> dst, n bytes) = rtt(src, dst) / 2 + n * 8 / bandwidth + uniform(0, jitter)

Configuration
    Base values come from the cluster file's ``[network]`` table (`NetworkSettings`); `enabled =
    false` (the default for a hand-written file: real machines have a real network) makes every
    base latency zero. Run-time changes (`k2 cluster net ...`) go to an overrides file,
    ``net.toml`` next to the cluster file, which every node and client re-reads when it changes
    (`NetOverrides`); an override applies even when the base emulation is disabled, so a
    partition can be injected into any local cluster. Every validation error names the field.
"""

from __future__ import annotations

import os
import random
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_BANDWIDTH_MBIT",
    "DEFAULT_PAIR_RTT_MS",
    "DEFAULT_RTT_MS",
    "INTRA_REGION_RTT_MS",
    "OVERRIDES_FILE",
    "LinkCut",
    "LinkModel",
    "LinkOverride",
    "LinkParams",
    "NetOverrides",
    "NetworkSettings",
    "network_to_toml",
    "overrides_to_toml",
    "parse_network",
    "parse_overrides",
    "read_overrides",
    "write_overrides",
]

DEFAULT_RTT_MS: Mapping[frozenset[str], float] = {
    frozenset({"us-east", "eu-west"}): 75.0,
    frozenset({"us-east", "ap-southeast"}): 210.0,
    frozenset({"eu-west", "ap-southeast"}): 160.0,
}
"""Round-trip times between DESIGN.md's default regions."""
INTRA_REGION_RTT_MS = 1.0
DEFAULT_PAIR_RTT_MS = 100.0
"""RTT between two different regions with no entry in the matrix."""
DEFAULT_BANDWIDTH_MBIT = 1000.0
"""Megabits per second on each direction of an inter-region link (1 Gbit/s)."""
OVERRIDES_FILE = "net.toml"
"""Name of the run-time overrides file, in the cluster file's directory."""

Fail = Callable[[str, str], Exception]
"""Builds the error for a bad field: fail(field, message); the caller adds the file name."""


def _value_error(field_name: str, msg: str) -> Exception:
    return ValueError(f"{field_name}: {msg}")


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    """The ``[network]`` table of a cluster file: the base wide-area emulation.

    In TOML the matrix is nested, one row per region, each unordered pair given once (or twice
    with the same value)::

        [network]
        enabled = true
        intra_region_rtt_ms = 1.0
        default_rtt_ms = 100.0
        jitter_ms = 0.0
        bandwidth_mbit = 1000.0

        [network.rtt_ms]
        us-east = { eu-west = 75.0, ap-southeast = 210.0 }
        eu-west = { ap-southeast = 160.0 }
    """

    enabled: bool = False
    """Emulate latency and bandwidth between regions. Off unless the file says so (real machines
    have a real network); `k2 cluster up` writes it on unless given --no-wan."""
    rtt_ms: Mapping[frozenset[str], float] = field(default_factory=lambda: dict(DEFAULT_RTT_MS))
    """Round-trip time per unordered pair of different regions. A file that gives this table
    replaces the whole default matrix (pairs it leaves out get `default_rtt_ms`)."""
    default_rtt_ms: float = DEFAULT_PAIR_RTT_MS
    """RTT of a pair of different regions absent from `rtt_ms`."""
    intra_region_rtt_ms: float = INTRA_REGION_RTT_MS
    """RTT between two nodes (or a client and a node) of one region; a node calling itself pays
    nothing."""
    jitter_ms: float = 0.0
    """Extra one-way delay on every link, uniform in [0, jitter_ms]."""
    bandwidth_mbit: float = DEFAULT_BANDWIDTH_MBIT
    """Per direction of each inter-region link; 0 means unlimited. Intra-region: unlimited."""

    def rtt_of(self, a: str, b: str) -> float:
        """Base RTT in ms between regions `a` and `b` (before overrides; ignores `enabled`)."""
        if a == b:
            return self.intra_region_rtt_ms
        return self.rtt_ms.get(frozenset({a, b}), self.default_rtt_ms)


@dataclass(frozen=True, slots=True)
class LinkOverride:
    """Run-time values for one link; None leaves the base value."""

    rtt_ms: float | None = None
    jitter_ms: float | None = None
    bandwidth_mbit: float | None = None
    """0 means unlimited."""

    def merged(self, newer: LinkOverride) -> LinkOverride:
        return LinkOverride(
            newer.rtt_ms if newer.rtt_ms is not None else self.rtt_ms,
            newer.jitter_ms if newer.jitter_ms is not None else self.jitter_ms,
            newer.bandwidth_mbit if newer.bandwidth_mbit is not None else self.bandwidth_mbit,
        )

    def is_empty(self) -> bool:
        return self.rtt_ms is None and self.jitter_ms is None and self.bandwidth_mbit is None


@dataclass(frozen=True, slots=True)
class NetOverrides:
    """Run-time changes on top of `NetworkSettings` (the ``net.toml`` file). Immutable: every
    change returns a new value, which the writer then replaces the file with."""

    all_links: LinkOverride = LinkOverride()
    """Applies to every inter-region pair (a per-pair entry in `links` wins over it)."""
    links: Mapping[frozenset[str], LinkOverride] = field(default_factory=dict)
    """Per unordered region pair; the pair {r} (one element) is the link inside region r."""
    cuts: frozenset[tuple[str, str]] = frozenset()
    """Directed (from, to) cuts; each side is a region or a node name."""
    isolated: frozenset[str] = frozenset()
    """Regions or nodes cut off from everything outside them, both ways."""

    def is_empty(self) -> bool:
        """True when nothing is overridden (no file is needed)."""
        return (
            self.all_links.is_empty()
            and not self.cuts
            and not self.isolated
            and all(lo.is_empty() for lo in self.links.values())
        )

    def with_link(self, a: str | None, b: str | None, change: LinkOverride) -> NetOverrides:
        """`change` on the pair (a, b), on region a's internal link if b is None or a, or on
        every inter-region pair if a is None."""
        if a is None:
            return replace(self, all_links=self.all_links.merged(change))
        key = frozenset({a, b or a})
        links = dict(self.links)
        links[key] = links.get(key, LinkOverride()).merged(change)
        return replace(self, links=links)

    def with_cut(self, a: str, b: str, *, one_way: bool = False) -> NetOverrides:
        """Cut messages from `a` to `b`, and from `b` to `a` unless `one_way`."""
        if a == b:
            raise ValueError(f"cannot cut {a!r} from itself")
        cuts = {(a, b)} if one_way else {(a, b), (b, a)}
        return replace(self, cuts=self.cuts | cuts)

    def with_isolated(self, name: str) -> NetOverrides:
        return replace(self, isolated=self.isolated | {name})

    def healed(self, a: str | None = None, b: str | None = None) -> NetOverrides:
        """Remove every cut and isolation (no names), the isolation of `a` and every cut
        touching it (one name), or the cut between `a` and `b` both ways (two names). Latency
        and jitter overrides stay."""
        if a is None:
            return replace(self, cuts=frozenset(), isolated=frozenset())
        if b is None:
            return replace(
                self,
                cuts=frozenset(c for c in self.cuts if a not in c),
                isolated=self.isolated - {a},
            )
        return replace(self, cuts=self.cuts - {(a, b), (b, a)})


@dataclass(frozen=True, slots=True)
class LinkParams:
    """Effective values of one unordered region pair (both directions use them)."""

    rtt_ms: float
    jitter_ms: float
    bandwidth_mbit: float
    """0 means unlimited."""


class LinkCut(Exception):
    """The message cannot cross: a partition cuts `src` -> `dst` (node or region names)."""

    def __init__(self, src: str, dst: str, rule: str) -> None:
        super().__init__(f"emulated partition: {src} -> {dst} is cut ({rule})")
        self.src = src
        self.dst = dst
        self.rule = rule


class LinkModel:
    """Delays and partitions between regions: `NetworkSettings` with `NetOverrides` on top.

    Immutable and pure; a transport builds a new one when the overrides file changes.
    """

    def __init__(self, settings: NetworkSettings, overrides: NetOverrides | None = None) -> None:
        self.settings = settings
        self.overrides = overrides or NetOverrides()
        self._cache: dict[frozenset[str], LinkParams] = {}

    def link(self, a: str, b: str) -> LinkParams:
        """Effective parameters between regions `a` and `b` (a == b: inside region a)."""
        key = frozenset({a, b})
        p = self._cache.get(key)
        if p is None:
            st = self.settings
            if st.enabled:
                base = LinkParams(
                    st.rtt_of(a, b), st.jitter_ms, 0.0 if a == b else st.bandwidth_mbit
                )
            else:
                base = LinkParams(0.0, 0.0, 0.0)
            o = LinkOverride() if a == b else self.overrides.all_links
            o = o.merged(self.overrides.links.get(key, LinkOverride()))
            p = LinkParams(
                base.rtt_ms if o.rtt_ms is None else o.rtt_ms,
                base.jitter_ms if o.jitter_ms is None else o.jitter_ms,
                base.bandwidth_mbit if o.bandwidth_mbit is None else o.bandwidth_mbit,
            )
            self._cache[key] = p
        return p

    def is_active(self) -> bool:
        """False when no message can be delayed or cut (a transport may then skip the model)."""
        return self.settings.enabled or not self.overrides.is_empty()

    def cut_rule(
        self, src_region: str, dst_region: str, src_node: str | None, dst_node: str | None
    ) -> str | None:
        """The rule that stops a message from src to dst, or None if it may cross."""
        o = self.overrides
        src_names = (src_region,) if src_node is None else (src_node, src_region)
        dst_names = (dst_region,) if dst_node is None else (dst_node, dst_region)
        for s in src_names:
            for d in dst_names:
                if (s, d) in o.cuts:
                    return f"cut {s} -> {d}"
        for iso in o.isolated:
            # Cut when exactly one end is inside the isolated node or region.
            if (iso in src_names) != (iso in dst_names):
                return f"{iso} is isolated"
        return None

    def delay_for(
        self,
        src_region: str,
        dst_region: str,
        nbytes: int,
        rng: random.Random,
        *,
        src_node: str | None = None,
        dst_node: str | None = None,
    ) -> float:
        """Seconds one message of `nbytes` takes from src to dst; `LinkCut` if it cannot cross.

        Draws from `rng` only when the link has jitter. Node names are optional (a client has
        none) and matter only for cuts by node.
        """
        rule = self.cut_rule(src_region, dst_region, src_node, dst_node)
        if rule is not None:
            raise LinkCut(src_node or src_region, dst_node or dst_region, rule)
        p = self.link(src_region, dst_region)
        delay_ms = p.rtt_ms / 2
        if p.bandwidth_mbit > 0:
            delay_ms += nbytes * 8 / (p.bandwidth_mbit * 1000.0)  # bits / (bits per ms)
        if p.jitter_ms > 0:
            delay_ms += rng.uniform(0.0, p.jitter_ms)
        return delay_ms / 1000.0

    def describe(self, regions: Iterable[str]) -> list[tuple[str, str, LinkParams]]:
        """Effective parameters of every pair of `regions` (including each region with itself),
        in a stable order: for `k2 cluster net show`."""
        rs = list(regions)
        return [(a, b, self.link(a, b)) for i, a in enumerate(rs) for b in rs[i:]]


# -- TOML ---------------------------------------------------------------------------------------


def _number(v: Any, field_name: str, fail: Fail) -> float:
    # bool is an int to Python, but `rtt_ms = true` is a mistake, not 1 ms.
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise fail(field_name, f"expected a number, got {v!r}")
    if not v >= 0 or v == float("inf"):
        raise fail(field_name, f"must be a finite number >= 0, got {v!r}")
    return float(v)


def _check_keys(t: Mapping[str, Any], allowed: Iterable[str], where: str, fail: Fail) -> None:
    allowed = sorted(allowed)
    for k in t:
        if k not in allowed:
            raise fail(f"{where}.{k}", f"unknown field; expected one of {allowed}")


def _check_region(name: str, field_name: str, regions: Iterable[str] | None, fail: Fail) -> None:
    if regions is not None and name not in set(regions):
        raise fail(field_name, f"region {name!r} is not in [[regions]]")


_SCALARS = ("default_rtt_ms", "intra_region_rtt_ms", "jitter_ms", "bandwidth_mbit")


def parse_network(
    t: Any,
    *,
    regions: Iterable[str] | None = None,
    fail: Fail = _value_error,
    where: str = "network",
) -> NetworkSettings:
    """Validate a ``[network]`` table. `regions`: the cluster's regions, which every matrix entry
    must name (None: any name). `fail(field, msg)` builds the error, naming the field."""
    if not isinstance(t, Mapping):
        raise fail(where, "must be a table")
    _check_keys(t, {"enabled", "rtt_ms", *_SCALARS}, where, fail)
    d = NetworkSettings()
    values: dict[str, Any] = {}
    if "enabled" in t:
        if not isinstance(t["enabled"], bool):
            raise fail(f"{where}.enabled", f"expected true or false, got {t['enabled']!r}")
        values["enabled"] = t["enabled"]
    for k in _SCALARS:
        if k in t:
            values[k] = _number(t[k], f"{where}.{k}", fail)
    if "rtt_ms" in t:
        m = t["rtt_ms"]
        if not isinstance(m, Mapping):
            raise fail(f"{where}.rtt_ms", "must be a table of tables: a = { b = 75.0 }")
        rtt: dict[frozenset[str], float] = {}
        region_list = None if regions is None else list(regions)
        for a, row in m.items():
            f = f"{where}.rtt_ms.{a}"
            _check_region(a, f, region_list, fail)
            if not isinstance(row, Mapping):
                raise fail(f, "must be a table: { other-region = rtt_ms, ... }")
            for b, v in row.items():
                fb = f"{f}.{b}"
                _check_region(b, fb, region_list, fail)
                if a == b:
                    raise fail(fb, "the RTT inside a region is intra_region_rtt_ms")
                ms = _number(v, fb, fail)
                key = frozenset({a, b})
                if key in rtt and rtt[key] != ms:
                    raise fail(
                        fb, f"{ms} disagrees with {b}.{a} = {rtt[key]} (links are symmetric)"
                    )
                rtt[key] = ms
        values["rtt_ms"] = rtt
    return replace(d, **values)


def network_to_toml(st: NetworkSettings, regions: Iterable[str]) -> list[str]:
    """Lines of a ``[network]`` table; the matrix keeps only pairs of `regions`."""
    rs = list(regions)
    out = [
        "[network]",
        f"enabled = {'true' if st.enabled else 'false'}",
        *(f"{k} = {float(getattr(st, k))!r}" for k in _SCALARS),
    ]
    rows: list[str] = []
    for i, a in enumerate(rs):
        cells = [
            f"{_key(b)} = {float(st.rtt_ms[frozenset({a, b})])!r}"
            for b in rs[i + 1 :]
            if frozenset({a, b}) in st.rtt_ms
        ]
        if cells:
            rows.append(f"{_key(a)} = {{ {', '.join(cells)} }}")
    if rows:
        out += ["", "[network.rtt_ms]", *rows]
    return out


def _key(s: str) -> str:
    if s and all(c.isascii() and (c.isalnum() or c in "-_") for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_LINK_FIELDS = ("rtt_ms", "jitter_ms", "bandwidth_mbit")


def _parse_link(t: Any, where: str, fail: Fail, extra: Iterable[str] = ()) -> LinkOverride:
    if not isinstance(t, Mapping):
        raise fail(where, "must be a table")
    _check_keys(t, {*_LINK_FIELDS, *extra}, where, fail)
    vals = {k: _number(t[k], f"{where}.{k}", fail) for k in _LINK_FIELDS if k in t}
    return LinkOverride(**vals)


def _name(v: Any, field_name: str, fail: Fail) -> str:
    if not isinstance(v, str) or not v:
        raise fail(field_name, f"expected a region or node name, got {v!r}")
    return v


def parse_overrides(raw: Mapping[str, Any], *, fail: Fail = _value_error) -> NetOverrides:
    """Validate the overrides file's content (see `overrides_to_toml` for the format)."""
    _check_keys(raw, {"all", "links", "cuts", "isolated"}, "net", fail)
    all_links = _parse_link(raw.get("all", {}), "all", fail)
    links: dict[frozenset[str], LinkOverride] = {}
    raw_links = raw.get("links", [])
    if not isinstance(raw_links, list):
        raise fail("links", "must be an array of tables ([[links]])")
    for i, t in enumerate(raw_links):
        f = f"links[{i}]"
        lo = _parse_link(t, f, fail, extra=("regions",))
        rs = t.get("regions")
        if not isinstance(rs, list) or len(rs) not in (1, 2):
            raise fail(f"{f}.regions", f"expected one or two region names, got {rs!r}")
        key = frozenset(_name(r, f"{f}.regions", fail) for r in rs)
        links[key] = links.get(key, LinkOverride()).merged(lo)
    cuts: set[tuple[str, str]] = set()
    raw_cuts = raw.get("cuts", [])
    if not isinstance(raw_cuts, list):
        raise fail("cuts", "must be an array of tables ([[cuts]])")
    for i, t in enumerate(raw_cuts):
        f = f"cuts[{i}]"
        if not isinstance(t, Mapping):
            raise fail(f, "must be a table")
        _check_keys(t, {"from", "to"}, f, fail)
        a = _name(t.get("from"), f"{f}.from", fail)
        b = _name(t.get("to"), f"{f}.to", fail)
        if a == b:
            raise fail(f"{f}.to", f"cannot cut {a!r} from itself")
        cuts.add((a, b))
    iso = raw.get("isolated", [])
    if not isinstance(iso, list):
        raise fail("isolated", f"expected a list of names, got {iso!r}")
    isolated = frozenset(_name(x, "isolated", fail) for x in iso)
    return NetOverrides(all_links, links, frozenset(cuts), isolated)


def overrides_to_toml(o: NetOverrides) -> str:
    """The overrides file's text; `parse_overrides(tomllib.loads(text))` gives `o` back."""

    def link_lines(lo: LinkOverride) -> list[str]:
        return [f"{k} = {float(v)!r}" for k in _LINK_FIELDS if (v := getattr(lo, k)) is not None]

    out = [
        "# Run-time network overrides, written by `k2 cluster net`. Every node and client of the",
        "# cluster re-reads this file within ~0.1 s of a change; delete it to go back to the",
        "# cluster file's [network] table.",
    ]
    if o.isolated:  # a top-level key: before any table
        out.append("isolated = [" + ", ".join(_str(x) for x in sorted(o.isolated)) + "]")
    if not o.all_links.is_empty():
        out += ["", "[all]", *link_lines(o.all_links)]
    for key in sorted(o.links, key=sorted):
        lo = o.links[key]
        if lo.is_empty():
            continue
        names = ", ".join(_str(r) for r in sorted(key))
        out += ["", "[[links]]", f"regions = [{names}]", *link_lines(lo)]
    for a, b in sorted(o.cuts):
        out += ["", "[[cuts]]", f"from = {_str(a)}", f"to = {_str(b)}"]
    return "\n".join(out) + "\n"


def _str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- the overrides file (the only I/O in this module) -------------------------------------------


def read_overrides(path: Path) -> NetOverrides:
    """The overrides in `path`; empty overrides if it does not exist. ValueError (naming the file
    and the field) if it is malformed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return NetOverrides()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    return parse_overrides(raw, fail=lambda f, m: ValueError(f"{path}: {f}: {m}"))


def write_overrides(path: Path, o: NetOverrides) -> None:
    """Replace `path` atomically (temp file in the same directory, then rename), so a reader
    sees the old or the new file, never half of one; an empty `o` removes the file."""
    if o.is_empty():
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(overrides_to_toml(o))
    tmp.replace(path)
