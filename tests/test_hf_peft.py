"""PEFT LoRA over the lqplan-quantized base (planner.hf.peft): step-0 outputs equal apply_plan's model, the adapter
round-trips through save_pretrained / from_pretrained without a dequantized copy of the base, merge_and_unload
gives the dense model, training moves only the LoRA weights, and QA-LoRA is refused in one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import seeded_tiny_llama
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoModel, AutoModelForCausalLM

from planner.errors import UserError
from planner.hf.peft import (
    LqplanLoraLinear,
    get_lqplan_peft_model,
    load_lqplan_adapter,
    lqplan_lora_config,
    split_adapters,
)
from planner.profile.grid import GridPoint
from planner.train.apply import apply_plan, explicit_plan
from planner.train.export import export_peft, load_quantized, save_quantized
from quant import QALoRALinear, QuantConfig
from quant.layers import PackedLinear, QuantLoRALinear

CONFIGS = [(2, 16), (3, 32), (4, 64), (8, 128)]


def mixed_point(i, name, shape):
    bits, block = CONFIGS[i % len(CONFIGS)]
    return GridPoint(QuantConfig(bits=bits, blocksize=block), (8, 16, 32)[i % 3])


def held_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def perturb_lora(model, seed=0):
    """Stand-in for fine-tuning: move every adapter weight away from its initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))


