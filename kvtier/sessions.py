"""Chat sessions in the K2 store: create, append a turn, read from any region, move, expire.

A session is one conversation of one tenant with one model: its turns (role, token ids, the
chained hashes of the KV blocks that hold them, optional text), a home region and a TTL. Every
operation is a K2 transaction, so what one region commits another region reads.

Key layout (all under a region prefix, which homes the key in that region's shards)::

    <birth>/kvs/<tenant>/L/<session-id>             locator: {"home": <region>}; birth region only
    <home>/kvs/<tenant>/S/<session-id>/m            session record (model, counters, TTL, ...)
    <home>/kvs/<tenant>/S/<session-id>/t/<index>    one turn; index as 10 decimal digits

- A session id is ``<birth-region>:<name>``. The birth region (where the session was created)
  keeps the locator for the session's whole life. A reader first reads the record where it last
  saw the session (at first: the birth region); create, move and delete write record and locator
  in one transaction, so a record found there proves the home, and the locator is read only on a
  miss. A whole session (record and turns) is then one scan: one round trip to its home.
- Turns are separate keys: an append writes one turn key and the record, never the history.
- The tenant is part of every key, and every read checks the record's tenant as well: a session
  id of one tenant names nothing under another tenant's prefix.
- Tenant, session name and region are restricted to ``[A-Za-z0-9._-]``, so one tenant's prefix is
  never a prefix of another's.
- On a secured cluster the Guard (k2store/security.py) gives tenant T's principal exactly
  ``<region>/kvs/<T>/`` in every region (`KV_SESSION_ROOT`), so a serving node runs its sessions
  on its tenant's token, and another tenant's token is refused every key here.

Contracts
    - `append` is one transaction that reads the record and writes the next turn and the record.
      Concurrent appends (from any regions) conflict on the record; the loser is re-run with a
      fresh timestamp by `AsyncClient.run`, so every append lands exactly once, at distinct
      consecutive indices, in commit order.
    - `append` is idempotent per `turn_id`: the record remembers the last `RECENT_TURN_IDS` turn
      ids, so an append whose commit outcome was unknown is re-sent with the same id and lands
      once. A re-send is recognised by its id alone, and only within that window.
    - `get` with `Consistency.LEADER` reads the home shards' leaders in a read-only transaction:
      it sees every append committed before it started, from any region (read-your-writes and
      real-time order, which the store's commit-wait gives). `Consistency.REPLICA` is the seam for
      replica reads: it takes the caller's last commit timestamp (`min_commit_ts`) and reads
      at a replica in the caller's region once that timestamp is visible there (no wide-area
      round trip; read-your-writes for the caller, a consistent but possibly older view for
      others).
    - `move` re-homes a session in one transaction (copy record and turns, delete the old keys,
      update the locator); concurrent appends conflict with it and are re-run at the new home.
    - TTL is sliding: create and every append set ``expires_at_ns = now + ttl``. An expired session
      reads as `SessionExpired`, is left out of listings, refuses appends, and `sweep_expired`
      deletes its keys. Time comes from the injected `truetime.ClockSource`.

HAZARD: expiry compares this process's clock with a deadline written by another process's clock.
    Clock error within the TrueTime bound moves the moment of expiry by at most that bound; a
    clock far ahead expires sessions early (their data is deleted by `sweep_expired`), a clock far
    behind keeps them late. Nothing else depends on the clock.
"""

from __future__ import annotations

import base64
import enum
import json
import random
import re
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from k2store.client import AsyncClient, AsyncTransaction, KeyLike
from k2store.errors import CommitOutcomeUnknown, InvalidArgument, K2Error
from k2store.security import KV_SESSION_ROOT
from truetime.clock import ClockSource

__all__ = [
    "RECENT_TURN_IDS",
    "AppendResult",
    "Consistency",
    "Session",
    "SessionConfig",
    "SessionExpired",
    "SessionInfo",
    "SessionNotFound",
    "SessionStats",
    "SessionStore",
    "Turn",
    "TurnInput",
    "parse_session_id",
    "session_keys",
]

RECENT_TURN_IDS = 16
"""How many recent turn ids the record keeps to make re-sent appends idempotent."""

