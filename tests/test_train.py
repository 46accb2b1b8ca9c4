"""Fine-tuning the adapters (own loop and Hugging Face Trainer), evaluation metrics and the real-text splits."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from conftest import seeded_tiny_llama
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from planner.corpus import real_text_splits
from planner.errors import UserError
from planner.profile.grid import GridPoint
from planner.train.apply import apply_plan, explicit_plan
from planner.train.data import text_dataset
from planner.train.evaluate import embedding_cosine, perplexity
from planner.train.hf import DistillationTrainer
from planner.train.loop import train
from planner.train.losses import distill_loss
from planner.train.settings import TrainSettings
from quant import QuantConfig

CONFIGS = [(2, 16), (3, 32), (4, 64), (8, 128), (4, 128), (3, 64), (2, 64), (4, 16)]


def mixed_point(i, name, shape):
    bits, block = CONFIGS[i % len(CONFIGS)]
    return GridPoint(QuantConfig(bits=bits, blocksize=block), (8, 16, 32)[i % 3])


def quantized_minilm(path, iters=1):
    model = AutoModel.from_pretrained(path)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    plan = explicit_plan(model, mixed_point, model_path=path, names=names, iters=iters)
    return apply_plan(model, plan, progress=False), plan


@pytest.fixture(scope="module")
def teacher(minilm_path):
    return AutoModel.from_pretrained(minilm_path).eval()


@pytest.fixture(scope="module")
def splits():
    return real_text_splits()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A seeded random 2-layer Llama with the MiniLM vocabulary, saved as a real safetensors folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    seeded_tiny_llama(30522, kv_heads=4, max_position_embeddings=256).save_pretrained(folder)
    return folder


# ---- text splits --------------------------------------------------------------------------------------------
def test_real_text_splits_are_deterministic_disjoint_and_bounded(splits):
    assert splits == real_text_splits()
    assert set(splits) == {"train", "heldout", "calib"}
    assert all(len(v) > 50 for v in splits.values())
    assert not set(splits["train"]) & set(splits["heldout"])
    assert not set(splits["calib"]) & set(splits["heldout"])
    pieces = real_text_splits(max_chars=300)["heldout"]
    # Pieces are cut at sentence ends; only a single sentence longer than the limit may exceed it.
    assert all(len(p) <= 300 or ". " not in p for p in pieces)
    assert len(pieces) > len(splits["heldout"])


# ---- distillation (the embedded encoder) ---------------------------------------------------------------------
def test_distill_loss_is_zero_for_identical_states_and_masks_padding():
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(distill_loss(h, h, mask)) == pytest.approx(0.0, abs=1e-6)
    other = h.clone()
    other[0, 3:] += 100.0  # padding positions must not count
    assert float(distill_loss(h, other, mask)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_lowers_loss_and_raises_heldout_cosine(minilm_path, tok, teacher, splits):
    model, _ = quantized_minilm(minilm_path)
    held = splits["heldout"][:24]
    before = embedding_cosine(model, teacher, tok, held, max_len=64)
    history = train(model, tok, splits["train"], TrainSettings(steps=16, batch_size=8, max_len=32, lr=2e-3,
                                                               eval_every=8), teacher=teacher,
                    eval_fn=lambda m: embedding_cosine(m, teacher, tok, held[:8], max_len=64), progress=False)
    after = embedding_cosine(model, teacher, tok, held, max_len=64)
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4
    assert 1 - after < 0.75 * (1 - before), (before, after)  # a quarter of the gap to the teacher closed
    print(f"held-out cosine to the teacher: {before:.4f} -> {after:.4f}; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert [h["step"] for h in history if "eval" in h] == [0, 8, 16]
    assert all(h["tokens_per_s"] > 0 and h["lr"] == 2e-3 for h in history if "loss" in h)


def test_train_rejects_bad_input(minilm_path, tok, teacher):
    plain = AutoModel.from_pretrained(minilm_path)
    with pytest.raises(UserError, match="teacher"):
        train(plain, tok, ["some text"], TrainSettings(steps=1), objective="distill", progress=False)
    plain.requires_grad_(False)
    with pytest.raises(UserError, match="trainable"):
        train(plain, tok, ["some text"], TrainSettings(steps=1), teacher=teacher, progress=False)
    with pytest.raises(UserError, match="objective"):
        train(plain, tok, ["some text"], TrainSettings(steps=1), objective="mlm", progress=False)


def test_hf_trainer_trains_adapters_and_leaves_the_base_alone(minilm_path, tok, teacher, splits, tmp_path):
    from transformers import DataCollatorWithPadding, TrainingArguments

    model, _ = quantized_minilm(minilm_path, iters=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    adapters = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True, logging_steps=1)
    trainer = DistillationTrainer(model=model, teacher=teacher, args=args,
                                  train_dataset=text_dataset(tok, splits["train"][:24], 48),
                                  data_collator=DataCollatorWithPadding(tok))
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, adapters[k])]
    # zero-init QLoRA-style adapters (iters=0): lora_B moves first; every lora_B must have moved
    assert {k for k in adapters if k.endswith("lora_B")} <= set(changed)


# ---- causal LM: next-token loss, perplexity, gradient checkpointing ------------------------------------------
def quantized_llama(folder, iters=1):
    model = AutoModelForCausalLM.from_pretrained(folder)
    plan = explicit_plan(model, GridPoint(QuantConfig(bits=4, blocksize=64), 8), model_path=folder, iters=iters)
    return apply_plan(model, plan, progress=False), plan


def test_perplexity_equals_the_models_own_loss_in_one_window(tiny_llama, tok, splits):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    text = splits["heldout"][0]
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.shape[1] < 256
    with torch.no_grad():
        want = math.exp(float(model(input_ids=ids, labels=ids).loss))
    assert perplexity(model, tok, [text], max_len=256, stride=128) == pytest.approx(want, rel=1e-5)


def test_sliding_window_perplexity_does_not_depend_on_batching(tiny_llama, tok, splits):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    texts = splits["heldout"][:6]
    one = perplexity(model, tok, texts, max_len=64, stride=32, batch_size=1)
    many = perplexity(model, tok, texts, max_len=64, stride=32, batch_size=5)
    assert one == pytest.approx(many, rel=1e-5)
    assert 1.0 < one < 2 * 30522  # a random model is near-uniform over the vocabulary
    with pytest.raises(UserError, match="stride"):
        perplexity(model, tok, texts, max_len=64, stride=128)


def test_sharded_evaluation_splits_the_work_and_sums_to_the_whole(tiny_llama, minilm_path, tok, teacher, splits,
                                                                  monkeypatch):
    """Under DDP each of 2 ranks scores every 2nd window (text) and the all-reduced sums give the 1-process value;
    simulated here by playing both ranks in turn and adding their partial sums as all_reduce would."""
    from planner.train import evaluate

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    texts = splits["heldout"][:6]
    whole = perplexity(model, tok, texts, max_len=64, stride=32)
    encoder, encoder_texts = AutoModel.from_pretrained(minilm_path).eval(), splits["heldout"][:5]
    with torch.no_grad():  # a student that differs from the teacher, so the cosines are not all 1
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    whole_cos = embedding_cosine(encoder, teacher, tok, encoder_texts)
    partial = {"ppl": [], "cos": []}
    for rank in (0, 1):
        monkeypatch.setattr(evaluate, "joined_shard", lambda rank=rank: (rank, 2))
        for key, run in (("ppl", lambda: perplexity(model, tok, texts, max_len=64, stride=32, shard=True)),
                         ("cos", lambda: embedding_cosine(encoder, teacher, tok, encoder_texts, shard=True))):
            monkeypatch.setattr(evaluate, "all_sum", lambda values, device, key=key: partial[key].append(values) or
                                list(values))
            run()
    (nll0, n0), (nll1, n1) = partial["ppl"]
    assert n0 > 0 and n1 > 0  # both ranks did work
    assert math.exp((nll0 + nll1) / (n0 + n1)) == pytest.approx(whole, rel=1e-6)
    assert (partial["cos"][0][0] + partial["cos"][1][0]) / len(encoder_texts) == pytest.approx(whole_cos, rel=1e-6)
    assert whole_cos < 0.999


def test_causal_finetune_lowers_loss_and_perplexity(tiny_llama, tok, splits):
    model, _ = quantized_llama(tiny_llama)
    held = splits["heldout"][:4]
    before = perplexity(model, tok, held, max_len=128, stride=64)
    history = train(model, tok, splits["train"][:200], TrainSettings(steps=15, batch_size=4, max_len=64, lr=1e-2),
                    progress=False)
    after = perplexity(model, tok, held, max_len=128, stride=64)
    losses = [h["loss"] for h in history]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert after < before


def test_gradient_checkpointing_gives_the_same_step(tiny_llama, tok, splits):
    model, _ = quantized_llama(tiny_llama)
    twin = copy.deepcopy(model)
    settings = TrainSettings(steps=1, batch_size=2, max_len=32, lr=1e-3, seed=3)
    h1 = train(model, tok, splits["train"][:50], settings, progress=False)
    checkpointed = dataclasses.replace(settings, gradient_checkpointing=True, grad_accum=1)
    h2 = train(twin, tok, splits["train"][:50], checkpointed, progress=False)
    assert h1[0]["loss"] == pytest.approx(h2[0]["loss"], rel=1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


def test_gradient_accumulation_averages_micro_batches(tiny_llama, tok, splits):
    model, _ = quantized_llama(tiny_llama)
    twin = copy.deepcopy(model)
    texts = splits["train"][:50]
    # one step of 4 sequences == one step of 2 micro-batches of 2 (same stream of sequences, same seed)
    h1 = train(model, tok, texts, TrainSettings(steps=1, batch_size=4, max_len=32, lr=1e-3, max_grad_norm=None),
               progress=False)
    h2 = train(twin, tok, texts, TrainSettings(steps=1, batch_size=2, grad_accum=2, max_len=32, lr=1e-3,
                                               max_grad_norm=None), progress=False)
    assert h1[0]["loss"] == pytest.approx(h2[0]["loss"], rel=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.gpu
def test_bf16_training_step_on_gpu(tiny_llama, tok, splits):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plan = explicit_plan(model, GridPoint(QuantConfig(bits=4, blocksize=64), 8), model_path=tiny_llama, iters=1)
    apply_plan(model, plan, device="cuda", progress=False)
    history = train(model, tok, splits["train"][:50], TrainSettings(steps=2, batch_size=2, max_len=32), progress=False)
    assert all(math.isfinite(h["loss"]) for h in history)


def test_finetune_command_helper_end_to_end(tiny_llama, tok, tmp_path):
    from planner.train.export import load_quantized
    from planner.train.finetune import finetune
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plan = explicit_plan(model, GridPoint(QuantConfig(bits=4, blocksize=64), 8), model_path=tiny_llama, iters=1)
    plan.save(tmp_path / "plan.json")
    result = finetune(tmp_path / "plan.json", TrainSettings(steps=6, batch_size=2, max_len=32, lr=1e-2, eval_texts=4),
                      model=tiny_llama, out_dir=tmp_path / "run", tokenizer=tok, progress=False)
    assert result["metric"] == "perplexity" and result["after"] < result["before"]
    assert result["quantized_bytes"] == plan.totals["bytes"]
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert report["after"] == result["after"] and report["bytes_match_plan"] and report["world_size"] == 1
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama)
    held = real_text_splits()["heldout"][:4]
    assert report["full_precision"] == pytest.approx(perplexity(fp, tok, held, max_len=32, stride=16), rel=1e-6)
    assert "| quantized, after fine-tuning |" in (tmp_path / "run" / "train_report.md").read_text()
    from planner.model.tokenizer import tokenizer_digest
    assert report["tokenizer"] == tokenizer_digest(tok)  # the results that depend on tokens name the tokenizer
    assert f"Tokenizer: `{report['tokenizer']}`" in (tmp_path / "run" / "train_report.md").read_text()
    loaded, _ = load_quantized(tmp_path / "run" / "quantized")
    assert sum(p.requires_grad for p in loaded.parameters()) == 2 * len(plan.matrices)
    # `lqplan evaluate`'s library call scores the reloaded model exactly as the run's final evaluation did
    from planner.train.evaluate import evaluate_quantized
    again = evaluate_quantized(tmp_path / "run" / "quantized", tiny_llama, eval_texts=4, max_len=32, tokenizer=tok)
    assert again["quantized"] == pytest.approx(result["after"], rel=1e-6)
    assert again["full_precision"] == pytest.approx(report["full_precision"], rel=1e-6)


# ---- the `lqplan train` / `lqplan evaluate` commands ---------------------------------------------------------
def test_train_and_evaluate_commands_on_the_embedded_model(minilm_path, tmp_path, capsys):
    from planner.cli import main
    model = AutoModel.from_pretrained(minilm_path)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    explicit_plan(model, mixed_point, model_path=minilm_path, names=names, iters=1).save(tmp_path / "plan.json")
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(real_text_splits()["train"][:40]), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--plan", str(tmp_path / "plan.json"), "--text", str(text), "--steps", "4",
                 "--batch-size", "4", "--max-len", "24", "--lr", "2e-3", "--eval-texts", "4", "--out", str(out),
                 "--quiet", "--init", "qlora"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "train_report.json").read_text())
    assert report["metric"] == "embedding_cosine" and report["full_precision"] == 1.0
    assert report["init"] == "qlora" and report["after"] > report["before"]
    assert report["tokens_per_s"] > 0 and report["peak_memory_bytes"] > 0 and report["bytes_match_plan"]
    assert f"after {report['after']:.4f}" in printed
    assert main(["evaluate", "--quantized", str(out / "quantized"), "--eval-texts", "4", "--max-len", "24"]) == 0
    assert f"quantized {report['after']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--plan", "{tmp}/missing.json"], "does not exist"),
    (["--plan", "{plan}", "--model", "{llama}"], "the plan was made for model"),
    (["--plan", "{plan}", "--steps", "0"], "--steps 0 must be >= 1"),
    (["--plan", "{plan}", "--max-len", "1"], "--max-len 1 must be >= 2"),
    (["--plan", "{plan}", "--text", "{tmp}/none.txt"], "training text file"),
    (["--plan", "{plan}", "--text", "{binary}"], "looks binary"),
    (["--plan", "{plan}", "--device", "cuda:7"] if not torch.cuda.is_available() else
     ["--plan", "{plan}", "--device", "tpu"], "device"),
])
def test_train_command_bad_input_is_one_line_and_writes_nothing(args, message, minilm_path, tiny_llama, tmp_path,
                                                                 capsys):
    from planner.cli import main
    model = AutoModel.from_pretrained(minilm_path)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")][:2]
    explicit_plan(model, mixed_point, model_path=minilm_path, names=names, iters=0).save(tmp_path / "plan.json")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01binary")
    fill = dict(tmp=tmp_path, plan=tmp_path / "plan.json", llama=tiny_llama, binary=tmp_path / "bin.txt")
    out = tmp_path / "out"
    assert main(["train", *[a.format(**fill) for a in args], "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lqplan: error: ") and message in err, err
    assert not out.exists()
