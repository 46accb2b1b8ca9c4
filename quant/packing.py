"""Bit packing of k-bit codes into bytes: 8/k codes per byte for k in {2, 4, 8}; 8 codes in 3 bytes for k = 3.

Hand-written because no library packs arbitrary 2/3-bit codes on CPU and GPU alike; vectorised, no Python loops
over elements."""

from __future__ import annotations

import torch


# Codes packed per step: the int32 working copies stay ~50 MB whatever the matrix (a multiple of 8 codes).
CHUNK_CODES = 1 << 22


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of codes (< 2^bits) whose length is a multiple of 8 into a flat uint8 tensor."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 8:
        raise ValueError(f"packing needs a multiple of 8 codes, got {codes.numel()}")
    if codes.numel() > CHUNK_CODES and bits != 8:
        return torch.cat([_pack(codes[i:i + CHUNK_CODES], bits) for i in range(0, codes.numel(), CHUNK_CODES)])
    return _pack(codes, bits)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.clone()
    if bits in (2, 4):
        per = 8 // bits
        c = codes.view(-1, per).to(torch.int32)
        shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
        return (c << shifts).sum(dim=1).to(torch.uint8)
    if bits == 3:
        c = codes.view(-1, 8).to(torch.int32)
        shifts = torch.arange(8, device=codes.device, dtype=torch.int32) * 3
        word = (c << shifts).sum(dim=1)  # 24 bits
        out = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=1)
        return out.to(torch.uint8).reshape(-1)
    raise ValueError(f"cannot pack {bits}-bit codes; supported: 2, 3, 4, 8")


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_codes: the first `count` codes as a flat uint8 tensor."""
    packed = packed.reshape(-1)
    if bits == 8:
        return packed[:count].clone()
    if bits in (2, 4):
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        mask = (1 << bits) - 1
        out = (packed.unsqueeze(1) >> shifts) & mask
        return out.reshape(-1)[:count]
    if bits == 3:
        b = packed.view(-1, 3).to(torch.int32)
        word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * 3
        out = (word.unsqueeze(1) >> shifts) & 0x7
        return out.to(torch.uint8).reshape(-1)[:count]
    raise ValueError(f"cannot unpack {bits}-bit codes; supported: 2, 3, 4, 8")
