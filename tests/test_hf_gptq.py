"""QA-LoRA models exported whole into GPTQ's integer layout: bit packing against an independent bit-stream reference,
the exact format read back equal to the merged model, the integer formats' measured loss, refusals, the CLI, and
transformers' GPTQ path where optimum and gptqmodel are installed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import seeded_tiny_llama
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from planner.errors import UserError
from planner.hf.gptq import export_gptq, load_gptq, module_settings
from planner.profile.grid import GridPoint
from planner.train.apply import apply_plan, explicit_plan, quant_layers, set_module
from planner.train.export import save_quantized
from quant import QuantConfig
from quant.gptq_pack import GPTQLinear, merged_offsets, pack_cols, pack_rows, unpack_cols, unpack_rows
from quant.qalora import expand_groups


def int_config(bits: int, g: int, scale_dtype: str = "fp32") -> QuantConfig:
    return QuantConfig(kind="int", bits=bits, blocksize=g, double_quant=False, asymmetric=True, scale_dtype=scale_dtype)


def train_stand_in(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every adapter away from its initialisation, as fine-tuning would: the merge then shifts every zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def merged_copy(model: nn.Module) -> nn.Module:
    """The merged QA-LoRA model: every layer replaced by QALoRALinear.merge() (pure INT, rank 0)."""
    merged = copy.deepcopy(model)
    for name, layer in quant_layers(merged).items():
        set_module(merged, name, layer.merge())
    return merged


# ---- packing ------------------------------------------------------------------------------------------------
def stream_reference(column: list[int], bits: int) -> list[int]:
    """GPTQ's packing of one column, from its definition: 32 codes -> one little-endian integer of 32·bits bits ->
    `bits` unsigned 32-bit words (Python integers, no torch)."""
    words = []
    for start in range(0, len(column), 32):
        stream = sum(c << (bits * i) for i, c in enumerate(column[start:start + 32]))
        words += [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(bits)]
    return words


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trip_is_exact_and_follows_the_gptq_bit_stream(bits):
    codes = torch.randint(0, 2 ** bits, (96, 40), generator=torch.Generator().manual_seed(bits))
    codes[:, 0] = 2 ** bits - 1  # all-ones codes: the sign bit of every int32 word is set
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_rows(packed, bits).long(), codes)
    for col in (0, 7):
        assert (packed[:, col].long() & 0xFFFFFFFF).tolist() == stream_reference(codes[:, col].tolist(), bits)
    across = pack_cols(codes.T, bits)  # qzeros: packed along the output dimension
    assert torch.equal(across, packed.T) and torch.equal(unpack_cols(across, bits).long(), codes.T)


def test_packing_refuses_what_gptq_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(48, 4, dtype=torch.long), 3)  # 3-bit codes fill words only 32 at a time
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_rows(torch.zeros(12, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="2, 3, 4 or 8"):
        pack_rows(torch.zeros(32, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="0 .. 3"):
        pack_rows(torch.full((32, 4), 4), 2)


# ---- whole models -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LlamaForCausalLM, every projection QA-LoRA at mixed bits 2/3/4/8 and groups 16/32 (the per-module map
    matters), adapters moved as if trained."""
    base = tmp_path_factory.mktemp("llama") / "base"
    seeded_tiny_llama(max_position_embeddings=128).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    plan = explicit_plan(model, lambda i, n, s: GridPoint(int_config((2, 3, 4, 8)[i % 4], (16, 32)[i % 2]),
                                                          1 + i % 2, "qalora"), model_path=base, iters=1)
    apply_plan(model, plan, progress=False)
    return train_stand_in(model), plan


IDS = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(1))


def test_exact_format_reads_back_as_the_merged_model(llama, tmp_path):
    model, _ = llama
    folder = export_gptq(model, tmp_path / "gptq")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "lqplan_offsets" and not qc["sym"]
    assert qc["block_name_to_quantize"] == "model.layers" and "-:^lm_head$" in qc["dynamic"]
    loaded = load_gptq(folder)
    merged = merged_copy(model)
    for name, layer in quant_layers(model).items():
        got = loaded.get_submodule(name)
        assert isinstance(got, GPTQLinear)
        assert module_settings(qc, name) == (got.bits, got.group_size) == (layer.config.bits, layer.group_size)
        assert got.qweight.dtype == torch.int32 and got.offsets.dtype == got.scales.dtype == torch.float32
        want = merged.get_submodule(name).dequantize()
        # one fp32 rounding apart: s·q + β' against QALoRALinear's t[q]·α + β' (measured max 1.5e-8 here)
        assert (got.dequantize() - want).abs().max() <= 1e-6 * want.abs().max()
    assert qc["meta"]["lqplan"]["relative_weight_error"] < 1e-6 and qc["meta"]["lqplan"]["clamped_zeros"] == 0
    with torch.no_grad():
        want = merged(input_ids=IDS).logits
        torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(want, model(input_ids=IDS).logits, rtol=0, atol=1e-5)  # the merge is exact too