class DenseWatch(TorchFunctionMode):
    """Records every real (not meta) floating tensor a torch call returns with one of `shapes`."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.hits = set(shapes), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta"
                    and tuple(t.shape) in self.shapes):
                self.hits.append(getattr(func, "__name__", str(func)))
        return out


@pytest.fixture(scope="module")
def batch(tok):
    return tok(["Assert statements are a convenient way to insert debugging assertions into a program.",
                "A class definition defines a class object."], padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def applied(minilm_path):
    """apply_plan's MiniLM (LoftQ T=1) over the first two encoder layers, mixed configs and ranks 8/16/32 with
    alpha 16: scalings 2, 1 and 0.5 all have to survive the trip into PEFT."""
    model = AutoModel.from_pretrained(minilm_path)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(("encoder.layer.0.",
                                                                                                "encoder.layer.1."))]
    plan = explicit_plan(model, mixed_point, model_path=minilm_path, names=names, iters=1)
    apply_plan(model, plan, alpha=16, progress=False)
    return model.eval(), plan


@pytest.fixture(scope="module")
def peft_minilm(applied):
    model, plan = applied
    return get_lqplan_peft_model(copy.deepcopy(model), plan).eval()


def test_step0_equals_apply_plan_and_stays_packed(applied, peft_minilm, batch):
    model, plan = applied
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        got = peft_minilm(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    inner = peft_minilm.base_model.model
    for e in plan.matrices:
        wrapper = inner.get_submodule(e.name)
        assert isinstance(wrapper, LqplanLoraLinear) and wrapper.r["default"] == e.point.rank
        base = wrapper.get_base_layer()
        assert type(base) is PackedLinear and base.lqplan_init is None
        assert wrapper.scaling["default"] == model.get_submodule(e.name).scaling
    # the same packed storage, the same fp32 adapter values: not a byte more than apply_plan's model
    assert held_bytes(peft_minilm) == held_bytes(model)
    config = peft_minilm.peft_config["default"]
    assert sorted(config.target_modules) == sorted(e.name for e in plan.matrices)
    assert sorted(set(config.rank_pattern.values())) == [8, 16, 32]


def test_plain_get_peft_model_with_the_config_starts_the_same(applied, peft_minilm, batch):
    """What TRL does with peft_config=: peft.get_peft_model(base, lqplan_lora_config(base, plan))."""
    from peft import get_peft_model

    model, plan = applied
    base = split_adapters(copy.deepcopy(model))
    plain = get_peft_model(base, lqplan_lora_config(base, plan)).eval()
    assert all(m.lqplan_init is None for m in plain.modules()
               if isinstance(m, PackedLinear))  # copied into the adapters, then dropped
    with torch.no_grad():
        assert torch.equal(plain(**batch).last_hidden_state, peft_minilm(**batch).last_hidden_state)


def test_split_adapters_shares_the_packed_buffers(applied):
    model, _ = applied
    layer = next(m for m in model.modules() if isinstance(m, QuantLoRALinear))
    holder = nn.Module()
    holder.layer = layer
    split_adapters(holder)
    base = holder.layer
    assert type(base) is PackedLinear and base.state_dict().keys() == {
        k for k in layer.state_dict() if not k.startswith("lora_")}
    assert base.q_codes.data_ptr() == layer.q_codes.data_ptr() and base.bias is layer.bias
    a, b, scaling = base.lqplan_init
    assert torch.equal(a, layer.lora_A) and torch.equal(b, layer.lora_B) and scaling == layer.scaling


def test_qlora_init_disable_and_second_adapter(applied, peft_minilm, batch):
    """init='qlora' is PEFT's zero-B start: the output is the packed base's, which disable_adapter gives too; a
    second adapter is trained and switched like any PEFT adapter."""
    model, plan = applied
    qlora = get_lqplan_peft_model(copy.deepcopy(model), plan, init="qlora").eval()
    with torch.no_grad():
        zero_b = qlora(**batch).last_hidden_state
        with peft_minilm.disable_adapter():
            disabled = peft_minilm(**batch).last_hidden_state
        loftq = peft_minilm(**batch).last_hidden_state
    assert torch.equal(zero_b, disabled) and not torch.allclose(loftq, disabled)
    second = get_lqplan_peft_model(copy.deepcopy(model), plan).eval()
    second.add_adapter("other", lqplan_lora_config(second.base_model.model, plan))
    with torch.no_grad():
        second.set_adapter("other")
        assert torch.equal(second(**batch).last_hidden_state, disabled)  # fresh adapter: lora_B = 0
        second.set_adapter("default")
        assert torch.equal(second(**batch).last_hidden_state, loftq)


def test_adapter_roundtrip_and_packed_export(applied, batch, tmp_path):
    model, plan = applied
    trained = get_lqplan_peft_model(copy.deepcopy(model), plan).eval()
    perturb_lora(trained)
    trained.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "_custom_modules" not in saved
    base_dir = save_quantized(split_adapters(copy.deepcopy(model)), plan, tmp_path / "base")
    base, _ = load_quantized(base_dir)
    reloaded = load_lqplan_adapter(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        want = trained(**batch).last_hidden_state
        assert torch.equal(reloaded(**batch).last_hidden_state, want)
    assert held_bytes(reloaded) == held_bytes(trained)

    # export_peft: the packed folder + a standard adapter by default, far smaller than the dense base
    exported = copy.deepcopy(model)
    perturb_lora(exported, seed=1)
    base_dir, adapter_dir = export_peft(exported, tmp_path / "peft", plan=plan)
    dense_dir, _ = export_peft(exported, tmp_path / "dense", dense=True)
    fp32 = sum(4 * e.shape[0] * e.shape[1] for e in plan.matrices)
    packed_size = (base_dir / "model.safetensors").stat().st_size
    assert packed_size < (dense_dir / "model.safetensors").stat().st_size - 0.7 * fp32
    loaded = load_lqplan_adapter(load_quantized(base_dir)[0], adapter_dir).eval()
    assert all(type(loaded.base_model.model.get_submodule(e.name).get_base_layer()) is PackedLinear
               for e in plan.matrices)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, exported(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    assert all(isinstance(m, QuantLoRALinear) and m.rank for m in exported.modules()
               if isinstance(m, QuantLoRALinear))  # the exported model is left as it was
    with pytest.raises(UserError, match="plan="):
        export_peft(exported, tmp_path / "x")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LlamaForCausalLM, every projection planned (mixed 2/3/4 bits, ranks 4/8), LoftQ T=1."""
    folder = tmp_path_factory.mktemp("llama") / "base"
    seeded_tiny_llama(max_position_embeddings=128).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    plan = explicit_plan(model, lambda i, n, s: GridPoint(QuantConfig(bits=(2, 3, 4)[i % 3], blocksize=32),
                                                          4 * (1 + i % 2)), model_path=folder, iters=1)
    apply_plan(model, plan, progress=False)
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(1))
    return model.eval(), plan, ids


