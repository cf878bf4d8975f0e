"""KV-cache blocks: their spec, their namespace, their content-hash keys and their wire format.

Purpose
    A *block* is the attention KV cache of `block_tokens` consecutive tokens for every layer of
    one model, K and V together, as one tensor. This module says what a valid block is
    (`BlockSpec`), which blocks may be shared (`Namespace`), how a block is named (a chained
    content hash) and how its tensor becomes bytes and back (the block frame).

Data flow
    ::

        tokens ──block_hashes(ns, tokens)──▶ [h_1, h_2, ...]     keys of the full blocks
        kv tensor ──split_blocks──▶ per-block tensors ──encode_block──▶ frame bytes ──▶ block store
        frame bytes ──decode_block(frame, spec)──▶ tensor ──concat_blocks──▶ kv tensor

Keys
    ``h_0 = blake2b-256(namespace canonical form)`` and ``h_i = blake2b-256(h_{i-1} ||
    u32le(tokens of block i))``, both keyed with `HASH_SEED` and personalised, so a block's key
    depends on every token before it (a block is reusable only after the same prefix) and on the
    namespace (model revision, tokenizer, spec with dtype and layout, tenant and tenant salt).
    The algorithm is named by `HASH_ALGORITHM` and recorded in the namespace's metadata row; a
    change to it must change that name. Python's `hash()` is never used: it is salted per process.

Frame (little-endian)
    ``magic "K2KB" | version u8 | dtype u8 | layout u8 | flags u8 | block_tokens u32 |
    num_layers u32 | num_kv_heads u32 | head_dim u32 | payload_len u64 | payload_crc u32 |
    block_hash 32 bytes | header_crc u32 | payload``. The payload is the tensor's bytes in the
    spec's layout, C order. Encoding is one copy (or none, with `encode_block_parts`); decoding
    copies once into a new or caller-supplied tensor (`out=`, to reuse pooled memory). Version 2
    (written since session 16) checksums with CRC-32C, version 1 with zlib's CRC-32; both are
    read.

Invariants
    - A frame that decodes is exactly what was encoded: header and payload are checksummed, the
      spec in the header must equal the reader's spec, and the block hash (when the writer gave
      one) must equal the key it was read under.
    - Identical inputs give identical hashes in every process and on every machine.

Failure modes
    Wrong shape, dtype or layout: `BlockSpecMismatch`. Bad magic, truncation or a checksum
    mismatch: `CorruptBlock`. Token ids outside [0, 2**32): `InvalidArgument`.
"""

from __future__ import annotations

import hashlib
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import crc32c
import numpy as np
import torch

from k2store.errors import InvalidArgument
from kvtier.errors import BlockSpecMismatch, BlockTooLarge, CorruptBlock

__all__ = [
    "CHECKSUM_ALGORITHM",
    "FRAME_HEADER_BYTES",
    "HASH_ALGORITHM",
    "HASH_SEED",
    "MAX_BLOCK_BYTES",
    "BlockHeader",
    "BlockSpec",
    "Layout",
    "Namespace",
    "block_hashes",
    "block_view",
    "concat_blocks",
    "decode_block",
    "encode_block",
    "encode_block_parts",
    "read_header",
    "split_blocks",
    "verify_frame",
]

HASH_ALGORITHM = "blake2b-256-keyed/chain-v1"
"""Recorded in each namespace's metadata row; change it whenever the hashing below changes."""
HASH_SEED = b"k2-kvtier-hash-v1"
"""The blake2b key of every block hash: fixed, so hashes agree across processes and machines."""
CHECKSUM_ALGORITHM = "crc32c"
"""Checksums of the frames written here: CRC-32C (Castagnoli), which the `crc32c` package computes
with the CPU's CRC instruction: 0.12 ms for a 2.4 MB block here against 0.41 ms for zlib's CRC-32
(19.9 / 5.9 GB/s), and 1 GB/s for blake2b. Every read verifies a frame, so on a block store's
bulk reads this was a third of the time per block. It guards against corruption, not against an
adversary (the block hash in the frame binds key to bytes). Frames of version 1 (zlib's
"crc32") are still read, and their checksums are recorded under that name."""
MAX_BLOCK_BYTES = 1 << 30
"""No spec may describe a larger block; deployments set a smaller limit in the connector."""

