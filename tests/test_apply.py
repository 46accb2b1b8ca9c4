"""apply_plan on the embedded MiniLM: real packed storage, exact forward, frozen base, name resolution, bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModel

from planner.errors import UserError
from planner.model.weights import fingerprint
from planner.profile.grid import GridPoint
from planner.train.apply import (
    apply_plan,
    explicit_plan,
    memory_report,
    quant_layers,
    quantized_bytes,
    resolve_names,
)
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


@pytest.mark.gpu
def test_apply_on_gpu_keeps_packed_storage_on_the_device(minilm_path, batch):
    model = AutoModel.from_pretrained(minilm_path)
    plan = explicit_plan(model, mixed_point, model_path=minilm_path, names=encoder_names(model), iters=1)
    apply_plan(model, plan, device="cuda", progress=False)
    assert all(b.device.type == "cuda" for b in model.buffers())
    assert quantized_bytes(model) == plan.totals["bytes"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**{k: v.cuda() for k, v in batch.items()}).last_hidden_state
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compiled_cuda_dequant_is_bit_identical_to_eager(bits, monkeypatch):
    from quant import backends
    w = torch.randn(640, 1000, generator=torch.Generator().manual_seed(bits)).cuda()  # 640000: not a block multiple
    layer = QuantLoRALinear(quantize(w, QuantConfig("nf", bits, 64)))
    for dtype in (torch.bfloat16, torch.float32):
        layer.backend = "compile"
        assert backends.dequant_backend(w.device, layer.config, layer.backend) == "compile"
        fused = layer.dequantize(dtype)
        layer.backend = "eager"
        eager = layer.dequantize(dtype)
        assert torch.equal(fused, eager)
        assert torch.equal(eager.float(), layer.quantized().dequantize().to(dtype).float())
    assert not backends._COMPILED.get("failed"), "torch.compile fell back to eager on this GPU"


# ---- QA-LoRA points: grid, plan document, executor ---------------------------------------------------------------
def qalora_config(bits=2, g=64, scale_dtype="fp16"):
    return QuantConfig(kind="int", bits=bits, blocksize=g, double_quant=False, asymmetric=True,
                       scale_dtype=scale_dtype)


def test_grid_points_carry_a_method_and_labels_stay_stable():
    from planner.profile.grid import make_grid
    lora = make_grid("2,4", "64", "8,16")
    assert [p.label for p in lora] == ["nf2-b64-dq8/256-r8", "nf2-b64-dq8/256-r16", "nf4-b64-dq8/256-r8",
                                       "nf4-b64-dq8/256-r16"]  # the profile cache's keys: unchanged
    assert {p.method for p in lora} == {"lora"}
    both = make_grid("2,3,4,8", "16,32,64,128", "4,8,16", method="both")
    qa = [p for p in both if p.method == "qalora"]
    assert len(both) == 4 * 4 * 3 + len(qa) and len(qa) == 4 * 3 * 3  # INT {2,3,4,8} x groups {32,64,128} x ranks
    assert {(p.config.bits, p.config.blocksize) for p in qa} == {(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128)}
    assert all(p.config.kind == "int" and p.config.asymmetric and not p.config.double_quant
               and p.config.scale_dtype == "fp16" for p in qa)
    assert qa[0].label == "qalora-int2-b32-sfp16-asym-r4"
    assert len({p.label for p in both}) == len(both)
    # A LoRA point with the same INT quantizer is a different point with a different label.
    twin = GridPoint(qa[0].config, 4)
    assert twin != qa[0] and twin.label == "int2-b32-sfp16-asym-r4"
    for p in both:
        assert GridPoint.from_dict(p.to_dict()) == p
    old = {k: v for k, v in lora[0].to_dict().items() if k != "method"}  # documents from before QA-LoRA
    assert GridPoint.from_dict(old) == lora[0]
    with pytest.raises(UserError, match="asymmetric INT"):
        GridPoint(QuantConfig(), 8, "qalora")
    with pytest.raises(UserError, match="method"):
        GridPoint(QuantConfig(), 8, "gptq")
    with pytest.raises(UserError, match="--method"):
        make_grid(method="all")


def test_qalora_ranks_are_skipped_where_the_pooled_adapter_cannot_have_them():
    from planner.profile.grid import make_grid
    grid = make_grid("2", ranks="4,8,16", method="qalora")
    ok = {(p.config.blocksize, p.rank) for p in grid if p.applies_to((384, 384))}
    assert ok == {(32, 4), (32, 8), (64, 4)}  # min(out, in/g): 12, 6, 3
    wide = {(p.config.blocksize, p.rank) for p in grid if not p.applies_to((384, 1536))}
    assert wide == {(128, 16)}  # in/g = 48, 24, 12
    assert not GridPoint(qalora_config(g=64), 4, "qalora").applies_to((384, 200))  # 200 % 64 != 0
    assert GridPoint(QuantConfig(), 10_000).applies_to((384, 384))  # LoRA: the profiler reports a bad rank


@pytest.mark.parametrize("shape, bits, g, scale, rank, nbytes", [
    # codes m·n·k/8 + (m·n/g groups) x (scale + zero) + 16-bit adapters r·(m + n/g)·2 bytes, counted by hand:
    ((384, 384), 2, 64, "fp16", 4, 36_864 + 2_304 * 4 + 4 * (384 + 6) * 2),
    ((384, 1536), 3, 32, "fp32", 8, 221_184 + 18_432 * 8 + 8 * (384 + 48) * 2),
    ((1536, 384), 4, 128, "bf16", 3, 294_912 + 4_608 * 4 + 3 * (1536 + 3) * 2),
])
def test_qalora_point_cost_is_what_the_layer_stores_byte_for_byte(shape, bits, g, scale, rank, nbytes):
    from quant import QALoRALinear

    point = GridPoint(qalora_config(bits, g, scale), rank, "qalora")
    assert point.bits(shape) == 8 * nbytes
    layer = QALoRALinear(quantize(torch.randn(shape), point.config), torch.zeros(shape[0]), rank=rank)
    held = sum(b.numel() for n, b in layer.named_buffers() if n.startswith("q_"))  # uint8 buffers: 1 byte each
    pooled = layer.lora_A.numel() + layer.lora_B.numel()
    assert layer.lora_A.shape == (rank, shape[1] // g)
    assert held + 2 * pooled == nbytes == layer.quant_nbytes + layer.adapter_nbytes16
    with pytest.raises(UserError, match="does not apply"):
        GridPoint(point.config, shape[1] // g + 1, "qalora").bits(shape)


def test_plan_entries_carry_the_method_and_old_plans_read_as_lora(minilm_path):
    from planner.plan.document import Plan
    model = AutoModel.from_pretrained(minilm_path)
    names = encoder_names(model)[:2]
    points = {names[0]: GridPoint(qalora_config(), 4, "qalora"), names[1]: GridPoint(QuantConfig(bits=3), 8)}
    plan = explicit_plan(model, lambda i, n, s: points[n], model_path=minilm_path, names=names)
    doc = plan.to_dict()
    assert doc["schema"] == "lqplan.plan/1"
    assert [m["method"] for m in doc["matrices"]] == ["qalora", "lora"]
    assert doc["matrices"][0]["bytes"] == 49_200  # 36,864 codes + 9,216 scale/zero + 3,120 adapters
    back = Plan.from_dict(doc)
    assert [e.point for e in back.matrices] == [points[n] for n in names]
    for m in doc["matrices"]:
        del m["method"]
    doc["matrices"] = doc["matrices"][1:]
    m, n = doc["matrices"][0]["shape"]
    doc["totals"].update(bytes=doc["matrices"][0]["bytes"], bits=8 * doc["matrices"][0]["bytes"], params=m * n)
    assert Plan.from_dict(doc).matrices[0].point == points[names[1]]


@pytest.fixture(scope="module")
def mixed_qalora(minilm_path):
    model = AutoModel.from_pretrained(minilm_path)
    names = encoder_names(model)

    def choose(i, name, shape):
        if i % 3 == 0:
            return GridPoint(qalora_config(2 + i % 3, 64, "fp32"), 4, "qalora")
        if i % 3 == 1:
            return GridPoint(qalora_config(3, 32, "fp16"), 8, "qalora")
        return GridPoint(QuantConfig(bits=3, blocksize=64), 8)

    plan = explicit_plan(model, choose, model_path=minilm_path, names=names, iters=1)
    originals = {e.name: model.get_submodule(e.name).weight.detach().clone() for e in plan.matrices}
    apply_plan(model, plan, device="cpu", progress=False)
    return model.eval(), plan, originals


def test_mixed_plan_builds_each_entry_with_its_method(mixed_qalora):
    from quant import QALoRALinear

    model, plan, _ = mixed_qalora
    for e in plan.matrices:
        layer = model.get_submodule(e.name)
        assert isinstance(layer, QALoRALinear) == (e.point.method == "qalora")
        assert layer.config == e.point.config
        if e.point.method == "qalora":
            assert layer.lora_A.shape == (e.point.rank, e.shape[1] // e.point.config.blocksize)
    assert {e.point.method for e in plan.matrices} == {"lora", "qalora"}


def test_qalora_models_save_reload_and_export_to_peft_and_merged(mixed_qalora, batch, tmp_path):
    """QA-LoRA's pooled adapters survive save/load bit for bit, and both exports reproduce the model: PEFT gets the
    pooled lora_A as a standard one (columns repeated g times, divided by g)."""
    import copy
    import json

    from peft import PeftModel

    from planner.train.export import (
        MANIFEST,
        export_merged,
        export_peft,
        load_quantized,
        save_quantized,
    )
    from quant import QALoRALinear

    model, plan, _ = mixed_qalora
    model = copy.deepcopy(model)
    with torch.no_grad():  # stand-in for fine-tuning: adapters away from their initialisation
        g = torch.Generator().manual_seed(5)
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    folder = save_quantized(model, plan, tmp_path / "q")
    methods = {n: info["method"] for n, info in json.loads((folder / MANIFEST).read_text())["layers"].items()}
    assert methods == {e.name: e.point.method for e in plan.matrices}
    loaded, _ = load_quantized(folder)
    assert all(isinstance(loaded.get_submodule(e.name), QALoRALinear) == (e.point.method == "qalora")
               for e in plan.matrices)
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        assert torch.equal(loaded(**batch).last_hidden_state, want)
        base_dir, adapter_dir = export_peft(model, tmp_path / "peft", dense=True)
        peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), adapter_dir).eval()
        torch.testing.assert_close(peft_model(**batch).last_hidden_state, want, rtol=1e-4, atol=1e-4)
        merged = AutoModel.from_pretrained(export_merged(model, tmp_path / "merged")).eval()
        torch.testing.assert_close(merged(**batch).last_hidden_state, want, rtol=1e-4, atol=1e-4)


def test_qalora_plan_forward_equals_the_dequantized_reference(mixed_qalora, minilm_path, batch):
    from quant import qalora_decompose
    from quant.qalora import adapter_weight

    model, plan, originals = mixed_qalora
    reference = AutoModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        for e in plan.matrices:
            w, cfg, r = originals[e.name], e.point.config, e.point.rank
            if e.point.method == "qalora":
                d = qalora_decompose(w, cfg, r, 1)
                dense = d.q.dequantize() + adapter_weight(d.lora_a, d.lora_b, cfg.blocksize)
            else:
                d = decompose(w, cfg, r, iters=1)
                dense = d.q.dequantize() + d.a @ d.b.T
            assert torch.equal(model.get_submodule(e.name).dequantize(), d.q.dequantize())
            reference.get_submodule(e.name).weight.copy_(dense)
        got = model(**batch).last_hidden_state
        want = reference(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_qalora_plan_bytes_held_equal_the_plan(mixed_qalora):
    model, plan, _ = mixed_qalora
    assert quantized_bytes(model) == plan.totals["bytes"] == sum(e.bytes for e in plan.matrices)
    report = memory_report(model)
    assert report["plan_accounted_bytes"] == plan.totals["bytes"]
    assert report["adapter_bytes_16bit"] == sum(
        2 * e.point.rank * (e.shape[0] + e.shape[1] // (e.point.config.blocksize if e.point.method == "qalora"
                                                         else 1)) for e in plan.matrices)


def test_qalora_entries_merge_back_to_pure_int_layers(mixed_qalora):
    from quant import QALoRALinear

    model, plan, _ = mixed_qalora
    merged = copy.deepcopy(model)
    checked = set()
    for e in plan.matrices:
        layer = merged.get_submodule(e.name)
        if not isinstance(layer, QALoRALinear):
            continue
        with torch.no_grad():
            layer.lora_B.normal_(std=0.01)  # as if trained
        flat = layer.merge()
        assert flat.rank == 0 and torch.equal(flat.q_codes, layer.q_codes)
        assert torch.equal(flat.q_scales, layer.q_scales)
        x = torch.randn(3, layer.in_features)
        dtype = e.point.config.scale_dtype
        if dtype == "fp32":  # fp32 zero-points: the merged INT layer computes what the adapter did
            with torch.no_grad():
                torch.testing.assert_close(flat(x), layer(x), atol=2e-5, rtol=1e-5)
        else:  # fp16 zero-points keep 11 significant bits of β': the merge is exact up to that rounding
            beta = flat._field("zeros").float().abs().repeat_interleave(layer.group_size).view(layer.out_features, -1)
            assert ((flat.dequantize() - layer.merged_weight()).abs() <= beta * 2.0 ** -11 + 1e-6).all()
        checked.add(dtype)
    assert checked == {"fp32", "fp16"}


def test_method_option_and_qlora_init_for_qalora_entries(minilm_path, minilm_weights):
    from quant import QALoRALinear

    model = AutoModel.from_pretrained(minilm_path)
    names = encoder_names(model)[:2]
    w0 = model.get_submodule(names[0]).weight.detach().clone()
    cfg = qalora_config(4, 32, "fp32")
    plan = explicit_plan(model, GridPoint(cfg, 4, "qalora"), model_path=minilm_path, names=names)
    with pytest.raises(UserError, match="method=None"):
        apply_plan(model, plan, method="lora", progress=False)
    with pytest.raises(UserError, match="method"):
        apply_plan(model, plan, method="gptq", progress=False)
    apply_plan(model, plan, init="qlora", progress=False)  # zero-product adapter, Q = q(W)
    layer = model.get_submodule(names[0])
    assert isinstance(layer, QALoRALinear) and torch.count_nonzero(layer.lora_B) == 0
    assert torch.equal(layer.merged_weight(), quantize(w0, cfg).dequantize())
    # method="qalora" with an entry QA-LoRA cannot build: one UserError before any layer is replaced
    nf4 = GridPoint(QuantConfig(bits=4, blocksize=64), 4)
    nf_plan = explicit_plan(AutoModel.from_pretrained(minilm_path), lambda i, n, s: GridPoint(cfg, 4) if i == 0 else nf4,
                            model_path=minilm_path, names=names)  # the first entry could be QA-LoRA, the second not
    fresh = AutoModel.from_pretrained(minilm_path)
    with pytest.raises(UserError, match="QA-LoRA"):
        apply_plan(fresh, nf_plan, method="qalora", progress=False)
    assert not any(isinstance(m, QALoRALinear) for m in fresh.modules())
    # method="qalora" builds QA-LoRA layers from a LoRA plan with INT configs (the older init="qalora").
    lora_plan = explicit_plan(AutoModel.from_pretrained(minilm_path), GridPoint(cfg, 4), model_path=minilm_path,
                              names=names)
    other = apply_plan(AutoModel.from_pretrained(minilm_path), lora_plan, method="qalora", iters=1, progress=False)
    assert isinstance(other.get_submodule(names[0]), QALoRALinear)


def test_profile_table_has_qalora_rows_with_exact_costs(minilm_path, tmp_path):
    from planner.model.discover import discover_matrices
    from planner.model.resolve import resolve_model
    from planner.profile.grid import make_grid
    from planner.profile.run import run_profile
    from planner.profile.settings import ProfileSettings
    from quant import SolverSettings, qalora_decompose

    source = resolve_model(str(minilm_path))
    infos = [m for m in discover_matrices(source) if m.name.startswith("encoder.layer.0.")][:1]  # query 384x384
    grid = make_grid("2", "64", "4,8", method="both", groups="32,64")
    table, stats = run_profile(source, infos, ProfileSettings(grid, 2, SolverSettings(method="exact")),
                               cache_dir=tmp_path, device="cpu", progress=False)
    assert list(table["label"]) == ["nf2-b64-dq8/256-r4", "nf2-b64-dq8/256-r8", "qalora-int2-b32-sfp16-asym-r4",
                                    "qalora-int2-b32-sfp16-asym-r8", "qalora-int2-b64-sfp16-asym-r4"]  # g64 r8 > 6
    assert list(table["method"]) == ["lora", "lora", "qalora", "qalora", "qalora"]
    for _, row in table.iterrows():
        point = next(p for p in grid if p.label == row["label"])
        assert row["storage_bits"] == point.bits((384, 384))
    row = table.iloc[-1]
    w = AutoModel.from_pretrained(minilm_path).get_submodule(infos[0].name).weight.detach()
    d = qalora_decompose(w, qalora_config(2, 64), 4, 1, solver=SolverSettings(method="exact"))
    assert row["error"] == pytest.approx(d.error, rel=1e-6) and row["storage_bits"] == 8 * 49_200
    again, stats2 = run_profile(source, infos, ProfileSettings(grid, 2, SolverSettings(method="exact")),
                                cache_dir=tmp_path, device="cpu", progress=False)
    assert stats2.computed_points == 0 and again.equals(table)  # the skipped point is not "missing" forever


def test_fisher_factors_are_balanced_for_training_and_the_product_is_kept(minilm_path):
    model = AutoModel.from_pretrained(minilm_path)
    names = encoder_names(model)[:1]
    plan = explicit_plan(model, GridPoint(QuantConfig(bits=3, blocksize=64), 8), model_path=minilm_path, names=names,
                         iters=1)
    shape = plan.matrices[0].shape
    g = torch.Generator().manual_seed(1)
    # LQ-LoRA's row weights are raw mean squared gradients (~1e-8 on MiniLM), the column weights mean-normalised.
    fisher = {names[0]: (torch.rand(shape[0], generator=g) * 1e-8 + 1e-10, torch.rand(shape[1], generator=g) + 0.1)}
    w = model.get_submodule(names[0]).weight.detach().clone()
    d = decompose(w, QuantConfig(bits=3, blocksize=64), 8, iters=1, fisher=fisher[names[0]])
    assert d.a.norm() / d.b.norm() > 1e3  # the decomposition's own split is badly scaled
    apply_plan(model, plan, fisher=fisher, progress=False)
    layer = model.get_submodule(names[0])
    ratio = layer.lora_B.norm(dim=0) / layer.lora_A.norm(dim=1)
    assert ((ratio >= 0.5) & (ratio <= 2)).all()
    assert torch.equal(layer.merged_weight(), d.q.dequantize() + d.a @ d.b.T)


def test_cli_grid_lists_qalora_points_with_their_exact_cost(capsys):
    from planner.cli import main
    assert main(["grid", "--method", "both", "--bits", "2", "--blocks", "64", "--groups", "64,128", "--ranks", "4",
                 "--shape", "384x384"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[1:-1]}
    assert set(rows) == {"nf2-b64-dq8/256-r4", "qalora-int2-b64-sfp16-asym-r4", "qalora-int2-b128-sfp16-asym-r4"}
    assert rows["qalora-int2-b64-sfp16-asym-r4"][:2] == ["2.5000", "49200"]
    assert "n/a" in rows["qalora-int2-b128-sfp16-asym-r4"][1]  # rank 4 > in/g = 3
    assert out[-1] == "3 configurations"
    with pytest.raises(SystemExit) as exc:  # argparse rejects an unknown method with exit code 2
        main(["grid", "--method", "gptq"])
    assert exc.value.code == 2 and "--method" in capsys.readouterr().err
