"""The local inference engine: a transformers causal LM fed by the KV tier.

Purpose
    Serve one request at a time on one model, and never compute a prefix's attention KV that the
    tier can load faster. The engine sees token ids, tensors and a `LookupResult`'s block table
    only; namespaces, metadata rows and block stores stay behind the connector.

Data flow (one request)
    ::

        messages ─chat template─▶ prompt ids
          ─▶ connector.lookup(ids)          longest cached prefix, block-aligned, and where
                                            (the connector keeps remote blocks only while
                                            fetching beats recomputing them; the engine feeds
                                            its measured prefill speed to that cost model)
          ─▶ connector.retrieve(sink=)      each block as it arrives (other regions' copies are
                                            not confirmed first: the load itself tells; theirs
                                            come in parts of a few layers, every block's first
                                            layers first), handed to a _CacheBuilder on the
                                            torch thread, which converts it once (dtype, layout)
                                            straight into the cache's preallocated buffers
          ─▶ DynamicCache                   per layer K, V as [1, heads, tokens, dim] (model dtype),
                                            views of those buffers; later tokens append in place
                                            (no torch.cat of the whole cache per token)
          ─▶ prefill the rest               at least the last prompt token is computed; it runs
                                            while the load is in flight, each decoder layer
                                            waiting for its layer of every block (_LayerFeed):
                                            the suffix's first layers are computed while the
                                            last are on the wire. If the load then falls short
                                            (a block missing or failing its checksum), that
                                            pass is thrown away and the rest recomputed
          ─▶ decode                         greedy, or sampled with a seeded generator; each token
                                            is yielded as it is made (TTFT, time between tokens)
          ─▶ connector.store(ids, kv)       the full blocks of prompt (+ generated) tokens, in the
                                            background after the last token: off the latency path

Contracts
    - Restored-cache logits equal recomputed logits within float tolerance: the model computes in
      its own dtype; blocks are kept in the tier's dtype (`EngineConfig.kv_dtype`). With a
      float32 tier the difference is float rounding (~1e-5); float16 (the default, half the bytes
      to move) adds the rounding of K and V to 11 bits (logit differences ~1e-2 on SmolLM2,
      the same greedy tokens in our tests).
    - Only full blocks are cached; a partial tail is always recomputed. When the whole prompt is
      cached the last token is recomputed anyway (its logits are needed).
    - Requests run one at a time (`asyncio.Lock`); model calls run on one worker thread of the
      engine's own (never spread over a pool: see `_torch`), so the event loop keeps serving
      gRPC and HTTP meanwhile.
    - A block that fails to load is recomputed (the connector counts it); a failed store only
      loses the chance of reuse. Neither fails the request.
    - Nothing computed from a block part that did not verify is kept: a pass that ran on parts
      counts only when every block it waited for verified and no part was handed over twice (a
      block reloaded from another region); otherwise it is computed again on what verified.

Devices
    CPU by default, CUDA when torch sees one: blocks are put into a pinned host mirror of the
    cache buffer (pooled across requests), and each layer goes to the device in one
    non-blocking copy once every block's part of it is in (before that layer runs), not a
    staged copy and a wait per block; stored blocks come back layer by layer into one host
    tensor.

Time
    Durations come from the injected `ClockSource.monotonic_ns` (default `SystemClock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import queue
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from kvtier import torchthread
from kvtier.attention import use_k2_attention
from kvtier.blocks import BlockSpec, Layout, Namespace
from kvtier.connector import AsyncKVConnector
from truetime import ClockSource, SystemClock

T = TypeVar("T")

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "HFTokenCodec",
    "PrefillCostModel",
    "PrefillResult",
    "RequestMetrics",
    "SamplingParams",
    "TokenCodec",
    "TokenEvent",
    "block_spec_for",
    "namespace_for",
]

log = logging.getLogger("kvtier.engine")


# -- configuration and results ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_tokens: int = 64
    """Tokens per KV block (2,048 tokens of SmolLM2 in float16: 32 blocks of 1.5 MB)."""
    kv_dtype: str = "float16"
    """dtype of blocks in the tier; float16 halves what moves between regions."""
    store: bool = True
    """Store each request's new full blocks (off: read-only use of the tier, as benchmarks do)."""
    store_generated: bool = True
    """Also store the full blocks of generated tokens (the next turn of a chat starts with them)."""
    device: str | None = None
    """"cpu", "cuda", ... (default: where the model is)."""
    fold_gqa: bool = True
    """Attend over a cached prefix without expanding its KV heads to the query heads
    (kvtier/attention.py): switches a model on transformers' "sdpa" to "k2_sdpa"."""
    layerwise: bool = True
    """Prefill the rest of the prompt while the cached prefix loads, each decoder layer waiting
    for its own layer of the prefix (off: the whole prefix first, then the pass)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int | None = None
    """Seed of the request's sampling generator (same seed, same tokens)."""
    stop_at_eos: bool = True