_NAME = re.compile(r"^[A-Za-z0-9._:+@-]{1,128}$")


class Layout(StrEnum):
    """Axis order of a block tensor (and of the KV tensors the connector takes and returns)."""

    LKHTD = "LKHTD"
    """(layers, 2 [K then V], kv_heads, tokens, head_dim): transformers' per-layer
    ``[batch=1, heads, seq, dim]`` keys and values stacked."""
    LKTHD = "LKTHD"
    """(layers, 2, tokens, kv_heads, head_dim): the token-major layout of paged attention
    kernels (vLLM, flash-attn)."""

    @property
    def token_axis(self) -> int:
        return 3 if self is Layout.LKHTD else 2


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_CODES = {name: i + 1 for i, name in enumerate(_DTYPES)}
_LAYOUT_CODES = {layout: i + 1 for i, layout in enumerate(Layout)}


@dataclass(frozen=True, slots=True)
class BlockSpec:
    """The shape of one model's KV blocks. Validated on construction (`InvalidArgument`)."""

    block_tokens: int
    """Tokens per block; only full blocks are stored."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    """One of float32, float16, bfloat16."""
    layout: Layout = Layout.LKHTD

    def __post_init__(self) -> None:
        for name in ("block_tokens", "num_layers", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v < 1 << 20:
                raise InvalidArgument(f"block spec: {name} must be an int in [1, 2**20), got {v!r}")
        if self.dtype not in _DTYPES:
            raise InvalidArgument(f"block spec: dtype {self.dtype!r} is not one of {list(_DTYPES)}")
        try:
            object.__setattr__(self, "layout", Layout(self.layout))
        except ValueError:
            raise InvalidArgument(
                f"block spec: layout {self.layout!r} is not one of {[x.value for x in Layout]}"
            ) from None
        if self.nbytes > MAX_BLOCK_BYTES:
            raise BlockTooLarge(
                f"block spec describes {self.nbytes} bytes per block; the limit is {MAX_BLOCK_BYTES}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def shape(self, num_tokens: int | None = None) -> tuple[int, ...]:
        """Tensor shape for `num_tokens` tokens (default: one block)."""
        t = self.block_tokens if num_tokens is None else num_tokens
        if self.layout is Layout.LKHTD:
            return (self.num_layers, 2, self.num_kv_heads, t, self.head_dim)
        return (self.num_layers, 2, t, self.num_kv_heads, self.head_dim)

    @property
    def nbytes(self) -> int:
        """Payload bytes of one block (the frame adds FRAME_HEADER_BYTES)."""
        return (
            self.num_layers
            * 2
            * self.num_kv_heads
            * self.block_tokens
            * self.head_dim
            * _ITEMSIZE[self.dtype]
        )

    def check_tensor(self, kv: torch.Tensor, num_tokens: int | None = None) -> None:
        """Raise BlockSpecMismatch unless kv is a tensor of this spec for `num_tokens` tokens."""
        if not isinstance(kv, torch.Tensor):
            raise BlockSpecMismatch(f"KV must be a torch.Tensor, not {type(kv).__name__}")
        want = self.shape(num_tokens)
        if kv.dtype != self.torch_dtype:
            raise BlockSpecMismatch(
                f"KV dtype {kv.dtype} does not match the block spec's {self.dtype}"
            )
        if tuple(kv.shape) != want:
            raise BlockSpecMismatch(
                f"KV shape {tuple(kv.shape)} does not match layout {self.layout.value} "
                f"(layers, 2, ...) for {want[self.layout.token_axis]} tokens: expected {want}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_tokens": self.block_tokens,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "layout": self.layout.value,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockSpec:
        try:
            return cls(
                block_tokens=d["block_tokens"],
                num_layers=d["num_layers"],
                num_kv_heads=d["num_kv_heads"],
                head_dim=d["head_dim"],
                dtype=d["dtype"],
                layout=Layout(d["layout"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"malformed block spec {d!r}: {e}") from None

    def _canonical(self) -> bytes:
        return struct.pack(
            "<IIIIBB",
            self.block_tokens,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            _DTYPE_CODES[self.dtype],
            _LAYOUT_CODES[self.layout],
        )


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _lp(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


@dataclass(frozen=True, slots=True)
class Namespace:
    """Which blocks may be shared: the same model revision, tokenizer, spec and tenant.

    `tenant_salt` is a per-tenant secret mixed into every hash, so another tenant cannot even
    probe for a prefix by its key. With `shared=True` the tenant and salt are left out and the
    namespace is common to every tenant that opted in to sharing (checked at registration).
    """

    model_revision: str
    tokenizer_id: str
    spec: BlockSpec
    tenant: str
    tenant_salt: bytes = b""
    shared: bool = False

    def __post_init__(self) -> None:
        for name in ("model_revision", "tokenizer_id", "tenant"):
            v = getattr(self, name)
            if not isinstance(v, str) or not _NAME.match(v):
                raise InvalidArgument(
                    f"namespace: {name} {v!r} must be 1-128 characters of [A-Za-z0-9._:+@-]"
                )
        if not isinstance(self.spec, BlockSpec):
            raise InvalidArgument("namespace: spec must be a BlockSpec")
        if not isinstance(self.tenant_salt, bytes) or len(self.tenant_salt) > 64:
            raise InvalidArgument("namespace: tenant_salt must be at most 64 bytes")

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    @property
    def layout(self) -> Layout:
        return self.spec.layout

    @property
    def root(self) -> bytes:
        """h_0 of every chain in this namespace."""
        parts = [
            HASH_ALGORITHM.encode(),
            self.model_revision.encode(),
            self.tokenizer_id.encode(),
            self.spec._canonical(),
            b"shared" if self.shared else b"tenant",
            b"" if self.shared else self.tenant.encode(),
            b"" if self.shared else self.tenant_salt,
        ]
        return hashlib.blake2b(
            b"".join(_lp(p) for p in parts), digest_size=32, key=HASH_SEED, person=b"k2kv-ns"
        ).digest()

    @property
    def id(self) -> str:
        """Hex name of the namespace in metadata keys (not secret: the salt cannot be derived)."""
        return self.root[:16].hex()

    def describe(self) -> dict[str, Any]:
        """What the metadata row records (never the salt)."""
        return {
            "model_revision": self.model_revision,
            "tokenizer_id": self.tokenizer_id,
            "spec": self.spec.to_dict(),
            "tenant": self.tenant,
            "shared": self.shared,
            "hash_algorithm": HASH_ALGORITHM,
        }


def _token_bytes(tokens: Sequence[int] | torch.Tensor | np.ndarray[Any, Any]) -> bytes:
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidArgument(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"tokens must be integers, got {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) >= 1 << 32:
        raise InvalidArgument("token ids must lie in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes()


def block_hashes(
    ns: Namespace, tokens: Sequence[int] | torch.Tensor | np.ndarray[Any, Any]
) -> list[bytes]:
    """The chained keys of the full blocks of `tokens` (a trailing partial block has none)."""
    raw = _token_bytes(tokens)
    step = ns.spec.block_tokens * 4
    out: list[bytes] = []
    prev = ns.root
    for i in range(len(raw) // step):
        prev = hashlib.blake2b(
            prev + raw[i * step : (i + 1) * step],
            digest_size=32,
            key=HASH_SEED,
            person=b"k2kv-blk",
        ).digest()
        out.append(prev)
    return out


# -- frames --------------------------------------------------------------------------------------

_MAGIC = b"K2KB"
_VERSION = 2
_CHECKSUMS: dict[int, tuple[str, Callable[[Any], int]]] = {
    1: ("crc32", zlib.crc32),
    2: (CHECKSUM_ALGORITHM, crc32c.crc32c),
}
"""Frame version -> (name, function) of its checksums: each version read, the last written."""
_WRITE_CHECKSUM = _CHECKSUMS[_VERSION][1]
_HEADER = struct.Struct("<4sBBBBIIIIQI32s")
FRAME_HEADER_BYTES = _HEADER.size + 4
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_CODE_LAYOUTS = {v: k for k, v in _LAYOUT_CODES.items()}


@dataclass(frozen=True, slots=True)
class BlockHeader:
    spec: BlockSpec
    payload_len: int
    checksum: int
    block_hash: bytes
    """32 bytes, or all zeros when the writer did not bind the frame to a key."""
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    """Of `checksum`: the frame version's ("crc32c"; "crc32" in version 1 frames)."""


