"""Before/after on one GPU: old Triton kernel vs new (dequant us), and the old unfused layer forward vs the fused
function (step ms), same process. Not part of the project; numbers go into reports/benchmarks.md."""
import statistics, sys, os, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch, torch.nn.functional as F
import old_triton_dequant as old
from quant import QuantConfig, triton_dequant
from quant.blockwise import quantize
from quant import layers as L
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_step as BS
from bench_dequant import timed

dev = torch.device("cuda")
for shape in ((5120, 5120), (13824, 5120)):
    w = torch.randn(shape, device=dev) * 0.02
    for bits in (4, 3, 2):
        cfg = QuantConfig("nf", bits, 64, double_quant=True)
        layer = L.QuantLoRALinear(quantize(w, cfg))
        sc = {"scale_codes": layer.q_scale_codes, "scale_table": L.flat_codebook("int", 8, dev),
              "scale_scales": layer._field("scale_scales"), "scale_offset": layer._field("scale_offset")}
        t = L.flat_codebook("nf", bits, dev)
        a = old.dequantize(layer.q_codes, t, cfg, shape, torch.bfloat16, **sc)
        b = triton_dequant.dequantize(layer.q_codes, t, cfg, shape, torch.bfloat16, **sc)
        assert torch.equal(a, b)
        to = timed(lambda: old.dequantize(layer.q_codes, t, cfg, shape, torch.bfloat16, **sc), 50)
        tn = timed(lambda: triton_dequant.dequantize(layer.q_codes, t, cfg, shape, torch.bfloat16, **sc), 50)
        print(f"dequant {shape} NF{bits}: old {to:.1f} us, new {tn:.1f} us, new/old {tn/to:.3f}", flush=True)

class _Old(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer, dtype):
        ctx.layer, ctx.dtype = layer, dtype
        return F.linear(x, layer.dequantize(dtype))
    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return g.to(ctx.dtype) @ ctx.layer.dequantize(ctx.dtype), None, None

def old_forward(self, x):
    dtype = x.dtype
    out = _Old.apply(x.to(dtype), self, dtype)
    h = F.linear(self.adapter_input(x).to(dtype), self.lora_A.to(dtype))
    return out + self.scaling * F.linear(h, self.lora_B.to(dtype))

new_forward = L.QuantLoRALinear.forward
x = torch.randn(2048, 5120, device=dev).to(torch.bfloat16)
os.environ["LQPLAN_DEQUANT"] = "triton"
models = {v: BS.build(v, 1, (5120, 13824), 64, dev) for v in ("bnb-nf4+lora", "lqplan-nf4[triton]", "lqplan-mixed-nf2/3/4[triton]")}
res = {}
for r in range(5):
    for v, m in models.items():
        for name, fwd in (("old", old_forward), ("new", new_forward)):
            if v.startswith("bnb") and name == "old":
                continue
            L.QuantLoRALinear.forward = fwd
            res.setdefault((v, name), []).append(BS.step_time(m, x, 10, dev))
for k, v in res.items():
    print(f"step {k}: {statistics.median(v)*1e3:.3f} ms [{min(v)*1e3:.3f}-{max(v)*1e3:.3f}]")
