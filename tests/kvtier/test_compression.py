"""Compression of block transfers and its measured choice."""

from __future__ import annotations

import pytest
import torch

from k2store.errors import InvalidArgument
from kvtier.blocks import BlockSpec, encode_block
from kvtier.compression import CODECS, choose_codec, compress_frame, decompress_frame
from kvtier.errors import CorruptBlock

BF16 = BlockSpec(16, 4, 2, 32, "bfloat16")


def kv_like(spec: BlockSpec) -> torch.Tensor:
    """Normal values with per-channel scales (a few outlier channels), like real K and V."""
    g = torch.Generator().manual_seed(3)
    scale = torch.exp(
        torch.randn(spec.num_layers, 2, spec.num_kv_heads, 1, spec.head_dim, generator=g)
    )
    return (torch.randn(spec.shape(), generator=g) * scale).to(spec.torch_dtype)


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_round_trip(codec: str) -> None:
    frame = encode_block(BF16, kv_like(BF16))
    packed = compress_frame(codec, frame)
    assert decompress_frame(codec, packed) == frame


def test_shuffled_zlib_shrinks_bfloat16() -> None:
    frame = encode_block(BF16, kv_like(BF16))
    assert len(compress_frame("zlib", frame)) < 0.9 * len(frame)


def test_choice_follows_the_link() -> None:
    frame = encode_block(BF16, kv_like(BF16))
    fast = choose_codec(frame, 1e15)  # a link faster than any codec: send raw
    assert fast.codec == "none" and fast.ratio["none"] == 1.0
    slow = choose_codec(frame, 1e3)  # 1 kB/s: bytes saved dominate
    assert slow.codec != "none" and slow.ratio[slow.codec] < 0.9


def test_bad_transfers_and_codecs() -> None:
    frame = encode_block(BF16, kv_like(BF16))
    packed = bytearray(compress_frame("zlib", frame))
    packed[-5] ^= 0xFF
    with pytest.raises(CorruptBlock):
        decompress_frame("zlib", bytes(packed))
    with pytest.raises(CorruptBlock):
        decompress_frame("zlib", frame[:20])
    with pytest.raises(InvalidArgument):
        compress_frame("brotli", frame)
