"""Host-bound check: per step, the host's enqueue time (until one_step returns) vs the wall time (after sync)."""
import sys, os, time, statistics, cProfile, pstats, io
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import torch
import bench_step as BS
dev = torch.device("cuda")
x = torch.randn(2048, 5120, device=dev).to(torch.bfloat16)
os.environ["LQPLAN_DEQUANT"] = "triton"
for v in ("bnb-nf4+lora", "lqplan-nf4[triton]", "lqplan-mixed-nf2/3/4[triton]"):
    m = BS.build(v, 1, (5120, 13824), 64, dev)
    params = [p for p in m.parameters() if p.requires_grad]
    for _ in range(3):
        BS.one_step(m, x, params)
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(20):
        t0 = time.perf_counter(); BS.one_step(m, x, params); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
        host.append(t1 - t0); wall.append(t2 - t0)
    print(f"{v}: host {statistics.median(host)*1e3:.2f} ms, wall {statistics.median(wall)*1e3:.2f} ms", flush=True)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(10):
        BS.one_step(m, x, params)
    torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12); print(s.getvalue()[-3500:])
    del m
