"""`lqplan evaluate --plan`: a plan's quantized model (initial adapters) scored against the full-precision model,
token by token (planner.train.score.PlanScorer), checked against brute force on tiny decoders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import seeded_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from planner import cli
from planner.corpus import real_text_splits
from planner.model.tokenizer import tokenizer_digest
from planner.plan.document import Plan
from planner.profile.grid import GridPoint
from planner.train.apply import apply_plan, explicit_plan
from planner.train.evaluate import eval_windows, next_token_targets, perplexity
from planner.train.score import PlanScorer
from quant import QuantConfig

WINDOWS = dict(max_len=64, stride=32)
# The scorer's log-probabilities are fp32 (|log p| <= ~12 here): each differs from float64 brute force by a few
# ulps of 12, and KL = sum_v p (log p - log q) with sum_v p = 1 by at most ~4 * 2^-23 * 12 per token.
FP32_KL = 6e-6


def _save_with_bos_tokenizer(model, folder, minilm_path):
    """The model and the MiniLM vocabulary with a BOS token ([CLS], id 101), so windows start with BOS."""
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path, bos_token="[CLS]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory, minilm_path):
    return _save_with_bos_tokenizer(seeded_tiny_llama(30522, max_position_embeddings=256),
                                    tmp_path_factory.mktemp("llama"), minilm_path)


@pytest.fixture(scope="module")
def plan_file(llama):
    """Every linear of the tiny Llama at NF2, block 64, rank 4, LoftQ T=1: damage large enough to measure."""
    path = llama.parent / "plan" / "plan.json"
    explicit_plan(AutoModelForCausalLM.from_pretrained(llama), GridPoint(QuantConfig(bits=2, blocksize=64), 4),
                  model_path=llama, iters=1).save(path)
    return path


@pytest.fixture(scope="module")
def texts():
    return real_text_splits()["heldout"][:6]  # more than 300 tokens


@pytest.fixture(scope="module")
def scorer(llama, texts):
    return PlanScorer(llama, texts=texts, eval_tokens=300, batch_size=3, device="cpu", **WINDOWS)


def fp_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def student(folder, plan_file):
    return apply_plan(fp_model(folder), Plan.load(plan_file), model_path=folder, device="cpu", progress=False).eval()


@torch.no_grad()
def brute_force(fp, model, windows) -> dict:
    """Each window alone, full logits of both models, log-softmax in float64."""
    kl = nll_fp = nll = 0.0
    n = agree = 0
    for batch, mask, labels in windows.batches(1):
        positions, targets = next_token_targets(labels)
        lp = fp(input_ids=batch, attention_mask=mask).logits[positions].double().log_softmax(-1)
        lq = model(input_ids=batch, attention_mask=mask).logits[positions].double().log_softmax(-1)
        kl += float((lp.exp() * (lp - lq)).sum())
        nll_fp -= float(lp.gather(1, targets[:, None]).sum())
        nll -= float(lq.gather(1, targets[:, None]).sum())
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        n += targets.numel()
    return {"kl": kl / n, "ppl_fp": math.exp(nll_fp / n), "ppl": math.exp(nll / n), "top1": agree / n, "n": n}


def test_kl_of_the_full_precision_model_against_itself_is_exactly_zero(scorer, llama):
    m = scorer.score_model(fp_model(llama))
    assert m["kl"] == 0.0 and m["top1_agreement"] == 1.0
    assert m["perplexity"]["quantized"] == m["perplexity"]["full_precision"]
    assert m["tokens"] == 300 == scorer.windows.scored  # BOS first: every one of the 300 text tokens is scored


def test_kl_and_perplexity_of_a_plan_equal_brute_force(scorer, llama, plan_file):
    q = student(llama, plan_file)
    m = scorer.score_model(q)
    want = brute_force(fp_model(llama), q, scorer.windows)
    assert m["tokens"] == want["n"] and m["kl"] > 1e-3  # 2-bit weights: far from the fp model
    assert m["kl"] == pytest.approx(want["kl"], rel=0, abs=FP32_KL)
    assert m["perplexity"]["quantized"] == pytest.approx(want["ppl"], rel=1e-5)
    assert m["perplexity"]["full_precision"] == pytest.approx(want["ppl_fp"], rel=1e-5)
    assert m["top1_agreement"] == want["top1"] < 1.0


def test_plan_scores_like_apply_plan_and_the_streamed_reference_like_the_resident_one(scorer, llama, plan_file, texts):
    doc = scorer.score(plan_file)  # built from the shards, never from an fp copy in memory
    m = scorer.score_model(student(llama, plan_file))
    assert doc["kl"] == pytest.approx(m["kl"], rel=1e-6)
    assert doc["perplexity"] == pytest.approx(m["perplexity"], rel=1e-6)
    again = scorer.score(plan_file)  # every layer reused from the first build: the same numbers exactly
    assert again["plan"]["layers_reused"] == 14 and (again["kl"], again["nll"]) == (doc["kl"], doc["nll"])
    streamed = PlanScorer(llama, texts=texts, eval_tokens=300, batch_size=3, device="cpu", stream=True, **WINDOWS)
    assert streamed.stream and not scorer.stream
    assert streamed.score(plan_file)["kl"] == pytest.approx(doc["kl"], rel=1e-6)
    t = doc["tokens"]
    # windows start at text tokens 0, 32, ..., 256 (the last one reaches token 300)
    assert (t["scored"], t["windows"], t["max_len"], t["stride"], t["bos"]) == (300, 9, 64, 32, 101)
    assert t["digest"] == streamed.windows.digest() and doc["plan"]["objective"] == "data-free"
    assert t["tokenizer"] == tokenizer_digest(AutoTokenizer.from_pretrained(llama))
    assert doc["full_precision_pass"] == {"streamed": False, "head_cached": True}


def test_a_fisher_plan_is_built_with_the_fisher_weights_it_was_profiled_with(scorer, llama, tmp_path):
    from planner.api import make_plan
    from planner.model.resolve import resolve_model
    from planner.profile.grid import make_grid
    from planner.profile.objective import plan_weights
    from planner.profile.settings import ProfileSettings

    settings = ProfileSettings(make_grid("2,4", "64", "4"), iters=1, calib="pydoc", calib_tokens=256)
    make_plan(str(llama), "5bits", settings, out_dir=tmp_path / "plan", cache_dir=tmp_path / "c", progress=False,
              reports=False)
    path = tmp_path / "plan" / "plan.json"
    doc = scorer.score(path, cache_dir=tmp_path / "c")
    assert doc["plan"]["objective"] == "fisher" and doc["plan"]["weights_key"].startswith("pydoc-")
    plan = Plan.load(path)
    weights = plan_weights(plan, resolve_model(str(llama)), tmp_path / "c", "cpu")
    weighted = apply_plan(fp_model(llama), plan, model_path=llama, device="cpu", fisher=weights, progress=False)
    plain = apply_plan(fp_model(llama), plan, model_path=llama, device="cpu", progress=False)
    assert doc["kl"] == pytest.approx(scorer.score_model(weighted)["kl"], rel=1e-6)
    assert abs(doc["kl"] - scorer.score_model(plain)["kl"]) > 1e-4 * doc["kl"]  # the weights made a difference


def test_perplexities_equal_the_perplexity_function_on_the_same_windows(llama, plan_file, texts):
    s = PlanScorer(llama, texts=texts, eval_tokens=None, batch_size=2, device="cpu", **WINDOWS)
    assert s.windows.spans == eval_windows(AutoTokenizer.from_pretrained(llama), texts, **WINDOWS).spans
    q = student(llama, plan_file)
    m = s.score_model(q)
    assert m["perplexity"]["full_precision"] == pytest.approx(
        perplexity(fp_model(llama), AutoTokenizer.from_pretrained(llama), texts, **WINDOWS), rel=1e-6)
    assert m["perplexity"]["quantized"] == pytest.approx(
        perplexity(q, AutoTokenizer.from_pretrained(llama), texts, **WINDOWS), rel=1e-6)


def test_a_head_whose_output_the_model_changes_is_run_again_not_cached(tmp_path, minilm_path, texts):
    """Gemma 2 soft-caps its logits after the head: head(hidden) is not the model's output, so the scorer keeps
    the full-precision model and the KL is still exact."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=30.0)
    folder = _save_with_bos_tokenizer(Gemma2ForCausalLM(config), tmp_path / "gemma2", minilm_path)
    s = PlanScorer(folder, texts=texts, eval_tokens=120, batch_size=2, device="cpu", **WINDOWS)
    assert s._fp is not None  # not cached
    assert s.score_model(fp_model(folder))["kl"] == 0.0
    other = fp_model(folder)
    with torch.no_grad():
        other.model.norm.weight.add_(3.0)  # Gemma's norm scales by 1 + weight: logits 4x sharper
    m = s.score_model(other)
    want = brute_force(fp_model(folder), other, s.windows)
    assert m["kl"] > 1e-3 and m["kl"] == pytest.approx(want["kl"], rel=0, abs=FP32_KL)