def _payload_view(spec: BlockSpec, kv: torch.Tensor) -> memoryview:
    spec.check_tensor(kv)
    t = kv.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        # numpy's copy, not torch's: torch would run a parallel copy on the calling thread (the
        # event loop's, for a connector), which starts an OpenMP team there and slows every
        # later forward pass (kvtier/torchthread.py). Viewed as same-size integers because
        # bfloat16 has no numpy type; the bytes are the same.
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        packed: Any = np.ascontiguousarray(t.view(ints).numpy())
        return memoryview(packed).cast("B")
    # A uint8 view of the same storage: no copy (bfloat16 has no numpy type, bytes do).
    data: Any = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(data)


def encode_block_parts(
    spec: BlockSpec, kv: torch.Tensor, block_hash: bytes = b""
) -> tuple[bytes, memoryview]:
    """(header, payload) for one block; the payload aliases kv's memory when kv is contiguous
    on the CPU, so it must not be modified until the frame has been written out."""
    if block_hash and len(block_hash) != 32:
        raise InvalidArgument(f"block hash must be 32 bytes, got {len(block_hash)}")
    payload = _payload_view(spec, kv)
    head = _HEADER.pack(
        _MAGIC,
        _VERSION,
        _DTYPE_CODES[spec.dtype],
        _LAYOUT_CODES[spec.layout],
        0,
        spec.block_tokens,
        spec.num_layers,
        spec.num_kv_heads,
        spec.head_dim,
        payload.nbytes,
        _WRITE_CHECKSUM(payload),
        block_hash or bytes(32),
    )
    return head + struct.pack("<I", _WRITE_CHECKSUM(head)), payload