T = TypeVar("T")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_NS_PER_S = 1_000_000_000
_SCAN_PAGE = 500


class SessionNotFound(K2Error):
    """No such session for this tenant (never created, deleted, or another tenant's)."""

    reason = "kv-session-not-found"


class SessionExpired(SessionNotFound):
    """The session's TTL has passed; it is gone for reads and appends."""

    reason = "kv-session-expired"


class _Reader(Protocol):
    """What a session read needs: a read-only transaction or a replica snapshot."""

    @property
    def ts(self) -> int: ...

    async def get(self, key: KeyLike) -> bytes | None: ...

    async def scan(
        self, start: KeyLike = b"", end: KeyLike | None = None, *, limit: int
    ) -> list[tuple[bytes, bytes]]: ...


class Consistency(enum.Enum):
    """How `SessionStore.get` may be served."""

    LEADER = "leader"
    """Read at the home shards' leaders: always read-your-writes."""
    REPLICA = "replica"
    """Read at a replica in the reader's region at max(its visible timestamp, `min_commit_ts`),
    waiting until that is visible there: no wide-area round trip."""


@dataclass(frozen=True, slots=True)
class SessionConfig:
    default_ttl_s: float = 3600.0
    """Sliding TTL of a session when `create` gets none."""
    max_attempts: int = 32
    """Transaction attempts per operation (conflicting appends re-run with a fresh timestamp)."""
    max_outcome_unknown_retries: int = 3
    """Re-sends of an append whose commit outcome was unknown (safe: appends are idempotent)."""
    max_turns_read: int = 100_000
    """Upper bound on turns one `get` or `move` reads (bounds every scan loop)."""
    max_sessions_listed: int = 100_000
    """Upper bound on sessions one `list` or `sweep_expired` visits."""


