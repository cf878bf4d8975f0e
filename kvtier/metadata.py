"""Block metadata in the K2 store: what exists, where its bytes live, who holds it, who pays.

Purpose
    The KV tier's source of truth. Block bytes live in block stores (kvtier/blockstore.py); this
    module keeps, transactionally, which regions hold which blocks of which namespace, pins,
    reader leases, last use, each region's block stores and capacity, and each tenant's quota and
    usage.

Key layout, version 2 (keys are UTF-8; every row of region R lives under ``R/``, on shards led in
R; the roots are k2store/security.py's, whose Guard grants tenant T's principal read and write on
``R/kv/t/<T>/`` and, with ``share_blocks``, ``R/kv/shared/``, and read only on its own config row
and the region rows)
    ::

        R/kv/tenant/<tenant>                        {"quota_bytes", "share"}  config, every region
        R/kv/region/R                               {"capacity_bytes", "stores": [address, ...]}
        R/kv/t/<tenant>/usage                       {"used_bytes", "blocks"}  tenant's bytes in R
        <root>ns/<nsid>                             namespace record          in every region
        <root>blk/<nsid>/<hash hex>                 R holds this block (row below)
        <root>lease/<nsid>/<hash hex>/<holder>      a reader's lease on R's copy: expiry ns,
                                                    or "released:<ns>" once it loaded (last use)
        <root>pin/<nsid>/<hash hex>/<holder>        a pin on R's copy: until ns, 0 = until unpinned

    where ``<root>`` is the namespace owner's: ``R/kv/t/<tenant>/`` for a tenant's namespace,
    ``R/kv/shared/`` for one shared between tenants (owner "" below, as at the block stores).
    Version 1 kept every row under ``R/kv/<kind>/`` with no tenant in the key, so only an admin
    token could serve; its rows are not read any more (re-register tenants and namespaces).

    Who writes what on a secured cluster: tenant and region rows are the operator's (an admin
    token: `register_tenant`, a block store's `register_store`); everything under a tenant's root,
    including its usage, is written by that tenant's own transactions (see k2store/security.py
    for what that lets a malicious tenant do to its own quota). A copy in a shared namespace is
    charged to its publisher's usage row, so only that publisher (or an admin: the placement
    sweeper) can remove it; another tenant's `remove` of it is refused (PermissionDenied) and the
    stale row stays until then, which readers treat as a miss.

    Block row: ``{"v": 1, "index": i, "size": frame bytes, "dtype", "layout", "checksum": the
    payload's checksum, "checksum_algorithm" (its frame's: "crc32c", or "crc32" from version-1
    frames), "hash_algorithm", "tenant": who pays for this copy,
    "published_ns", "last_use_ns"}``. Readers ignore fields they do not know (placement adds its
    own). Reads never rewrite a block row: a copy's recent use is in its lease rows (a held
    lease's expiry, or the time a reader released it), and `last_use_ns` is refreshed only by
    whoever rewrites the row anyway (placement).

Why per region
    A region's rows describe only that region's copies, so everything that changes them (publish,
    eviction, usage, leases, pins) is a transaction inside one region: one round trip to a local
    leader, never a read-then-write across the wide area (which, under K2-VCR's epoch seals, a
    cross-region transaction survives only if it finishes within the seal's grace). Finding a
    block anywhere is one read-only round over every region's row for it (`lookup`). Config rows
    (tenants, namespaces) are written blind to every region at once (one round) and read
    locally. Quotas are per region: a tenant's usage in R is checked against its quota in R's
    publish transaction.

Two-phase publish
    1. the bytes are put, durably, into a block store of region R (`BlockStore.put` fsyncs);
    2. one transaction in R reads the tenant's quota and usage and the block rows, checks the
       quota, writes the new rows and the usage. Quota and publication commit together or not
       at all.
    Removal runs the other way: the row goes first (`remove`, `evict`), then the bytes may be
    deleted. So a row in R implies R's store received the bytes; they can still be lost later
    (node loss, corruption), which readers handle as a miss and report with `remove`.

Leases and pins
    Each lease and pin is its own row, so readers never write the same key (no conflicts between
    them). `evict` refuses a copy with an unexpired lease or pin. Releasing a lease rewrites its
    row as "released:<ns>" rather than deleting it: the row then holds nothing back but keeps
    the copy's last use, which the placement sweeper ranks copies by (a copy read a moment ago
    must not look as cold as its publish time). A copy's lease rows go with its block row
    (`evict`, `remove`), so they are bounded by the readers that used the copy; a lease or
    release written just after its copy went (both are blind writes) stays behind as an orphan
    row, which nothing reads (a copy's rows are found from its block row). A lease is taken
    just after the read that found the block (separate transactions, so that a lookup is one
    read-only round plus one blind write round); an eviction in between makes the load fail,
    which the reader counts and recomputes (a miss, never wrong data).
    HAZARD: lease expiry compares timestamps from different machines' clocks. If a reader's
    clock runs behind the evictor's by more than the lease TTL minus the reader's load time, a
    block can be evicted under it, with the same outcome (a counted miss). The default TTL
    (30 s) is far above the clock bound.

Failure modes
    Unknown tenant or namespace: `UnknownTenant`, `UnknownNamespace`. A shared namespace for a
    tenant that has not opted in: `SharingNotAllowed`. Over quota: `QuotaExceeded`, nothing
    published. Store errors are the client's (`TxnAborted` is retried by `client.run`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2store.client import AsyncClient, AsyncTransaction, KeyLike
from k2store.errors import InvalidArgument, K2Error
from k2store.security import (
    KV_REGION_ROOT,
    KV_SHARED_ROOT,
    KV_TENANT_CONFIG_ROOT,
    KV_TENANT_ROOT,
)
from kvtier.blocks import CHECKSUM_ALGORITHM, HASH_ALGORITHM, Namespace
from kvtier.errors import QuotaExceeded, SharingNotAllowed, UnknownNamespace, UnknownTenant
from truetime import ClockSource, SystemClock

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LEASE_S",
    "LAYOUT_VERSION",
    "BlockInfo",
    "BlockMetadata",
    "BlockRow",
    "NamespaceRecord",
    "PublishBlock",
    "PublishResult",
    "RegionCopy",
    "RegionRecord",
    "TenantRecord",
    "block_key",
    "blocks_prefix",
    "lease_prefix",
    "leases_prefix",
    "namespace_key",
    "owner_of",
    "owner_root",
    "pin_prefix",
    "region_key",
    "tenant_key",
    "usage_key",
]

DEFAULT_LEASE_S = 30.0
_NS = 1_000_000_000


LAYOUT_VERSION = 2
"""Of the key layout in the module doc."""


def tenant_key(region: str, tenant: str) -> str:
    return f"{region}/{KV_TENANT_CONFIG_ROOT}{tenant}"


def region_key(region: str) -> str:
    return f"{region}/{KV_REGION_ROOT}{region}"


def owner_of(ns: NamespaceRecord | Namespace) -> str:
    """Whose root a namespace's rows live under: its tenant, or "" when it is shared."""
    return "" if ns.shared else ns.tenant