def test_llama_train_step_moves_only_lora_then_merges_and_reloads(llama, tmp_path):
    model, plan, ids = llama
    with torch.no_grad():
        want = model(input_ids=ids).logits
    peft_model = get_lqplan_peft_model(copy.deepcopy(model), plan, lora_dropout=0.1, task_type="CAUSAL_LM")
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)

    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = peft_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert changed == lora and len(lora) == 2 * len(plan.matrices)
    peft_model.eval()

    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
        peft_model.merge_adapter()  # dense while merged; unmerge restores the packed layer as it was
        torch.testing.assert_close(peft_model(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-5)
        peft_model.unmerge_adapter()
        assert torch.equal(peft_model(input_ids=ids).logits, trained)

    peft_model.save_pretrained(tmp_path / "adapter")
    base_dir = save_quantized(split_adapters(copy.deepcopy(model)), plan, tmp_path / "base")
    shapes = {tuple(e.shape) for e in plan.matrices}
    base = load_quantized(base_dir)[0]
    with DenseWatch(shapes) as watch:
        reloaded = load_lqplan_adapter(base, tmp_path / "adapter").eval()
    assert watch.hits == []  # PEFT's side creates no float tensor of a planned matrix's size
    with torch.no_grad(), DenseWatch(shapes) as control:
        reloaded.base_model.model.get_submodule(plan.matrices[0].name).get_base_layer().dequantize()
    assert control.hits  # the watch does see a dequantized copy
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)

    merged = copy.deepcopy(peft_model).merge_and_unload()
    for e in plan.matrices:
        layer = merged.get_submodule(e.name)
        assert type(layer) is nn.Linear and not isinstance(layer, BaseTunerLayer)
        wrapper = peft_model.base_model.model.get_submodule(e.name)
        dense = wrapper.get_base_layer().dequantize(torch.float32) + wrapper.get_delta_weight("default")
        torch.testing.assert_close(layer.weight, dense, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-5)


def test_qalora_and_bad_options_are_refused_in_one_line(applied, tmp_path):
    model, plan = applied
    torch.manual_seed(0)
    holder = nn.Sequential(QALoRALinear.from_linear(
        nn.Linear(128, 64), QuantConfig(kind="int", bits=3, blocksize=32, double_quant=False, asymmetric=True),
        rank=4))
    for call in (lambda: get_lqplan_peft_model(holder), lambda: lqplan_lora_config(holder),
                 lambda: split_adapters(holder)):
        with pytest.raises(UserError, match="QA-LoRA") as err:
            call()
        assert "\n" not in str(err.value) and "--method lora" in str(err.value)
    with pytest.raises(UserError, match="init="):
        get_lqplan_peft_model(copy.deepcopy(model), plan, init="pissa")
    with pytest.raises(UserError, match="no DoRA"):
        get_lqplan_peft_model(copy.deepcopy(model), plan, use_dora=True)
    with pytest.raises(UserError, match="rank"):
        get_lqplan_peft_model(copy.deepcopy(model), plan, r=4)  # LoftQ factors have the plan's ranks
    with pytest.raises(UserError, match="no lqplan-quantized layers"):
        lqplan_lora_config(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(UserError, match="adapter_config.json"):
        load_lqplan_adapter(copy.deepcopy(model), tmp_path)
