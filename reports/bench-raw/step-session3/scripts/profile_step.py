import sys, os
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import torch
import bench_step as BS
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
x = torch.randn(2048, 5120, device=dev).to(torch.bfloat16)
os.environ["LQPLAN_DEQUANT"] = "triton"
for v in ("bnb-nf4+lora", "lqplan-nf4[triton]", "lqplan-mixed-nf2/3/4[triton]"):
    m = BS.build(v, 1, (5120, 13824), 64, dev)
    BS.step_time(m, x, 3, dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        BS.step_time(m, x, 5, dev)
    print("=====", v)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
    del m