def owner_root(region: str, owner: str) -> str:
    """``R/kv/t/<owner>/``, or ``R/kv/shared/`` for owner "" (namespaces shared by tenants)."""
    if "/" in owner:
        raise InvalidArgument(f"tenant name {owner!r}")
    return f"{region}/{KV_TENANT_ROOT}{owner}/" if owner else f"{region}/{KV_SHARED_ROOT}"


def usage_key(region: str, tenant: str) -> str:
    if not tenant:
        raise InvalidArgument("usage is charged to a tenant, not to the shared namespace")
    return owner_root(region, tenant) + "usage"


def namespace_key(region: str, owner: str, nsid: str) -> str:
    return owner_root(region, owner) + f"ns/{nsid}"


def blocks_prefix(region: str, owner: str) -> str:
    """Every block row of `owner`'s namespaces in `region`."""
    return owner_root(region, owner) + "blk/"


def block_key(region: str, owner: str, nsid: str, block_hash: bytes) -> str:
    return blocks_prefix(region, owner) + f"{nsid}/{block_hash.hex()}"


def leases_prefix(region: str, owner: str) -> str:
    return owner_root(region, owner) + "lease/"


def lease_prefix(region: str, owner: str, nsid: str, block_hash: bytes) -> str:
    return leases_prefix(region, owner) + f"{nsid}/{block_hash.hex()}/"


