"""The HF-native path end to end on CPU: a plan loaded as a transformers quantization_config, PEFT LoRA adapters
started from the LoftQ factors, then the quantized base saved with save_pretrained and the adapter with PEFT's
save_pretrained, both reloaded: the outputs equal lqplan's own apply_plan model at every step, and no dequantized
copy of the base appears."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded_tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM

from planner.hf import LqplanConfig
from planner.hf.peft import get_lqplan_peft_model, load_lqplan_adapter, lqplan_lora_config, lqplan_wrappers
from planner.profile.grid import GridPoint
from planner.train.apply import apply_plan, explicit_plan, quant_layers
from quant import QuantConfig
from quant.layers import PackedLinear

POINTS = [GridPoint(QuantConfig(bits=4, blocksize=64), 8), GridPoint(QuantConfig(bits=3, blocksize=32), 4),
          GridPoint(QuantConfig(bits=2, blocksize=16), 4)]


@pytest.fixture(scope="module")
def folder_and_plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    seeded_tiny_llama().save_pretrained(folder)
    plan = explicit_plan(AutoModelForCausalLM.from_pretrained(folder), lambda i, n, s: POINTS[i % 3],
                         model_path=folder, iters=2)
    return folder, plan


def test_quantizer_then_peft_equals_apply_plan_and_round_trips(folder_and_plan, tmp_path):
    folder, plan = folder_and_plan
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    ref = apply_plan(AutoModelForCausalLM.from_pretrained(folder), plan, device="cpu", progress=False).eval()
    with torch.no_grad():
        expected = ref(ids).logits

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=LqplanConfig(plan=plan), device_map="cpu")
    model.save_pretrained(tmp_path / "base")  # the packed base, before PEFT wraps its layers in place
    peft_model = get_lqplan_peft_model(model, plan).eval()
    with torch.no_grad():
        got = peft_model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # step 0: the planned model, LoftQ-initialised
    bases = [w.get_base_layer() for w in lqplan_wrappers(peft_model).values()]
    assert len(bases) == len(plan.matrices) and all(type(m) is PackedLinear for m in bases)

    # one training step moves only the adapters; then both halves are saved the standard ways
    peft_model.train()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model(ids, labels=ids).loss.backward()
    opt.step()
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(ids).logits
    assert not torch.allclose(trained, got)
    peft_model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu")
    reloaded = load_lqplan_adapter(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(ids).logits
    assert torch.equal(again, trained)
    planned = {tuple(e.shape) for e in plan.matrices}
    dense = [n for n, t in list(reloaded.named_parameters()) + list(reloaded.named_buffers())
             if t.is_floating_point() and t.dim() == 2 and tuple(t.shape) in planned]
    assert not dense, f"a dequantized copy of the base: {dense[:3]}"

    merged = reloaded.merge_and_unload()
    assert not quant_layers(merged) and isinstance(merged.model.layers[0].mlp.up_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_a_bf16_load_keeps_the_loftq_factors_exact_in_the_adapters(folder_and_plan):
    """Loaded at bf16 (as examples/finetune_hf.py does on a GPU), the adapters still start at the fp32 LoftQ
    factors exactly: PEFT creates them in the base's dtype, which would round them to bf16 first."""
    folder, plan = folder_and_plan
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=LqplanConfig(plan=plan),
                                                 dtype=torch.bfloat16, device_map="cpu")
    factors = {n: m.lqplan_init for n, m in quant_layers(model).items() if m.lqplan_init is not None}
    peft_model = get_lqplan_peft_model(model)
    wrapped = lqplan_wrappers(peft_model)
    assert factors and len(wrapped) == len(factors)
    for name, (a, b, scaling) in factors.items():
        layer = next(m for n, m in wrapped.items() if n.endswith(name))
        assert layer.lora_A["default"].weight.dtype == torch.float32
        assert torch.equal(layer.lora_A["default"].weight, a.float())
        torch.testing.assert_close(layer.lora_B["default"].weight, b.float() * (scaling / layer.scaling["default"]),
                                   rtol=0, atol=0)


def test_modules_kept_in_full_precision_get_no_adapter_from_the_plan(folder_and_plan):
    """lqplan_lora_config(model, plan) on a model loaded with modules_to_not_convert: the kept planned modules are
    dense nn.Linear, left out of the targets (they were refused as 'matches 0 quantized layers')."""
    folder, plan = folder_and_plan
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=LqplanConfig(plan=plan, modules_to_not_convert=["layers.1.mlp"]), device_map="cpu")
    config = lqplan_lora_config(model, plan)
    assert sorted(config.target_modules) == sorted(e.name for e in plan.matrices if ".layers.1.mlp." not in e.name)
    peft_model = get_lqplan_peft_model(model, plan)
    assert type(peft_model.base_model.model.model.layers[1].mlp.up_proj) is nn.Linear
    assert len(lqplan_wrappers(peft_model)) == len(config.target_modules)
