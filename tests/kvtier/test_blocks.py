"""Block specs, namespaces, chained hashes and the block frame."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import zlib

import crc32c
import numpy as np
import pytest
import torch
from kvtier_env import SPEC, make_kv, namespace

from k2store.errors import InvalidArgument
from kvtier.blocks import (
    CHECKSUM_ALGORITHM,
    FRAME_HEADER_BYTES,
    HASH_SEED,
    BlockSpec,
    Layout,
    Namespace,
    block_hashes,
    block_view,
    concat_blocks,
    decode_block,
    encode_block,
    encode_block_parts,
    read_header,
    split_blocks,
    verify_frame,
)
from kvtier.errors import BlockSpecMismatch, BlockTooLarge, CorruptBlock

# Fixed vectors: a change here breaks every stored cache, so it must come with a new
# HASH_ALGORITHM name (which the metadata checks).
ROOT_HEX = "5e7314c2b8f7406673cf61699ea8b484231e3045cb84ddd87b92e4ad28c20d4e"
BLOCK_HEX = [
    "af2e64728d1d4cb7cd17614ed4817d769ba8f4e2403b4c671fbfdea5269a600c",
    "300cb988a772e89e4166f3de50d8aaf5edbb5edf63e250b6f6b733dc81041d4e",
]
SHARED_ROOT_HEX = "d9e0ade5818f105ab26ba6c168ff44aa3222d7bb0b3c0aed25dddb64eaa260b3"


def test_hashes_match_the_fixed_vector_and_the_written_algorithm() -> None:
    ns = namespace()
    assert ns.root.hex() == ROOT_HEX
    hashes = block_hashes(ns, list(range(10)))  # two full blocks of 4; 2 tokens left over
    assert [h.hex() for h in hashes] == BLOCK_HEX
    prev = ns.root
    for i in range(2):
        toks = struct.pack("<4I", *range(4 * i, 4 * i + 4))
        prev = hashlib.blake2b(
            prev + toks, digest_size=32, key=HASH_SEED, person=b"k2kv-blk"
        ).digest()
        assert prev == hashes[i]
    assert namespace(shared=True).root.hex() == SHARED_ROOT_HEX


def test_hashes_are_the_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from kvtier.blocks import *\n"
        "ns = Namespace('smollm2-135m@r1', 'smollm2-tok', BlockSpec(4, 2, 2, 8, 'float16'),"
        " 'acme', b's')\n"
        "print(','.join(h.hex() for h in block_hashes(ns, list(range(10)))))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(",") == BLOCK_HEX


def test_token_input_types_agree() -> None:
    ns = namespace()
    toks = list(range(100, 112))
    a = block_hashes(ns, toks)
    assert block_hashes(ns, torch.tensor(toks)) == a
    assert block_hashes(ns, np.array(toks, dtype=np.int32)) == a
    assert len(a) == 3


def test_chain_depends_on_every_earlier_token_and_on_the_namespace() -> None:
    ns = namespace()
    base = block_hashes(ns, list(range(12)))
    changed = block_hashes(ns, [0, 1, 2, 99, *range(4, 12)])
    assert all(x != y for x, y in zip(base, changed, strict=True))
    later = block_hashes(ns, [*range(8), 99, 9, 10, 11])
    assert later[:2] == base[:2] and later[2] != base[2]
    others = [
        namespace("other"),
        namespace(salt=b"t"),
        Namespace("smollm2-135m@r2", "smollm2-tok", SPEC, "acme", b"s"),
        Namespace("smollm2-135m@r1", "other-tok", SPEC, "acme", b"s"),
        namespace(spec=BlockSpec(4, 2, 2, 8, "bfloat16")),
        namespace(spec=BlockSpec(4, 2, 2, 8, "float16", Layout.LKTHD)),
    ]
    for o in others:
        assert o.id != ns.id and block_hashes(o, list(range(12)))[0] != base[0]
    # Shared namespaces leave tenant and salt out: every opted-in tenant gets the same keys.
    assert namespace("a", shared=True, salt=b"x").id == namespace("b", shared=True).id


@pytest.mark.parametrize("tokens", [[-1, 2, 3, 4], [0, 1, 2, 1 << 32], [[1, 2], [3, 4]], [0.5] * 4])
def test_bad_tokens_are_rejected(tokens: object) -> None:
    with pytest.raises(InvalidArgument):
        block_hashes(namespace(), tokens)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw",
    [
        {"block_tokens": 0},
        {"num_layers": -1},
        {"head_dim": 2.0},
        {"dtype": "int8"},
        {"layout": "KLHTD"},
    ],
)
def test_spec_validation(kw: dict[str, object]) -> None:
    args: dict[str, object] = dict(
        block_tokens=4, num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16"
    )
    args.update(kw)
    with pytest.raises(InvalidArgument):
        BlockSpec(**args)  # type: ignore[arg-type]


def test_oversized_spec_is_refused() -> None:
    with pytest.raises(BlockTooLarge):
        BlockSpec(4096, 128, 64, 256, "float32")


def test_namespace_validation() -> None:
    with pytest.raises(InvalidArgument):
        Namespace("m", "t", SPEC, "a/b")
    with pytest.raises(InvalidArgument):
        Namespace("", "t", SPEC, "a")
    assert "salt" not in str(namespace().describe())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", list(Layout))
def test_round_trip(dtype: str, layout: Layout) -> None:
    spec = BlockSpec(4, 3, 2, 8, dtype, layout)
    kv = make_kv(spec, 4, seed=1)
    h = bytes(range(32))
    frame = encode_block(spec, kv, h)
    assert len(frame) == FRAME_HEADER_BYTES + spec.nbytes
    assert read_header(frame).spec == spec
    back = decode_block(frame, spec, block_hash=h)
    assert back.dtype == kv.dtype and torch.equal(back, kv)
    out = torch.zeros(spec.shape(), dtype=spec.torch_dtype)
    assert decode_block(frame, spec, out=out) is out and torch.equal(out, kv)
    view = block_view(frame, spec)  # no copy: the frame's own bytes
    assert torch.equal(view, kv) and view.data_ptr() != kv.data_ptr()


def test_block_view_checks_the_header_and_spec() -> None:
    frame = encode_block(SPEC, make_kv(SPEC, 4))
    other = BlockSpec(SPEC.block_tokens, SPEC.num_layers + 1, SPEC.num_kv_heads, SPEC.head_dim)
    with pytest.raises(BlockSpecMismatch):
        block_view(frame, other)
    bad = bytearray(frame)
    bad[3] ^= 0xFF  # inside the header: its checksum no longer matches
    with pytest.raises(CorruptBlock):
        block_view(bytes(bad), SPEC)


def test_encode_parts_alias_the_tensor() -> None:
    kv = make_kv(SPEC, 4)
    _, payload = encode_block_parts(SPEC, kv)
    kv.view(-1)[0] = 42.0
    assert torch.frombuffer(bytearray(payload[:2]), dtype=torch.float16)[0] == 42.0


def test_non_contiguous_input_is_encoded_in_layout_order() -> None:
    full = make_kv(SPEC, 8)
    a, b = split_blocks(SPEC, full, 2)
    assert not b.is_contiguous()
    assert torch.equal(decode_block(encode_block(SPEC, b), SPEC), b)
    assert torch.equal(concat_blocks(SPEC, [a, b]), full)
    assert concat_blocks(SPEC, []).shape == SPEC.shape(0)


def test_wrong_shape_dtype_or_layout_is_a_clear_error() -> None:
    with pytest.raises(BlockSpecMismatch, match="dtype"):
        encode_block(SPEC, make_kv(SPEC, 4).float())
    with pytest.raises(BlockSpecMismatch, match="shape"):
        encode_block(SPEC, make_kv(SPEC, 5))
    other = BlockSpec(4, 2, 2, 8, "float16", Layout.LKTHD)
    with pytest.raises(BlockSpecMismatch, match="LKHTD"):
        encode_block(SPEC, make_kv(other, 4).transpose(2, 3)[:, :, :1])
    frame = encode_block(other, make_kv(other, 4))
    with pytest.raises(BlockSpecMismatch, match="spec"):
        decode_block(frame, SPEC)


def test_corruption_is_detected() -> None:
    h = bytes(32 * [7])
    frame = bytearray(encode_block(SPEC, make_kv(SPEC, 4), h))
    verify_frame(frame, h)
    bad_payload = bytearray(frame)
    bad_payload[-1] ^= 1
    with pytest.raises(CorruptBlock, match="payload checksum"):
        decode_block(bad_payload, SPEC)
    bad_header = bytearray(frame)
    bad_header[10] ^= 1
    with pytest.raises(CorruptBlock, match="header"):
        decode_block(bad_header, SPEC)
    with pytest.raises(CorruptBlock, match=r"truncated|length"):
        decode_block(frame[:-1], SPEC)
    with pytest.raises(CorruptBlock, match="truncated"):
        decode_block(frame[:10], SPEC)
    with pytest.raises(CorruptBlock, match="belongs to"):
        decode_block(frame, SPEC, block_hash=bytes(32 * [8]))


def _as_version_1(frame: bytes) -> bytes:
    """The frame as version 1 wrote it: zlib's CRC-32 over payload and header."""
    head = bytearray(frame[: FRAME_HEADER_BYTES - 4])
    head[4] = 1
    struct.pack_into("<I", head, 32, zlib.crc32(frame[FRAME_HEADER_BYTES:]))
    return bytes(head) + struct.pack("<I", zlib.crc32(head)) + frame[FRAME_HEADER_BYTES:]


