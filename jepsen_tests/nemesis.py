"""Nemeses: faults injected into a live local cluster, one at a time, each healed in bounded time.

Faults
    - ``kill``: SIGKILL one node, leave it down for a moment, restart it from its data directory
      (`launcher.start_node`) and wait until it answers health checks.
    - ``pause``: SIGSTOP one node, then SIGCONT it: a node that is alive but silent (a long GC,
      a VM migration) whose peers must time it out.
    - ``partition``: through the userspace link layer (``net.toml`` beside the cluster file, re-read
      by every node and client within ~0.1 s): one region cut off from the others, the nodes
      split into two random halves, or a majorities ring (`majorities_ring`: every node hears a
      majority, no two hear the same one).
    - ``latency``: every inter-region link slowed to 400-700 ms round trips with 50 ms of jitter.
    - ``clock``: one or two nodes' clocks skewed through ``clock.toml`` beside the cluster file
      (truetime/skew.py; nodes re-read it within ~0.1 s), then restored. The skew is reported
      in the node's clock error bound, as a synchronisation daemon that measured it would:
      ``within`` the bound (an offset up to `max_uncertainty_us`, of either sign, or a drift
      that gets there by the end of the fault) the node widens its TrueTime intervals and keeps
      serving; ``beyond`` it (2-40 times the bound) the node must refuse to issue timestamps
      until the skew is gone. Either way no anomaly is allowed; with ``[cluster]
      unsafe_ignore_clock_bound`` the node ignores the report and the checkers must object.
      Where the skew reaches the protocol: the node's TrueTime reads the skewed clock, so it
      moves the region oracle's batch bases (K2-TB), the coordinator's commit-wait, future
      timestamps and aligned dispatch, the leader's epoch seals (K2-VCR), d2PL-TTC's commit
      timestamps and MVTO-HLC's hybrid clock; with one node per region (the runner's
      cluster) skewing a node skews its whole region. Monotonic clocks (TTLs, timeouts) are
      not skewed.

Contract
    `run` injects faults until its deadline, at most `max_faults`, one at a time, every kind once
    per round in a shuffled order (seeded by `rng`): a fault lasts
    `duration_s`, then heals, then the cluster gets `interval_s` of quiet. Each start and stop
    is recorded in the history (process ``"nemesis"``) and in `windows`. `heal` undoes
    everything (SIGCONT every node, restart the dead ones, remove every network override) and is
    safe to call at any time, more than once; the runner calls it before the final reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from jepsen_tests.history import History
from k2store import launcher
from k2store.cluster import ClusterConfig
from k2store.wan import LinkOverride, NetOverrides
from truetime import ClockSkew

__all__ = ["FAULTS", "FaultWindow", "Nemesis", "majorities_ring", "parse_nemesis", "ring_cuts"]

FAULTS = ("kill", "pause", "partition", "latency", "clock")


def parse_nemesis(spec: str) -> list[str]:
    """``none`` | ``all`` | a comma-separated list of FAULTS."""
    if spec == "none":
        return []
    if spec == "all":
        return list(FAULTS)
    kinds = [s.strip() for s in spec.split(",") if s.strip()]
    for k in kinds:
        if k not in FAULTS:
            raise ValueError(f"unknown nemesis {k!r}; choose none, all or from {FAULTS}")
    return kinds


def majorities_ring(ring: Sequence[str]) -> dict[str, frozenset[str]]:
    """Jepsen's majorities ring: who each node hears, given the nodes in ring order.

    Node i hears the majority window of its ring neighbours ``i - (m-1)//2 .. i + m//2`` (m =
    n//2 + 1, itself included), so every node hears a majority and, for n >= 3, no two hear the
    same one: each believes itself in a majority, and no majority agrees. With 5 nodes every
    node hears its two neighbours (the cuts are symmetric); with 3, a node hears itself and the
    next one (one-way cuts: a -> c is cut while c -> a is not)."""
    n = len(ring)
    m = n // 2 + 1
    lo = (m - 1) // 2
    return {ring[i]: frozenset(ring[(i + d) % n] for d in range(-lo, m - lo)) for i in range(n)}


def ring_cuts(views: dict[str, frozenset[str]]) -> NetOverrides:
    """The one-way cuts that make every node hear exactly its view (`majorities_ring`)."""
    net = NetOverrides()
    for dst, heard in sorted(views.items()):
        for src in sorted(views):
            if src not in heard:
                net = net.with_cut(src, dst, one_way=True)
    return net


@dataclass
class FaultWindow:
    kind: str
    target: str
    start_ns: int
    end_ns: int | None = None


class Nemesis:
    def __init__(
        self,
        cfg: ClusterConfig,
        history: History,
        kinds: Sequence[str],
        rng: random.Random,
        *,
        interval_s: tuple[float, float] = (2.0, 4.0),
        duration_s: tuple[float, float] = (2.0, 4.0),
        max_faults: int = 50,
        log: object = None,
        base_skews: dict[str, ClockSkew] | None = None,
    ) -> None:
        """`base_skews`: clock skews the run keeps outside clock faults (the runner's --skew);
        a clock fault adds to them and restores them, and `heal` removes them too."""
        self.cfg = cfg
        self.base_skews = dict(base_skews or {})
        self.history = history
        self.kinds = list(kinds)
        self.rng = rng
        self.interval_s = interval_s
        self.duration_s = duration_s
        self.max_faults = max_faults
        self.windows: list[FaultWindow] = []
        self.restarts = 0
        self._say = log if callable(log) else (lambda _msg: None)

    async def run(self, seconds: float) -> None:
        """Inject faults for about `seconds` (the last one heals by then or shortly after)."""
        if not self.kinds:
            return
        deadline = self.history.elapsed_ns() + int(seconds * 1e9)
        deck: list[str] = []
        for _ in range(self.max_faults):
            await asyncio.sleep(self.rng.uniform(*self.interval_s))
            left = (deadline - self.history.elapsed_ns()) / 1e9
            hold = self.rng.uniform(*self.duration_s)
            if left < hold:
                return
            if not deck:
                # Every kind once per round, in a random order: a run of n faults sees all kinds
                # once n >= len(kinds), rather than whatever a random choice happens to draw.
                deck = list(self.kinds)
                self.rng.shuffle(deck)
            kind = deck.pop()
            await getattr(self, f"_{kind}")(hold)

    def _open(self, kind: str, target: str) -> FaultWindow:
        self.history.nemesis(f"start-{kind}", target)
        w = FaultWindow(kind, target, self.history.elapsed_ns())
        self.windows.append(w)
        self._say(f"nemesis: {kind} {target}")
        return w

    def _close(self, w: FaultWindow) -> None:
        self.history.nemesis(f"stop-{w.kind}", w.target)
        w.end_ns = self.history.elapsed_ns()
        self._say(f"nemesis: healed {w.kind} {w.target}")

    async def _kill(self, hold: float) -> None:
        running = launcher.running_nodes(self.cfg)
        if not running:
            return
        victim = self.rng.choice(sorted(running))
        w = self._open("kill", victim)
        try:
            os.kill(running[victim], signal.SIGKILL)
            for _ in range(100):
                if victim not in launcher.running_nodes(self.cfg):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(min(hold, 1.5))
        finally:
            await self._restart(victim)
            self._close(w)

    async def _restart(self, name: str) -> None:
        if name in launcher.running_nodes(self.cfg):
            return
        proc = launcher.start_node(self.cfg, self.cfg.node(name))
        self.restarts += 1
        await asyncio.to_thread(launcher.wait_healthy, self.cfg, {name: proc}, 30, False)

    async def _pause(self, hold: float) -> None:
        running = launcher.running_nodes(self.cfg)
        if not running:
            return
        victim = self.rng.choice(sorted(running))
        w = self._open("pause", victim)
        try:
            os.kill(running[victim], signal.SIGSTOP)
            await asyncio.sleep(hold)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(running[victim], signal.SIGCONT)
            self._close(w)

    async def _partition(self, hold: float) -> None:
        pick = self.rng.random()
        if pick < 0.35 or len(self.cfg.nodes) < 2:
            region = self.rng.choice(self.cfg.region_names())
            target = f"isolate {region}"
            net = NetOverrides().with_isolated(region)
        elif pick < 0.65 and len(self.cfg.nodes) >= 3:
            ring = [n.name for n in self.cfg.nodes]
            self.rng.shuffle(ring)
            views = majorities_ring(ring)
            net = ring_cuts(views)
            target = "majorities ring: " + "; ".join(
                f"{k} hears {sorted(v)}" for k, v in sorted(views.items())
            )
        else:
            names = [n.name for n in self.cfg.nodes]
            self.rng.shuffle(names)
            cut = self.rng.randint(1, len(names) - 1)
            a, b = sorted(names[:cut]), sorted(names[cut:])
            target = f"halves {a} | {b}"
            net = NetOverrides()
            for x in a:
                for y in b:
                    net = net.with_cut(x, y)
        w = self._open("partition", target)
        try:
            launcher.write_net_overrides(self.cfg, net)
            await asyncio.sleep(hold)
        finally:
            launcher.write_net_overrides(self.cfg, NetOverrides())
            self._close(w)

    async def _latency(self, hold: float) -> None:
        rtt = float(self.rng.randint(400, 700))
        w = self._open("latency", f"inter-region rtt {rtt:.0f} ms, jitter 50 ms")
        try:
            net = NetOverrides().with_link(None, None, LinkOverride(rtt_ms=rtt, jitter_ms=50.0))
            launcher.write_net_overrides(self.cfg, net)
            await asyncio.sleep(hold)
        finally:
            launcher.write_net_overrides(self.cfg, NetOverrides())
            self._close(w)

    async def _clock(self, hold: float) -> None:
        st = self.cfg.settings
        bound_ns = st.max_uncertainty_us * 1000
        names = [n.name for n in self.cfg.nodes]
        victims = sorted(self.rng.sample(names, min(len(names), self.rng.choice((1, 1, 2)))))
        beyond = self.rng.random() < 0.3
        skews = dict(self.base_skews)
        parts: list[tuple[str, int, ClockSkew]] = []
        for i, v in enumerate(victims):
            # Two victims get opposite signs: their clocks then differ by up to twice the skew.
            sign = (1 if self.rng.random() < 0.5 else -1) if i == 0 else -parts[0][1]
            if beyond:
                skew = ClockSkew(sign * round(bound_ns * self.rng.uniform(2.0, 40.0)))
            elif self.rng.random() < 0.3:
                # Reach 0.9 of the bound by the end of the fault, drifting from no offset.
                skew = ClockSkew(0, sign * 0.9 * bound_ns / (hold * 1e9) * 1e6)
            else:
                skew = ClockSkew(sign * round(bound_ns * self.rng.uniform(0.2, 1.0)))
            base = skews.get(v, ClockSkew())
            skews[v] = ClockSkew(base.offset_ns + skew.offset_ns, base.drift_ppm + skew.drift_ppm)
            parts.append((v, sign, skew))
        what = "beyond" if beyond else "within"
        target = f"{what} the {st.max_uncertainty_us / 1000:g} ms bound: " + ", ".join(
            f"{v} {s.offset_ns / 1e6:+.1f} ms" + (f" {s.drift_ppm:+.0f} ppm" if s.drift_ppm else "")
            for v, _, s in parts
        )
        w = self._open("clock", target)
        try:
            launcher.write_clock_skews(self.cfg, skews)
            await asyncio.sleep(hold)
        finally:
            launcher.write_clock_skews(self.cfg, self.base_skews)
            self._close(w)

    async def heal(self) -> None:
        """Undo every fault: network overrides and clock skews removed (`base_skews` too), every
        node continued and running."""
        launcher.write_net_overrides(self.cfg, NetOverrides())
        launcher.write_clock_skews(self.cfg, {})
        for pid in launcher.running_nodes(self.cfg).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for n in self.cfg.nodes:
            await self._restart(n.name)
        for w in self.windows:
            if w.end_ns is None:
                self._close(w)