def test_evaluate_command_writes_the_result_beside_the_plan(plan_file, llama, capsys):
    rc = cli.main(["evaluate", "--plan", str(plan_file), "--eval-tokens", "200", "--max-len", "64", "--quiet",
                   "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "KL(fp || quantized)" in out and "200 tokens of the built-in held-out prose" in out
    doc = json.loads((plan_file.parent / "evaluate.json").read_text())
    assert doc["schema"] == "lqplan.evaluate/1" and doc["tokens"]["scored"] == 200
    assert doc["model"]["fingerprint"] == Plan.load(plan_file).fingerprint
    assert doc["plan"]["path"] == str(plan_file) and len(doc["plan"]["digest"]) == 16
    assert set(doc["versions"]) == {"lqplan", "torch", "transformers"} and doc["kl"] > 0
    assert f"{doc['kl']:.6f} nats/token" in out


@pytest.mark.parametrize("extra, words", [
    ([], ["one of the arguments --plan --quantized is required"]),
    (["--plan", "{plan}", "--quantized", "{tmp}"], ["not allowed with"]),
    (["--plan", "{tmp}/none.json"], ["none.json"]),
    (["--plan", "{plan}", "--eval-texts", "3"], ["--eval-texts applies to evaluate --quantized"]),
    (["--quantized", "{tmp}", "--eval-tokens", "5"], ["--eval-tokens applies to evaluate --plan"]),
    (["--quantized", "{tmp}", "--stream"], ["--stream applies to evaluate --plan"]),
    (["--plan", "{plan}", "--eval-tokens", "1"], ["--eval-tokens 1"]),
    (["--plan", "{plan}", "--max-len", "64", "--stride", "100"], ["stride=100"]),
    (["--plan", "{plan}", "--batch-size", "0"], ["--batch-size 0"]),
    (["--plan", "{plan}", "--eval-text", "{tmp}/none.txt"], ["evaluation text file"]),
    (["--plan", "{plan}", "--model", "{minilm}"], ["the plan was made for model"]),
    (["--plan", "{encoder_plan}"], ["not a causal language model"]),
])
def test_bad_input_is_one_line_and_writes_nothing(extra, words, plan_file, minilm_path, encoder_plan_file, tmp_path,
                                                   capsys):
    values = {"plan": plan_file, "tmp": tmp_path, "minilm": minilm_path, "encoder_plan": encoder_plan_file(4)}
    argv = ["evaluate", *[a.format(**values) for a in extra], "--device", "cpu"]
    argv += ["--out", str(tmp_path / "out")] if "--quantized" not in extra else []
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("lqplan: error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "out").exists()
