"""Where a training step's device time goes: a torch.profiler run's kernels grouped by what they do (GEMMs,
dequantization, attention, loss, optimizer, casts and copies, other elementwise work, reductions), per step, with
the top kernels. On a machine without CUDA the CPU operators are grouped instead, so the code runs anywhere."""

from __future__ import annotations

# First match wins: (category, substrings of the lower-cased kernel or operator name).
CATEGORIES = (
    ("dequant", ("dequant", "kdequantize", "_nf", "lookup")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "addmm", "aten::mm", "aten::bmm", "matmul", "linear")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "softmax")),
    ("optimizer", ("multi_tensor", "adam", "foreach", "clip_grad", "norm_kernel")),
    ("cast_copy", ("copy", "cast", "to_copy", "catarray", "cat_", "index")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "mul", "add", "silu", "rsqrt", "pow", "mean", "neg", "fill")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def summarize(prof, steps: int, top: int = 15) -> dict:
    """{device, per_step_ms: {category: ms}, total_ms_per_step, top: [(name, ms per step, calls per step)]} from a
    finished torch.profiler.profile over `steps` steps: CUDA kernels' own time where there are any, else CPU
    operators' self time."""
    events = prof.key_averages()
    cuda = [e for e in events if getattr(e.device_type, "name", "") == "CUDA"]
    if cuda:
        rows = [(e.key, e.self_device_time_total, e.count) for e in cuda]
        device = "cuda"
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in events if not e.key.startswith("ProfilerStep")]
        device = "cpu"
    per_cat: dict[str, float] = {}
    for name, us, _ in rows:
        per_cat[category(name)] = per_cat.get(category(name), 0.0) + us / 1000 / steps
    total = sum(per_cat.values())
    ranked = sorted(rows, key=lambda r: -r[1])[:top]
    return {"device": device, "steps": steps, "total_ms_per_step": round(total, 3),
            "per_step_ms": {k: round(v, 3) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
            "top": [[name[:120], round(us / 1000 / steps, 3), round(n / steps, 1)] for name, us, n in ranked]}


def render(summary: dict, title: str) -> str:
    total = summary["total_ms_per_step"] or 1.0
    lines = [f"{title}: {summary['device']} time per step {summary['total_ms_per_step']:.1f} ms "
             f"({summary['steps']} steps profiled)"]
    lines += [f"  {k:12} {v:9.2f} ms  {100 * v / total:5.1f}%" for k, v in summary["per_step_ms"].items()]
    lines += ["  top kernels (ms per step, calls per step):"]
    lines += [f"    {ms:8.2f} {calls:7.1f}  {name}" for name, ms, calls in summary["top"]]
    return "\n".join(lines)
