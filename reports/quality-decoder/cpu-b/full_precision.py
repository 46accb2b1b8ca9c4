# The fp model on the CPU jobs' 16 held-out paragraphs, through the same Context: python reports/quality-decoder/cpu-b/full_precision.py
# (from the repository root; /tmp/qb/runs/fisher.safetensors is any Fisher file: Context loads one, the fp score ignores it)
import sys, json, torch
from planner.study import quality_decoder as qd  # Settings, Context, text_digest
from planner.model.resolve import resolve_model
job = json.load(open("reports/quality-decoder/cpu-b/runs/4.7329-qlora-s0/job.json"))
s = qd.Settings(**{**job["settings"], "budgets": tuple(job["settings"]["budgets"])})
src = resolve_model("gemma3-270m")
ctx = qd.Context(str(src.folder), s, __import__("pathlib").Path("/tmp/qb/runs/fisher.safetensors"))
print("texts", len(ctx.heldout), "digest", qd.text_digest(ctx.heldout), "fp ppl", ctx.perplexity(ctx.pristine))
