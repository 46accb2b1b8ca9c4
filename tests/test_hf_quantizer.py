"""from_pretrained(..., quantization_config=LqplanConfig(plan)) on a tiny Llama, GPT-2 and the embedded MiniLM: the
packed buffers equal apply_plan's bit for bit, the LoftQ factors ride along as lqplan_init, weights are quantized
one at a time as they load, save_pretrained folders reload without quantizing, and bad inputs are one-line
UserErrors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import seeded_tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.quantizers import auto as hf_auto

import planner.hf
from planner.errors import UserError
from planner.hf import LqplanConfig, LqplanHfQuantizer
from planner.hf.quantizer import buffer_nbytes
from planner.profile.grid import GridPoint
from planner.testing.models import seeded_llama
from planner.train.apply import LayerRecipe, apply_plan, explicit_plan, quant_layers
from quant import QuantConfig, quantize
from quant.layers import BUFFER_PREFIX, QuantLoRALinear
from quant.qalora import QALoRALinear

POINTS = [GridPoint(QuantConfig(bits=4, blocksize=64), 8),
          GridPoint(QuantConfig(bits=3, blocksize=32), 4),
          GridPoint(QuantConfig(kind="int", bits=4, blocksize=32, double_quant=False, asymmetric=True), 2, "qalora"),
          GridPoint(QuantConfig(bits=2, blocksize=16, double_quant=False, scale_dtype="fp16"), 0)]


def mixed(i, name, shape):
    return POINTS[i % len(POINTS)]


def one_line_user_error(call, *words):
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def stored(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in layer.state_dict().items() if k.startswith(BUFFER_PREFIX) or k == "bias"}


def assert_same_buffers(model, ref):
    ours, theirs = quant_layers(model), quant_layers(ref)
    assert ours.keys() == theirs.keys() and ours
    for name, layer in ours.items():
        assert type(layer) is type(theirs[name]) and layer.rank == 0 and not list(layer.parameters())
        a, b = stored(layer), stored(theirs[name])
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (name, k)


def without_adapters(ref):
    """A copy of an apply_plan model whose adapters add nothing: the base the quantizer builds."""
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        for layer in quant_layers(ref).values():
            if layer.rank:
                layer.lora_B.zero_()
    return ref


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    seeded_tiny_llama().save_pretrained(folder)
    plan = explicit_plan(AutoModelForCausalLM.from_pretrained(folder), mixed, model_path=folder, iters=1)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=LqplanConfig(plan=plan))
    ref = apply_plan(AutoModelForCausalLM.from_pretrained(folder), plan, device="cpu", progress=False)
    return folder, plan, model, ref


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def minilm(minilm_path):
    base = AutoModel.from_pretrained(minilm_path)
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.startswith(("encoder.layer.0.",
                                                                                                 "encoder.layer.5."))]
    plan = explicit_plan(base, mixed, model_path=minilm_path, names=names, iters=1)
    model = AutoModel.from_pretrained(minilm_path, quantization_config=LqplanConfig(plan=plan))
    ref = apply_plan(base, plan, device="cpu", progress=False)
    return plan, model, ref


# ---- the config ----------------------------------------------------------------------------------------------
def test_config_holds_the_plan_and_reads_it_from_any_form(llama, tmp_path):
    _, plan, _, _ = llama
    plan.save(tmp_path / "plan.json")
    forms = [LqplanConfig(plan=plan), LqplanConfig(plan=tmp_path / "plan.json"), LqplanConfig(plan=plan.to_dict()),
             LqplanConfig.from_dict(json.loads(json.dumps(LqplanConfig(plan=plan).to_dict())))]
    assert all(f == forms[0] for f in forms)
    d = forms[0].to_dict()
    assert d["quant_method"] == "lqplan" and d["plan"] == plan.to_dict() and d["init"] == "loftq"
    assert dict(forms[0]) == d and json.loads(forms[0].to_json_string()) == d


@pytest.mark.parametrize("kwargs, words", [
    ({"plan": 3}, ["got a int", "plan.json"]),
    ({"plan": {"schema": "x"}}, ["schema 'x'"]),
    ({"plan": "/nonexistent/plan.json"}, ["does not exist"]),
    ({"init": "gptq"}, ["init='gptq'", "loftq"]),
    ({"iters": -1}, ["iters=-1"]),
    ({"modules_to_not_convert": "lm_head"}, ["not a list"]),
    ({"modules_to_not_convert": 3}, ["not a list"]),
    ({"bits": 4}, ["unknown options ['bits']"]),
])
def test_bad_config_is_a_one_line_user_error(llama, kwargs, words):
    args = {"plan": llama[1], **kwargs}
    one_line_user_error(lambda: LqplanConfig(**args), *words)


def test_a_file_that_is_not_a_plan_is_a_user_error(llama):
    one_line_user_error(lambda: LqplanConfig(plan=llama[0] / "config.json"), "plan schema None")


def test_register_is_idempotent_and_maps_both_names():
    planner.hf.register()
    planner.hf.register()
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lqplan"] is LqplanConfig
    assert hf_auto.AUTO_QUANTIZER_MAPPING["lqplan"] is LqplanHfQuantizer


@pytest.mark.parametrize("point", POINTS + [GridPoint(QuantConfig(bits=8, blocksize=256, dq_blocksize=16,
                                                                   dq_dtype="bf16"), 0)])
@pytest.mark.parametrize("shape", [(64, 96), (37, 100), (3, 5)])
def test_empty_buffers_have_the_quantized_sizes(point, shape):
    q = quantize(torch.randn(shape), point.config)
    layer = QuantLoRALinear(q)
    expected = {k.removeprefix(BUFFER_PREFIX): v.numel() for k, v in stored(layer).items()}
    assert buffer_nbytes(point.config, shape[0] * shape[1]) == expected


# ---- quantizing while loading ------------------------------------------------------------------------------------
def test_llama_packed_buffers_equal_apply_plans_bit_for_bit(llama):
    _, plan, model, ref = llama
    assert_same_buffers(model, ref)
    assert len(quant_layers(model)) == len(plan.matrices) == 14
    assert isinstance(model.model.layers[0].self_attn.v_proj, QALoRALinear)  # the entry's method
    # the stand-in `weight` holds nothing but has the layer's rows: code multiplying by it fails instead of using 0 rows
    assert all(layer.weight.shape == (layer.out_features, 0) for layer in quant_layers(model).values())
    assert model.is_quantized and model.config.quantization_config == LqplanConfig(plan=plan)


def test_loftq_factors_ride_along_as_lqplan_init(llama):
    _, plan, model, ref = llama
    ours, theirs = quant_layers(model), quant_layers(ref)
    for entry in plan.matrices:
        layer, built = ours[entry.name], theirs[entry.name]
        if not entry.point.rank:
            assert layer.lqplan_init is None
            continue
        a, b, scaling = layer.lqplan_init
        assert a.shape == (entry.point.rank, layer.in_features) and b.shape == (layer.out_features, entry.point.rank)
        assert scaling == built.scaling and torch.equal(b, built.lora_B)
        if isinstance(built, QALoRALinear):  # the pooled adapter, as a full-width one with the same product
            torch.testing.assert_close(layer.merged_weight() + scaling * b @ a, built.merged_weight())
        else:
            assert torch.equal(a, built.lora_A)
        assert "lqplan_init" not in layer.state_dict()


def test_llama_outputs_equal_the_base_of_apply_plans_model(llama, ids):
    _, _, model, ref = llama
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, without_adapters(ref)(ids).logits, rtol=1e-5, atol=1e-5)


def test_weights_stream_one_at_a_time(llama, monkeypatch):
    folder, plan, _, _ = llama
    seen = []
    quantize_weight = LqplanHfQuantizer.quantize_weight

    def watched(self, model, key, value):
        # no other planned module holds a real fp weight while this one is quantized
        live = [n for n in self.modules if (w := model.get_submodule(n)._parameters.get("weight")) is not None
                and not w.is_meta]
        seen.append((key, live))
        return quantize_weight(self, model, key, value)

    monkeypatch.setattr(LqplanHfQuantizer, "quantize_weight", watched)
    AutoModelForCausalLM.from_pretrained(folder, quantization_config=LqplanConfig(plan=plan, init="qlora"))
    assert len(seen) == len(plan.matrices) and all(not live for _, live in seen)


def test_qlora_init_and_modules_to_not_convert(llama, tmp_path):
    folder, plan, _, _ = llama
    config = LqplanConfig(plan=plan, init="qlora", modules_to_not_convert=["layers.1.mlp"])
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    kept = [e for e in plan.matrices if ".layers.1.mlp." not in e.name]
    ref = AutoModelForCausalLM.from_pretrained(folder)
    ref_plan = copy.copy(plan)
    ref_plan.matrices = kept
    apply_plan(ref, ref_plan, device="cpu", init="qlora", progress=False)
    assert_same_buffers(model, ref)
    assert type(model.model.layers[1].mlp.up_proj) is nn.Linear
    assert all(layer.lqplan_init is None for layer in quant_layers(model).values())
    model.save_pretrained(tmp_path)  # the skipped modules stay full precision in the saved folder too
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_buffers(again, model)
    assert torch.equal(again.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_gpt2_conv1d_layers_quantize_as_apply_plan_does(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=64, n_layer=1, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path)
    plan = explicit_plan(base, POINTS[0], model_path=tmp_path, iters=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=LqplanConfig(plan=plan))
    assert_same_buffers(model, apply_plan(base, plan, device="cpu", progress=False))


# ---- save_pretrained / from_pretrained -----------------------------------------------------------------------
def test_saved_llama_reloads_bit_identical_without_quantizing(llama, ids, tmp_path, monkeypatch):
    _, plan, model, _ = llama
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lqplan" and config["plan"] == plan.to_dict()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(f"{n}.q_codes").dtype == torch.uint8 and f"{n}.weight" not in keys
                   for n in quant_layers(model))

    def no_quantization(*args, **kwargs):
        raise AssertionError("a saved quantized model was quantized again")

    monkeypatch.setattr(LayerRecipe, "layer", no_quantization)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, layer in quant_layers(model).items():
        a, b = stored(layer), stored(quant_layers(again)[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config.quantization_config == model.config.quantization_config
    assert again.config.to_dict() == {**model.config.to_dict(), "_name_or_path": str(tmp_path)}
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_dequantize_gives_plain_linears_with_the_same_outputs(llama, ids):
    model = copy.deepcopy(llama[2])
    with torch.no_grad():
        before = model(ids).logits
        plain = model.dequantize()
        assert not quant_layers(plain) and not plain.is_quantized
        assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(plain(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_minilm_encoder_quantizes_and_round_trips(minilm, tok, tmp_path):
    plan, model, ref = minilm
    assert_same_buffers(model, ref)
    batch = tok(["Assert statements are a convenient way to insert debugging assertions."], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        torch.testing.assert_close(out, without_adapters(ref)(**batch).last_hidden_state, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path)
    assert_same_buffers(again, model)
    assert again.config.quantization_config == model.config.quantization_config
    with torch.no_grad():
        assert torch.equal(again(**batch).last_hidden_state, out)


# ---- bad inputs ----------------------------------------------------------------------------------------------
def test_a_plan_for_another_model_is_a_user_error(llama, minilm_path):
    config = LqplanConfig(plan=llama[1])
    one_line_user_error(lambda: AutoModel.from_pretrained(minilm_path, quantization_config=config),
                        "the plan was made for model", "re-plan")


def test_an_incomplete_saved_folder_is_a_user_error(minilm, tmp_path):
    _, model, _ = minilm
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["encoder.layer.5.output.dense.q_codes"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    one_line_user_error(lambda: AutoModel.from_pretrained(tmp_path), "encoder.layer.5.output.dense.q_codes",
                        "re-save")


def test_a_non_finite_weight_fails_the_load_with_one_line(tmp_path):
    model = seeded_llama(100, 32, 64, layers=1, heads=2, kv_heads=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 4] = float("nan")
    model.save_pretrained(tmp_path)
    plan = explicit_plan(model, POINTS[0], model_path=tmp_path, iters=1)
    one_line_user_error(lambda: AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=LqplanConfig(plan)),
                        "model.layers.0.mlp.up_proj", "NaN")


def test_unknown_skip_names_and_disk_offload_are_user_errors(llama):
    folder, plan, _, _ = llama
    one_line_user_error(lambda: AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=LqplanConfig(plan, modules_to_not_convert=["q_prj"])), "'q_prj'")
    one_line_user_error(lambda: AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=LqplanConfig(plan), device_map={"": "disk"}), "disk")