def test_integer_formats_are_standard_gptq_and_their_loss_is_measured(llama, tmp_path):
    """Integer qzeros cannot hold QA-LoRA's fractional merged zeros: the loss is real, recorded and at most half a
    step per group. v1 stores z − 1 with z >= 1 (the loaders' +1 cannot carry into the next packed field) and
    mirrors the groups that want z = 0, so v1 and v2 hold the very same weights."""
    model, _ = llama
    folders = {fmt: export_gptq(model, tmp_path / fmt, fmt) for fmt in ("gptq", "gptq_v2")}
    meta = {f: json.loads((d / "config.json").read_text())["quantization_config"]["meta"]["lqplan"]
            for f, d in folders.items()}
    loaded = {f: load_gptq(d) for f, d in folders.items()}
    for name, layer in quant_layers(model).items():
        v1, v2 = (loaded[f].get_submodule(name) for f in ("gptq", "gptq_v2"))
        assert v1.scales.dtype == torch.float16 and v1.qzeros.dtype == torch.int32 and not hasattr(v1, "offsets")
        assert unpack_cols(v1.qzeros, v1.bits).max() <= 2 ** v1.bits - 2  # z − 1 never all ones
        assert torch.equal(v1.dequantize(), v2.dequantize())
        # against the same fp16 step with the exact merged zeros: only the rounding of z, < half a step
        step = v2.scales.float().T.repeat_interleave(v2.group_size, dim=1)
        codes = unpack_rows(v2.qweight, v2.bits).T.float()
        exact_zero = codes * step + expand_groups(merged_offsets(layer), v2.group_size)
        assert ((v2.dequantize() - exact_zero).abs() <= 0.5 * step + 1e-6).all()
    assert meta["gptq"]["mirrored_groups"] > 0 == meta["gptq_v2"]["mirrored_groups"]
    assert meta["gptq"]["clamped_zeros"] == meta["gptq_v2"]["clamped_zeros"] == 0
    assert 0.01 < meta["gptq_v2"]["relative_weight_error"] == meta["gptq"]["relative_weight_error"] < 0.5
    with torch.no_grad():
        assert (loaded["gptq"](input_ids=IDS).logits - merged_copy(model)(input_ids=IDS).logits).abs().max() > 1e-3