def test_frames_are_written_with_crc32c_and_version_1_frames_still_read() -> None:
    h = bytes(32 * [9])
    kv = make_kv(SPEC, 4)
    frame = encode_block(SPEC, kv, h)
    head = read_header(frame)
    assert frame[4] == 2 and head.checksum_algorithm == CHECKSUM_ALGORITHM == "crc32c"
    assert head.checksum == crc32c.crc32c(frame[FRAME_HEADER_BYTES:])
    assert head.checksum != zlib.crc32(frame[FRAME_HEADER_BYTES:])
    old = _as_version_1(frame)
    assert read_header(old).checksum_algorithm == "crc32"
    assert verify_frame(old, h).checksum == zlib.crc32(frame[FRAME_HEADER_BYTES:])
    assert torch.equal(decode_block(old, SPEC, block_hash=h), kv)
    bad = bytearray(old)
    bad[-1] ^= 1
    with pytest.raises(CorruptBlock, match="payload checksum"):
        verify_frame(bytes(bad), h)
    # A version-2 header carrying version 1's checksums (or the reverse) is refused.
    mixed = bytearray(old)
    mixed[4] = 2
    with pytest.raises(CorruptBlock, match="header checksum"):
        read_header(bytes(mixed))
    unknown = bytearray(frame)
    unknown[4] = 3
    with pytest.raises(CorruptBlock, match="version"):
        read_header(bytes(unknown))
