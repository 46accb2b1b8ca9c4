"""CPU A/B of bench_step's lqplan variants between two trees: each run in a fresh process importing that tree's
bench/bench_step.py (build, step_time) at small fixed shapes, 1 thread; trees alternate A/B/A/B."""
import json, statistics, subprocess, sys
base, new, pairs = sys.argv[1], sys.argv[2], int(sys.argv[3])
CHILD = r'''
import json, sys, time, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/bench")
torch.set_num_threads(1)
import bench_step as b
import quant.layers as L
assert L.__file__.startswith(sys.argv[1]), L.__file__
dev = torch.device("cpu"); dims = (256, 688)
x = torch.randn(128, dims[0], generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
res = {}
models = {v: b.build(v, 1, dims, 8, dev) for v in ("lqplan-nf4[eager]", "lqplan-mixed-nf2/3/4[eager]")}
for m in models.values(): b.set_backend(m, "eager")
for r in range(3):
    for v, m in models.items():
        params = [p for p in m.parameters() if p.requires_grad]
        b.one_step(m, x, params)
        t0 = time.process_time()
        for _ in range(4):
            b.one_step(m, x, params)
        res.setdefault(v, []).append((time.process_time() - t0) / 4)
print(json.dumps({v: statistics.median(s) for v, s in res.items()} if False else {v: sorted(s)[1] for v, s in res.items()}))
'''
rows = {"base": [], "new": []}
for i in range(pairs):
    for side, tree in (("base", base), ("new", new)):
        p = subprocess.run([sys.executable, "-c", CHILD, tree], capture_output=True, text=True, cwd="/tmp",
                           env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": "/root"})
        if p.returncode: print(p.stderr[-2000:]); sys.exit(1)
        rows[side].append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(i, side, rows[side][-1], flush=True)
for v in rows["new"][0]:
    b = [r[v] for r in rows["base"]]; n = [r[v] for r in rows["new"]]
    pp = [x / y for x, y in zip(n, b)]
    print(f"{v:30s} base {statistics.median(b)*1e3:.2f} ms new {statistics.median(n)*1e3:.2f} ms new/base "
          f"{statistics.median(n)/statistics.median(b):.4f} per-pair median {statistics.median(pp):.4f} "
          f"[{min(pp):.4f}-{max(pp):.4f}] n={len(pp)}")
