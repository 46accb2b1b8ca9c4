"""The training-memory model (planner.plan.train_memory): its activation terms equal, byte for byte, what autograd
saves in lqplan's training step (bf16 autocast, fused quantized-LoRA layers, SDPA) for a small Llama on the CPU,
with and without gradient checkpointing; the other terms are the exact tensor sizes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from planner.errors import UserError
from planner.plan.train_memory import (
    ADAPTER_DTYPES,
    STATE_BYTES,
    Architecture,
    TrainShape,
    head_bytes,
    layer_activation_bytes,
    predict,
)
from planner.profile.grid import GridPoint
from planner.train.apply import apply_plan, explicit_plan
from planner.train.loop import _checkpointing
from quant import QuantConfig

RANKS = {"q_proj": 8, "k_proj": 4, "v_proj": 8, "o_proj": 0, "gate_proj": 16, "up_proj": 4, "down_proj": 8}


def tiny(layers: int, h=64, i=160, heads=4, kv=2, vocab=300):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)

    def choose(index, name, shape):
        return GridPoint(QuantConfig(bits=4, blocksize=32), RANKS[name.rsplit(".", 1)[1]])

    plan = explicit_plan(model, choose, fingerprint="sha256:" + "0" * 64)
    apply_plan(model, plan, fingerprint="sha256:" + "0" * 64, device="cpu", init="qlora", progress=False,
               adapter_dtype=torch.bfloat16)
    return cfg, model, plan


def saved_bytes(model, batch: int, seq: int, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves in one forward with labels (the loss included)."""
    model.train()
    if checkpointing:
        _checkpointing(model, True)  # as lqplan train turns it on
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, 300, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("batch, seq", [(2, 32), (1, 64)])
def test_layer_activations_equal_autograds_saved_tensors(batch, seq):
    one, two = tiny(1)[1], tiny(2)[1]
    measured = saved_bytes(two, batch, seq, False) - saved_bytes(one, batch, seq, False)
    cfg = tiny(1)[0].to_dict()
    assert measured == layer_activation_bytes(Architecture.from_config(cfg), batch * seq, list(RANKS.values()))


def test_checkpointing_saves_each_layers_input_only():
    one, three = tiny(1)[1], tiny(3)[1]
    batch, seq = 2, 32
    measured = saved_bytes(three, batch, seq, True) - saved_bytes(one, batch, seq, True)
    assert measured == 2 * (2 * 64 * batch * seq)  # two more layers, each keeping its bf16 input (2h per token)


def test_logit_terms_equal_what_the_loss_saves():
    """Growing the vocabulary by V adds the bf16 logits and the loss's fp32 log-softmax: 6·V bytes per token."""
    batch, seq = 2, 32
    small, large = tiny(1, vocab=300)[1], tiny(1, vocab=500)[1]
    measured = saved_bytes(large, batch, seq, False) - saved_bytes(small, batch, seq, False)
    arch = Architecture.from_config(tiny(1)[0].to_dict())
    saved_per_vocab = (head_bytes(arch, batch * seq) - head_bytes(Architecture(**{**arch.__dict__, "vocab": 0}),
                                                                    batch * seq)) // arch.vocab
    assert measured == batch * seq * 6 * 200
    assert saved_per_vocab == batch * seq * (6 + 2 * 4)  # the saved 6 bytes plus the backward's two fp32 grads


def test_predicted_terms_are_the_exact_tensor_sizes():
    cfg, model, plan = tiny(2)
    shape = TrainShape(batch=2, seq_len=32, optimizer="adamw", adapter_dtype="fp32")
    p = predict(cfg.to_dict(), plan.matrices, 1234, shape)
    params = sum(e.point.adapter_params(e.shape) for e in plan.matrices)
    held = sum(m.quant_nbytes for m in model.modules() if hasattr(m, "quant_nbytes"))
    assert p["adapter_params"] == params == sum(x.numel() for x in model.parameters() if x.requires_grad)
    assert p["terms"]["packed_weights"] == held
    assert p["terms"]["adapter_params"] == params * ADAPTER_DTYPES["fp32"]
    assert p["terms"]["optimizer_states"] == params * STATE_BYTES["adamw"]
    assert p["terms"]["unplanned_tensors"] == 1234
    assert p["train_peak_bytes"] == sum(p["terms"].values())
    assert p["peak_bytes"] == max(p["train_peak_bytes"], p["apply_peak_bytes"])
    largest = max(e.shape[0] * e.shape[1] for e in plan.matrices)
    assert p["apply_peak_bytes"] == held + params * 4 + max(1234, 14 * largest + 64 * 2**20) + 32 * 2**20
    ckpt = predict(cfg.to_dict(), plan.matrices, 1234, TrainShape(2, 32, True))
    assert ckpt["terms"]["activations"] < p["terms"]["activations"]


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"seq_len": -1}, {"optimizer": "adam"}, {"adapter_dtype": "fp16"},
                                    {"batch": 2.5}])
def test_bad_train_shapes_are_one_line_errors(kwargs):
    with pytest.raises(UserError) as e:
        TrainShape(**kwargs)
    assert "\n" not in str(e.value)
