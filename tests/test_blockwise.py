"""Blockwise quantization: exact storage cost, real packed bytes, round-trip error bounds, reference equality."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from quant import NF4_QLORA, QuantConfig, QuantizedTensor, quantize, quantize_dequantize
from quant.codebooks import codebook, nearest_code, nf_codebook

BITS = (2, 3, 4, 8)
BLOCKS = (16, 32, 64, 128, 256)
DTYPES = ("fp32", "fp16", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def grid_configs(kind: str) -> list[QuantConfig]:
    """Every configuration of one kind: bits x blocks x (no double quant per scale dtype, or double quant over
    dq_bits x dq_blocksize x dq_dtype); INT adds asymmetric (zero-point) configurations without double quant."""
    out = []
    for bits, block in itertools.product(BITS, BLOCKS):
        out += [QuantConfig(kind, bits, block, double_quant=False, scale_dtype=sd) for sd in DTYPES]
        out += [QuantConfig(kind, bits, block, True, dqb, dqB, dqd)
                for dqb, dqB, dqd in itertools.product(BITS, (16, 64, 256), DTYPES)]
        if kind == "int":
            out += [QuantConfig(kind, bits, block, double_quant=False, scale_dtype=sd, asymmetric=True) for sd in DTYPES]
    return out


ALL_CONFIGS = grid_configs("nf") + grid_configs("int")


def test_grid_size():
    # 4 bits x 5 blocks x (3 + 4*3*3) = 780 per kind, plus 4 x 5 x 3 asymmetric INT.
    assert len(grid_configs("nf")) == 780
    assert len(grid_configs("int")) == 840
    assert len(set(ALL_CONFIGS)) == len(ALL_CONFIGS)


# ---- bits per weight and storage, by hand ----------------------------------------------------------------
def test_config_records_round_trip_every_configuration():
    import numpy as np

    for cfg in ALL_CONFIGS:
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg
        # a wider record (a plan entry, a pandas row of profile.csv): other keys ignored, numpy scalars made Python's
        row = {"name": "m", "rank": 8, **{k: np.array(v)[()] for k, v in cfg.to_dict().items()}}
        again = QuantConfig.from_record(row)
        assert again == cfg and again.to_dict() == cfg.to_dict()
        assert all(type(v) in (str, int, bool) for v in again.to_dict().values())
    assert QuantConfig.from_record({"bits": 3, "rank": 4}) == QuantConfig(bits=3)  # absent fields: the defaults
    with pytest.raises(ValueError, match="unknown"):
        QuantConfig.from_dict({**NF4_QLORA.to_dict(), "rank": 4})


def test_bits_per_weight_by_hand():
    assert NF4_QLORA.bits_per_weight == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
    assert QuantConfig("nf", 4, 64, double_quant=False).bits_per_weight == 4.5  # 4 + 32/64
    assert QuantConfig("nf", 4, 64, double_quant=False, scale_dtype="bf16").bits_per_weight == 4.25  # 4 + 16/64
    assert QuantConfig("int", 4, 64, double_quant=False, asymmetric=True).bits_per_weight == 5.0  # 4 + 2*32/64
    assert QuantConfig("nf", 3, 16, True, 2, 16, "bf16").bits_per_weight == 3 + 2 / 16 + 16 / 256  # 3.1875
    assert QuantConfig("nf", 2, 256, True, 8, 256, "fp16").bits_per_weight == 2 + 8 / 256 + 16 / 65536


def test_storage_bytes_by_hand():
    # NF4, block 64, double quant 8-bit / 256 / fp32 on 384x1536 = 589824 weights:
    #   codes 589824 / 2 = 294912; 9216 blocks -> 9216 one-byte scale codes; 9216/256 = 36 fp32 second-level
    #   scales = 144; fp32 mean offset 4.  294912 + 9216 + 144 + 4 = 304276.
    assert NF4_QLORA.storage_bytes(384 * 1536) == 304276
    assert NF4_QLORA.matrix_bits((384, 1536), rank=16) == 8 * 304276 + 16 * 16 * (384 + 1536) == 2925728
    # NF3, block 64, fp32 scales on 7x13 = 91: 2 blocks padded to 128 codes -> 16 groups of 8 x 3 bytes = 48;
    #   2 scales x 4 = 8.  48 + 8 = 56.
    assert QuantConfig("nf", 3, 64, double_quant=False).storage_bytes(91) == 56
    # NF2, block 16, double quant 3-bit / 64 / bf16 on 1x1: 16 codes x 2 bits = 4 bytes; 1 second-level block
    #   of 64 scale codes x 3 bits = 24 bytes; 1 bf16 = 2; offset 4.  4 + 24 + 2 + 4 = 34.
    assert QuantConfig("nf", 2, 16, True, 3, 64, "bf16").storage_bytes(1) == 34
    # INT4 asymmetric, block 32, fp16 on 129x257 = 33153: ceil(33153/32) = 1037 blocks; 1037*32/2 = 16592
    #   code bytes; scale + zero-point 1037 x 2 x 2 = 4148.  16592 + 4148 = 20740.
    assert QuantConfig("int", 4, 32, double_quant=False, scale_dtype="fp16", asymmetric=True).storage_bytes(33153) == 20740
    # NF8, block 256, double quant 8-bit / 16 / fp16 on 33153: ceil(33153/256) = 130 blocks -> 33280 code bytes;
    #   ceil(130/16) = 9 second-level blocks -> 144 scale codes; 9 x 2 = 18; offset 4.  33280+144+18+4 = 33446.
    assert QuantConfig("nf", 8, 256, True, 8, 16, "fp16").storage_bytes(33153) == 33446


@pytest.mark.parametrize("cfg,shape,expected", [
    (NF4_QLORA, (384, 1536), 304276),
    (QuantConfig("nf", 3, 64, double_quant=False), (7, 13), 56),
    (QuantConfig("nf", 2, 16, True, 3, 64, "bf16"), (1, 1), 34),
    (QuantConfig("int", 4, 32, double_quant=False, scale_dtype="fp16", asymmetric=True), (129, 257), 20740),
    (QuantConfig("nf", 8, 256, True, 8, 16, "fp16"), (129, 257), 33446),
])
def test_hand_counted_bytes_are_really_held(cfg, shape, expected):
    assert quantize(torch.randn(shape), cfg).nbytes == expected


def _check_storage_layout(q: QuantizedTensor, cfg: QuantConfig, numel: int) -> None:
    nblocks = math.ceil(numel / cfg.blocksize)
    assert q.codes.dtype == torch.uint8
    if cfg.double_quant:
        assert q.scales is None and q.zeros is None
        assert q.scale_scales.dtype == TORCH_DTYPES[cfg.dq_dtype]
        assert q.scale_scales.numel() == math.ceil(nblocks / cfg.dq_blocksize)
        assert q.scale_codes.dtype == torch.uint8 and q.scale_offset.dtype == torch.float32
    else:
        assert q.scales.dtype == TORCH_DTYPES[cfg.scale_dtype] and q.scales.numel() == nblocks
        assert (q.zeros is not None) == cfg.asymmetric


@pytest.mark.parametrize("shape", [(1, 1), (7, 13)])
def test_nbytes_equals_storage_bytes_for_every_config(shape):
    w = torch.randn(shape)
    for cfg in ALL_CONFIGS:
        q = quantize(w, cfg)
        assert q.nbytes == cfg.storage_bytes(w.numel()), cfg.label
        _check_storage_layout(q, cfg, w.numel())


def _subset(configs, dq_variants):
    return [c for c in configs if not c.double_quant or (c.dq_bits, c.dq_blocksize, c.dq_dtype) in dq_variants]


@pytest.mark.parametrize("shape,configs", [
    ((129, 257), _subset(ALL_CONFIGS, {(8, 256, "fp32"), (3, 16, "bf16"), (2, 64, "fp16")})),
    ((384, 1536), [c for c in _subset(ALL_CONFIGS, {(8, 256, "fp32")}) if c.blocksize in (16, 64, 256)
                   and (c.kind == "nf" or c.asymmetric) and c.scale_dtype == "fp32"]),
], ids=["129x257", "384x1536"])
def test_nbytes_equals_storage_bytes_on_larger_shapes(shape, configs):
    w = torch.randn(shape)
    for cfg in configs:
        q = quantize(w, cfg)
        assert q.nbytes == cfg.storage_bytes(w.numel()), cfg.label
        _check_storage_layout(q, cfg, w.numel())


def test_nbytes_is_the_nominal_bits_when_blocks_divide():
    # With numel a multiple of B x B2 nothing is padded: the real bits are exactly numel x bits_per_weight, plus
    # the 32-bit fp32 mean offset of double quantization. The smallest such shape per config keeps this fast.
    for cfg in ALL_CONFIGS:
        if cfg.double_quant:
            shape, extra = (cfg.dq_blocksize, cfg.blocksize), 32
        else:
            shape, extra = (3, cfg.blocksize), 0
        n = shape[0] * shape[1]
        assert quantize(torch.randn(shape), cfg).nbytes * 8 == n * cfg.bits_per_weight + extra, cfg.label
    # And once on a real matrix shape, 384 x 1536 = 9 x 256 x 256, for the QLoRA configuration.
    assert quantize(torch.randn(384, 1536), NF4_QLORA).nbytes * 8 == 384 * 1536 * 4.126953125 + 32


# ---- round trip -----------------------------------------------------------------------------------------
ROUNDTRIP_CONFIGS = (
    [QuantConfig(kind, b, blk, double_quant=False, scale_dtype=sd)
     for kind in ("nf", "int") for b in BITS for blk in BLOCKS for sd in ("fp32", "bf16")]
    + [QuantConfig(kind, b, blk, True, dqb, dqB, dqd)
       for kind in ("nf", "int") for b in BITS for blk in BLOCKS
       for dqb, dqB, dqd in ((8, 256, "fp32"), (2, 16, "bf16"), (3, 64, "fp16"))]
    + [QuantConfig("int", b, blk, double_quant=False, scale_dtype=sd, asymmetric=True)
       for b in BITS for blk in BLOCKS for sd in DTYPES]
)


def _stored(q: QuantizedTensor, w: torch.Tensor):
    """float64 (blocks, B) views of w (zero-padded), the dequantized values, the stored scales and zero-points."""
    cfg = q.config
    nblocks = cfg.num_blocks(w.numel())
    flat = torch.zeros(nblocks * cfg.blocksize, dtype=torch.float64)
    flat[: w.numel()] = w.reshape(-1).double()
    deq = torch.zeros_like(flat)
    deq[: w.numel()] = q.dequantize().reshape(-1).double()
    s = q.block_scales().double()[:, None]
    z = q.zeros.double()[:, None] if cfg.asymmetric else torch.zeros_like(s)
    return flat.view(nblocks, -1), deq.view(nblocks, -1), s, z


def _heavy_tailed(shape) -> torch.Tensor:
    # Rows of very different magnitude (like real weights) make blocks with small scales, where double
    # quantization's absolute scale error is relatively large.
    return torch.randn(shape) * torch.exp(2 * torch.randn(shape[0], 1))


@pytest.mark.parametrize("cfg", ROUNDTRIP_CONFIGS, ids=lambda c: c.label)
def test_roundtrip_error_bounds(cfg):
    w = _heavy_tailed((23, 61))  # 1403 weights: no block size divides it, so the last block is padded
    q = quantize(w, cfg)
    blocks, deq, s, z = _stored(q, w)
    t = codebook(cfg.kind, cfg.bits, cfg.asymmetric).double()
    err = (deq - blocks).abs()
    tol = 1e-6 * (s.abs() + z.abs() + blocks.abs())

    # Every weight gets the nearest value its block can represent with the scale as stored.
    representable = t[None, None, :] * s[:, :, None] + z[:, :, None]
    nearest = (representable - blocks[:, :, None]).abs().amin(dim=2)
    assert bool((err <= nearest + tol).all())

    # Hence |error| <= half the largest codebook gap x |scale|, plus the distance by which w/scale falls outside
    # the codebook's range (only possible when the stored scale is below the block's absmax).
    half_gap = t.diff().max() / 2
    x = (blocks - z) / torch.where(s == 0, torch.ones_like(s), s)
    lo, hi = t[0].item(), t[-1].item()
    outside = (torch.clamp(lo - x, min=0) + torch.clamp(x - hi, min=0)) * s.abs()
    assert bool((err <= half_gap * s.abs() + outside + tol).all())

    if not cfg.double_quant and cfg.scale_dtype == "fp32":
        # fp32 scales are the exact absmax (or max - min): nothing is clipped, the plain bound holds.
        if cfg.asymmetric:
            assert torch.equal(z[:, 0], blocks.amin(dim=1))
        else:
            assert torch.equal(s[:, 0], blocks.abs().amax(dim=1))
        assert bool((err <= half_gap * s.abs() + tol).all())


def test_double_quant_scales_are_the_stored_ones():
    w = _heavy_tailed((64, 96))
    q = quantize(w, NF4_QLORA)
    s = q.block_scales()
    absmax = w.reshape(-1, 64).abs().amax(dim=1)
    # 8-bit scale codes of (absmax - mean) in blocks of 256: each scale within half a step of its absmax.
    step = 2 * q.scale_scales.float().repeat_interleave(256)[: s.numel()] / 255
    assert bool(((s - absmax).abs() <= step / 2 + 1e-6 * absmax).all())
    assert torch.allclose(q.scale_offset, absmax.mean())
    # dequantize() uses exactly these scales.
    codes = q.codes_unpacked().long()
    assert torch.equal(q.dequantize().reshape(-1), (nf_codebook(4)[codes] * s[:, None]).reshape(-1))


@pytest.mark.parametrize("cfg", ROUNDTRIP_CONFIGS, ids=lambda c: c.label)
def test_zero_blocks(cfg):
    w = torch.randn(16, 64)
    w[:4] = 0  # the first 256 weights: block 0 for every block size
    deq = quantize(w, cfg).dequantize()
    if cfg.kind == "int" and cfg.double_quant and not cfg.asymmetric:
        # A symmetric INT codebook of 2^k values has no 0, and a double-quantized scale of an all-zero block is
        # generally not 0: the best it can do is ±scale/(2^k - 1).
        s = quantize(w, cfg).block_scales()[0].abs()
        assert deq[:4].abs().max() <= s / (2**cfg.bits - 1) * (1 + 1e-6)
    else:
        assert torch.count_nonzero(deq[:4]) == 0
    assert torch.count_nonzero(quantize(torch.zeros(16, 64), cfg).dequantize()) == 0


@pytest.mark.parametrize("cfg", ROUNDTRIP_CONFIGS, ids=lambda c: c.label)
def test_padding(cfg):
    w = torch.randn(7, 13)
    q = quantize(w, cfg)
    nblocks = cfg.num_blocks(91)
    padded = torch.zeros(1, nblocks * cfg.blocksize)
    padded[0, :91] = w.reshape(-1)
    qp = quantize(padded, cfg)
    # The padded tail is stored as zeros would be: the storage is identical, the shape is not.
    assert q.tensors().keys() == qp.tensors().keys()
    assert all(torch.equal(q.tensors()[k], qp.tensors()[k]) for k in q.tensors())
    deq = q.dequantize()
    assert deq.shape == (7, 13) and deq.dtype == torch.float32
    assert torch.equal(deq.reshape(-1), qp.dequantize().reshape(-1)[:91])
    if not cfg.asymmetric:
        table = codebook(cfg.kind, cfg.bits)
        tail = q.codes_unpacked().reshape(-1)[91:]
        assert bool((tail == nearest_code(torch.zeros(1), table)).all())


@pytest.mark.parametrize("cfg", ROUNDTRIP_CONFIGS, ids=lambda c: c.label)
def test_quantize_dequantize_equals_the_stored_tensor(cfg):
    w = _heavy_tailed((23, 61))
    assert torch.equal(quantize_dequantize(w, cfg), quantize(w, cfg).dequantize())


@pytest.mark.parametrize("cfg", [NF4_QLORA, QuantConfig("int", 3, 32, double_quant=False, asymmetric=True),
                                 QuantConfig("nf", 2, 16, True, 3, 64, "bf16")], ids=lambda c: c.label)
def test_state_dict_roundtrip(cfg):
    w = torch.randn(33, 65)
    q = quantize(w, cfg)
    sd = q.state_dict("layer.0.")
    assert all(k.startswith("layer.0.") for k in sd)
    back = QuantizedTensor.from_state_dict(cfg, w.shape, sd, prefix="layer.0.")
    assert torch.equal(back.dequantize(), q.dequantize())
    assert back.nbytes == q.nbytes == cfg.storage_bytes(w.numel())


def test_low_precision_inputs_quantize_like_their_fp32_values():
    w = torch.randn(48, 80).to(torch.bfloat16)
    assert torch.equal(quantize(w, NF4_QLORA).dequantize(), quantize(w.float(), NF4_QLORA).dequantize())
    assert quantize(w, NF4_QLORA).dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_quantize_rejects_bad_inputs():
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(8, 8)
        w[3, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize(w, NF4_QLORA)
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.zeros(0, 4), NF4_QLORA)
    with pytest.raises(ValueError, match="torch.Tensor"):
        quantize([[1.0, 2.0]], NF4_QLORA)


# ---- reference ------------------------------------------------------------------------------------------
def _reference_nf4_b64(w: torch.Tensor) -> torch.Tensor:
    """QLoRA's blockwise NF4 written out: absmax per block of 64, argmin over the table, table[code] x scale."""
    table = torch.tensor([
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ])
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    x = blocks / absmax
    code = (x[:, :, None] - table).abs().argmin(dim=2)
    return (table[code] * absmax).reshape(w.shape)