@dataclass(slots=True)
class RequestMetrics:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose KV was loaded from the tier instead of computed."""
    cached_by_region: dict[str, int] = field(default_factory=dict)
    """Blocks loaded per region."""
    offered_tokens: int = 0
    """Tokens the lookup found anywhere (before the cost model's choice)."""
    choice: str = "miss"
    """miss | local | remote | mixed, where the loaded blocks came from; "recompute" when the
    connector's cost model judged every block found slower to fetch than to recompute (a
    "+recompute" suffix: some of them)."""
    failed_blocks: int = 0
    bytes_moved: int = 0
    """Bytes fetched from other regions."""
    bytes_loaded: int = 0
    """Block bytes loaded in all (this region's included)."""
    computed_tokens: int = 0
    """Prompt tokens prefilled."""
    lookup_s: float = 0.0
    load_s: float = 0.0
    """Lookup done to the last block in (the pass runs meanwhile: see `prefill_s`)."""
    convert_s: float = 0.0
    """Of the load, the torch thread's time putting blocks into the cache (dtype and layout
    conversion; on a GPU, into pinned host memory, and each layer's copy to the device)."""
    prefill_s: float = 0.0
    """The prompt's pass, or after a load the part of it that the load did not hide (it runs
    while the blocks arrive, each layer once its part of every block is in; a pass thrown
    away and run again counts whole)."""
    ttft_s: float = 0.0
    """Request start to first token out, all of the above included."""
    recompute_estimate_s: float | None = None
    """What prefilling the whole prompt would take (the prefill cost model's estimate)."""
    completion_tokens: int = 0
    inter_token_s: list[float] = field(default_factory=list)
    """Time between consecutive tokens."""
    total_s: float = 0.0
    stored_blocks: int = 0
    """Blocks the store after the request put (filled in when it finishes)."""

    @property
    def mean_inter_token_s(self) -> float:
        return float(np.mean(self.inter_token_s)) if self.inter_token_s else 0.0


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int
    text: str
    """Text this token added (detokenized incrementally; may be empty mid-character)."""
    index: int
    finish_reason: str | None = None
    """None until the last event: "stop" (end of sequence) or "length"."""
    metrics: RequestMetrics | None = None
    """On the last event."""


@dataclass(frozen=True, slots=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    metrics: RequestMetrics


@dataclass(slots=True)
class PrefillResult:
    cache: Any
    """The model's DynamicCache, covering every prompt token."""
    logits: torch.Tensor
    """Logits of the computed prompt positions, [computed_tokens, vocab] (float32, CPU) when
    `all_logits`, else of the last position only, [1, vocab]."""
    metrics: RequestMetrics
    buffer: torch.Tensor | None = None
    """The pooled buffer the cache was built in (`Engine._prefill(pooled=True)`), if any."""


# -- tokenizers ---------------------------------------------------------------------------------


class TokenCodec(Protocol):
    """What the engine needs of a tokenizer."""

    @property
    def name(self) -> str: ...

    @property
    def eos_ids(self) -> frozenset[int]: ...

    def chat_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a chat, with the prompt for the assistant's turn appended."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenCodec:
    """A transformers tokenizer as a TokenCodec."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self._name = name
        eos: set[int] = set()
        for attr in ("eos_token_id",):
            v = getattr(tokenizer, attr, None)
            if isinstance(v, int):
                eos.add(v)
        # Chat models end a turn with a token of their own (SmolLM2: <|im_end|>).
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
                eos.add(tid)
        self._eos = frozenset(eos)

    @property
    def name(self) -> str:
        return self._name

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos

    def chat_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=True, tokenize=True
            )
            if not isinstance(out, list):  # transformers 5 returns a BatchEncoding
                out = out["input_ids"]
            return [int(t) for t in out]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


# -- namespaces ---------------------------------------------------------------------------------


def block_spec_for(
    model_config: Any, *, block_tokens: int = 64, dtype: str = "float16"
) -> BlockSpec:
    """The block spec of a transformers decoder config (layers, KV heads, head dim)."""
    cfg = (
        model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    )
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return BlockSpec(block_tokens, cfg.num_hidden_layers, kv_heads, head_dim, dtype, Layout.LKHTD)


def namespace_for(
    revision: str,
    tokenizer_id: str,
    spec: BlockSpec,
    tenant: str,
    *,
    tenant_salt: bytes = b"",
    shared: bool = False,
) -> Namespace:
    return Namespace(revision, tokenizer_id, spec, tenant, tenant_salt, shared)


# -- the prefill cost model ---------------------------------------------------------------------


class PrefillCostModel:
    """Estimates prefill time from measured prefills: ``t = a*new + b*new*(past + new/2) + c``
    (linear work per token plus attention over the context), least squares over the last
    `window` observations. It answers "what would recomputing cost" for the cost-aware choice
    and for the demo's "TTFT if recomputed" column."""

    def __init__(self, window: int = 64) -> None:
        self._obs: list[tuple[int, int, float]] = []
        self._window = window
        self._coef: np.ndarray[Any, Any] | None = None

    def observe(self, past: int, new: int, seconds: float) -> None:
        if new <= 0 or seconds <= 0:
            return
        self._obs.append((past, new, seconds))
        del self._obs[: -self._window]
        self._coef = None

    @property
    def ready(self) -> bool:
        return any(new >= 32 for _, new, _ in self._obs)

    def _fit(self) -> np.ndarray[Any, Any]:
        """Least squares over every subset of the three terms that keeps the linear one; the
        best fit whose coefficients are all non-negative wins (a negative cost would make
        extrapolation nonsense, e.g. from noisy small prefills)."""
        if self._coef is None:
            x = np.array(
                [[n, n * (p + n / 2) / 1000.0, 1.0] for p, n, _ in self._obs], dtype=np.float64
            )
            y = np.array([s for _, _, s in self._obs], dtype=np.float64)
            best: tuple[float, np.ndarray[Any, Any]] | None = None
            for cols in ([0, 1, 2], [0, 1], [0, 2], [0]):
                if len({(p, n) for p, n, _ in self._obs}) < len(cols):
                    continue
                sub, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
                if (sub < 0).any():
                    continue
                coef = np.zeros(3)
                coef[cols] = sub
                err = float(((x @ coef - y) ** 2).sum())
                if best is None or err < best[0] * 0.999:
                    best = (err, coef)
            if best is None:  # proportional to tokens
                best = (0.0, np.array([float(y.sum() / x[:, 0].sum()), 0.0, 0.0]))
            self._coef = best[1]
        return self._coef

    def estimate(self, new: int, past: int = 0) -> float | None:
        """Seconds to prefill `new` tokens after `past` cached ones; None before any data."""
        if not self._obs or new <= 0:
            return None if not self._obs else 0.0
        a, b, c = self._fit()
        return float(a * new + b * new * (past + new / 2) / 1000.0 + c)

    def marginal(self, tokens: int) -> float | None:
        """Seconds that `tokens` cached tokens at the front of a prompt save its pass: the fit
        without its per-pass constant, which the pass over the rest of the prompt pays either
        way (recomputing n + q tokens against q after n loaded differs by a*n + b*n^2/2). On a
        GPU that constant (kernel launches) is most of a short prefill, and a rate taken from
        whole prefills (tokens / seconds) makes every long prefix look dear to recompute.
        None until `ready`."""
        if not self.ready or tokens <= 0:
            return None
        a, b, _c = self._fit()
        return float(a * tokens + b * tokens * (tokens / 2) / 1000.0)


# -- buffers ------------------------------------------------------------------------------------


class _BufferPool(list[torch.Tensor]):
    """Freed flat buffers kept for reuse, largest first (at most `keep`); `lease` hands out the
    smallest that fits, else a new one from `make`. Used on one thread at a time."""

    def __init__(self, make: Callable[[int], torch.Tensor], keep: int = 2) -> None:
        super().__init__()
        self._make = make
        self._keep = keep

    def lease(self, numel: int) -> torch.Tensor:
        fits = [i for i, b in enumerate(self) if b.numel() >= numel]
        if not fits:
            return self._make(numel)
        # By position: list.remove would compare tensors with ==, element by element.
        return self.pop(min(fits, key=lambda i: self[i].numel()))

    def give_back(self, flat: torch.Tensor) -> None:
        self.append(flat)
        self.sort(key=lambda b: b.numel(), reverse=True)
        del self[self._keep :]


class _CacheBuilder:
    """The model's KV cache, built from tier blocks as they arrive, in any order: each block is
    converted (dtype and layout) once, straight into the buffers the cache will attend over,
    while the blocks after it are still on the wire. One buffer holds every layer's keys and
    values, with `room` tokens to spare for the rest of the prompt and the reply, so the cache
    grows in place.

    Everything runs on the engine's torch thread (`put` through `_LayerFeed`)."""

    def __init__(
        self, engine: Engine, num_tokens: int, room: int = 256, *, pooled: bool = False
    ) -> None:
        """`pooled`: take the buffer from the engine's pool (`Engine._lease_buffer`); the caller
        gives it back (`Engine._return_buffer(builder.flat)`) once nothing uses the cache."""
        spec = engine.spec
        self.spec = spec
        self._new_cache = engine._new_cache
        shape = (spec.num_layers, 2, 1, spec.num_kv_heads, num_tokens + room, spec.head_dim)
        numel = math.prod(shape)
        self.flat: torch.Tensor | None = engine._lease_buffer(numel) if pooled else None
        if self.flat is not None:
            self.buf = self.flat[:numel].view(shape)
        else:
            self.buf = torch.empty(shape, dtype=engine.model_dtype, device=engine.device)
        self.device = engine.device
        self.host_flat: torch.Tensor | None = None
        """On a GPU: a pinned host mirror of `buf` in the tier's dtype and layout (from
        `Engine._hosts`). Blocks are put into it with plain copies (each block's layer is
        one run of memory there), and each layer goes to the device in one transfer
        (`upload`), where the GPU converts dtype and layout: no staged copy and no wait per
        block, no strided conversion on the CPU. The engine takes it back (`_return_host`) once
        the request's pass has run: every upload precedes that pass on the same stream."""
        self._dirty: set[int] = set()
        """Layers put into the host mirror since their last upload."""
        self._stage: torch.Tensor | None = None
        """One layer of the host mirror on the device (reused: uploads queue on one stream)."""
        if engine._host_mirror:
            t, heads, dim = num_tokens + room, spec.num_kv_heads, spec.head_dim
            tier = (2, t, heads, dim) if spec.layout is Layout.LKTHD else (2, heads, t, dim)
            self.host_flat = engine._hosts.lease(spec.num_layers * math.prod(tier))
            self.host = self.host_flat[: spec.num_layers * math.prod(tier)]
            self.host = self.host.view(spec.num_layers, *tier)
        self.convert_ns = 0
        self._clock = engine.clock

    def put(self, index: int, block: torch.Tensor, first_layer: int = 0) -> None:
        """Write block `index` (the tier's spec: dtype, layout), or its layers [first_layer,
        first_layer + len(block)), into its token range."""
        t0 = self._clock.monotonic_ns()
        bt = self.spec.block_tokens
        layers = slice(first_layer, first_layer + block.shape[0])
        tokens = slice(index * bt, (index + 1) * bt)
        lkthd = self.spec.layout is Layout.LKTHD
        if self.host_flat is not None:  # as it is: the GPU converts it in `upload`
            (self.host[layers, :, tokens] if lkthd else self.host[layers, :, :, tokens]).copy_(
                block
            )
            self._dirty.update(range(layers.start, layers.stop))
        else:
            if lkthd:
                block = block.permute(0, 1, 3, 2, 4)
            self.buf[layers, :, 0, :, tokens, :].copy_(block)
        self.convert_ns += self._clock.monotonic_ns() - t0

    def upload(self, layers: Iterable[int] | None = None) -> None:
        """Copy these layers (default: every one put since its last upload) from the host
        mirror to the device and convert them into the cache there, asynchronously: work queued
        after it on the stream sees them."""
        if self.host_flat is None:
            return
        t0 = self._clock.monotonic_ns()
        lkthd = self.spec.layout is Layout.LKTHD
        for i in sorted(self._dirty if layers is None else self._dirty.intersection(layers)):
            if self._stage is None:
                self._stage = torch.empty_like(self.host[i], device=self.device)
            self._stage.copy_(self.host[i], non_blocking=True)
            self.buf[i, :, 0].copy_(self._stage.permute(0, 2, 1, 3) if lkthd else self._stage)
            self._dirty.discard(i)
        self.convert_ns += self._clock.monotonic_ns() - t0

    def finish(self, filled: int) -> Any:
        """A new cache holding the first `filled` tokens (again after a pass thrown away: a
        pass appends to the cache it was given)."""
        self.upload()
        cache = self._new_cache()
        for i, layer in enumerate(cache.layers):
            k, v = self.buf[i, 0], self.buf[i, 1]
            if hasattr(layer, "adopt"):
                layer.adopt(k, v, filled)
            else:  # a layer type of the model's own: give it copies
                cache.update(k[..., :filled, :].clone(), v[..., :filled, :].clone(), i)
        return cache


class _PrefixShort(Exception):
    """A layer waited for a block part that the load will not deliver."""


class _LayerFeed:
    """Block parts from the event loop to the torch thread, where the prefill pass waits for
    them layer by layer (`Engine._feed_forward`).

    The connector's sink (`sink`, on the event loop) queues each part and waits until the torch
    thread has copied it into the cache (the part is a view valid only until the sink returns).
    The torch thread takes parts in `wait_layer` (before each decoder layer runs) and `drain`,
    the only places where it converts them: all torch work stays on the one thread
    (kvtier/torchthread.py). `close` (on the event loop, once the retrieve has returned) ends
    the feed: a layer still missing a block then raises `_PrefixShort`."""

    def __init__(
        self, builder: _CacheBuilder, blocks: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._builder = builder
        self._blocks = blocks
        self._loop = loop
        self._parts: queue.SimpleQueue[tuple[int, int, torch.Tensor, asyncio.Future[None]] | None]
        self._parts = queue.SimpleQueue()
        self._have = [0] * builder.spec.num_layers
        """Per layer, blocks (of the first `blocks`) whose part for it was taken."""
        self._seen: set[tuple[int, int]] = set()
        self.repeated = False
        """A (block, layer) was handed over twice (a block reloaded after a part failed): what
        was computed on the first copy must not be kept."""
        self.closed = False

    async def sink(self, index: int, first_layer: int, part: torch.Tensor) -> None:
        done = self._loop.create_future()
        self._parts.put((index, first_layer, part, done))
        await done

    def close(self) -> None:
        self._parts.put(None)

    # -- on the torch thread --

    def _take(self) -> None:
        item = self._parts.get()
        if item is None:
            self.closed = True
            return
        index, first, part, done = item
        try:
            self._builder.put(index, part, first)
        except Exception as e:  # handed to the sink that waits for it
            self._loop.call_soon_threadsafe(_settle, done, e)
            return
        for layer in range(first, first + part.shape[0]):
            if (index, layer) in self._seen:
                self.repeated = True
            else:
                self._seen.add((index, layer))
                if index < self._blocks:
                    self._have[layer] += 1
        self._loop.call_soon_threadsafe(_settle, done, None)

    def wait_layer(self, layer: int) -> None:
        while self._have[layer] < self._blocks:
            if self.closed:
                raise _PrefixShort(f"layer {layer}: {self._have[layer]} of {self._blocks} blocks")
            self._take()
        self._builder.upload((layer,))

    def drain(self) -> None:
        while not self.closed:
            self._take()


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():  # the waiting sink was cancelled
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


# -- the engine ---------------------------------------------------------------------------------


class Engine:
    """A causal LM with a KV tier. `connector` may be None (no tier: every prompt is computed).

    Create one per model; share it between requests (they run one at a time)."""

    def __init__(
        self,
        model: Any,
        tokenizer: TokenCodec,
        connector: AsyncKVConnector | None = None,
        *,
        config: EngineConfig | None = None,
        clock: ClockSource | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.connector = connector
        self.config = config or EngineConfig()
        if self.config.fold_gqa:
            use_k2_attention(model)
        self.clock: ClockSource = clock or SystemClock()
        self.device = torch.device(self.config.device or str(next(model.parameters()).device))
        self.model_dtype: torch.dtype = next(model.parameters()).dtype
        self.spec = (
            connector.spec
            if connector is not None
            else block_spec_for(
                model.config, block_tokens=self.config.block_tokens, dtype=self.config.kv_dtype
            )
        )
        self.prefill_cost = PrefillCostModel()
        if connector is not None:  # the connector weighs fetches against this engine's passes
            connector.cost.prefill_model = self.prefill_cost.marginal
        self._lock = asyncio.Lock()
        self._stores: set[asyncio.Task[None]] = set()
        self._host_mirror = self.device.type == "cuda"
        """Build loaded caches through a host mirror (`_CacheBuilder.host`): on a GPU (tests
        also switch it on for a CPU engine, where the mirror is not pinned)."""
        self._buffers = _BufferPool(
            lambda n: torch.empty(n, dtype=self.model_dtype, device=self.device)
        )
        """Free flat KV buffers for `_CacheBuilder`. A fresh 100 MB buffer costs its page faults
        on every request (~25 ms here, on the thread converting blocks into it), since the
        allocator hands memory that large back to the system when it is freed."""
        pin = self.device.type == "cuda"
        self._hosts = _BufferPool(
            lambda n: torch.empty(n, dtype=self.spec.torch_dtype, pin_memory=pin)
        )
        """Free host mirrors for `_CacheBuilder`, in the tier's dtype; pinned on a GPU (pinning is
        slow, hence the pool; copies from pageable memory would not overlap with anything)."""
        # Every torch call runs on the process's one torch thread (kvtier/torchthread.py:
        # a second thread that runs parallel operators makes every forward pass slower).
        self._torch = torchthread.executor()
        self.requests = 0
        self.history: list[RequestMetrics] = []
        """Metrics of finished requests (the last 1,000)."""

    def _now(self) -> int:
        return self.clock.monotonic_ns()

    def _lease_buffer(self, numel: int) -> torch.Tensor:
        """A flat buffer of at least numel elements for a cache built from the tier (see
        `_buffers`; tests wrap this to watch which buffer a request got)."""
        return self._buffers.lease(numel)

    def _return_host(self, builder: _CacheBuilder) -> None:
        """Take a builder's host mirror back once the request's pass has run: the pass follows
        every upload from it on the stream and ends by reading its logits (a synchronisation),
        so no copy from it is still in flight."""
        assert builder.host_flat is not None
        self._hosts.give_back(builder.host_flat)
        builder.host_flat = None

    def _return_buffer(self, flat: torch.Tensor) -> None:
        """Take a buffer back once nothing reads the cache built in it."""
        self._buffers.give_back(flat)

    async def _in_torch(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the engine's torch thread (see `_torch`)."""
        return await asyncio.get_running_loop().run_in_executor(self._torch, fn, *args)

    # -- public API -----------------------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        arrived_ns: int | None = None,
        fresh_regions: Sequence[str] = (),
    ) -> AsyncIterator[TokenEvent]:
        """Stream the completion of prompt_ids token by token. The last event carries the
        finish reason and the request's metrics. Stops early if the caller stops iterating.
        `arrived_ns` (this engine's clock): when the request arrived, if earlier than this call
        (a serving node reads the session first); TTFT counts from it. `fresh_regions`: regions
        whose block rows must be read current, at their leaders (one wide-area round) rather
        than at this region's replicas, e.g. where a session that just moved here was served
        a moment ago."""
        p = params or SamplingParams()
        if not prompt_ids:
            raise ValueError("empty prompt")
        t0 = self._now() if arrived_ns is None else arrived_ns
        ids = [int(t) for t in prompt_ids]
        async with self._lock:
            pre = await self._prefill(
                ids, t0, all_logits=False, fresh_regions=fresh_regions, pooled=True
            )
            m = pre.metrics
            gen = torch.Generator(device="cpu")
            if p.seed is not None:
                gen.manual_seed(p.seed)
            else:
                gen.seed()
            out: list[int] = []
            text = ""
            logits = pre.logits[-1]
            last_t = t0
            finish: str | None = None
            try:
                while True:
                    tok = await self._in_torch(_sample, logits, p, gen)
                    out.append(tok)
                    now = self._now()
                    if len(out) == 1:
                        m.ttft_s = (now - t0) / 1e9
                    else:
                        m.inter_token_s.append((now - last_t) / 1e9)
                    last_t = now
                    if p.stop_at_eos and tok in self.tokenizer.eos_ids:
                        finish = "stop"
                    elif len(out) >= p.max_tokens:
                        finish = "length"
                    new_text = self.tokenizer.decode(out)
                    delta = new_text[len(text) :] if new_text.startswith(text) else new_text
                    # Hold back a trailing replacement character: the rest of a multi-byte
                    # character comes with the next token.
                    if finish is None and delta.endswith("\ufffd"):
                        delta = ""
                    else:
                        text = new_text
                    m.completion_tokens = len(out)
                    if finish is not None:
                        m.total_s = (self._now() - t0) / 1e9
                        self._finish(ids, out, pre.cache, m, pre.buffer)
                        yield TokenEvent(tok, delta, len(out) - 1, finish, m)
                        return
                    yield TokenEvent(tok, delta, len(out) - 1)
                    logits = await self._in_torch(self._step, pre.cache, tok)
            finally:
                if finish is None:  # the caller stopped early: still keep what was computed
                    m.total_s = (self._now() - t0) / 1e9
                    self._finish(ids, out, pre.cache, m, pre.buffer)

    async def complete(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None
    ) -> Completion:
        ids: list[int] = []
        text: list[str] = []
        finish, metrics = "length", RequestMetrics()
        async for ev in self.generate(prompt_ids, params):
            ids.append(ev.token_id)
            text.append(ev.text)
            if ev.finish_reason is not None:
                finish = ev.finish_reason
                metrics = ev.metrics or metrics
        return Completion(ids, "".join(text), finish, metrics)

    async def prefill(
        self, prompt_ids: Sequence[int], *, all_logits: bool = False, use_tier: bool = True
    ) -> PrefillResult:
        """Lookup, load and prefill only (tests and benchmarks): the logits of the computed
        positions and the cache. Stores nothing."""
        ids = [int(t) for t in prompt_ids]
        async with self._lock:
            return await self._prefill(ids, self._now(), all_logits=all_logits, use_tier=use_tier)

    async def store(self, token_ids: Sequence[int], cache: Any) -> int:
        """Store the full blocks of token_ids from cache (which must cover them); returns the
        blocks put. Used by `generate` after each request; public for benchmarks."""
        if self.connector is None:
            return 0
        ids = [int(t) for t in token_ids]
        n_full = len(ids) // self.spec.block_tokens * self.spec.block_tokens
        if n_full == 0:
            return 0
        kv = await self._in_torch(self._export, cache, n_full)
        try:
            r = await self.connector.store(ids[:n_full], kv)
        except Exception as e:  # a failed store only loses reuse
            log.warning("storing %d blocks failed: %s", n_full // self.spec.block_tokens, e)
            return 0
        return r.stored

    async def flush(self) -> None:
        """Wait until the stores of finished requests are done (the demo and tests use it)."""
        while self._stores:
            await asyncio.gather(*list(self._stores), return_exceptions=True)

    async def calibrate(self, sizes: Sequence[int] = (128, 512, 1024)) -> None:
        """Seed the prefill cost model with prefills of these sizes (random token ids)."""
        g = torch.Generator().manual_seed(0)
        vocab = int(self.model.config.get_text_config().vocab_size)
        async with self._lock:
            await self._in_torch(self._forward, [1] * 16, None, False)  # warm-up, untimed
            for n in sizes:
                ids = torch.randint(0, vocab, (n,), generator=g).tolist()
                t = self._now()
                await self._in_torch(self._forward, ids, None, False)
                self._observe_prefill(n, (self._now() - t) / 1e9)

    # -- internals ------------------------------------------------------------------------------

    def _observe_prefill(self, tokens: int, seconds: float) -> None:
        """A measured prefill from an empty cache: for this engine's estimates, and for the
        connector's cost model, which weighs fetching blocks against recomputing them."""
        self.prefill_cost.observe(0, tokens, seconds)
        if self.connector is not None:
            self.connector.cost.observe_prefill(tokens, seconds)

    async def _prefill(
        self,
        ids: list[int],
        t0: int,
        *,
        all_logits: bool,
        use_tier: bool = True,
        fresh_regions: Sequence[str] = (),
        pooled: bool = False,
    ) -> PrefillResult:
        """`pooled`: build a cache loaded from the tier in a pooled buffer; the result's
        `buffer` must then go back (`_return_buffer`) once nothing reads the cache."""
        m = RequestMetrics(prompt_tokens=len(ids))
        self.requests += 1
        m.recompute_estimate_s = self.prefill_cost.estimate(len(ids))
        built: _CacheBuilder | None = None
        builder: _CacheBuilder | None = None
        cached = 0
        fed: tuple[Any, torch.Tensor, int] | None = None
        if self.connector is not None and use_tier:
            skipped = self.connector.stats.skipped_by_cost
            # Other regions' copies are not confirmed before loading: the load finds out.
            found = await self.connector.lookup(
                ids, confirm_remote=False, fresh_regions=fresh_regions
            )
            skipped = self.connector.stats.skipped_by_cost - skipped
            t1 = self._now()
            m.lookup_s = (t1 - t0) / 1e9
            m.offered_tokens = found.num_tokens + skipped * self.spec.block_tokens
            if skipped:
                m.choice = "recompute"
            if found.num_tokens:
                builder = await self._in_torch(
                    functools.partial(_CacheBuilder, pooled=pooled), self, found.num_tokens
                )
                feed = _LayerFeed(builder, len(found.blocks), asyncio.get_running_loop())
                layers = self._decoder_layers() if self.config.layerwise else None
                # The pass starts now, on the torch thread, and takes each block part as it
                # arrives; its layers wait for theirs (without `layers`: all, then the pass).
                pending = asyncio.get_running_loop().run_in_executor(
                    self._torch,
                    self._feed_forward,
                    ids,
                    builder,
                    found.num_tokens,
                    all_logits,
                    feed,
                    layers,
                )
                try:
                    got = await self.connector.retrieve(ids, found, sink=feed.sink)
                finally:
                    t2 = self._now()
                    feed.close()
                    fed = await pending
                m.load_s = (t2 - t1) / 1e9
                cached = got.num_tokens
                if fed is not None and (cached < found.num_tokens or feed.repeated):
                    fed = None  # computed on a part that did not verify: computed again below
                m.failed_blocks = got.failed_blocks
                m.bytes_moved = got.bytes_moved
                m.cached_by_region = dict(got.by_region)
                m.bytes_loaded = sum(
                    b.size for b in found.blocks[: len(found.blocks) - got.failed_blocks]
                )
                if cached:
                    built = builder
                elif builder.flat is not None:  # nothing loaded: the buffer goes straight back
                    self._return_buffer(builder.flat)
            m.choice = _choice(m.cached_by_region, self.connector.config.region, m)
        m.cached_tokens = cached
        if fed is None:
            t3 = self._now()
            fed = await self._in_torch(self._load_and_forward, ids, built, cached, all_logits)
        else:  # the pass ran during the load: what of it the load did not hide
            t3 = t2
        cache, logits, computed = fed
        m.prefill_s = (self._now() - t3) / 1e9
        if builder is not None:
            m.convert_s = builder.convert_ns / 1e9
            if builder.host_flat is not None:  # on the torch thread, where it is leased
                await self._in_torch(self._return_host, builder)
        m.computed_tokens = computed
        if built is None:  # a clean measurement of prefill alone (no cache to build)
            self._observe_prefill(computed, m.prefill_s)
        if m.recompute_estimate_s is None:
            m.recompute_estimate_s = self.prefill_cost.estimate(len(ids))
        return PrefillResult(cache, logits, m, built.flat if built is not None else None)

    # The methods below run in a worker thread.

    def _new_cache(self) -> Any:
        """A DynamicCache whose full-attention layers append in place (`_growable_layer`)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        if all(type(layer) is DynamicLayer for layer in cache.layers):
            cls = _growable_layer()
            cache.layers = [cls() for _ in cache.layers]
        return cache

    def _decoder_layers(self) -> list[torch.nn.Module] | None:
        """The model's decoder layers in order, when it has one per tier layer (transformers'
        decoder-only models keep them in `model.model.layers`); else None."""
        inner = getattr(self.model, "model", None)
        layers = getattr(inner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == self.spec.num_layers:
            return list(layers)
        return None

    def _feed_forward(
        self,
        ids: list[int],
        builder: _CacheBuilder,
        planned: int,
        all_logits: bool,
        feed: _LayerFeed,
        layers: Sequence[torch.nn.Module] | None,
    ) -> tuple[Any, torch.Tensor, int] | None:
        """The pass over ids after `planned` cached tokens, run while they load: decoder layer i
        first waits for layer i of every block. None when the load fell short (the caller
        computes again on what arrived). Returns only once the feed is closed and drained."""
        try:
            if layers is None:
                feed.drain()
                return None
            hooks = [
                layer.register_forward_pre_hook(functools.partial(_wait_layer, feed, i))
                for i, layer in enumerate(layers)
            ]
            try:
                return self._load_and_forward(ids, builder, planned, all_logits)
            except _PrefixShort:
                return None
            finally:
                for h in hooks:
                    h.remove()
        finally:
            feed.drain()

    def _load_and_forward(
        self, ids: list[int], built: _CacheBuilder | None, cached: int, all_logits: bool
    ) -> tuple[Any, torch.Tensor, int]:
        cache = None
        # The last token's logits are needed: when every token came from the tier, recompute
        # the last one.
        start = min(cached, len(ids) - 1) if built is not None else 0
        if built is not None and start > 0:
            cache = built.finish(start)
        cache, logits = self._forward(ids[start:], cache, all_logits)
        return cache, logits, len(ids) - start

    @torch.inference_mode()
    def _forward(self, ids: list[int], cache: Any, all_logits: bool) -> tuple[Any, torch.Tensor]:
        if cache is None:
            cache = self._new_cache()
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=x,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        return out.past_key_values, out.logits[0].float().cpu()

    @torch.inference_mode()
    def _step(self, cache: Any, token: int) -> torch.Tensor:
        x = torch.tensor([[token]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float().cpu()  # type: ignore[no-any-return]

    def _export(self, cache: Any, num_tokens: int) -> torch.Tensor:
        """The first num_tokens of cache as one tensor in the tier's spec (CPU)."""
        layers = cache.layers
        dtype = self.spec.torch_dtype
        out = torch.empty(self.spec.shape(num_tokens), dtype=dtype)
        lkthd = self.spec.layout is Layout.LKTHD
        for i, layer in enumerate(layers):
            for j, t in enumerate((layer.keys, layer.values)):
                src = t[0, :, :num_tokens, :]
                if lkthd:
                    src = src.transpose(0, 1)
                out[i, j].copy_(src.to(dtype))
        return out

    def _finish(
        self,
        ids: list[int],
        out: list[int],
        cache: Any,
        m: RequestMetrics,
        buffer: torch.Tensor | None = None,
    ) -> None:
        """Record the request and store its blocks in the background; `buffer` (the pooled
        buffer the cache lives in) goes back to the pool once the store has read the cache."""
        self.history.append(m)
        del self.history[:-1000]
        # The cache holds the prompt and every generated token but the last (never fed back).
        tokens = ids + out[:-1] if self.config.store_generated else ids
        tokens = tokens[: cache.get_seq_length()]
        if (
            self.connector is None
            or not self.config.store
            or len(tokens) // self.spec.block_tokens * self.spec.block_tokens <= m.cached_tokens
        ):
            # Nothing new to keep (every full block came from the tier): the cache is done.
            if buffer is not None:
                self._return_buffer(buffer)
            return

        async def store() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                m.stored_blocks = await self.store(tokens, cache)

        task = asyncio.get_running_loop().create_task(store())
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)
        if buffer is not None:
            # Only once the export has read the cache (HAZARD: handed back earlier, the next
            # request would overwrite the blocks this store is exporting).
            task.add_done_callback(lambda _t: self._return_buffer(buffer))


_GROWABLE: list[type] = []


def _growable_layer() -> type:
    """A transformers DynamicLayer that appends into preallocated buffers instead of
    `torch.cat`, which copies the whole layer for every token (94 MB per decoded token for
    SmolLM2 at 2,048 tokens). `keys`/`values` stay views of the filled part, so everything
    that reads them (sequence length, masks, crop) works unchanged. Made on first use, so
    importing this module does not import transformers."""
    if _GROWABLE:
        return _GROWABLE[0]
    from transformers.cache_utils import DynamicLayer

    class GrowableLayer(DynamicLayer):  # type: ignore[no-untyped-call]
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self._kbuf: torch.Tensor | None = None
            self._vbuf: torch.Tensor | None = None

        def _filled(self) -> int:
            if not self.is_initialized or self.keys is None or self.keys.dim() < 2:
                return 0
            return int(self.keys.shape[-2])

        def _reserve(self, like: torch.Tensor, dtype: torch.dtype, need: int, room: int) -> None:
            n = self._filled()
            if self._kbuf is not None and self._kbuf.shape[-2] >= need:
                return
            cap = max(need + room, need * 3 // 2)
            shape = (*like.shape[:-2], cap, like.shape[-1])
            kb = torch.empty(
                shape, dtype=dtype, device=like.device if self._kbuf is None else self._kbuf.device
            )
            vb = torch.empty_like(kb)
            if n:
                assert self.keys is not None and self.values is not None
                kb[..., :n, :].copy_(self.keys)
                vb[..., :n, :].copy_(self.values)
            self._kbuf, self._vbuf = kb, vb

        def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            n = self._filled()
            need = n + key_states.shape[-2]
            assert self._kbuf is not None and self._vbuf is not None
            self._kbuf[..., n:need, :].copy_(key_states, non_blocking=True)
            self._vbuf[..., n:need, :].copy_(value_states, non_blocking=True)
            self.keys = self._kbuf[..., :need, :]
            self.values = self._vbuf[..., :need, :]

        def adopt(self, kbuf: torch.Tensor, vbuf: torch.Tensor, filled: int) -> None:
            """Start the layer with buffers whose first `filled` tokens are already written."""
            self.dtype, self.device = kbuf.dtype, kbuf.device
            self.is_initialized = True
            self._kbuf, self._vbuf = kbuf, vbuf
            self.keys = kbuf[..., :filled, :]
            self.values = vbuf[..., :filled, :]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            need = self._filled() + key_states.shape[-2]
            self._reserve(key_states, key_states.dtype, need, 256)
            self._append(key_states, value_states)
            assert self.keys is not None and self.values is not None
            return self.keys, self.values

        def reset(self) -> None:
            self._kbuf = self._vbuf = None
            super().reset()

    _GROWABLE.append(GrowableLayer)
    return GrowableLayer


def _wait_layer(feed: _LayerFeed, layer: int, _module: Any, _args: Any) -> None:
    """Forward pre-hook of decoder layer `layer` (see `Engine._feed_forward`)."""
    feed.wait_layer(layer)


def _choice(by_region: Mapping[str, int], here: str, m: RequestMetrics) -> str:
    """miss | local | remote | mixed; "recompute" when the cost model skipped every block found,
    and a "+recompute" suffix when it skipped some."""
    skipped = m.choice == "recompute"
    if not by_region:
        return "recompute" if skipped else "miss"
    regions = set(by_region)
    base = "local" if regions == {here} else "remote" if here not in regions else "mixed"
    return base + ("+recompute" if skipped else "")


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    if p.temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < p.top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=gen).item())
