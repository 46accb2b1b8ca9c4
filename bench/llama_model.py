"""The Llama-architecture model the GPU benchmarks build (no real decoder ships in a PyPI package): its shape
options and its config, shared by executor_gpu.py and ddp_train.py."""

from __future__ import annotations


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
    """A LlamaConfig of args' shape over the embedded model's tokenizer `tok` (BERT vocabulary and special tokens)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, max_position_embeddings=max(2 * args.seq_len, 512),
                       tie_word_embeddings=False, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                       pad_token_id=tok.pad_token_id)