def pin_prefix(region: str, owner: str, nsid: str, block_hash: bytes) -> str:
    return owner_root(region, owner) + f"pin/{nsid}/{block_hash.hex()}/"


def _dump(d: Mapping[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _load(raw: bytes, where: str) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise InvalidArgument(f"malformed metadata row {where}: {e}") from None
    if not isinstance(d, dict):
        raise InvalidArgument(f"malformed metadata row {where}: not an object")
    return d


def _holder(holder: str) -> str:
    if not holder or "/" in holder or not holder.isprintable() or len(holder) > 128:
        raise InvalidArgument(f"holder id {holder!r}: 1-128 printable characters, no '/'")
    return holder


_RELEASED = b"released:"


def parse_lease(raw: bytes, where: str) -> tuple[int, bool]:
    """A lease row's (ns, held): a lease's expiry and True, or the release time of a lease its
    reader gave back and False (it holds nothing: only a record of last use)."""
    try:
        if raw.startswith(_RELEASED):
            return int(raw[len(_RELEASED) :]), False
        return int(raw), True
    except ValueError:
        raise InvalidArgument(f"malformed lease row {where}: {raw[:64]!r}") from None


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(frozen=True, slots=True)
class TenantRecord:
    tenant: str
    region: str
    """The region whose rows this record was read from (usage is per region)."""
    quota_bytes: int
    used_bytes: int
    blocks: int
    share: bool
    """The tenant opted in to namespaces shared with other tenants."""


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    nsid: str
    tenant: str
    shared: bool
    fields: dict[str, Any]
    """What `Namespace.describe` recorded (model revision, tokenizer, spec, hash algorithm)."""


@dataclass(frozen=True, slots=True)
class RegionRecord:
    region: str
    capacity_bytes: int
    stores: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BlockRow:
    """One region's copy of one block."""

    block_hash: bytes
    region: str
    index: int
    size: int
    checksum: int
    tenant: str
    """Who pays for this copy."""
    last_use_ns: int
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def parse(cls, block_hash: bytes, region: str, raw: bytes, where: str) -> BlockRow:
        d = _load(raw, where)
        try:
            return cls(
                block_hash,
                region,
                int(d["index"]),
                int(d["size"]),
                int(d["checksum"]),
                str(d["tenant"]),
                int(d.get("last_use_ns", 0)),
                d,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"malformed block row {where}: {e!r}") from None


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """A block and every region's copy of it."""

    block_hash: bytes
    index: int
    size: int
    copies: dict[str, BlockRow]

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(sorted(self.copies))


@dataclass(frozen=True, slots=True)
class RegionCopy:
    """One copy a region holds, as an operator's scan finds it (`BlockMetadata.region_copies`)."""

    owner: str
    """The namespace's tenant, "" for a shared namespace."""
    nsid: str
    row: BlockRow
    newest_lease_ns: int
    """Expiry of the newest lease held on this copy, expired or not (0: none)."""
    last_release_ns: int = 0
    """When a reader last released a lease on this copy, after loading it (0: never)."""

    @property
    def record(self) -> NamespaceRecord:
        """Enough of the namespace's record to address this copy's rows (`evict`, `remove`)."""
        return NamespaceRecord(self.nsid, self.owner, not self.owner, {})


@dataclass(frozen=True, slots=True)
class PublishBlock:
    """A block whose bytes are already durable in the publishing region (phase one done)."""

    block_hash: bytes
    index: int
    size: int
    checksum: int
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    """Of `checksum`: the frame's (`BlockHeader.checksum_algorithm`)."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    published: int
    """Blocks the region did not hold before."""
    unchanged: int
    """Blocks the region already held (nothing charged)."""
    charged_bytes: int
    ts: int
    """Timestamp of the publishing transaction (its commit timestamp under K2-MVTO)."""


class BlockMetadata:
    """Transactions over the rows above, through a K2 `AsyncClient` (retries included).

    Reads of config rows go to the client's region. `clock` supplies lease, pin and last-use
    times (injected; tests pass a ManualClock)."""

    def __init__(self, client: AsyncClient, *, clock: ClockSource | None = None) -> None:
        self.client = client
        self.local_region = client.region
        self.clock: ClockSource = clock or SystemClock()

    def _regions(self) -> list[str]:
        return self.client.cluster.region_names()

    def _check_region(self, region: str) -> str:
        self.client.cluster.region(region)  # UnknownNode (InvalidArgument) on a typo
        return region

    async def _blind(self, writes: Mapping[KeyLike, bytes | None]) -> int:
        """Write without reading: one round to every shard involved, so even a transaction
        over every region survives epoch seals (its keys are declared for a future timestamp)."""
        if not writes:
            return 0
        keys = list(writes)

        async def fn(tx: AsyncTransaction) -> int:
            await tx.put_many(dict(writes))
            return tx.ts

        return await self.client.run(fn, keys=keys)

    # -- tenants and namespaces ----------------------------------------------------------------

    async def register_tenant(
        self,
        tenant: str,
        *,
        quota_bytes: int,
        share: bool = False,
        region_quota: Mapping[str, int] | None = None,
    ) -> None:
        """Create a tenant or change its quota and sharing, in every region at once. The quota
        holds in each region separately (`region_quota` overrides it for some regions); usage
        rows are untouched."""
        if not tenant or "/" in tenant:
            raise InvalidArgument(f"tenant name {tenant!r}")
        for q in [quota_bytes, *(region_quota or {}).values()]:
            if q < 0:
                raise InvalidArgument(f"tenant {tenant}: quotas must be >= 0, got {q}")
        overrides = {self._check_region(r): q for r, q in (region_quota or {}).items()}
        await self._blind(
            {
                tenant_key(r, tenant): _dump(
                    {"quota_bytes": overrides.get(r, quota_bytes), "share": share}
                )
                for r in self._regions()
            }
        )

    async def tenant(self, tenant: str, *, region: str | None = None) -> TenantRecord:
        """The tenant's quota and its usage in `region` (default: this client's)."""
        r = self._check_region(region or self.local_region)
        cfg_raw, use_raw = await self.client.run(
            lambda tx: tx.get_many([tenant_key(r, tenant), usage_key(r, tenant)]),
            read_only=True,
        )
        if cfg_raw is None:
            raise UnknownTenant(f"unknown tenant {tenant!r}: register it first")
        cfg = _load(cfg_raw, tenant_key(r, tenant))
        use = _load(use_raw, usage_key(r, tenant)) if use_raw is not None else {}
        return TenantRecord(
            tenant,
            r,
            int(cfg.get("quota_bytes", 0)),
            int(use.get("used_bytes", 0)),
            int(use.get("blocks", 0)),
            bool(cfg.get("share", False)),
        )

    async def register_namespace(self, ns: Namespace) -> NamespaceRecord:
        """Record a namespace in every region (idempotent: the record is a function of ns). A
        shared namespace needs the tenant's opt-in."""
        t = await self.tenant(ns.tenant)
        if ns.shared and not t.share:
            raise SharingNotAllowed(
                f"tenant {ns.tenant} has not opted in to sharing; namespace {ns.id} is shared"
            )
        record = ns.describe()
        await self._blind(
            {namespace_key(r, owner_of(ns), ns.id): _dump(record) for r in self._regions()}
        )
        return _namespace_record(ns.id, record)

    async def namespace(self, ns: Namespace) -> NamespaceRecord:
        """The registered record of ns; `UnknownNamespace` when it was never registered, and
        `SharingNotAllowed` when ns is shared and its tenant has not opted in."""
        key = namespace_key(self.local_region, owner_of(ns), ns.id)
        raw = await self.client.get(key)
        if raw is None:
            raise UnknownNamespace(
                f"namespace {ns.id} (model {ns.model_revision}, tokenizer {ns.tokenizer_id}, "
                f"{ns.dtype}/{ns.layout.value}, tenant {ns.tenant}) is not registered"
            )
        rec = _namespace_record(ns.id, _load(raw, key))
        if rec.fields.get("hash_algorithm") != HASH_ALGORITHM:
            raise UnknownNamespace(
                f"namespace {ns.id} was hashed with {rec.fields.get('hash_algorithm')}, this "
                f"build uses {HASH_ALGORITHM}"
            )
        if ns.shared and not (await self.tenant(ns.tenant)).share:
            raise SharingNotAllowed(f"tenant {ns.tenant} has not opted in to shared namespaces")
        return rec

    # -- regions -------------------------------------------------------------------------------

    async def register_store(self, region: str, address: str, *, capacity_bytes: int) -> None:
        """Add a block store's address to its region's row (a transaction in that region);
        the region's capacity is the largest any of its stores reported."""
        key = region_key(self._check_region(region))

        async def fn(tx: AsyncTransaction) -> None:
            raw = await tx.get(key)
            row: dict[str, Any] = (
                _load(raw, key) if raw is not None else {"capacity_bytes": 0, "stores": []}
            )
            row["stores"] = [s for s in row["stores"] if s != address] + [address]
            row["capacity_bytes"] = max(int(row["capacity_bytes"]), capacity_bytes)
            await tx.put(key, _dump(row))

        await self.client.run(fn, keys=[key])

    async def region(self, region: str) -> RegionRecord | None:
        raw = await self.client.get(region_key(region))
        if raw is None:
            return None
        d = _load(raw, region_key(region))
        return RegionRecord(region, int(d["capacity_bytes"]), tuple(d["stores"]))

    # -- operator scans (admin token) -----------------------------------------------------------

    async def tenants(self, region: str | None = None) -> list[str]:
        """Every tenant registered in `region` (default: this client's). Reads every tenant's
        config row: an operator's call (admin token on a secured cluster)."""
        prefix = f"{self._check_region(region or self.local_region)}/{KV_TENANT_CONFIG_ROOT}"
        rows = await self.client.scan(prefix, _prefix_end(prefix))
        return [k.decode()[len(prefix) :] for k, _ in rows]

    async def region_copies(self, region: str) -> list[RegionCopy]:
        """Every block copy published in `region`, each tenant's and the shared namespaces',
        with its newest lease: the registered tenants are listed, then each owner's block and
        lease rows are scanned. An operator's call (placement, the router's resync)."""
        self._check_region(region)
        owners = ["", *await self.tenants(region)]
        out: list[RegionCopy] = []
        for owner in owners:
            blk, lease = blocks_prefix(region, owner), leases_prefix(region, owner)
            rows = await self.client.scan(blk, _prefix_end(blk))
            if not rows:
                continue
            leases = await self.client.scan(lease, _prefix_end(lease))
            newest: dict[tuple[str, str], int] = {}
            released: dict[tuple[str, str], int] = {}
            for k, v in leases:
                parts = k.decode()[len(lease) :].split("/")  # nsid, hash, holder
                if len(parts) == 3:
                    at = (parts[0], parts[1])
                    ns, held = parse_lease(v, k.decode())
                    into = newest if held else released
                    into[at] = max(into.get(at, 0), ns)
            for k, v in rows:
                parts = k.decode()[len(blk) :].split("/")  # nsid, hash
                if len(parts) != 2:
                    continue
                h = bytes.fromhex(parts[1])
                row = BlockRow.parse(h, region, v, k.decode())
                at = (parts[0], parts[1])
                out.append(RegionCopy(owner, parts[0], row, newest.get(at, 0), released.get(at, 0)))
        return out

    # -- finding blocks ------------------------------------------------------------------------

    async def lookup(
        self,
        rec: NamespaceRecord,
        hashes: Sequence[bytes],
        *,
        regions: Sequence[str] = (),
        replica_regions: Sequence[str] = (),
        timeout_s: float | None = None,
        unreachable: list[str] | None = None,
    ) -> list[BlockInfo]:
        """The longest prefix of `hashes` of which some region holds every block, with each
        block's copies. Each region's rows are read in its own one-shot read-only transaction
        (`AsyncClient.read_many`: one round trip to a coordinator), all in parallel; a region
        that fails or takes longer than `timeout_s` counts as holding nothing and is appended to
        `unreachable`, so a region that went away costs a timeout, not every lookup.

        Rows of `replica_regions` are read instead from the replicas in this client's region, in
        one snapshot at the region's visible timestamp: no wide-area round trip, at the price of
        missing rows published in the last visibility delay (a few hundred ms; such a block is
        recomputed). Where the replicas cannot answer, those regions are read at their leaders."""
        if not hashes:
            return []
        rs = list(regions) or self._regions()
        stale = [r for r in rs if r in replica_regions]

        async def read(r: str) -> list[bytes | None]:
            keys: list[KeyLike] = [block_key(r, owner_of(rec), rec.nsid, h) for h in hashes]
            return await self.client.read_many(keys)  # one round trip, not three

        async def read_replicas() -> dict[str, list[bytes | None]]:
            if not stale:
                return {}
            keys: list[KeyLike] = [
                block_key(r, owner_of(rec), rec.nsid, h) for r in stale for h in hashes
            ]
            try:
                raws = await asyncio.wait_for(
                    self.client.replica_snapshot().get_many(keys), timeout_s
                )
            except (K2Error, TimeoutError) as e:
                log.info("replica lookup failed, reading %s at their leaders: %s", stale, e)
                return {}
            n = len(hashes)
            return {r: raws[j * n : (j + 1) * n] for j, r in enumerate(stale)}

        async def read_leaders(regions: list[str]) -> None:
            results = await asyncio.gather(
                *(asyncio.wait_for(read(r), timeout_s) for r in regions), return_exceptions=True
            )
            for r, res in zip(regions, results, strict=True):
                if isinstance(res, K2Error | TimeoutError):
                    if unreachable is not None:
                        unreachable.append(r)
                    continue
                if isinstance(res, BaseException):
                    raise res
                per_region[r] = res

        per_region: dict[str, list[bytes | None]] = {}
        replicated, _ = await asyncio.gather(
            read_replicas(), read_leaders([r for r in rs if r not in stale])
        )
        per_region.update(replicated)
        missed = [r for r in stale if r not in replicated]
        if missed:
            await read_leaders(missed)
        out: list[BlockInfo] = []
        for i, h in enumerate(hashes):
            copies: dict[str, BlockRow] = {}
            for r in sorted(per_region):
                raw = per_region[r][i]
                if raw is not None:
                    copies[r] = BlockRow.parse(h, r, raw, block_key(r, owner_of(rec), rec.nsid, h))
            if not copies:
                break
            first = next(iter(copies.values()))
            out.append(BlockInfo(h, first.index, first.size, copies))
        return out

    async def rows(
        self, rec: NamespaceRecord, hashes: Sequence[bytes], region: str
    ) -> list[BlockRow | None]:
        """Region's row for each block (None where it holds none), read at one snapshot."""
        if not hashes:
            return []
        keys: list[KeyLike] = [block_key(region, owner_of(rec), rec.nsid, h) for h in hashes]
        raws = await self.client.run(lambda tx: tx.get_many(keys), read_only=True)
        return [
            None if raw is None else BlockRow.parse(h, region, raw, str(k))
            for h, k, raw in zip(hashes, keys, raws, strict=True)
        ]

    async def block(self, rec: NamespaceRecord, block_hash: bytes) -> BlockInfo | None:
        found = await self.lookup(rec, [block_hash])
        return found[0] if found else None

    async def lease(
        self,
        rec: NamespaceRecord,
        region: str,
        hashes: Sequence[bytes],
        holder: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        """Lease region's copies of these blocks to holder for lease_s (a blind write in the
        region), so eviction there keeps its hands off while the holder loads them."""
        _holder(holder)
        until = str(self.clock.now_ns() + int(lease_s * _NS)).encode()
        await self._blind(
            {lease_prefix(region, owner_of(rec), rec.nsid, h) + holder: until for h in hashes}
        )

    async def release(
        self, rec: NamespaceRecord, region: str, hashes: Sequence[bytes], holder: str
    ) -> None:
        """Give back holder's leases (best done after loading; they also expire on their own).
        Each row stays, as "released:<now>": it holds nothing back any more but records the
        copy's last use for placement."""
        _holder(holder)
        at = _RELEASED + str(self.clock.now_ns()).encode()
        await self._blind(
            {lease_prefix(region, owner_of(rec), rec.nsid, h) + holder: at for h in hashes}
        )

    # -- publishing and removing ---------------------------------------------------------------

    async def publish(
        self,
        rec: NamespaceRecord,
        tenant: str,
        region: str,
        blocks: Sequence[PublishBlock],
    ) -> PublishResult:
        """Phase two: record that `region` holds these blocks and charge `tenant` for every
        byte it newly holds there, in one transaction in the region with the quota check.

        Precondition (phase one, the caller's): each block's frame is durable in a block store
        of `region`. Raises QuotaExceeded (nothing published) when the tenant would go over."""
        self._check_region(region)
        if rec.tenant != tenant and not rec.shared:
            raise SharingNotAllowed(
                f"tenant {tenant} cannot publish into namespace {rec.nsid} of tenant {rec.tenant}"
            )
        tkey, ukey = tenant_key(region, tenant), usage_key(region, tenant)
        bkeys: list[KeyLike] = [
            block_key(region, owner_of(rec), rec.nsid, b.block_hash) for b in blocks
        ]

        async def fn(tx: AsyncTransaction) -> PublishResult:
            cfg_raw, use_raw, *raws = await tx.get_many([tkey, ukey, *bkeys])
            if cfg_raw is None:
                raise UnknownTenant(f"unknown tenant {tenant!r} in {region}: register it first")
            cfg = _load(cfg_raw, tkey)
            if rec.shared and not cfg.get("share"):
                raise SharingNotAllowed(f"tenant {tenant} has not opted in to sharing")
            use = _load(use_raw, ukey) if use_raw is not None else {"used_bytes": 0, "blocks": 0}
            now = self.clock.now_ns()
            published = unchanged = charged = 0
            writes: dict[KeyLike, bytes | None] = {}
            for b, key, raw in zip(blocks, bkeys, raws, strict=True):
                if raw is not None:
                    row = _load(raw, str(key))
                    # Checksums compare only under one algorithm (a copy published from a
                    # version-1 frame has zlib's "crc32"; rows from before the field, too).
                    same_algorithm = row.get("checksum_algorithm", "crc32") == b.checksum_algorithm
                    if row.get("size") != b.size or (
                        same_algorithm and row.get("checksum") != b.checksum
                    ):
                        raise InvalidArgument(
                            f"block {b.block_hash.hex()[:16]} in namespace {rec.nsid}: the new "
                            f"bytes differ from the ones published in {region}"
                        )
                    unchanged += 1
                    continue
                writes[key] = _dump(
                    {
                        "v": 1,
                        "index": b.index,
                        "size": b.size,
                        "dtype": rec.fields["spec"]["dtype"],
                        "layout": rec.fields["spec"]["layout"],
                        "checksum": b.checksum,
                        "checksum_algorithm": b.checksum_algorithm,
                        "hash_algorithm": HASH_ALGORITHM,
                        "tenant": tenant,
                        "published_ns": now,
                        "last_use_ns": now,
                    }
                )
                published += 1
                charged += b.size
            used = int(use.get("used_bytes", 0)) + charged
            quota = int(cfg.get("quota_bytes", 0))
            if charged and used > quota:
                raise QuotaExceeded(
                    f"tenant {tenant}: publishing {charged} bytes in {region} would use {used} "
                    f"of its {quota}-byte quota there; nothing was published"
                )
            if writes:
                use.update(used_bytes=used, blocks=int(use.get("blocks", 0)) + published)
                writes[ukey] = _dump(use)
                await tx.put_many(writes)
            return PublishResult(published, unchanged, charged, tx.ts)

        return await self.client.run(fn, keys=[tkey, ukey, *bkeys])

    async def remove(self, rec: NamespaceRecord, hashes: Sequence[bytes], region: str) -> int:
        """Forget region's copies of these blocks (their bytes were lost, corrupt or are being
        dropped), refunding whoever paid for them. Returns how many rows went. Ignores leases
        and pins: use `evict` for voluntary removal."""
        return await self._remove(rec, hashes, region, check_holds=False)

    async def evict(self, rec: NamespaceRecord, block_hash: bytes, region: str) -> bool:
        """Remove region's copy unless it is pinned or leased there; True when removed. The
        caller deletes the region's bytes only after this returns True (metadata first)."""
        return await self._remove(rec, [block_hash], region, check_holds=True) == 1

    async def _remove(
        self, rec: NamespaceRecord, hashes: Sequence[bytes], region: str, *, check_holds: bool
    ) -> int:
        self._check_region(region)
        bkeys: list[KeyLike] = [block_key(region, owner_of(rec), rec.nsid, h) for h in hashes]

        async def fn(tx: AsyncTransaction) -> int:
            raws = await tx.get_many(bkeys)
            now = self.clock.now_ns()
            refunds: dict[str, tuple[int, int]] = {}
            writes: dict[KeyLike, bytes | None] = {}
            for h, key, raw in zip(hashes, bkeys, raws, strict=True):
                if raw is None:
                    continue
                row = BlockRow.parse(h, region, raw, str(key))
                lprefix = lease_prefix(region, owner_of(rec), rec.nsid, h)
                leases = await tx.scan(lprefix, _prefix_end(lprefix))
                if check_holds:
                    held = False
                    for k, v in leases:
                        until, holds = parse_lease(v, k.decode())
                        held |= holds and until > now
                    pprefix = pin_prefix(region, owner_of(rec), rec.nsid, h)
                    for _, v in await tx.scan(pprefix, _prefix_end(pprefix)):
                        until = int(v)
                        held |= until == 0 or until > now
                    if held:
                        continue
                writes[key] = None
                # The copy's lease rows go with it (expired and released ones: nothing holds
                # it). Pins stay: a pin covers copies that arrive later too.
                writes.update({k: None for k, _ in leases})
                size, n = refunds.get(row.tenant, (0, 0))
                refunds[row.tenant] = (size + row.size, n + 1)
            for tenant, (size, n) in refunds.items():
                ukey = usage_key(region, tenant)
                use_raw = await tx.get(ukey)
                use = _load(use_raw, ukey) if use_raw is not None else {}
                use["used_bytes"] = max(0, int(use.get("used_bytes", 0)) - size)
                use["blocks"] = max(0, int(use.get("blocks", 0)) - n)
                writes[ukey] = _dump(use)
            if writes:
                await tx.put_many(writes)
            return sum(n for _, n in refunds.values())

        return await self.client.run(fn, keys=bkeys)

    async def pin(
        self,
        rec: NamespaceRecord,
        hashes: Sequence[bytes],
        holder: str,
        *,
        regions: Sequence[str] = (),
        ttl_s: float | None = None,
    ) -> None:
        """Pin these blocks' copies in `regions` (default: every region, including copies that
        arrive later) for holder, until unpinned or for ttl_s. One blind write round."""
        _holder(holder)
        until = 0 if ttl_s is None else self.clock.now_ns() + int(ttl_s * _NS)
        rs = list(regions) or self._regions()
        await self._blind(
            {
                pin_prefix(r, owner_of(rec), rec.nsid, h) + holder: str(until).encode()
                for r in rs
                for h in hashes
            }
        )

    async def unpin(
        self,
        rec: NamespaceRecord,
        hashes: Sequence[bytes],
        holder: str,
        *,
        regions: Sequence[str] = (),
    ) -> None:
        _holder(holder)
        rs = list(regions) or self._regions()
        await self._blind(
            {pin_prefix(r, owner_of(rec), rec.nsid, h) + holder: None for r in rs for h in hashes}
        )


def _namespace_record(nsid: str, d: dict[str, Any]) -> NamespaceRecord:
    return NamespaceRecord(nsid, str(d["tenant"]), bool(d["shared"]), d)