def test_minilm_exports_whole_and_fp16_configs_stay_exact(minilm_path, tmp_path, tok):
    """The embedded MiniLM (BertModel: the pooler stays a plain Linear), QA-LoRA layers with fp32 and fp16 scales:
    offsets are fp32 whatever the layer held, so fp16 layers lose nothing beyond what the merge itself rounds."""
    model = AutoModel.from_pretrained(minilm_path)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.layer.")][:12]
    plan = explicit_plan(model, lambda i, n, s: GridPoint(int_config((4, 3, 2, 8)[i % 4], 64, ("fp32", "fp16")[i % 2]),
                                                          2, "qalora"), model_path=minilm_path, names=names, iters=1)
    apply_plan(model, plan, progress=False)
    model = train_stand_in(model)
    loaded = load_gptq(export_gptq(model, tmp_path / "minilm"))
    assert isinstance(loaded.pooler.dense, nn.Linear) and isinstance(loaded.get_submodule(names[1]), GPTQLinear)
    batch = tok(["Assert statements are a convenient way to insert debugging assertions.", "A class object."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).last_hidden_state  # the trained model, adapters unmerged
        got = loaded(**batch).last_hidden_state
        lqplan_merge = merged_copy(model)(**batch).last_hidden_state  # fp16 layers round β' to fp16 in merge()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - want).abs().max() < (lqplan_merge - want).abs().max() / 10


def test_non_qalora_plans_are_refused_in_one_line(minilm_path, tmp_path):
    model = AutoModel.from_pretrained(minilm_path)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.layer.0.")][:2]
    apply_plan(model, explicit_plan(model, GridPoint(QuantConfig(bits=4, blocksize=64), 4), model_path=minilm_path,
                                    names=names), progress=False)
    with pytest.raises(UserError, match=r"not QA-LoRA .*nf4-b64.*NF codes are not integers") as e:
        export_gptq(model, tmp_path / "nf")
    assert "\n" not in str(e.value) and not (tmp_path / "nf").exists()
    with pytest.raises(UserError, match="apply_plan"):
        export_gptq(AutoModel.from_pretrained(minilm_path), tmp_path / "plain")
    with pytest.raises(UserError, match="checkpoint format"):
        export_gptq(model, tmp_path / "x", "awq")
    with pytest.raises(UserError, match="not a GPTQ folder"):
        load_gptq(tmp_path)


def test_cli_exports_a_saved_quantized_model(llama, tmp_path, capsys):
    from planner.cli import main

    model, plan = llama
    quantized = save_quantized(model, plan, tmp_path / "q")
    assert main(["export", "--quantized", str(quantized), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    assert "export: gptq" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(load_gptq(tmp_path / "g")(input_ids=IDS).logits, model(input_ids=IDS).logits,
                                   rtol=0, atol=1e-5)
    assert main(["export", "--quantized", str(quantized), "--format", "merged", "--checkpoint-format", "gptq",
                 "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # --format peft: the packed base plus a standard adapter (export_peft needs the plan for the packed base)
    assert main(["export", "--quantized", str(quantized), "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    assert "export: peft" in capsys.readouterr().out
    from planner.hf.peft import load_lqplan_adapter
    from planner.train.export import load_quantized

    base_dir, adapter_dir = sorted(d for d in (tmp_path / "p").iterdir() if d.is_dir())[:2]
    base_dir, adapter_dir = (base_dir, adapter_dir) if (base_dir / "model.safetensors").exists() else (adapter_dir,
                                                                                                        base_dir)
    peft_model = load_lqplan_adapter(load_quantized(base_dir)[0], adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=1e-4)


# ---- transformers' GPTQ path ----------------------------------------------------------------------------------
def test_transformers_gptq_path_reads_the_integer_format(tmp_path, monkeypatch):
    """Only where optimum and gptqmodel import (neither is a dependency; gptqmodel 7.7 installs CPU-only from PyPI
    with --no-deps, docs/gptq-layout.md). optimum reads one bits / group_size, so the plan is uniform here."""
    pytest.importorskip("optimum.gptq", reason="optimum is not installed: transformers' GPTQ path needs it")
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed: transformers' GPTQ path needs it")
    from transformers import GPTQConfig

    monkeypatch.setattr(torch._dynamo.config, "disable", True)  # gptqmodel compiles its dequant: minutes on CPU
    base = tmp_path / "base"
    seeded_tiny_llama().save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    apply_plan(model, explicit_plan(model, GridPoint(int_config(2, 16), 2, "qalora"), model_path=base, iters=1),
               progress=False)
    folder = export_gptq(train_stand_in(model), tmp_path / "gptq", "gptq")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["lqplan"]["mirrored_groups"] > 0  # negated scales and mirrored codes go through too
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="cpu",
                                              quantization_config=GPTQConfig(bits=2, backend="torch")).eval()
    assert type(hf.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel")
    with torch.no_grad():
        want = load_gptq(folder)(input_ids=IDS).logits
        got = hf(input_ids=IDS).logits.float()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()  # fp16 compute against ours in fp32
    with pytest.raises(ValueError, match="lqplan_offsets"):  # the exact format is not GPTQ's: refused, not misread
        AutoModelForCausalLM.from_pretrained(export_gptq(model, tmp_path / "exact"), device_map="cpu")


def test_gptqmodel_reads_a_mixed_plan_through_the_dynamic_map(llama, tok, tmp_path, monkeypatch):
    """gptqmodel's own loader honours `dynamic` (per-module bits / group size). It refuses asymmetric v1 folders
    not written by gptqmodel itself, so the mixed plan goes as gptq_v2; it loads a tokenizer, so one is written."""
    gptqmodel = pytest.importorskip("gptqmodel", reason="gptqmodel is not installed")
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    model, _ = llama
    folder = export_gptq(model, tmp_path / "v2", "gptq_v2", tokenizer=tok)
    native = gptqmodel.GPTQModel.load(str(folder), device="cpu", backend=gptqmodel.BACKEND.TORCH, dtype=torch.float16)
    layers = native.model.model.layers
    assert [layers[0].self_attn.k_proj.bits, layers[0].self_attn.o_proj.bits] == [3, 8]
    with torch.no_grad():
        want = load_gptq(folder)(input_ids=IDS).logits
        got = native.model(input_ids=IDS).logits.float()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
