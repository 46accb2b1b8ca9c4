"""Where does a real decoder's perplexity go wrong on a GPU? Issue 18's H200 study scored QLoRA NF4 b64 with
zero-initialised adapters (exactly the quantized model) at perplexity 2,453 before fine-tuning, where this CPU
scores the same plan on the same weights at 23.05 (fp 17.29). The cause was found since: the H200's transformers
5.17.0 rebuilt Gemma 3's GGUF tokenizer as a Unigram model without merges (docs/models.md); the tokenizer is now
loaded with its known-answer check, so this script compares the forward passes only.

One run scores Gemma 3 270M on the same held-out windows in every combination that could explain it, side by side
with the CPU reference of the same combination:
  model:      full precision | QLoRA's plan (NF4 b64 double-quant, rank 16, zero-init: the quantized model itself)
  attention:  sdpa | eager
  dequant:    triton | compile | eager (quantized model on CUDA only)
  precision:  fp32 | bf16 autocast (as training runs)
It then hooks every decoder layer's output for one window and prints the first layer where the device and the CPU
differ by more than the precision's rounding, so a wrong kernel or attention path shows where it starts.

    python bench/decoder_gpu_check.py --out reports/decoder-gpu-check          # on the GPU machine
    python bench/decoder_gpu_check.py --device cpu --texts 4 --out /tmp/check   # CPU smoke run

Writes results.json and check.md under --out."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.corpus import real_text_splits  # noqa: E402
from planner.devices import resolve_device  # noqa: E402
from planner.errors import UserError  # noqa: E402
from planner.fsio import write_json, write_text  # noqa: E402
from planner.model.resolve import resolve_model  # noqa: E402
from planner.plan import Plan, PlanEntry  # noqa: E402
from planner.train.apply import apply_plan  # noqa: E402
from planner.train.evaluate import perplexity  # noqa: E402
from quant import NF4_QLORA  # noqa: E402
from quant.layers import set_backend  # noqa: E402


def qlora_plan(source, matrices) -> Plan:
    """QLoRA's uniform plan (NF4 b64 double-quant, rank 16) for every planned matrix, without a profile."""
    from planner.profile.grid import GridPoint

    point = GridPoint(NF4_QLORA, 16)
    entries = [PlanEntry.of(m.name, m.shape, point, error=0.0) for m in matrices]
    return Plan.from_entries(source.record(), {"kind": "uniform", "label": point.label}, entries, method={"init": "qlora"})


def score(model, tokenizer, texts, bf16: bool, device) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return perplexity(model, tokenizer, texts, max_len=256, stride=128, batch_size=8, device=device)


def layer_outputs(model, ids, device, bf16: bool) -> list[torch.Tensor]:
    """Every decoder layer's hidden-state output for one window, in fp32 on the CPU."""
    outs = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: outs.append((o[0] if isinstance(o, tuple) else o)
                                                                        .detach().float().cpu()))
             for layer in model.model.layers]
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids.to(device))
    finally:
        for h in hooks:
            h.remove()
    return outs


def first_divergence(ref: list[torch.Tensor], got: list[torch.Tensor], tol: float) -> dict:
    """The first layer whose relative difference from the CPU's exceeds `tol`, and every layer's difference."""
    rel = [float((g - r).norm() / r.norm().clamp_min(1e-30)) for r, g in zip(ref, got)]
    bad = next((i for i, d in enumerate(rel) if not math.isfinite(d) or d > tol), None)
    return {"first_layer_over_tol": bad, "tol": tol, "relative_diff_per_layer": rel}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--texts", type=int, default=16, help="held-out pydoc paragraphs scored (default 16)")
    p.add_argument("--out", default="reports/decoder-gpu-check")
    args = p.parse_args(argv)
    try:
        from transformers import AutoModelForCausalLM

        from planner.model.discover import discover_matrices
        from planner.model.tokenizer import load_tokenizer

        dev = resolve_device(args.device)
        source = resolve_model(args.model)
        tokenizer = load_tokenizer(source.folder)
        texts = real_text_splits()["heldout"][:args.texts]
        plan = qlora_plan(source, discover_matrices(source))
        models = {}
        for attn in ("sdpa", "eager"):
            fp = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32,
                                                      attn_implementation=attn).eval()
            torch.manual_seed(0)
            quant = apply_plan(copy.deepcopy(fp), plan, model_path=source.folder, device="cpu", init="qlora",
                               progress=False)
            models[("fp", attn)], models[("nf4", attn)] = fp, quant
    except UserError as e:
        print(f"decoder_gpu_check: error: {e}", file=sys.stderr)
        return 2

    cpu = torch.device("cpu")
    window = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0][:255]
    if tokenizer.bos_token_id is not None:
        window = torch.cat([torch.tensor([tokenizer.bos_token_id]), window])
    window = window[None]
    rows = []
    for (kind, attn), bf16 in itertools.product(models, (False, True)):
        model = models[(kind, attn)]
        set_backend(model, "eager")
        t0 = time.perf_counter()
        ref_ppl = score(model, tokenizer, texts, bf16, cpu)
        ref_layers = layer_outputs(model, window, cpu, bf16)
        cpu_s = time.perf_counter() - t0
        backends = ("triton", "compile", "eager") if kind == "nf4" and dev.type == "cuda" else ("eager",)
        on_dev = copy.deepcopy(model).to(dev) if dev.type != "cpu" else model
        for backend in backends:
            set_backend(on_dev, backend)
            t0 = time.perf_counter()
            ppl = score(on_dev, tokenizer, texts, bf16, dev)
            got = layer_outputs(on_dev, window, dev, bf16)
            row = {"model": kind, "attn": attn, "precision": "bf16-autocast" if bf16 else "fp32",
                   "dequant": backend if kind == "nf4" else None, "device": str(dev), "ppl": ppl,
                   "cpu_ppl": ref_ppl, "ratio": ppl / ref_ppl, "seconds": time.perf_counter() - t0,
                   "cpu_seconds": cpu_s, **first_divergence(ref_layers, got, 0.05 if bf16 else 1e-3)}
            rows.append(row)
            print(f"{kind:3s} attn={attn:5s} {row['precision']:13s} dequant={backend:7s} ppl {ppl:10.3f} "
                  f"cpu {ref_ppl:10.3f} ratio {row['ratio']:.4f} first layer over tol: "
                  f"{row['first_layer_over_tol']}", flush=True)
        del on_dev
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "transformers": __import__("transformers").__version__, "python": sys.version.split()[0]}
    out = Path(args.out)
    result = {"command": "python bench/decoder_gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": source.name, "fingerprint": source.fingerprint, "texts": len(texts), "environment": env,
              "rows": rows}
    write_json(out / "results.json", result)
    lines = [f"# {source.name} perplexity: {dev} vs CPU, same windows", "", f"Command: `{result['command']}`  ",
             f"Environment: {json.dumps(env)}", "",
             "| model | attention | precision | dequant | ppl | CPU ppl | ratio | first layer over tol |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['attn']} | {r['precision']} | {r['dequant'] or '-'} | {r['ppl']:.3f} | "
              f"{r['cpu_ppl']:.3f} | {r['ratio']:.4f} | {r['first_layer_over_tol']} |" for r in rows]
    write_text(out / "check.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
