"""Nemeses: faults injected into a live local cluster, one at a time, each healed in bounded time.

Faults
    - ``kill``: SIGKILL one node, leave it down for a moment, restart it from its data directory
      (`launcher.start_node`) and wait until it answers health checks.
    - ``pause``: SIGSTOP one node, then SIGCONT it: a node that is alive but silent (a long GC,
      a VM migration) whose peers must time it out.
    - ``partition``: through the userspace link layer (``net.toml`` beside the cluster file, re-read
      by every node and client within ~0.1 s): one region cut off from the others, or the nodes
      split into two random halves.
    - ``latency``: every inter-region link slowed to 400-700 ms round trips with 50 ms of jitter.
    - ``clock``: not supported yet. Skewing one node's clock needs a node option (see
      `CLOCK_HOOK`); the node code is not this package's to change.

Contract
    `run` injects faults until its deadline, at most `max_faults`, one at a time: a fault lasts
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

__all__ = ["CLOCK_HOOK", "FAULTS", "FaultWindow", "Nemesis", "parse_nemesis"]

FAULTS = ("kill", "pause", "partition", "latency")
CLOCK_HOOK = (
    "a node setting (cluster file or command line) that wraps the node's SystemClock in "
    "truetime.SkewedClock(offset_ns, drift_ppm), readable at run time (like net.toml) so a nemesis "
    "can skew one node within and beyond max_uncertainty_us and restore it; and, for 'beyond the "
    "bound without refusal', a test-only flag that keeps the node serving"
)


def parse_nemesis(spec: str) -> list[str]:
    """``none`` | ``all`` | a comma-separated list of FAULTS."""
    if spec == "none":
        return []
    if spec == "all":
        return list(FAULTS)
    kinds = [s.strip() for s in spec.split(",") if s.strip()]
    for k in kinds:
        if k == "clock":
            raise ValueError(f"the clock nemesis is not supported yet: it needs {CLOCK_HOOK}")
        if k not in FAULTS:
            raise ValueError(f"unknown nemesis {k!r}; choose none, all or from {FAULTS}")
    return kinds


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
    ) -> None:
        self.cfg = cfg
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
        for _ in range(self.max_faults):
            await asyncio.sleep(self.rng.uniform(*self.interval_s))
            left = (deadline - self.history.elapsed_ns()) / 1e9
            hold = self.rng.uniform(*self.duration_s)
            if left < hold:
                return
            kind = self.rng.choice(self.kinds)
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
        if self.rng.random() < 0.5 or len(self.cfg.nodes) < 2:
            region = self.rng.choice(self.cfg.region_names())
            target = f"isolate {region}"
            net = NetOverrides().with_isolated(region)
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

    async def heal(self) -> None:
        """Undo every fault: network overrides removed, every node continued and running."""
        launcher.write_net_overrides(self.cfg, NetOverrides())
        for pid in launcher.running_nodes(self.cfg).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for n in self.cfg.nodes:
            await self._restart(n.name)
        for w in self.windows:
            if w.end_ns is None:
                self._close(w)
