"""Synthetic Llama-architecture models for the tests and benchmarks (no real decoder ships in a PyPI package):
seeded tiny models in memory or saved beside the embedded MiniLM's tokenizer, configs of a named shape, and sharded
checkpoints with a real model's exact architecture and random weights. Seeded: the same call gives the same weights."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..fsio import write_json
from ..model.resolve import default_model_path

# hidden, intermediate, layers, attention heads, key/value heads (the Llama-2 papers' configurations)
SHAPES = {"llama2-7b": (4096, 11008, 32, 32, 32), "llama2-13b": (5120, 13824, 40, 40, 40),
          "llama2-70b": (8192, 28672, 80, 64, 8), "tiny": (128, 256, 2, 4, 4)}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MINILM_VOCAB = 30522


def seeded_llama(vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 seed: int = 0, **config):
    """A LlamaForCausalLM of this shape built right after torch.manual_seed(seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=kv_heads, **config))


def seeded_tiny_llama(vocab_size: int = 1000, kv_heads: int = 2, **config):
    """The test suite's tiny causal LM: 64 wide, 2 layers, 4 attention heads, seed 0, so every test that makes one
    with the same config gets the same weights."""
    return seeded_llama(vocab_size, 64, 128, 2, 4, kv_heads, **config)


def save_tiny_decoder(folder: Path, hidden: int = 64, intermediate: int = 128, max_positions: int = 256,
                      architectures: bool = True) -> Path:
    """A seeded 2-layer Llama (4 heads, 2 key/value heads) over the embedded MiniLM's vocabulary, saved with that
    tokenizer and [CLS] as its BOS token; `architectures=False` drops the config's architectures, as a GGUF
    conversion leaves it. Kept when folder/config.json exists."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    seeded_llama(MINILM_VOCAB, hidden, intermediate, 2, 4, 2, max_position_embeddings=max_positions
                 ).save_pretrained(folder)
    if not architectures:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("architectures", None)
        write_json(folder / "config.json", cfg)
    AutoTokenizer.from_pretrained(default_model_path(), bos_token="[CLS]").save_pretrained(folder)
    return folder


# ---- a named shape for the GPU benchmarks' in-memory models --------------------------------------------------------
def add_shape_args(p) -> None:
    """--hidden/--intermediate/--layers/--heads (default: a 132M-parameter Llama) and --seed."""
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)


def set_tiny_shape(args) -> None:
    """The --tiny smoke runs' model: 2 layers, 128 wide."""
    args.hidden, args.intermediate, args.layers, args.heads = 128, 256, 2, 4


