"""How exact each GPTQ checkpoint format is for a QA-LoRA model with merged adapters (docs/gptq-layout.md's table).

The embedded MiniLM, all 36 encoder matrices QA-LoRA at k bits, groups of 64, rank 4, fp16 scale/zero storage,
LoftQ-initialised (T = 1), adapters then moved by 0.02·N(0, 1) as a stand-in for training. Per format: relative and
max weight error against the merged dense weights (export_gptq's own record), relative error of the last hidden
state against the trained model (adapters unmerged), and for comparison the quantized model against full precision
and lqplan's QALoRALinear.merge() (which rounds the merged zero-points to the layer's fp16).

    python bench/gptq_layout_error.py [--bits 2,3,4,8] [--out DIR]   # about 40 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.hf.gptq import export_gptq, load_gptq  # noqa: E402
from planner.model.resolve import default_model_path  # noqa: E402
from planner.profile.grid import GridPoint  # noqa: E402
from planner.train.apply import apply_plan, explicit_plan, quant_layers, set_module  # noqa: E402
from quant import QuantConfig  # noqa: E402

TEXTS = ["Assert statements are a convenient way to insert debugging assertions into a program.",
         "A class definition defines a class object.",
         "The import statement combines two operations; it searches for the named module."]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(bits: int, out: Path, batch, reference: torch.Tensor) -> dict:
    from transformers import AutoModel

    path = default_model_path()
    model = AutoModel.from_pretrained(path)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    config = QuantConfig(kind="int", bits=bits, blocksize=64, double_quant=False, asymmetric=True, scale_dtype="fp16")
    apply_plan(model, explicit_plan(model, GridPoint(config, 4, "qalora"), model_path=path, names=names, iters=1),
               progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.eval()
    merged = copy.deepcopy(model)
    for name, layer in quant_layers(merged).items():
        set_module(merged, name, layer.merge())
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        dense = {n: layer.merged_weight() for n, layer in quant_layers(model).items()}
        weights = (sum(float((dense[n] - w).pow(2).sum()) for n, w in original.items())
                   / sum(float(w.pow(2).sum()) for w in original.values())) ** 0.5
        row = {"bits": bits, "quantized_vs_fp_weights": weights, "quantized_vs_fp_out": rel(want, reference),
               "lqplan_merge_out": rel(merged(**batch).last_hidden_state, want)}
        for fmt in ("lqplan_offsets", "gptq", "gptq_v2"):
            folder = export_gptq(model, out / f"{fmt}-{bits}", fmt)
            meta = json.loads((folder / "config.json").read_text())["quantization_config"]["meta"]["lqplan"]
            row[fmt] = {"weight_rel": meta["relative_weight_error"], "weight_max": meta["max_abs_weight_error"],
                        "mirrored": meta["mirrored_groups"], "clamped": meta["clamped_zeros"],
                        "out_rel": rel(load_gptq(folder)(**batch).last_hidden_state, want)}
    return row


def main() -> None:
    from transformers import AutoModel, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--out", default=None, help="where the exported folders go (default: a temporary folder)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # export_gptq logs the integer formats' loss: it is in the table
    torch.set_num_threads(1)
    path = default_model_path()
    batch = AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = AutoModel.from_pretrained(path).eval()(**batch).last_hidden_state
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        print("| bits | quantized vs fp: weights / out | lqplan_offsets: weights / out | gptq = gptq_v2: weights / "
              "max abs Δw / out | v1 mirrored groups | merge(): out |")
        for bits in (int(b) for b in args.bits.split(",")):
            r = measure(bits, out, batch, reference)
            e, i = r["lqplan_offsets"], r["gptq_v2"]
            print(f"| {bits} | {r['quantized_vs_fp_weights']:.3g} / {r['quantized_vs_fp_out']:.3g} | {e['weight_rel']:.2g} / {e['out_rel']:.2g} | "
                  f"{i['weight_rel']:.3g} / {i['weight_max']:.3g} / {i['out_rel']:.3g} | {r['gptq']['mirrored']} | "
                  f"{r['lqplan_merge_out']:.2g} |")


if __name__ == "__main__":
    main()
