"""Bit packing: exact identity, exact byte counts, and the bit layout pinned by hand-computed bytes."""

from __future__ import annotations

import pytest
import torch

from quant.config import packed_nbytes
from quant.packing import pack_codes, unpack_codes


def _u8(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [8, 64, 8 * 1001])
def test_pack_unpack_identity(bits, count):
    codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == count * bits // 8 == packed_nbytes(count, bits)
    assert torch.equal(unpack_codes(packed, bits, count), codes)
    # A prefix: padding codes at the end are dropped on request.
    assert torch.equal(unpack_codes(packed, bits, count - 5), codes[: count - 5])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_code_value_survives(bits):
    codes = torch.arange(2**bits, dtype=torch.uint8).repeat(8)  # each value in every position of a group
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.numel()), codes)


def test_packed_byte_counts():
    assert packed_nbytes(8, 3) == 3  # 8 codes of 3 bits = 24 bits
    assert packed_nbytes(16, 3) == 6
    assert packed_nbytes(9, 3) == 6  # a started group of 8 takes its full 3 bytes
    assert packed_nbytes(8, 2) == 2 and packed_nbytes(8, 4) == 4 and packed_nbytes(8, 8) == 8
    assert packed_nbytes(10, 4) == 5 and packed_nbytes(10, 2) == 3
    assert pack_codes(torch.zeros(8, dtype=torch.uint8), 3).numel() == 3


# Layout: codes fill each byte (or, for 3 bits, each little-endian 24-bit word) from the least significant bit.
def test_layout_2bit():
    packed = pack_codes(_u8([0, 1, 2, 3, 3, 2, 1, 0]), 2)
    # byte 0 = 0 | 1<<2 | 2<<4 | 3<<6 = 0 + 4 + 32 + 192 = 228 = 0b11_10_01_00
    # byte 1 = 3 | 2<<2 | 1<<4 | 0<<6 = 3 + 8 + 16 + 0 = 27 = 0b00_01_10_11
    assert packed.tolist() == [0b11100100, 0b00011011] == [228, 27]


def test_layout_3bit():
    packed = pack_codes(_u8([0, 1, 2, 3, 4, 5, 6, 7]), 3)
    # word = sum(i << 3i) = 0o76543210 = 0b111_110_101_100_011_010_001_000 = 0xFAC688 = 16434824,
    # stored little-endian: 0x88, 0xC6, 0xFA.
    assert sum(i << (3 * i) for i in range(8)) == 0o76543210 == 0xFAC688
    assert packed.tolist() == [0x88, 0xC6, 0xFA] == [136, 198, 250]
    # A single 7 in the third slot spans bits 6..8: byte 0 gets 0b11000000, byte 1 gets 0b1.
    assert pack_codes(_u8([0, 0, 7, 0, 0, 0, 0, 0]), 3).tolist() == [0b11000000, 0b00000001, 0]


def test_layout_4bit():
    packed = pack_codes(_u8([1, 2, 3, 4, 5, 6, 7, 8]), 4)
    # low nibble first: byte = c0 | c1 << 4
    assert packed.tolist() == [0x21, 0x43, 0x65, 0x87] == [33, 67, 101, 135]
    assert pack_codes(_u8([15, 0, 0, 15, 0, 0, 0, 0]), 4).tolist() == [0x0F, 0xF0, 0, 0]


def test_layout_8bit():
    codes = _u8([0, 1, 127, 128, 200, 254, 255, 7])
    packed = pack_codes(codes, 8)
    assert packed.tolist() == [0, 1, 127, 128, 200, 254, 255, 7]
    assert packed.data_ptr() != codes.data_ptr()  # a copy: packing never aliases its input


def test_pack_rejects_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(7, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="supported: 2, 3, 4, 8"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="supported: 2, 3, 4, 8"):
        unpack_codes(torch.zeros(8, dtype=torch.uint8), 6, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_cpu_cuda_agree(bits):
    codes = torch.randint(0, 2**bits, (8 * 513,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    packed_cuda = pack_codes(codes.cuda(), bits)
    assert torch.equal(packed_cuda.cpu(), packed)
    assert torch.equal(unpack_codes(packed_cuda, bits, codes.numel()).cpu(), codes)