def llama_config(tok, args):
    """A LlamaConfig of args' shape (hidden, intermediate, layers, heads, seq_len) over the tokenizer `tok` (the
    embedded model's: BERT vocabulary and special tokens)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, max_position_embeddings=max(2 * args.seq_len, 512),
                       tie_word_embeddings=False, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                       pad_token_id=tok.pad_token_id)


# ---- sharded checkpoints of a real model's architecture ------------------------------------------------------------
def checkpoint_config(shape: tuple[int, int, int, int, int], vocab_size: int, dtype: str, bos: int, eos: int,
                      pad: int | None = None, layers: int | None = None, **extra) -> dict:
    """config.json of a LlamaForCausalLM of `shape` (SHAPES' tuple), `layers` deep (default the shape's)."""
    hidden, inter, n_layers, heads, kv = shape
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers or n_layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab_size, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": bos,
            "eos_token_id": eos, **({"pad_token_id": pad} if pad is not None else {}), "torch_dtype": dtype, **extra}


def projection_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder layer's projections, as torch.nn.Linear stores them."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}


def write_sharded(folder: Path, cfg: dict, shards: Iterable[dict[str, torch.Tensor]], count: int,
                  log: Callable[[str], None] = lambda msg: None) -> int:
    """Save `shards` (tensor dicts, made one at a time) as model-000i-of-000n.safetensors with the shard index and
    config.json; returns the bytes written."""
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        cpu = {k: v.cpu().contiguous() for k, v in tensors.items()}
        save_file(cpu, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in cpu})
        size = sum(v.numel() * v.element_size() for v in cpu.values())
        total += size
        log(f"  wrote {name} ({size / 2**30:.2f} GiB)")
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(folder / "config.json", cfg)
    return total


def student_t(shape, std: float, gen: torch.Generator, device) -> torch.Tensor:
    """Student-t(5) samples scaled to standard deviation `std` (t(5) has variance 5/3), as bf16: heavy-tailed like
    trained weights."""
    df = 5.0
    z = torch.randn(shape, generator=gen, device=device)
    chi2 = torch._standard_gamma(torch.full(shape, df / 2, device=device), generator=gen) * 2
    return (z / torch.sqrt(chi2 / df) * (std / (df / (df - 2)) ** 0.5)).to(torch.bfloat16)


def write_shaped_model(out: Path, shape: str, layers: int | None = None, seed: int = 0, device="cpu",
                       tokenizer: Path | None = None) -> tuple[dict, int]:
    """A Hugging Face folder with SHAPES[shape]'s exact architecture and the tokenizer files of `tokenizer` (default
    the embedded MiniLM): one bf16 shard per decoder layer, then one for the embeddings / final norm / head, all
    Student-t(5) at std 0.02 from one generator on `device`. Returns (config, bytes written)."""
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(tokenizer) if tokenizer else default_model_path()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    t = AutoTokenizer.from_pretrained(src)
    cfg = checkpoint_config(SHAPES[shape], t.vocab_size, "bfloat16", t.cls_token_id, t.sep_token_id,
                            t.pad_token_id, layers, rope_theta=10000.0, attention_bias=False, mlp_bias=False)
    hidden, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    gen = torch.Generator(device=device).manual_seed(seed)
    ones = torch.ones(hidden, dtype=torch.bfloat16)

    def shards():
        for i in range(n):
            layer = {f"model.layers.{i}.{k}.weight": student_t(s, 0.02, gen, device)
                     for k, s in projection_shapes(cfg).items()}
            layer[f"model.layers.{i}.input_layernorm.weight"] = ones.clone()
            layer[f"model.layers.{i}.post_attention_layernorm.weight"] = ones.clone()
            yield layer
        yield {"model.embed_tokens.weight": student_t((cfg["vocab_size"], hidden), 0.02, gen, device),
               "model.norm.weight": ones, "lm_head.weight": student_t((cfg["vocab_size"], hidden), 0.02, gen, device)}

    return cfg, write_sharded(out, cfg, shards(), n + 1)


def layer_seeded_tensors(cfg: dict, layer: int, seed: int) -> dict[str, torch.Tensor]:
    """One decoder layer's fp16 weights, each projection from its own generator (so a layer does not depend on the
    others): normal at std 0.02 with rows scaled 0.5-1.5x, as in trained weights, so blocks' absmax scales differ."""
    out = {}
    for j, (name, shape) in enumerate(projection_shapes(cfg).items()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 16 + j)
        w = torch.randn(shape, generator=g) * 0.02
        w *= torch.rand(shape[0], 1, generator=g).add_(0.5)
        out[f"model.layers.{layer}.{name}.weight"] = w.half()
    h = cfg["hidden_size"]
    out[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    out[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    return out


def write_layer_seeded_model(folder: Path, cfg: dict, seed: int, log: Callable[[str], None] = print) -> Path:
    """A Llama-shaped folder of `cfg` with fp16 weights (layer_seeded_tensors), the embeddings and head first; kept
    when folder/bench-model.json records the same config and seed."""
    folder = Path(folder)
    marker, spec = folder / "bench-model.json", {"config": cfg, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    layers, h, v = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    head = {"model.embed_tokens.weight": (torch.randn(v, h, generator=g) * 0.02).half(),
            "model.norm.weight": torch.ones(h, dtype=torch.float16),
            "lm_head.weight": (torch.randn(v, h, generator=g) * 0.02).half()}
    shards = (head if i == 0 else layer_seeded_tensors(cfg, i - 1, seed) for i in range(layers + 1))
    write_sharded(folder, cfg, shards, layers + 1, log)
    write_json(marker, spec)
    log(f"model: {folder} written in {time.perf_counter() - t0:.1f} s")
    return folder
