"""The models built straight from the shards (planner.train.build, planner.train.reference) equal the ones built
from a fully loaded full-precision model: the streamed student computes the same outputs as apply_plan on
from_pretrained, the streamed reference the same perplexity as the whole model, for a Llama, the embedded BERT and a
GPT-2 whose projections are Conv1D; nothing full-size is loaded on the way."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded_tiny_llama
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
)

from planner.corpus import real_text_splits
from planner.model.discover import discover_matrices
from planner.model.resolve import resolve_model
from planner.profile.grid import GridPoint
from planner.train.apply import LayerRecipe, apply_plan, explicit_plan, quantized_bytes
from planner.train.build import build_student
from planner.train.evaluate import perplexity
from planner.train.reference import reference_perplexity, streamed_reference
from quant import QuantConfig

POINT = GridPoint(QuantConfig(bits=4, blocksize=64), 8)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    seeded_tiny_llama(30522).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=64, n_layer=2, n_head=4, n_positions=128)).save_pretrained(
        folder)
    return folder


def plan_for(folder):
    source = resolve_model(folder)
    names = [m.name for m in discover_matrices(source)]
    model = (AutoModelForCausalLM if (folder / "config.json").read_text().find("CausalLM") >= 0 or
             "LMHead" in (folder / "config.json").read_text() else AutoModel).from_pretrained(folder)
    return source, model, explicit_plan(model, POINT, model_path=folder, names=names, iters=1)


@pytest.mark.parametrize("which", ["llama", "gpt2", "minilm"])
def test_streamed_student_equals_apply_plan_on_the_loaded_model(which, request, minilm_path):
    folder = minilm_path if which == "minilm" else request.getfixturevalue(which)
    source, model, plan = plan_for(folder)
    causal = which != "minilm"
    torch.manual_seed(1)
    reference = apply_plan(model, plan, model_path=folder, device="cpu", progress=False)
    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(folder)
    student = build_student(source, plan, config, LayerRecipe.of(plan), causal=causal, device="cpu",
                            dtype=torch.float32)
    assert quantized_bytes(student) == quantized_bytes(reference) == plan.totals["bytes"]
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in reference.named_parameters() if p.requires_grad} and trainable
    ids = torch.randint(0, 30522, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = reference.eval()(input_ids=ids), student.eval()(input_ids=ids)
    out = "logits" if causal else "last_hidden_state"
    assert torch.equal(getattr(a, out), getattr(b, out))


def test_bf16_student_holds_unplanned_tensors_at_the_training_dtype(llama):
    source, _, plan = plan_for(llama)
    student = build_student(source, plan, AutoConfig.from_pretrained(llama), LayerRecipe.of(plan, init="qlora"),
                            causal=True, device="cpu", dtype=torch.bfloat16)
    embed = student.get_input_embeddings().weight
    assert embed.dtype == torch.bfloat16 and not embed.requires_grad
    assert all(p.dtype == torch.float32 for n, p in student.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_streamed_reference_perplexity_equals_the_whole_model(which, request, tok, tmp_path):
    folder = request.getfixturevalue(which)
    source = resolve_model(folder)
    config = AutoConfig.from_pretrained(folder)
    texts = real_text_splits()["heldout"][:3]
    whole = perplexity(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tok, texts, max_len=32,
                       stride=16)
    streamed = streamed_reference(source, config, causal=True, device="cpu")
    meta_before = sum(p.is_meta for p in streamed.parameters())
    assert meta_before > 0  # the layer blocks are not held between forwards
    assert perplexity(streamed, tok, texts, max_len=32, stride=16, device="cpu") == whole
    assert sum(p.is_meta for p in streamed.parameters()) == meta_before
    cached = reference_perplexity(source, config, tok, texts, max_len=32, stride=16, device="cpu", cache_dir=tmp_path)
    assert cached == whole
    assert list(tmp_path.rglob("*.json"))  # the second call reads the cache
    assert reference_perplexity(source, config, tok, texts, max_len=32, stride=16, device="cpu",
                                cache_dir=tmp_path) == whole


def test_gpt2_conv1d_is_planned_with_fisher_weights_and_fine_tuned(gpt2, minilm_path, tmp_path):
    """GPT-2's projections are Conv1D, stored (in, out): the Fisher weights must come out (out, in) like the plan
    (a raw ValueError "fisher weights have shapes (64,), (192,)" before) and `train` must accept the plan."""
    import shutil

    from planner.cli import main

    folder = tmp_path / "gpt2"
    shutil.copytree(gpt2, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path / name, folder / name)
    grid = ["--bits", "4", "--blocks", "64", "--ranks", "8", "--iters", "1", "--quiet", "--no-report"]
    assert main(["plan", "--budget", "8bits", "--model", str(folder), "--calib", "pydoc", "--calib-tokens", "256",
                 "--out", str(tmp_path / "plan"), "--cache", str(tmp_path / "cache"), *grid]) == 0
    assert main(["train", "--plan", str(tmp_path / "plan" / "plan.json"), "--steps", "2", "--batch-size", "2",
                 "--max-len", "32", "--eval-texts", "2", "--out", str(tmp_path / "run"), "--no-save", "--quiet",
                 "--device", "cpu", "--cache", str(tmp_path / "cache")]) == 0  # the plan's Fisher weights, reused