@pytest.mark.parametrize("name", [
    # Holds a weight whose w/absmax equals the fp32-rounded midpoint of two NF4 values while being strictly
    # nearer the upper one: a midpoint rounded in fp32 sends it to the lower value.
    "encoder.layer.5.output.dense.weight",
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.2.intermediate.dense.weight",
])
def test_nf4_matches_reference_on_real_matrices(minilm_weights, name):
    w = minilm_weights[name]
    cfg = QuantConfig("nf", 4, 64, double_quant=False)
    assert torch.equal(quantize(w, cfg).dequantize(), _reference_nf4_b64(w))
    assert torch.equal(quantize_dequantize(w, cfg), _reference_nf4_b64(w))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [QuantConfig("nf", 4, 64, double_quant=False), NF4_QLORA,
                                 QuantConfig("nf", 3, 32, True, 8, 256, "bf16"),
                                 QuantConfig("int", 2, 16, double_quant=False, asymmetric=True)],
                         ids=lambda c: c.label)
def test_cpu_cuda_agree(cfg):
    w = _heavy_tailed((129, 257))
    q_cpu, q_gpu = quantize(w, cfg), quantize(w.cuda(), cfg)
    assert q_gpu.device.type == "cuda" and q_gpu.nbytes == q_cpu.nbytes
    if cfg.double_quant:
        # The mean of the scales is a reduction whose order differs by device; allow its last bit to move.
        same = (q_gpu.codes_unpacked().cpu() == q_cpu.codes_unpacked()).float().mean().item()
        assert same >= 0.999
        assert torch.allclose(q_gpu.dequantize().cpu(), q_cpu.dequantize(), rtol=1e-4, atol=1e-3 * w.abs().max().item())
    else:
        assert all(torch.equal(q_gpu.tensors()[k].cpu(), v) for k, v in q_cpu.tensors().items())
        assert torch.equal(q_gpu.dequantize().cpu(), q_cpu.dequantize())
    assert torch.equal(q_gpu.to("cpu").dequantize(), q_gpu.dequantize().cpu())


@pytest.mark.parametrize("config", [QuantConfig(bits=4), QuantConfig(bits=3, blocksize=32),
                                    QuantConfig(bits=2, blocksize=128, double_quant=False),
                                    QuantConfig(kind="int", bits=4, blocksize=64, asymmetric=True, double_quant=False,
                                                scale_dtype="fp16")])
def test_the_chunked_passes_store_the_same_bytes_as_one_pass(config, monkeypatch):
    """The quantizer normalises and packs in chunks to bound its temporaries; chunk boundaries (here mid-matrix,
    not at row ends) must not change a byte."""
    import quant.blockwise as blockwise
    import quant.packing as packing

    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(3))
    whole = quantize(w, config)
    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(packing, "CHUNK_CODES", 1000)
    chunked = quantize(w, config)
    for field in whole.TENSOR_FIELDS:
        a, b = getattr(whole, field), getattr(chunked, field)
        assert (a is None and b is None) or torch.equal(a, b)
