"""How the CPU jobs of claim (b) were set up (run once from the repository root, 2026-12-02, this 2-core machine).

The H200 study's own plans at QLoRA's 4.7329 bits (runs/4.7329-{qlora,ilp,ilp_fisher}/plan.json) and its Fisher
weights (runs/fisher.safetensors, from the device run's output) are reused, so the arms are exactly the device's.
Each plan names the device's assembly of Gemma 3 270M (fingerprint sha256:e8eb1650...). That folder differs from
this machine's only in config.json's transformers_version (5.17.0 there): with that one field set to 5.17.0, this
machine's folder hashes to the same fingerprint (checked below), so each plan is re-addressed to the local folder.
The fine-tune is shortened to fit a CPU: 100 steps of 2 x 128 tokens (the device: 150 of 8 x 256), scored on the
first 16 held-out paragraphs. Then, per job:  python bench/quality_decoder.py --worker /tmp/qb/runs/<key>"""

import hashlib
import json
import sys
from pathlib import Path

from planner.model.digests import file_digests
from planner.model.resolve import resolve_model

DEVICE_RUNS, OUT = Path(sys.argv[1]), Path(sys.argv[2])  # the device run's runs/ folder, the CPU jobs' folder
DEVICE_FINGERPRINT = "sha256:e8eb1650dbf53987dc81ffdfdb9600087b5b223c76cce2b5c202132596125c0b"

src = resolve_model("gemma3-270m")
config = json.loads((src.folder / "config.json").read_text())
h = hashlib.sha256(json.dumps({**config, "transformers_version": "5.17.0"}, sort_keys=True).encode())
files = sorted(src.folder.glob("*.safetensors"))
for p, d in zip(files, file_digests(files)):
    h.update(p.name.encode() + b"\0" + d.encode() + b"\0")
assert "sha256:" + h.hexdigest() == DEVICE_FINGERPRINT, "not the device's weights"

OUT.mkdir(parents=True, exist_ok=True)
(OUT / "fisher.safetensors").write_bytes((DEVICE_RUNS / "fisher.safetensors").read_bytes())
for arm in ("qlora", "ilp_fisher", "ilp"):
    plan = json.loads((DEVICE_RUNS / f"4.7329-{arm}/plan.json").read_text())
    assert plan["model"]["fingerprint"] == DEVICE_FINGERPRINT
    plan["model"].update(fingerprint=src.fingerprint, source=str(src.folder))
    (OUT / f"4.7329-{arm}").mkdir(exist_ok=True)
    (OUT / f"4.7329-{arm}/plan.json").write_text(json.dumps(plan, indent=2))
    for seed in ((0, 1) if arm != "ilp" else (0,)):
        job = json.loads((DEVICE_RUNS / f"4.7329-{arm}-s0/job.json").read_text())
        d = OUT / f"4.7329-{arm}-s{seed}"
        d.mkdir(exist_ok=True)
        job.update(key=d.name, dir=str(d), seed=seed, measure=seed == 0, plan=str(OUT / f"4.7329-{arm}/plan.json"),
                   folder=str(src.folder), fisher_path=str(OUT / "fisher.safetensors"))
        job["settings"].update(device="cpu", steps=100, batch_size=2, max_len=128, eval_texts=16)
        (d / "job.json").write_text(json.dumps(job, indent=2))
