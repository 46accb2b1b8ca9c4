"""Write a seeded random model with a real LLM's exact architecture (Llama-2-13B or -70B shapes) as a Hugging Face
folder that `lqplan plan` / `lqplan train` and transformers' `from_pretrained` treat as a checkpoint: config.json,
one bf16 safetensors shard per decoder layer plus one for the embeddings / final norm / head, the shard index and
the embedded MiniLM tokenizer files (vocabulary 30,522). Weights: Student-t(5) scaled to std 0.02 (heavy-tailed like
trained weights), generated on the GPU when there is one. Not a released checkpoint: memory and speed figures are
real, quality figures are not.

    python bench/write_shaped_model.py --shape llama2-13b --out /var/tmp/llama13b            # ~26 GB, ~35 s on an H200
    python bench/write_shaped_model.py --shape llama2-70b --layers 20 --out /var/tmp/llama70b-20
    python bench/write_shaped_model.py --shape tiny --out /tmp/tiny                           # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.model.resolve import default_model_path  # noqa: E402

# hidden, intermediate, layers, attention heads, key/value heads (Llama-2 papers' configurations)
SHAPES = {"llama2-7b": (4096, 11008, 32, 32, 32), "llama2-13b": (5120, 13824, 40, 40, 40),
          "llama2-70b": (8192, 28672, 80, 64, 8), "tiny": (128, 256, 2, 4, 4)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def student_t(shape, std: float, gen: torch.Generator, device) -> torch.Tensor:
    """Student-t(5) samples scaled to standard deviation `std` (t(5) has variance 5/3), as bf16."""
    df = 5.0
    z = torch.randn(shape, generator=gen, device=device)
    chi2 = torch._standard_gamma(torch.full(shape, df / 2, device=device), generator=gen) * 2
    return (z / torch.sqrt(chi2 / df) * (std / (df / (df - 2)) ** 0.5)).to(torch.bfloat16)


def config_dict(shape: str, layers: int | None, tok: dict) -> dict:
    hidden, inter, n_layers, heads, kv = SHAPES[shape]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers or n_layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": tok["vocab_size"], "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "bos_token_id": tok["bos"], "eos_token_id": tok["eos"], "pad_token_id": tok["pad"],
            "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-13b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", default=None, help="folder with the tokenizer files (default: the embedded MiniLM)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(args.tokenizer) if args.tokenizer else default_model_path()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(src)
    cfg = config_dict(args.shape, args.layers, {"vocab_size": t.vocab_size, "bos": t.cls_token_id,
                                                "eos": t.sep_token_id, "pad": t.pad_token_id})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    hidden, inter, heads, kv = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                                cfg["num_key_value_heads"])
    kv_dim = hidden // heads * kv
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    weight_map, total = {}, 0

    def write(fname: str, tensors: dict) -> None:
        nonlocal total
        cpu = {k: v.cpu().contiguous() for k, v in tensors.items()}
        save_file(cpu, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in cpu})
        total += sum(v.numel() * v.element_size() for v in cpu.values())

    n = cfg["num_hidden_layers"]
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_dim, hidden),
              "self_attn.v_proj": (kv_dim, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    ones = torch.ones(hidden, dtype=torch.bfloat16)
    for i in range(n):
        layer = {f"model.layers.{i}.{k}.weight": student_t(s, 0.02, gen, args.device) for k, s in shapes.items()}
        layer[f"model.layers.{i}.input_layernorm.weight"] = ones.clone()
        layer[f"model.layers.{i}.post_attention_layernorm.weight"] = ones.clone()
        write(f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors", layer)
    write(f"model-{n + 1:05d}-of-{n + 1:05d}.safetensors",
          {"model.embed_tokens.weight": student_t((cfg["vocab_size"], hidden), 0.02, gen, args.device),
           "model.norm.weight": ones, "lm_head.weight": student_t((cfg["vocab_size"], hidden), 0.02, gen, args.device)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1) + "\n")
    print(f"wrote {out}: {args.shape}, {n} layers, {total / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