@dataclass(frozen=True, slots=True)
class TurnInput:
    """What a caller appends. `token_ids` are the turn's tokens; `block_keys` the chained hashes
    (hex) of the KV blocks completed by this turn; `turn_id` makes re-sent appends idempotent."""

    role: str
    token_ids: Sequence[int] = ()
    block_keys: Sequence[str] = ()
    text: str = ""
    turn_id: str | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    index: int
    role: str
    token_ids: tuple[int, ...]
    block_keys: tuple[str, ...]
    text: str
    turn_id: str
    appended_ns: int
    region: str
    """Region of the client that appended it."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """The session record without its turns."""

    session_id: str
    tenant: str
    model: str
    home_region: str
    created_ns: int
    updated_ns: int
    ttl_ns: int
    expires_at_ns: int
    num_turns: int
    num_tokens: int

    def expired(self, now_ns: int) -> bool:
        return now_ns >= self.expires_at_ns


@dataclass(frozen=True, slots=True)
class Session:
    info: SessionInfo
    turns: tuple[Turn, ...]
    """Turns from `from_turn` on, in index order."""
    read_ts: int = 0
    """Timestamp of the transaction that read it."""

    @property
    def session_id(self) -> str:
        return self.info.session_id

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(t for turn in self.turns for t in turn.token_ids)

    @property
    def block_keys(self) -> tuple[str, ...]:
        return tuple(k for turn in self.turns for k in turn.block_keys)


@dataclass(frozen=True, slots=True)
class AppendResult:
    index: int
    """Index of the appended turn (0-based)."""
    num_turns: int
    commit_ts: int
    """Pass as `min_commit_ts` to a later `get` for read-your-writes at a replica."""
    duplicate: bool = False
    """The turn id had already been appended; nothing new was written."""


@dataclass(frozen=True, slots=True)
class SessionKeys:
    locator: bytes
    record: bytes
    turn_prefix: bytes

    def turn(self, index: int) -> bytes:
        return self.turn_prefix + b"%010d" % index


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidArgument(f"{what} {value!r}: use 1-128 characters of [A-Za-z0-9._-]")
    return value


def parse_session_id(session_id: str) -> tuple[str, str]:
    """(birth region, name) of a session id; InvalidArgument if malformed."""
    birth, sep, name = session_id.partition(":") if isinstance(session_id, str) else ("", "", "")
    if not sep:
        raise InvalidArgument(f"session id {session_id!r}: expected '<birth-region>:<name>'")
    return _check_name("region", birth), _check_name("session name", name)


def session_keys(tenant: str, session_id: str, home: str) -> SessionKeys:
    """The keys of a session homed in `home` (see the module docstring)."""
    birth, _ = parse_session_id(session_id)
    _check_name("tenant", tenant)
    _check_name("region", home)
    sid = session_id.encode()
    base = f"{home}/{KV_SESSION_ROOT}{tenant}/S/".encode() + sid + b"/"
    return SessionKeys(
        locator=f"{birth}/{KV_SESSION_ROOT}{tenant}/L/".encode() + sid,
        record=base + b"m",
        turn_prefix=base + b"t/",
    )


def _prefix_end(prefix: bytes) -> bytes:
    # Every prefix here ends in "/"; "0" is the next byte, so [prefix, end) is exactly the prefix.
    assert prefix.endswith(b"/")
    return prefix[:-1] + b"0"


def _pack_tokens(ids: Sequence[int]) -> str:
    try:
        raw = struct.pack(f"<{len(ids)}I", *ids)
    except struct.error as e:
        raise InvalidArgument(f"token ids must be integers in [0, 2**32): {e}") from None
    return base64.b64encode(raw).decode()


def _unpack_tokens(s: str) -> tuple[int, ...]:
    raw = base64.b64decode(s)
    return struct.unpack(f"<{len(raw) // 4}I", raw)


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _info_from(rec: dict[str, Any]) -> SessionInfo:
    return SessionInfo(
        session_id=rec["id"],
        tenant=rec["tenant"],
        model=rec["model"],
        home_region=rec["home"],
        created_ns=rec["created_ns"],
        updated_ns=rec["updated_ns"],
        ttl_ns=rec["ttl_ns"],
        expires_at_ns=rec["expires_at_ns"],
        num_turns=rec["num_turns"],
        num_tokens=rec["num_tokens"],
    )


def _turn_from(index: int, raw: bytes) -> Turn:
    d = json.loads(raw)
    return Turn(
        index=index,
        role=d["role"],
        token_ids=_unpack_tokens(d["tokens"]),
        block_keys=tuple(d["blocks"]),
        text=d["text"],
        turn_id=d["turn_id"],
        appended_ns=d["at_ns"],
        region=d["region"],
    )


@dataclass
class _Located:
    keys: SessionKeys
    record: dict[str, Any]
    home: str


@dataclass
class SessionStats:
    """Counters for callers, tests and benchmarks."""

    appends: int = 0
    duplicate_appends: int = 0
    outcome_unknown_resends: int = 0
    moves: int = 0
    expired_deleted: int = 0


class SessionStore:
    """Sessions of every tenant, stored through one `AsyncClient` (which fixes this process's
    region: appends and reads are coordinated there, whatever the session's home)."""

    def __init__(
        self,
        client: AsyncClient,
        clock: ClockSource,
        *,
        config: SessionConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`clock`: where TTLs and turn timestamps come from (never the OS clock directly).
        `rng`: draws session names and turn ids (seed it for deterministic runs)."""
        self.client = client
        self.clock = clock
        self.config = config or SessionConfig()
        self._rng = rng or random.Random()
        self._regions = {r.name for r in client.cluster.regions}
        self.stats = SessionStats()
        self._homes: dict[str, str] = {}
        """Session id -> last home seen: a guess that saves a round; the locator is the truth."""

    @property
    def region(self) -> str:
        return self.client.region

    def _check_region(self, region: str) -> str:
        if region not in self._regions:
            raise InvalidArgument(
                f"region {region!r} is not in the cluster (regions: {sorted(self._regions)})"
            )
        return region

    async def _run(
        self,
        fn: Callable[[AsyncTransaction], Awaitable[T]],
        *,
        read_only: bool = False,
        keys: Sequence[bytes] = (),
    ) -> T:
        return await self.client.run(
            fn, read_only=read_only, keys=list(keys), max_attempts=self.config.max_attempts
        )

    def _key_hint(self, tenant: str, session_id: str, *also_home: str) -> list[bytes]:
        """Keys a transaction on this session will likely touch (`AsyncClient.run(keys=)`): the
        locator and the record where the session was last seen, plus records in `also_home`.
        A transaction that reaches other regions then starts at a timestamp that is still open
        when its writes arrive there."""
        birth, _ = parse_session_id(session_id)
        _check_name("tenant", tenant)
        guess = self._homes.get(session_id, birth)
        keys = session_keys(tenant, session_id, guess)
        out = [keys.locator, keys.record]
        out += [session_keys(tenant, session_id, h).record for h in also_home if h != guess]
        return out

    async def _locate(self, tx: _Reader, tenant: str, session_id: str) -> _Located:
        """Find the session's record in this transaction. The record is read first where the
        session was last seen (or its birth region): create, move and delete change record and
        locator together, so a record found there proves the home, and the locator is read only
        on a miss. One round when the guess is right, three at most."""
        birth, _ = parse_session_id(session_id)
        _check_name("tenant", tenant)
        guess = self._homes.get(session_id, birth)
        keys = session_keys(tenant, session_id, guess)
        rec_raw = await tx.get(keys.record)
        home = guess
        if rec_raw is None:
            loc_raw = await tx.get(keys.locator)
            if loc_raw is None:
                raise SessionNotFound(f"session {session_id!r} of tenant {tenant!r} does not exist")
            home = json.loads(loc_raw)["home"]
            if home != guess:
                keys = session_keys(tenant, session_id, home)
                rec_raw = await tx.get(keys.record)
            if rec_raw is None:
                raise SessionNotFound(
                    f"session {session_id!r} of tenant {tenant!r}: locator names home {home!r} "
                    "but the record is missing there"
                )
        return self._located(keys, rec_raw, home, tenant, session_id)

    def _located(
        self, keys: SessionKeys, rec_raw: bytes, home: str, tenant: str, session_id: str
    ) -> _Located:
        rec: dict[str, Any] = json.loads(rec_raw)
        if rec["tenant"] != tenant or rec["id"] != session_id:
            raise SessionNotFound(f"session {session_id!r} of tenant {tenant!r} does not exist")
        self._homes[session_id] = home
        return _Located(keys, rec, home)

    def _live(self, loc: _Located, tenant: str, session_id: str) -> None:
        now = self.clock.now_ns()
        if now >= loc.record["expires_at_ns"]:
            raise SessionExpired(
                f"session {session_id!r} of tenant {tenant!r} expired at "
                f"{loc.record['expires_at_ns']} (now {now})"
            )

    # -- operations ----------------------------------------------------------------------------

    async def create(
        self,
        tenant: str,
        model: str,
        *,
        ttl_s: float | None = None,
        home: str | None = None,
        name: str | None = None,
    ) -> SessionInfo:
        """Create an empty session homed in `home` (default: this client's region). Its id is
        ``<this region>:<name>`` (name: random hex unless given; an existing id is refused)."""
        _check_name("tenant", tenant)
        if not isinstance(model, str) or not model or len(model) > 512:
            raise InvalidArgument(f"model {model!r}: a non-empty string of at most 512 chars")
        home = self._check_region(home or self.region)
        name = _check_name("session name", name or f"{self._rng.getrandbits(96):024x}")
        ttl = self.config.default_ttl_s if ttl_s is None else ttl_s
        if not ttl > 0:
            raise InvalidArgument(f"ttl_s must be positive, got {ttl}")
        ttl_ns = int(ttl * _NS_PER_S)
        session_id = f"{self.region}:{name}"
        keys = session_keys(tenant, session_id, home)

        async def fn(tx: AsyncTransaction) -> SessionInfo:
            if await tx.get(keys.locator) is not None:
                raise InvalidArgument(f"session {session_id!r} of tenant {tenant!r} exists")
            now = self.clock.now_ns()
            rec = {
                "id": session_id,
                "tenant": tenant,
                "model": model,
                "home": home,
                "created_ns": now,
                "updated_ns": now,
                "ttl_ns": ttl_ns,
                "expires_at_ns": now + ttl_ns,
                "num_turns": 0,
                "num_tokens": 0,
                "recent_turn_ids": [],
            }
            await tx.put_many({keys.locator: _dump({"home": home}), keys.record: _dump(rec)})
            return _info_from(rec)

        info: SessionInfo = await self._run(fn, keys=[keys.locator, keys.record])
        self._homes[session_id] = home
        return info

    async def append(self, tenant: str, session_id: str, turn: TurnInput) -> AppendResult:
        """Append one turn (one transaction); see the module docstring for the contract."""
        if not isinstance(turn.role, str) or not turn.role or len(turn.role) > 64:
            raise InvalidArgument(f"turn role {turn.role!r}: a non-empty string of <= 64 chars")
        tokens = _pack_tokens(list(turn.token_ids))
        blocks = [str(b) for b in turn.block_keys]
        turn_id = turn.turn_id or f"{self._rng.getrandbits(96):024x}"

        async def fn(tx: AsyncTransaction) -> AppendResult:
            loc = await self._locate(tx, tenant, session_id)
            self._live(loc, tenant, session_id)
            rec = loc.record
            if turn_id in rec["recent_turn_ids"]:
                idx = rec["num_turns"] - len(rec["recent_turn_ids"])
                idx += rec["recent_turn_ids"].index(turn_id)
                return AppendResult(idx, rec["num_turns"], 0, duplicate=True)
            now = self.clock.now_ns()
            idx = rec["num_turns"]
            rec["num_turns"] = idx + 1
            rec["num_tokens"] += len(turn.token_ids)
            rec["updated_ns"] = now
            rec["expires_at_ns"] = now + rec["ttl_ns"]
            rec["recent_turn_ids"] = [*rec["recent_turn_ids"], turn_id][-RECENT_TURN_IDS:]
            body = {
                "role": turn.role,
                "tokens": tokens,
                "blocks": blocks,
                "text": turn.text,
                "turn_id": turn_id,
                "at_ns": now,
                "region": self.region,
            }
            await tx.put_many({loc.keys.turn(idx): _dump(body), loc.keys.record: _dump(rec)})
            return AppendResult(idx, idx + 1, 0)

        hint = self._key_hint(tenant, session_id)
        tx_holder: list[AsyncTransaction] = []  # the last attempt's transaction: its commit_ts

        async def tracked(tx: AsyncTransaction) -> AppendResult:
            tx_holder[:] = [tx]
            return await fn(tx)

        for attempt in range(self.config.max_outcome_unknown_retries + 1):
            try:
                res: AppendResult = await self._run(tracked, keys=hint)
            except CommitOutcomeUnknown:
                if attempt == self.config.max_outcome_unknown_retries:
                    raise
                self.stats.outcome_unknown_resends += 1
                continue
            commit_ts = (tx_holder[0].commit_ts or 0) if tx_holder else 0
            if res.duplicate:
                self.stats.duplicate_appends += 1
            else:
                self.stats.appends += 1
            return AppendResult(res.index, res.num_turns, commit_ts, duplicate=res.duplicate)
        raise AssertionError("unreachable")

    async def get(
        self,
        tenant: str,
        session_id: str,
        *,
        consistency: Consistency = Consistency.LEADER,
        min_commit_ts: int = 0,
        from_turn: int = 0,
    ) -> Session:
        """The session with its turns from `from_turn` on. Raises SessionNotFound /
        SessionExpired. See the module docstring for what each `consistency` guarantees."""
        if not isinstance(consistency, Consistency):
            raise InvalidArgument(f"consistency must be a Consistency, not {consistency!r}")
        if from_turn < 0:
            raise InvalidArgument(f"from_turn must be >= 0, got {from_turn}")

        async def fn(tx: _Reader) -> Session:
            if from_turn == 0:
                loc, rows = await self._scan_whole(tx, tenant, session_id)
                turns = [_turn_from(i, raw) for i, raw in rows]
            else:
                loc = await self._locate(tx, tenant, session_id)
                self._live(loc, tenant, session_id)
                turns = await self._read_turns(tx, loc, from_turn)
            self._live(loc, tenant, session_id)
            return Session(_info_from(loc.record), tuple(turns), tx.ts)

        if consistency is Consistency.REPLICA:
            # Served by replicas in this client's region at max(visible, min_commit_ts): no
            # wide-area round trip once the region has seen the caller's last append.
            return await fn(self.client.replica_snapshot(min_ts=min_commit_ts))
        session: Session = await self._run(fn, read_only=True)
        return session

    async def _scan_whole(
        self, tx: _Reader, tenant: str, session_id: str
    ) -> tuple[_Located, list[tuple[int, bytes]]]:
        """The record and every turn (raw), read by scanning the session's key range at the
        guessed home (record key "m" sorts before the turns' "t/"): one round trip for a session
        of fewer than `_SCAN_PAGE` turns when the guess is right. On a miss, `_locate` finds the
        home and the turns are scanned there."""
        birth, _ = parse_session_id(session_id)
        _check_name("tenant", tenant)
        home = self._homes.get(session_id, birth)
        keys = session_keys(tenant, session_id, home)
        hi = _prefix_end(keys.turn_prefix)
        page = await tx.scan(keys.record, hi, limit=_SCAN_PAGE)
        if page and page[0][0] == keys.record:
            loc = self._located(keys, page[0][1], home, tenant, session_id)
            page = page[1:]
            full = len(page) == _SCAN_PAGE - 1
        else:
            loc = await self._locate(tx, tenant, session_id)
            page, full = [], True
        num = loc.record["num_turns"]
        if num > self.config.max_turns_read:
            raise InvalidArgument(
                f"session {session_id!r} has {num} turns; reading more than "
                f"{self.config.max_turns_read} at once is refused (use from_turn)"
            )
        plen = len(loc.keys.turn_prefix)
        rows = [(int(k[plen:]), v) for k, v in page]
        lo = page[-1][0] + b"\x00" if page else loc.keys.turn_prefix
        for _ in range(num // _SCAN_PAGE + 2):
            if not full:
                break
            more = await tx.scan(lo, _prefix_end(loc.keys.turn_prefix), limit=_SCAN_PAGE)
            rows.extend((int(k[plen:]), v) for k, v in more)
            full = len(more) == _SCAN_PAGE
            if more:
                lo = more[-1][0] + b"\x00"
        if [i for i, _ in rows] != list(range(num)):
            raise K2Error(
                f"session {session_id!r}: turns 0..{num - 1} expected, read {len(rows)}; "
                "the record and its turns disagree"
            )
        return loc, rows

    def _check_turns(self, loc: _Located, turns: list[Turn], from_turn: int) -> None:
        num = loc.record["num_turns"]
        if [t.index for t in turns] != list(range(from_turn, num)):
            raise K2Error(
                f"session {loc.record['id']!r}: turns {from_turn}..{num - 1} expected, read "
                f"{len(turns)}; the record and its turns disagree"
            )

    async def _read_turns(self, tx: _Reader, loc: _Located, from_turn: int) -> list[Turn]:
        num = loc.record["num_turns"]
        if num - from_turn > self.config.max_turns_read:
            raise InvalidArgument(
                f"session {loc.record['id']!r} has {num} turns; reading more than "
                f"{self.config.max_turns_read} at once is refused (use from_turn)"
            )
        out: list[Turn] = []
        lo = loc.keys.turn(from_turn)
        hi = _prefix_end(loc.keys.turn_prefix)
        plen = len(loc.keys.turn_prefix)
        for _ in range(num // _SCAN_PAGE + 2):
            page = await tx.scan(lo, hi, limit=_SCAN_PAGE)
            out.extend(_turn_from(int(k[plen:]), v) for k, v in page)
            if len(page) < _SCAN_PAGE:
                break
            lo = page[-1][0] + b"\x00"
        self._check_turns(loc, out, from_turn)
        return out

    async def move(self, tenant: str, session_id: str, new_home: str) -> SessionInfo:
        """Re-home the session in one transaction (see the module docstring)."""
        self._check_region(new_home)

        async def fn(tx: AsyncTransaction) -> SessionInfo:
            loc, turns_raw = await self._scan_whole(tx, tenant, session_id)
            self._live(loc, tenant, session_id)
            if loc.home == new_home:
                return _info_from(loc.record)
            new = session_keys(tenant, session_id, new_home)
            rec = dict(loc.record, home=new_home)
            writes: dict[bytes | str, bytes | None] = {
                loc.keys.record: None,
                new.record: _dump(rec),
                new.locator: _dump({"home": new_home}),
            }
            for idx, raw in turns_raw:
                writes[loc.keys.turn(idx)] = None
                writes[new.turn(idx)] = raw
            await tx.put_many(writes)
            return _info_from(rec)

        info: SessionInfo = await self._run(fn, keys=self._key_hint(tenant, session_id, new_home))
        self._homes[session_id] = new_home
        self.stats.moves += 1
        return info

    async def delete(self, tenant: str, session_id: str) -> bool:
        """Delete the session and all its keys; False if it did not exist."""

        async def fn(tx: AsyncTransaction) -> bool:
            try:
                loc = await self._locate(tx, tenant, session_id)
            except SessionNotFound:
                return False
            await self._delete_located(tx, loc)
            return True

        done: bool = await self._run(fn, keys=self._key_hint(tenant, session_id))
        self._homes.pop(session_id, None)
        return done

    async def _delete_located(self, tx: AsyncTransaction, loc: _Located) -> None:
        num = loc.record["num_turns"]
        writes: dict[bytes | str, bytes | None] = {loc.keys.record: None, loc.keys.locator: None}
        for i in range(num):
            writes[loc.keys.turn(i)] = None
        await tx.put_many(writes)

    async def list_sessions(
        self, tenant: str, *, include_expired: bool = False
    ) -> list[SessionInfo]:
        """The tenant's sessions (every birth region's locators, then their records), ordered by
        session id; expired ones only if asked. One read-only transaction: a consistent view."""
        _check_name("tenant", tenant)

        async def fn(tx: AsyncTransaction) -> list[SessionInfo]:
            now = self.clock.now_ns()
            out: list[SessionInfo] = []
            located = await self._locators(tx, tenant)
            for i in range(0, len(located), _SCAN_PAGE):
                chunk = located[i : i + _SCAN_PAGE]
                keys: list[bytes | str] = [session_keys(tenant, s, h).record for s, h in chunk]
                for rec_raw in await tx.get_many(keys):
                    if rec_raw is None:
                        continue
                    info = _info_from(json.loads(rec_raw))
                    if info.tenant == tenant and (include_expired or not info.expired(now)):
                        out.append(info)
            return sorted(out, key=lambda i: i.session_id)

        result: list[SessionInfo] = await self._run(fn, read_only=True)
        return result

    async def _locators(self, tx: AsyncTransaction, tenant: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for region in sorted(self._regions):
            lo = f"{region}/kvs/{tenant}/L/".encode()
            hi, plen = _prefix_end(lo), len(lo)
            for _ in range(self.config.max_sessions_listed // _SCAN_PAGE + 1):
                page = await tx.scan(lo, hi, limit=_SCAN_PAGE)
                out.extend((k[plen:].decode(), json.loads(v)["home"]) for k, v in page)
                if len(page) < _SCAN_PAGE or len(out) >= self.config.max_sessions_listed:
                    break
                lo = page[-1][0] + b"\x00"
        return out[: self.config.max_sessions_listed]

    async def sweep_expired(self, tenant: str) -> int:
        """Delete the tenant's expired sessions (one transaction each); returns how many."""
        expired = [
            i
            for i in await self.list_sessions(tenant, include_expired=True)
            if i.expired(self.clock.now_ns())
        ]
        n = 0
        for info in expired:

            async def fn(tx: AsyncTransaction, sid: str = info.session_id) -> bool:
                try:
                    loc = await self._locate(tx, tenant, sid)
                except SessionNotFound:
                    return False
                if self.clock.now_ns() < loc.record["expires_at_ns"]:
                    return False  # appended to since the listing: alive again
                await self._delete_located(tx, loc)
                return True

            if await self._run(fn, keys=self._key_hint(tenant, info.session_id)):
                n += 1
                self._homes.pop(info.session_id, None)
        self.stats.expired_deleted += n
        return n
