"""Decoders as decoders (issue 18): BOS-first evaluation windows and training blocks where the tokenizer has a BOS,
a config.json without `architectures` planned and fine-tuned as a causal LM, and the causal Fisher from
per-example next-token gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import seeded_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from planner.corpus import load_calib, real_text_splits
from planner.model.discover import is_causal_lm
from planner.profile.fisher import compute_fisher
from planner.train.data import causal_blocks
from planner.train.evaluate import perplexity


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory, minilm_path):
    """A seeded random 2-layer Llama saved WITHOUT `architectures` in config.json (as a GGUF conversion can leave
    it), with the MiniLM vocabulary and a tokenizer that has a BOS token ([CLS], id 101)."""
    folder = tmp_path_factory.mktemp("decoder-no-arch")
    seeded_tiny_llama(30522, max_position_embeddings=256).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("architectures", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    AutoTokenizer.from_pretrained(minilm_path, bos_token="[CLS]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bos_tok(decoder_folder):
    tok = AutoTokenizer.from_pretrained(decoder_folder)
    assert tok.bos_token_id == 101
    return tok


def test_perplexity_with_bos_equals_the_models_own_loss_in_one_window(decoder_folder, bos_tok):
    model = AutoModelForCausalLM.from_pretrained(decoder_folder).eval()
    text = real_text_splits()["heldout"][0]
    ids = torch.tensor([[bos_tok.bos_token_id] + bos_tok(text, add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] < 256
    with torch.no_grad():
        want = math.exp(float(model(input_ids=ids, labels=ids).loss))
    assert perplexity(model, bos_tok, [text], max_len=256, stride=128) == pytest.approx(want, rel=1e-2)
    assert perplexity(model, bos_tok, [text], max_len=256, stride=128) == pytest.approx(want, rel=1e-5)


def test_every_sliding_window_starts_with_bos_and_every_token_is_scored_once(decoder_folder, bos_tok):
    model = AutoModelForCausalLM.from_pretrained(decoder_folder).eval()
    texts = real_text_splits()["heldout"][:4]
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    one = perplexity(model, bos_tok, texts, max_len=32, stride=16, batch_size=1)
    hook.remove()
    assert len(seen) > 2 and all(int(batch[0, 0]) == bos_tok.bos_token_id for batch in seen)
    assert one == pytest.approx(perplexity(model, bos_tok, texts, max_len=32, stride=16, batch_size=3), rel=1e-5)


def test_training_blocks_start_with_bos_only_where_the_tokenizer_has_one(bos_tok, tok):
    texts = real_text_splits()["train"][:20]
    blocks = causal_blocks(bos_tok, texts, 32)
    assert blocks.shape[1] == 32 and bool((blocks[:, 0] == 101).all())
    body = [i for t in texts for i in bos_tok(t, add_special_tokens=False)["input_ids"] + [bos_tok.sep_token_id]]
    assert blocks[:, 1:].reshape(-1).tolist() == body[: blocks.shape[0] * 31]
    plain = causal_blocks(tok, texts, 32)  # MiniLM's tokenizer has no BOS: blocks are the token stream as before
    assert tok.bos_token_id is None and plain.reshape(-1).tolist() == body[: plain.numel()]


def test_a_config_without_architectures_is_planned_and_finetuned_as_a_causal_lm(decoder_folder, tmp_path):
    from planner.api import make_plan
    from planner.profile.grid import make_grid
    from planner.profile.settings import ProfileSettings
    from planner.train.finetune import finetune
    from planner.train.settings import TrainSettings

    assert "architectures" not in json.loads((decoder_folder / "config.json").read_text())
    assert is_causal_lm(json.loads((decoder_folder / "config.json").read_text()))
    settings = ProfileSettings(make_grid("2,4", "64", "4"), iters=1)
    res = make_plan(str(decoder_folder), "5bits", settings, out_dir=tmp_path / "plan", cache_dir=tmp_path / "c",
                    progress=False, reports=False)
    assert len(res.plan.matrices) == 14  # 7 projections x 2 layers: the decoder's own structure
    r = finetune(tmp_path / "plan" / "plan.json", TrainSettings(steps=2, batch_size=2, max_len=32, eval_texts=2,
                                                                save_model=False),
                 out_dir=tmp_path / "run", progress=False, cache_dir=tmp_path / "c")
    assert r["metric"] == "perplexity" and r["architecture"] == "LlamaForCausalLM"
    assert 1.0 < r["after"] < 2 * 30522 and r["full_precision"] is not None


def test_causal_fisher_is_the_mean_of_per_example_squared_next_token_gradients(decoder_folder, bos_tok):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    calib = load_calib("pydoc")
    got = compute_fisher(decoder_folder, names, calib, max_tokens=256, seq_len=32, batch_size=4)
    # Reference: each paragraph alone, its own next-token loss, one backward each, the squares averaged.
    model = AutoModelForCausalLM.from_pretrained(decoder_folder, dtype=torch.float32)
    model.train()
    sums, count, tokens = {n: 0.0 for n in names}, 0, 0
    for text in calib.texts:
        # BOS first, then the text: no other special token ([SEP]) although this tokenizer would add it
        ids = torch.tensor([[101] + bos_tok(text, add_special_tokens=False, truncation=True, max_length=31)["input_ids"]])
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for n in names:
            sums[n] = sums[n] + model.get_submodule(n).weight.grad.pow(2)
        count += 1
        tokens += ids.shape[1]
        if tokens >= 256 and count % 4 == 0:
            break
    for n in names:
        f = sums[n] / count
        rows, cols = got[n]
        torch.testing.assert_close(rows, f.mean(dim=1), rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(cols, f.mean(dim=0) / f.mean(), rtol=1e-4, atol=1e-6)
    # ... which is not the squared gradient of each mini-batch's loss (the former estimator)
    batch = bos_tok(calib.texts[:4], truncation=True, max_length=32, padding=True, return_tensors="pt")
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
    pooled = model.get_submodule(names[0]).weight.grad.pow(2).mean(dim=1)
    assert not torch.allclose(pooled, got[names[0]][0], rtol=0.05)


@pytest.mark.parametrize("widths, ranks", [([384] * 36, "8,16,32"), ([640, 256, 256, 640, 640, 640, 640], "8,16,32"),
                                            ([4096, 4096, 4096, 4096, 4096, 4096, 11008], "16,32,64"),
                                            ([128, 64], "4,8,16"), ([], "16,32,64")])
def test_default_ranks_follow_the_median_matrix_width(widths, ranks):
    from planner.profile.grid import default_ranks

    assert default_ranks(widths) == ranks


def test_plan_without_ranks_uses_the_models_default_and_explicit_ranks_are_kept(tmp_path):
    from planner.cli import commands
    from planner.cli.parser import build_parser

    seen = []
    for extra in ([], ["--ranks", "16,32,64"], ["--ranks", "4"]):
        # its own --out: prepare() checks the folder's plan.json, and the working directory may hold a user's
        args = build_parser().parse_args(["plan", "--budget", "2.75bits", "--out", str(tmp_path / "out"), *extra])
        commands.prepare(args)  # parses and checks only: nothing is written
        seen.append(sorted({p.rank for p in args.settings.grid}))
    assert seen == [[8, 16, 32], [16, 32, 64], [4]]


def test_eval_text_scores_the_given_paragraphs_in_train_and_evaluate(decoder_folder, bos_tok, tmp_path, capsys):
    from planner.cli import main
    from planner.profile.grid import GridPoint
    from planner.train.apply import explicit_plan
    from planner.train.evaluate import evaluate_quantized
    from quant import QuantConfig

    model = AutoModelForCausalLM.from_pretrained(decoder_folder)
    explicit_plan(model, GridPoint(QuantConfig(bits=4, blocksize=64), 4), model_path=decoder_folder,
                  iters=1).save(tmp_path / "plan.json")
    paragraphs = ["The quick brown fox jumps over the lazy dog.", "A second paragraph, about something else."]
    (tmp_path / "eval.txt").write_text("\n\n".join(paragraphs) + "\n")
    rc = main(["train", "--plan", str(tmp_path / "plan.json"), "--steps", "1", "--batch-size", "2", "--max-len", "32",
               "--eval-text", str(tmp_path / "eval.txt"), "--out", str(tmp_path / "run"), "--quiet",
               "--cache", str(tmp_path / "c")])
    assert rc == 0
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    full = perplexity(model.eval(), bos_tok, paragraphs, max_len=32, stride=16)
    assert report["full_precision"] == pytest.approx(full, rel=1e-4)  # the reference scored the file's text
    capsys.readouterr()
    rc = main(["evaluate", "--quantized", str(tmp_path / "run" / "quantized"), "--eval-text",
               str(tmp_path / "eval.txt"), "--max-len", "32"])
    out = capsys.readouterr().out
    assert rc == 0 and "perplexity on 2 --eval-text texts" in out
    want = evaluate_quantized(tmp_path / "run" / "quantized", eval_texts=2, max_len=32, texts=paragraphs)
    assert f"quantized {want['quantized']:.4f}" in out and f"full precision {full:.4f}" in out
    assert main(["evaluate", "--quantized", str(tmp_path / "run" / "quantized"), "--eval-text",
                 str(tmp_path / "none.txt")]) == 2
    assert "evaluation text file" in capsys.readouterr().err