def encode_block(spec: BlockSpec, kv: torch.Tensor, block_hash: bytes = b"") -> bytes:
    """One block's frame as bytes (one copy of the tensor)."""
    head, payload = encode_block_parts(spec, kv, block_hash)
    return b"".join((head, payload))


def read_header(frame: bytes | bytearray | memoryview) -> BlockHeader:
    """Parse and check a frame's header (not its payload checksum; see `decode_block`)."""
    mv = memoryview(frame)
    if mv.nbytes < FRAME_HEADER_BYTES:
        raise CorruptBlock(
            f"block frame truncated: {mv.nbytes} bytes, header needs {FRAME_HEADER_BYTES}"
        )
    head = mv[: _HEADER.size]
    magic, version, dt, lay, _flags, bt, nl, nh, hd, plen, crc, bhash = _HEADER.unpack(head)
    if magic != _MAGIC or version not in _CHECKSUMS:
        raise CorruptBlock(
            f"not a block frame of version {', '.join(map(str, _CHECKSUMS))} (magic {magic!r}, "
            f"v{version})"
        )
    algorithm, checksum = _CHECKSUMS[version]
    (header_crc,) = struct.unpack_from("<I", mv, _HEADER.size)
    if checksum(head) != header_crc:
        raise CorruptBlock("block frame header checksum mismatch")
    if dt not in _CODE_DTYPES or lay not in _CODE_LAYOUTS:
        raise CorruptBlock(f"block frame names unknown dtype {dt} or layout {lay}")
    try:
        spec = BlockSpec(bt, nl, nh, hd, _CODE_DTYPES[dt], _CODE_LAYOUTS[lay])
    except InvalidArgument as e:
        raise CorruptBlock(f"block frame header describes an invalid spec: {e}") from None
    if plen != spec.nbytes or mv.nbytes != FRAME_HEADER_BYTES + plen:
        raise CorruptBlock(
            f"block frame length {mv.nbytes} does not match its header ({plen} payload bytes, "
            f"spec needs {spec.nbytes})"
        )
    return BlockHeader(spec, plen, crc, bytes(bhash), algorithm)


