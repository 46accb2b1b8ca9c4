"""Save / load of the quantized model (bit-identical), merged export, and PEFT adapter export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import seeded_tiny_llama
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from planner.errors import UserError
from planner.plan.document import Plan
from planner.profile.grid import GridPoint
from planner.train.apply import apply_plan, explicit_plan, quantized_bytes
from planner.train.export import (
    MANIFEST,
    export_merged,
    export_peft,
    load_quantized,
    save_quantized,
)
from quant import QuantConfig
from quant.layers import QuantLoRALinear

CONFIGS = [(2, 16), (3, 32), (4, 64), (8, 128), (4, 128), (3, 64)]


def mixed_point(i, name, shape):
    bits, block = CONFIGS[i % len(CONFIGS)]
    return GridPoint(QuantConfig(bits=bits, blocksize=block), (8, 16, 32)[i % 3])


def perturb_adapters(model, seed=0):
    """Stand-in for fine-tuning: move every adapter away from its initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.02 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def batch(tok):
    return tok(["Assert statements are a convenient way to insert debugging assertions into a program.",
                "A class definition defines a class object."], padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def trained(minilm_path):
    model = AutoModel.from_pretrained(minilm_path)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    plan = explicit_plan(model, mixed_point, model_path=minilm_path, names=names, iters=1)
    # alpha 16 with ranks 8/16/32: scalings 2, 1 and 0.5 all travel through save/load and the exports
    apply_plan(model, plan, alpha=16, progress=False)
    perturb_adapters(model)
    return model.eval(), plan


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    model, plan = trained
    return save_quantized(model, plan, tmp_path_factory.mktemp("q") / "minilm-q")


def test_save_writes_packed_storage_plan_and_manifest(saved, trained):
    model, plan = trained
    names = sorted(p.name for p in saved.iterdir())
    assert names == sorted(["config.json", "model.safetensors", "plan.json", MANIFEST])  # no temp files left
    manifest = json.loads((saved / MANIFEST).read_text())
    assert set(manifest["layers"]) == {e.name for e in plan.matrices}
    assert Plan.load(saved / "plan.json").to_dict() == plan.to_dict()
    # The file holds packed codes: far smaller than the fp32 matrices it replaces.
    fp32_matrices = sum(4 * e.shape[0] * e.shape[1] for e in plan.matrices)
    assert (saved / "model.safetensors").stat().st_size < 0.4 * fp32_matrices + 40e6


def test_load_is_bit_identical(saved, trained, batch):
    model, plan = trained
    loaded, loaded_plan = load_quantized(saved)
    assert loaded_plan.to_dict() == plan.to_dict()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, loaded(**batch).last_hidden_state)
    assert quantized_bytes(loaded) == plan.totals["bytes"]
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(plan.matrices) and all(".lora_" in n for n in trainable)
    layer = loaded.get_submodule(plan.matrices[0].name)
    assert isinstance(layer, QuantLoRALinear) and layer.scaling == 2.0


def test_merged_export_loads_with_automodel_and_matches(trained, batch, tmp_path):
    model, _ = trained
    folder = export_merged(model, tmp_path / "merged")
    plain = AutoModel.from_pretrained(folder).eval()
    assert not any(isinstance(m, QuantLoRALinear) for m in plain.modules())
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        got = plain(**batch).last_hidden_state
    # merging sums Q and the adapter product before the matmul: fp32 rounding only
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    name = next(n for n, m in model.named_modules() if isinstance(m, QuantLoRALinear))
    assert torch.equal(plain.get_submodule(name).weight, model.get_submodule(name).merged_weight())


def test_dense_peft_export_reproduces_the_model(trained, batch, tmp_path):
    """dense=True: a dequantized base folder that plain transformers + PEFT load (the packed default is tested in
    test_hf_peft.py)."""
    from peft import PeftModel

    model, plan = trained
    base_dir, adapter_dir = export_peft(model, tmp_path / "peft", dense=True)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(e.name for e in plan.matrices)
    assert sorted(set(config["rank_pattern"].values())) == [8, 16, 32]
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), adapter_dir).eval()
    for e in plan.matrices[:3]:
        assert peft_model.base_model.model.get_submodule(e.name).r["default"] == e.point.rank
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        got = peft_model(**batch).last_hidden_state
    # PEFT adds base and adapter outputs in another order than our merged-free forward: float32 rounding only
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_export_and_load_errors(minilm_path, tmp_path):
    plain = AutoModel.from_pretrained(minilm_path)
    with pytest.raises(UserError, match="apply_plan"):
        export_merged(plain, tmp_path / "x")
    with pytest.raises(UserError, match="save_quantized"):
        load_quantized(tmp_path)


def test_causal_llama_roundtrip_and_merged_export(tmp_path):
    """Rotary buffers, an lm_head and the causal path survive save/load bit for bit."""
    seeded_tiny_llama(max_position_embeddings=128).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    plan = explicit_plan(model, lambda i, n, s: GridPoint(QuantConfig(bits=(2, 3, 4)[i % 3], blocksize=32),
                                                          4 * (1 + i % 2)),
                         model_path=tmp_path / "base", iters=1)
    assert all("lm_head" not in e.name for e in plan.matrices) and len(plan.matrices) == 14
    apply_plan(model, plan, progress=False)
    perturb_adapters(model)
    model.eval()
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(1))
    save_quantized(model, plan, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, want)
        merged = AutoModelForCausalLM.from_pretrained(export_merged(model, tmp_path / "merged")).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
