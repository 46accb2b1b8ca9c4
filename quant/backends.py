"""Which implementation dequantizes a packed layer (the Triton kernel, torch.compile, eager) and the eager and
compiled ones themselves: codes and block scales in, the (out, in) weight in the compute dtype out."""

from __future__ import annotations

import types

import torch

from . import triton_dequant
from .blockwise import dequantize_codes
from .config import QuantConfig


def dequant_codes_eager(codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, bits: int, blocksize: int,
                         out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """blockwise.dequantize_codes as the function torch.compile copies per (bits, blocksize, dtype)."""
    return dequantize_codes(codes, table, scales, bits, blocksize, (out_features, in_features), dtype)


_COMPILED = {}


def _compiled_for(bits: int, blocksize: int, dtype: torch.dtype):
    """One torch.compile'd copy of the eager function per (bits, blocksize, dtype), shapes dynamic. Dynamo keeps its
    graphs per code object and stops recompiling one after 8 variants (then raises under fullgraph), which a mixed
    plan (bits x blocks x dtypes) exceeds; a renamed copy of the code object gets a cache of its own."""
    key = (bits, blocksize, dtype)
    fn = _COMPILED.get(key)
    if fn is None:
        code = dequant_codes_eager.__code__
        name = f"_dequant_nf{bits}_b{blocksize}_{str(dtype).split('.')[-1]}"
        copy = types.FunctionType(code.replace(co_name=name, co_qualname=name), dequant_codes_eager.__globals__, name)
        fn = _COMPILED[key] = torch.compile(copy, dynamic=True, fullgraph=True)
    return fn


DEQUANT_BACKENDS = ("auto", "triton", "compile", "eager")


def check_backend(name: str) -> str:
    if name not in DEQUANT_BACKENDS:
        raise ValueError(f"dequant backend {name!r} is not one of {', '.join(DEQUANT_BACKENDS)}")
    return name


def dequant_backend(device: torch.device, config: QuantConfig, choice: str = "auto") -> str:
    """Which implementation dequantizes a layer of `config` on `device`: the Triton kernel where it runs and handles
    the configuration, else torch.compile on CUDA, else eager. choice="triton"|"compile"|"eager" forces one (where it
    can run; the benchmarks compare them side by side); "auto" picks the fastest that runs."""
    check_backend(choice)
    triton_ok = triton_dequant.available(device) and triton_dequant.supports(config)
    compile_ok = device.type == "cuda" and not config.asymmetric and not _COMPILED.get("failed")
    if choice in ("auto", "triton") and triton_ok:
        return "triton"
    if choice in ("auto", "triton", "compile") and compile_ok:
        return "compile"
    return "eager"


def dequant_codes_compiled(codes, table, scales, bits, blocksize, out_features, in_features, dtype):
    """On CUDA without the Triton kernel, the eager function through torch.compile: one fused kernel reads the
    packed bytes and writes the 16-bit weight, instead of three full-size fp32 passes (gather, scale, cast). A
    compile failure (no Triton, no compiler) falls back to eager for good."""
    try:
        return _compiled_for(bits, blocksize, dtype)(codes, table, scales, bits, blocksize, out_features,
                                                      in_features, dtype)
    except torch.OutOfMemoryError:
        raise  # not a compiler problem: the eager path would run out of memory too
    except Exception:  # noqa: BLE001 - any compiler problem: the eager path computes the same values
        _COMPILED["failed"] = True
        return dequant_codes_eager(codes, table, scales, bits, blocksize, out_features, in_features, dtype)
