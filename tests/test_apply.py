"""apply_plan on the embedded MiniLM: real packed storage, exact forward, frozen base, name resolution, bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from planner.apply import apply_plan, explicit_plan, memory_report, quant_layers, quantized_bytes, resolve_names
from planner.errors import UserError
from planner.grid import GridPoint
from planner.models import fingerprint
from quant import QuantConfig, decompose, quantize
from quant.layers import QuantLoRALinear

CONFIGS = [(2, 16), (3, 32), (4, 64), (8, 128), (4, 128), (3, 64), (2, 64), (4, 16)]
RANKS = [8, 16, 32]


def mixed_point(i, name, shape):
    bits, block = CONFIGS[i % len(CONFIGS)]
    return GridPoint(QuantConfig(bits=bits, blocksize=block), RANKS[i % len(RANKS)])


def encoder_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]


@pytest.fixture(scope="module")
def tok(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def batch(tok):
    return tok(["Assert statements are a convenient way to insert debugging assertions into a program.",
                "The for statement is used to iterate over the elements of a sequence."],
               padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def applied(minilm_path):
    model = AutoModel.from_pretrained(minilm_path)
    plan = explicit_plan(model, mixed_point, model_path=minilm_path, names=encoder_names(model), iters=1)
    originals = {e.name: model.get_submodule(e.name).weight.detach().clone() for e in plan.matrices}
    apply_plan(model, plan, device="cpu", progress=False)
    return model.eval(), plan, originals


def test_plan_covers_36_mixed_matrices(applied):
    model, plan, _ = applied
    assert len(plan.matrices) == 36
    assert {e.point.config.bits for e in plan.matrices} == {2, 3, 4, 8}
    assert {e.point.rank for e in plan.matrices} == set(RANKS)
    assert set(quant_layers(model)) == {e.name for e in plan.matrices}


def test_layers_hold_packed_bytes_not_a_dequantized_copy(applied):
    model, plan, _ = applied
    for e in plan.matrices:
        layer = model.get_submodule(e.name)
        assert isinstance(layer, QuantLoRALinear)
        assert all(b.dtype == torch.uint8 for n, b in layer.named_buffers() if n.startswith("q_"))
        assert layer.quant_nbytes == e.point.config.storage_bytes(e.shape[0] * e.shape[1])
        assert not any(p.numel() == e.shape[0] * e.shape[1] for p in layer.parameters())


def test_forward_matches_reference_built_from_an_independent_decomposition(applied, minilm_path, batch):
    model, plan, originals = applied
    reference = AutoModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        for e in plan.matrices:
            d = decompose(originals[e.name], e.point.config, e.point.rank, iters=1)
            layer = model.get_submodule(e.name)
            assert torch.equal(layer.dequantize(), d.q.dequantize())
            reference.get_submodule(e.name).weight.copy_(d.q.dequantize() + d.a @ d.b.T)
        got = model(**batch).last_hidden_state
        want = reference(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [
    dict(bits=2, blocksize=16), dict(bits=3, blocksize=32), dict(bits=4, blocksize=64), dict(bits=8, blocksize=128),
    dict(bits=4, double_quant=False), dict(bits=3, double_quant=False, scale_dtype="bf16"),
    dict(kind="int", bits=4, asymmetric=True, double_quant=False, scale_dtype="fp16"),
    dict(bits=3, dq_bits=3, dq_blocksize=16, dq_dtype="bf16"), dict(bits=2, dq_bits=2, dq_blocksize=32),
    dict(bits=4, dq_bits=4, dq_blocksize=64, dq_dtype="fp16"),
])
def test_layer_dequantize_equals_the_quantized_tensor(kw, minilm_weights):
    w = list(minilm_weights.values())[1][:, :250]  # 384 x 250: the last block is padded for every block size
    q = quantize(w.contiguous(), QuantConfig(**kw))
    layer = QuantLoRALinear(q, None, rank=4)
    assert torch.equal(layer.dequantize(), q.dequantize())
    assert layer.quant_nbytes == q.nbytes == QuantConfig(**kw).storage_bytes(w.numel())
    assert torch.equal(layer.quantized().dequantize(), q.dequantize())
    assert torch.equal(layer.dequantize(torch.bfloat16), q.dequantize().to(torch.bfloat16))


def test_adapter_split_is_exact_for_power_of_two_scaling(minilm_weights):
    w = next(iter(minilm_weights.values()))
    d = decompose(w, QuantConfig(bits=3, blocksize=64), 16, iters=1)
    for alpha in (16, 32, 4):  # scaling 1, 2, 1/4
        layer = QuantLoRALinear(d.q, None, d.a, d.b, alpha=alpha)
        assert layer.scaling == alpha / 16
        assert torch.equal(layer.lora_delta(), d.a @ d.b.T)
        assert torch.equal(layer.merged_weight(), d.q.dequantize() + d.a @ d.b.T)


def test_only_adapters_train(applied):
    model, plan, _ = applied
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(plan.matrices)
    assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable)


def test_backward_recomputes_the_weight_and_matches_autograd(minilm_weights):
    w = list(minilm_weights.values())[4]  # 1536 x 384
    d = decompose(w, QuantConfig(bits=4, blocksize=64), 8, iters=1)
    bias = torch.randn(w.shape[0])
    layer = QuantLoRALinear(d.q, bias, d.a, d.b, alpha=16)
    x = torch.randn(3, 5, w.shape[1], requires_grad=True)
    layer(x).pow(2).sum().backward()
    gx, ga, gb = x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    x2 = x.detach().clone().requires_grad_(True)
    a2 = layer.lora_A.detach().clone().requires_grad_(True)
    b2 = layer.lora_B.detach().clone().requires_grad_(True)
    y = x2 @ d.q.dequantize().T + bias + layer.scaling * (x2 @ a2.T) @ b2.T
    y.pow(2).sum().backward()
    torch.testing.assert_close(gx, x2.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ga, a2.grad, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gb, b2.grad, rtol=1e-5, atol=1e-3)


def test_dtype_casts_leave_the_packed_storage_alone(applied):
    model, plan, _ = applied
    layer = copy.deepcopy(model.get_submodule(plan.matrices[0].name))
    before = layer.dequantize()
    layer.to(torch.float16)
    assert layer.lora_A.dtype == torch.float16
    assert torch.equal(layer.dequantize(), before)
    assert layer.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_quantized_bytes_equal_the_plan(applied):
    model, plan, _ = applied
    assert quantized_bytes(model) == plan.totals["bytes"] == sum(e.bytes for e in plan.matrices)
    report = memory_report(model)
    assert report["plan_accounted_bytes"] == plan.totals["bytes"]
    assert report["adapter_bytes_held"] == 2 * report["adapter_bytes_16bit"]  # adapters are fp32 while training
    assert report["adapter_bytes_16bit"] == sum(2 * e.point.rank * sum(e.shape) for e in plan.matrices)


def test_extra_repr_names_config_and_rank(applied):
    model, plan, _ = applied
    e = plan.matrices[0]
    text = repr(model.get_submodule(e.name))
    assert e.point.config.label in text and f"rank={e.point.rank}" in text


def test_fingerprint_mismatch_is_a_user_error(minilm_path):
    model = AutoModel.from_pretrained(minilm_path)
    names = encoder_names(model)[:2]
    plan = explicit_plan(model, GridPoint(QuantConfig(), 8), fingerprint="sha256:" + "0" * 64, names=names)
    with pytest.raises(UserError, match="re-plan"):
        apply_plan(model, plan, progress=False)
    # The model folder is found from model.name_or_path: the right plan applies without passing it.
    good = explicit_plan(model, GridPoint(QuantConfig(), 8), model_path=minilm_path, names=names)
    apply_plan(model, good, progress=False, iters=0)
    assert isinstance(model.get_submodule(names[0]), QuantLoRALinear)


def test_unknown_model_origin_is_a_user_error(minilm_path):
    model = AutoModel.from_pretrained(minilm_path)
    plan = explicit_plan(model, GridPoint(QuantConfig(), 8), model_path=minilm_path, names=encoder_names(model)[:1])
    model.name_or_path = ""
    model.config._name_or_path = ""
    with pytest.raises(UserError, match="model_path"):
        apply_plan(model, plan, progress=False)


class Wrapper(nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(384, 2)


def test_names_resolve_by_suffix_both_ways(minilm_path):
    bert = AutoModel.from_pretrained(minilm_path)
    names = encoder_names(bert)[:2]
    fp = fingerprint(minilm_path)
    plan = explicit_plan(bert, GridPoint(QuantConfig(bits=4), 8), fingerprint=fp, names=names)
    wrapped = Wrapper(bert)
    assert resolve_names(wrapped, plan) == {n: "bert." + n for n in names}
    apply_plan(wrapped, plan, fingerprint=fp, progress=False, init="qlora")
    assert isinstance(wrapped.bert.get_submodule(names[0]), QuantLoRALinear)

    # A plan made on the wrapper, applied to the bare model.
    bare = AutoModel.from_pretrained(minilm_path)
    prefixed = explicit_plan(Wrapper(bare), GridPoint(QuantConfig(bits=4), 8), fingerprint=fp,
                             names=["bert." + n for n in names])
    assert resolve_names(bare, prefixed) == {"bert." + n: n for n in names}


def test_missing_or_misshapen_matrix_is_a_user_error(minilm_path):
    model = AutoModel.from_pretrained(minilm_path)
    fp = fingerprint(minilm_path)
    plan = explicit_plan(model, GridPoint(QuantConfig(), 8), fingerprint=fp, names=encoder_names(model)[:1])
    plan.matrices[0].name = "decoder.layer.0.nothing"
    with pytest.raises(UserError, match="not a linear layer"):
        apply_plan(model, plan, fingerprint=fp, progress=False)
    plan = explicit_plan(model, GridPoint(QuantConfig(), 8), fingerprint=fp, names=encoder_names(model)[:1])
    plan.matrices[0].shape = (384, 1536)
    with pytest.raises(UserError, match="shape"):
        apply_plan(model, plan, fingerprint=fp, progress=False)
    plan = explicit_plan(model, GridPoint(QuantConfig(), 8), fingerprint=fp,
                         names=["encoder.layer.0.attention.self.query"])
    plan.matrices[0].name = "query"  # six layers end with it
    with pytest.raises(UserError, match="several"):
        apply_plan(model, plan, fingerprint=fp, progress=False)


def test_qlora_init_is_zero_product_and_rank_zero_has_no_adapter(minilm_path, minilm_weights, batch):
    model = AutoModel.from_pretrained(minilm_path)
    names = encoder_names(model)[:3]
    w0 = model.get_submodule(names[0]).weight.detach().clone()
    ranks = {names[0]: 64, names[1]: 0, names[2]: 16}
    plan = explicit_plan(model, lambda i, n, s: GridPoint(QuantConfig(bits=4, blocksize=64), ranks[n]),
                         model_path=minilm_path, names=names)
    apply_plan(model, plan, init="qlora", progress=False)
    first, second = model.get_submodule(names[0]), model.get_submodule(names[1])
    assert torch.count_nonzero(first.lora_B) == 0 and torch.count_nonzero(first.lora_A) > 0
    assert torch.equal(first.merged_weight(), quantize(w0, QuantConfig(bits=4, blocksize=64)).dequantize())
    assert second.rank == 0 and second.lora_A is None and second.adapter_nbytes16 == 0
    assert quantized_bytes(model) == plan.totals["bytes"]


def test_fisher_weights_reach_the_decomposition(minilm_path):
    model = AutoModel.from_pretrained(minilm_path)
    names = encoder_names(model)[:2]
    plan = explicit_plan(model, GridPoint(QuantConfig(bits=3, blocksize=64), 8), model_path=minilm_path, names=names,
                         iters=2)
    g = torch.Generator().manual_seed(0)
    fisher = {n: (torch.rand(s[0], generator=g) + 0.1, torch.rand(s[1], generator=g) + 0.1)
              for n, s in ((e.name, e.shape) for e in plan.matrices)}
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    apply_plan(model, plan, fisher=fisher, progress=False)
    for n in names:
        d = decompose(originals[n], QuantConfig(bits=3, blocksize=64), 8, iters=2, fisher=fisher[n])
        plain = decompose(originals[n], QuantConfig(bits=3, blocksize=64), 8, iters=2)
        layer = model.get_submodule(n)
        assert torch.equal(layer.merged_weight(), d.q.dequantize() + d.a @ d.b.T)
        assert not torch.equal(layer.merged_weight(), plain.q.dequantize() + plain.a @ plain.b.T)
    with pytest.raises(UserError, match="fisher"):
        apply_plan(AutoModel.from_pretrained(minilm_path), plan, fisher={names[0]: fisher[names[0]]}, progress=False)


def test_bad_init_and_device_are_user_errors(applied, minilm_path):
    model = AutoModel.from_pretrained(minilm_path)
    plan = explicit_plan(model, GridPoint(QuantConfig(), 8), model_path=minilm_path, names=encoder_names(model)[:1])
    with pytest.raises(UserError, match="init"):
        apply_plan(model, plan, init="gptq", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            apply_plan(model, plan, device="cuda", progress=False)


def test_qalora_hook_builds_group_pooled_layers(minilm_path, batch):
    qalora = pytest.importorskip("quant.qalora")
    model = AutoModel.from_pretrained(minilm_path)
    cfg = QuantConfig(kind="int", bits=4, blocksize=32, double_quant=False, asymmetric=True)
    plan = explicit_plan(model, GridPoint(cfg, 4), model_path=minilm_path, names=encoder_names(model)[:2])
    apply_plan(model, plan, init="qalora", iters=1, progress=False)
    layer = model.get_submodule(plan.matrices[0].name)
    assert isinstance(layer, qalora.QALoRALinear)
    assert [n for n, p in model.named_parameters() if p.requires_grad][0].startswith(plan.matrices[0].name + ".lora_")
    assert torch.isfinite(model(**batch).last_hidden_state).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_on_gpu_keeps_packed_storage_on_the_device(minilm_path, batch):
    model = AutoModel.from_pretrained(minilm_path)
    plan = explicit_plan(model, mixed_point, model_path=minilm_path, names=encoder_names(model), iters=1)
    apply_plan(model, plan, device="cuda", progress=False)
    assert all(b.device.type == "cuda" for b in model.buffers())
    assert quantized_bytes(model) == plan.totals["bytes"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**{k: v.cuda() for k, v in batch.items()}).last_hidden_state
    assert torch.isfinite(out).all()