_CHECKSUM_BY_NAME = dict(_CHECKSUMS.values())


def _checksum(h: BlockHeader) -> Callable[[Any], int]:
    return _CHECKSUM_BY_NAME[h.checksum_algorithm]


def verify_frame(
    frame: bytes | bytearray | memoryview, block_hash: bytes | None = None
) -> BlockHeader:
    """Check header, payload checksum and (if given) the key the frame was stored under."""
    h = read_header(frame)
    payload = memoryview(frame)[FRAME_HEADER_BYTES:]
    if _checksum(h)(payload) != h.checksum:
        raise CorruptBlock("block payload checksum mismatch")
    if block_hash is not None and h.block_hash != bytes(32) and h.block_hash != block_hash:
        raise CorruptBlock(
            f"block frame belongs to {h.block_hash.hex()[:16]}, read under {block_hash.hex()[:16]}"
        )
    return h


def decode_block(
    frame: bytes | bytearray | memoryview,
    spec: BlockSpec,
    *,
    block_hash: bytes | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The block tensor of a verified frame, copied once into `out` (a tensor of the spec's
    shape and dtype, e.g. from a pool) or into new memory."""
    h = verify_frame(frame, block_hash)
    if h.spec != spec:
        raise BlockSpecMismatch(f"stored block has spec {h.spec}, the reader expects {spec}")
    if out is None:
        out = torch.empty(spec.shape(), dtype=spec.torch_dtype)
    else:
        spec.check_tensor(out)
        if not out.is_contiguous() or out.device.type != "cpu":
            raise BlockSpecMismatch("decode_block: out must be a contiguous CPU tensor")
    dst = out.reshape(-1).view(torch.uint8).numpy()
    src = np.frombuffer(memoryview(frame), dtype=np.uint8, offset=FRAME_HEADER_BYTES)
    np.copyto(dst, src)
    return out


def block_view(frame: bytes | bytearray | memoryview, spec: BlockSpec) -> torch.Tensor:
    """The block tensor of a frame whose payload checksum was already verified (as
    `BlockStoreClient.get` does), without copying: a read-only view of the frame's bytes, valid
    while the frame is. Checks the header and the spec (`CorruptBlock`, `BlockSpecMismatch`)."""
    h = read_header(frame)
    if h.spec != spec:
        raise BlockSpecMismatch(f"stored block has spec {h.spec}, the reader expects {spec}")
    with warnings.catch_warnings():
        # The view is only read from; torch warns because bytes are immutable.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(
            frame, dtype=spec.torch_dtype, count=spec.nbytes // spec.itemsize,
            offset=FRAME_HEADER_BYTES,
        )  # fmt: skip
    return flat.view(spec.shape())


def split_blocks(spec: BlockSpec, kv: torch.Tensor, num_blocks: int) -> list[torch.Tensor]:
    """The first `num_blocks` block tensors of a KV tensor (views along the token axis)."""
    ax = spec.layout.token_axis
    return [kv.narrow(ax, i * spec.block_tokens, spec.block_tokens) for i in range(num_blocks)]


def concat_blocks(spec: BlockSpec, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """One KV tensor from consecutive block tensors (empty, with 0 tokens, for no blocks)."""
    if not blocks:
        return torch.empty(spec.shape(0), dtype=spec.torch_dtype)
    return torch.cat(list(blocks), dim=spec.layout.token_axis)
