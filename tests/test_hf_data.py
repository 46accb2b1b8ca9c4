"""Training records (issue 20): chat / prompt-completion / instruction / text records tokenized with the chat
template, labels on the responses only (exact token lists), BOS once, truncation and packing, local files through
datasets, the Trainer collator, one Trainer step and lqplan's own loop (`lqplan train --data`) on a quantized Llama."""

from __future__ import annotations

import copy
import json
import math
from importlib.util import find_spec

import pytest
import torch
from conftest import seeded_tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from planner.errors import UserError
from planner.hf.data import IGNORE_INDEX, collator, load_records, sft_dataset, sft_examples
from planner.profile.grid import GridPoint
from planner.train.apply import apply_plan, explicit_plan
from planner.train.data import Batches
from planner.train.losses import masked_causal_loss
from planner.train.settings import TrainSettings
from quant import QuantConfig

# The tokenization and both training loops need no datasets; reading files and sft_dataset do ([test] has it).
needs_datasets = pytest.mark.skipif(find_spec("datasets") is None, reason="needs datasets: pip install -e '.[hf]'")

WORDS = "be nice hi there hello friend tell me a joke no what is two plus four sure thing the sky blue add this".split()
SPECIAL = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello friend"}, {"role": "user", "content": "tell me a joke"},
        {"role": "assistant", "content": "no"}]
# A template that writes BOS itself (as Gemma's and Llama 3's do) and ends each turn with a marker.
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def word_tokenizer(template=None):
    """A word-level tokenizer with BOS / EOS / PAD: one token per word, so every expected list is written out."""
    names = ["<pad>", "<s>", "</s>", "<unk>", *SPECIAL, "###", "System", "User", "Assistant", ":", *WORDS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIAL)
    tok.chat_template = template
    return tok


def tokens(tok, example):
    ids, labels = example["input_ids"], example["labels"]
    return tok.convert_ids_to_tokens(ids), [t for t, lab in zip(tok.convert_ids_to_tokens(ids), labels)
                                            if lab != IGNORE_INDEX]


def only(tok, record, max_len=64):
    (example,) = sft_examples(tok, [record], max_len)
    assert all(lab in (i, IGNORE_INDEX) for i, lab in zip(example["input_ids"], example["labels"]))
    return tokens(tok, example)


# ---- tokenization and masks -----------------------------------------------------------------------------------
def test_fallback_template_masks_everything_but_the_responses():
    tok = word_tokenizer()
    ids, labelled = only(tok, {"messages": CHAT})
    assert ids == ["<s>", "###", "System", ":", "be", "nice", "###", "User", ":", "hi", "there", "###", "Assistant",
                   ":", "hello", "friend", "</s>", "###", "User", ":", "tell", "me", "a", "joke", "###", "Assistant",
                   ":", "no", "</s>"]
    assert labelled == ["hello", "friend", "</s>", "no", "</s>"]


def test_the_tokenizers_own_template_and_its_bos_once():
    tok = word_tokenizer(BOS_TEMPLATE)
    ids, labelled = only(tok, {"messages": CHAT})
    assert ids == ["<s>", "<|system|>", "be", "nice", "<|end|>", "<|user|>", "hi", "there", "<|end|>", "<|assistant|>",
                   "hello", "friend", "<|end|>", "<|user|>", "tell", "me", "a", "joke", "<|end|>", "<|assistant|>",
                   "no", "<|end|>"]
    assert labelled == ["hello", "friend", "<|end|>", "no", "<|end|>"]


def test_masked_tokens_are_exactly_the_prompts_tokens_on_a_real_tokenizer(tok):
    """MiniLM's WordPiece (no BOS): the -100 run is the prompt's own tokenization, the labelled run the rest."""
    tok = copy.deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    record = {"prompt": "What does a quantized LoRA adapter hold?", "completion": "Two low-rank factors."}
    (example,) = sft_examples(tok, [record], 64)
    prompt = tok.apply_chat_template([{"role": "user", "content": record["prompt"]}], tokenize=False,
                                     add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    assert example["labels"][n:] == example["input_ids"][n:]
    assert example["input_ids"][n:] == tok(record["completion"] + "\n", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("record, labelled", [
    ({"prompt": "what is two plus two", "completion": "four"}, ["four", "</s>"]),
    ({"instruction": "add this", "input": "two plus two", "output": "four"}, ["four", "</s>"]),
    ({"instruction": "tell me a joke", "input": "", "output": "no"}, ["no", "</s>"]),
    ({"text": "the sky is blue"}, ["the", "sky", "is", "blue", "</s>"]),
    ("the sky is blue", ["the", "sky", "is", "blue", "</s>"]),
])
def test_each_record_shape(record, labelled):
    ids, got = only(word_tokenizer(), record)
    assert got == labelled and ids[0] == "<s>" and ids.count("<s>") == 1
    if isinstance(record, dict) and "input" in record and record["input"]:
        assert ids[:9] == ["<s>", "###", "User", ":", "add", "this", "two", "plus", "two"]


def test_truncation_drops_examples_without_a_response_and_packing_keeps_every_target():
    tok = word_tokenizer()
    records = [{"messages": CHAT}, {"prompt": "tell me a joke", "completion": "no"}, {"text": "the sky is blue"}]
    cut = sft_examples(tok, records, 12)  # the chat's first response starts at token 14: that record goes
    assert [len(e["input_ids"]) for e in cut] == [12, 6] and all(e["input_ids"][0] == tok.bos_token_id for e in cut)
    whole = sft_examples(tok, records, 64)
    packed = sft_examples(tok, records, 8, pack=True)  # blocks of prompt tokens only are left out
    assert all(len(e["input_ids"]) <= 8 and e["input_ids"][0] == tok.bos_token_id for e in packed)

    def targets(examples):
        return [t for e in examples for t in e["labels"][1:] if t != IGNORE_INDEX]

    assert targets(packed) == targets(whole) == tok.convert_tokens_to_ids(
        ["hello", "friend", "</s>", "no", "</s>", "no", "</s>", "the", "sky", "is", "blue", "</s>"])
    texts = ["the sky is blue", "hello friend", "tell me a joke"]
    assert [t for e in sft_examples(tok, texts, 4, pack=True) for t in e["input_ids"][1:]] == [
        t for e in sft_examples(tok, texts, 64) for t in e["input_ids"][1:]]
    with pytest.raises(UserError, match="max_len=4; raise --max-len"):
        sft_examples(tok, records[:1], 4)


def not_prefix_stable():
    return ("{% for m in messages %}{{ m['role'] + ' ' + m['content'] }}{% if loop.last %} last{% endif %} "
            "{% endfor %}")


@pytest.mark.parametrize("record, template, message", [
    ({"question": "hi"}, None, "has none of the record shapes"),
    ({"messages": "hi there"}, None, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, None, "has no assistant message"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, None, "starts with an assistant message"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, None, "string 'role' and 'content'"),
    (["hi"], None, "must be a JSON object"),
    ({"messages": CHAT}, "{{ raise_exception('roles must alternate') }}", "refused the conversation (roles must"),
    ({"messages": CHAT}, not_prefix_stable(), "renders message 2 differently"),
])
def test_bad_records_are_one_line_errors_naming_the_record(record, template, message):
    with pytest.raises(UserError) as e:
        sft_examples(word_tokenizer(template), [{"text": "the sky"}, record], 32, source="d.jsonl")
    assert message in str(e.value) and "record 1 of d.jsonl" in str(e.value) and "\n" not in str(e.value)


# ---- files through datasets -----------------------------------------------------------------------------------
@needs_datasets
def test_jsonl_json_and_text_files_load_as_records(tmp_path):
    rows = [{"messages": CHAT}, {"prompt": "hi", "completion": "no"}, {"text": "the sky is blue"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.txt").write_text("the sky\nis blue\n\n\nhello friend\n")
    cache = tmp_path / "cache"
    for name in ("d.jsonl", "d.json"):
        got = load_records(tmp_path / name, cache_dir=cache, progress=False)
        assert [{k: v for k, v in r.items() if v is not None} for r in got] == rows  # a mixed file: None = absent
        assert len(sft_examples(word_tokenizer(), got, 64)) == 3
    assert load_records(tmp_path / "d.txt", cache_dir=cache) == [{"text": "the sky\nis blue"}, {"text": "hello friend"}]
    import datasets

    ds = sft_dataset(word_tokenizer(), str(tmp_path / "d.jsonl"), 64, cache_dir=cache)
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["input_ids", "labels"] and len(ds) == 3
    assert sft_dataset(word_tokenizer(), datasets.Dataset.from_list(rows[1:2]), 64)[:] == ds[1:2]


@needs_datasets
@pytest.mark.parametrize("name, data, message", [
    ("missing.jsonl", None, "does not exist; pass a local"),
    ("org/some-dataset", None, "datasets on the hub are not downloaded"),
    ("folder", "dir", "is a folder"),
    ("d.csv", b"a,b\n1,2\n", "unknown file type '.csv'"),
    ("d.jsonl", b"", "is empty"),
    ("d.txt", b"\x00\x01binary", "looks binary"),
    ("d.jsonl", b'{"text": "a"}\n{oops\n', "cannot be read as JSON / JSON Lines"),
    ("d.txt", b"caf\xe9 au lait\n", "is not UTF-8 (byte 3)"),
])
def test_bad_files_are_one_line_errors(name, data, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if data == "dir":
        (tmp_path / name).mkdir()
    elif data is not None:
        (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError) as e:
        load_records(name, cache_dir=tmp_path / "cache", progress=False)
    assert message in str(e.value) and str(e.value).startswith("--data ") and "\n" not in str(e.value)


def test_without_datasets_reading_a_file_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets now raises ImportError
    (tmp_path / "d.jsonl").write_text('{"text": "the sky is blue"}\n')
    with pytest.raises(UserError, match=r'--data reads files with the datasets library; pip install -e "\.\[hf\]"'):
        load_records(tmp_path / "d.jsonl")


def test_collator_pads_with_ignored_labels():
    tok = word_tokenizer()
    batch = collator(tok)([{"input_ids": [1, 5, 6], "labels": [-100, -100, 6]}, {"input_ids": [1, 7]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, tok.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6], [1, 7, -100]]


# ---- training: transformers' Trainer and lqplan's loop on a quantized Llama --------------------------------------
FAKE_FINGERPRINT = "sha256:" + "0" * 64
RECORDS = [{"messages": CHAT}, {"prompt": "what is two plus two", "completion": "sure thing"},
           {"instruction": "tell me a joke", "output": "no"}, {"text": "the sky is blue"}] * 3


def tiny_llama(tok):
    return seeded_tiny_llama(len(tok), kv_heads=4, max_position_embeddings=128)


def quantized(tok):
    model = tiny_llama(tok)
    plan = explicit_plan(model, GridPoint(QuantConfig(bits=4, blocksize=64), 8), fingerprint=FAKE_FINGERPRINT, iters=1)
    return apply_plan(model, plan, fingerprint=FAKE_FINGERPRINT, progress=False)


@needs_datasets
def test_one_trainer_step_moves_only_the_adapters(tmp_path):
    from transformers import Trainer, TrainingArguments

    tok = word_tokenizer()
    model = quantized(tok)
    data = sft_dataset(tok, RECORDS, 48)
    batch = collator(tok)([data[i] for i in range(4)])
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():  # the loop's loss is transformers' own loss on the same labels
        assert float(masked_causal_loss(model, batch, targets)) == pytest.approx(float(model(**batch).loss), rel=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    result = Trainer(model=model, args=args, train_dataset=data, data_collator=collator(tok)).train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith((".lora_A", ".lora_B")) for k in changed), sorted(changed)


def test_own_loop_trains_on_responses_only():
    from planner.train.loop import train

    tok = word_tokenizer()
    cpu = torch.device("cpu")
    batch, targets, rows = Batches("causal", tok, RECORDS, 4, 48, seed=0).next(cpu)
    assert rows == 4 and targets == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert targets < int(batch["attention_mask"].sum())  # prompts and padding are no targets
    # Two data-parallel ranks of 2 rows each: DDP's mean of their losses (and gradients) is the 4-row batch's.
    model = tiny_llama(tok)
    with torch.no_grad():
        whole = masked_causal_loss(model, batch, targets)
        ranks = [masked_causal_loss(model, b, n / 2) for b, n, _ in
                 (Batches("causal", tok, RECORDS, 2, 48, seed=0, rank=r, world=2).next(cpu) for r in (0, 1))]
    assert float(sum(ranks) / 2) == pytest.approx(float(whole), rel=1e-5)
    history = train(quantized(tok), tok, RECORDS, TrainSettings(steps=4, batch_size=4, max_len=48, lr=1e-2),
                    progress=False)
    assert len(history) == 4 and all(math.isfinite(h["loss"]) for h in history)
    with pytest.raises(UserError, match="need a causal LM"):
        train(tiny_llama(tok), tok, RECORDS, TrainSettings(steps=1), objective="distill", teacher=tiny_llama(tok),
              progress=False)


@needs_datasets
def test_train_command_with_data_file(tmp_path, capsys):
    from planner.cli import main

    tok = word_tokenizer()
    folder = tmp_path / "llama"
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    plan = explicit_plan(tiny_llama(tok), GridPoint(QuantConfig(bits=4, blocksize=64), 8), model_path=folder, iters=1)
    plan.save(tmp_path / "plan.json")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    common = ["train", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "run"), "--quiet",
              "--cache", str(tmp_path / "cache")]
    assert main([*common, "--data", str(tmp_path / "d.jsonl"), "--steps", "2", "--batch-size", "2", "--max-len", "32",
                 "--eval-texts", "1", "--no-reference", "--no-save", "--pack"]) == 0
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert report["steps"] == 2 and all(math.isfinite(h["loss"]) for h in report["history"] if "loss" in h)
    capsys.readouterr()
    assert main([*common, "--data", str(tmp_path / "d.jsonl"), "--text", str(tmp_path / "d.jsonl")]) == 2
    assert main([*common, "--data", str(tmp_path / "none.jsonl")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "pass one of them" in errors[0] and "none.jsonl does not exist" in errors[1]


@needs_datasets
def test_the_example_script_fine_tunes_a_plan(tmp_path):
    for helper in ("planner.hf.config", "planner.hf.peft"):  # the quantizer and the PEFT layer (issue 20)
        pytest.importorskip(helper, reason=f"{helper} is not merged yet")
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    tok = word_tokenizer()
    folder = tmp_path / "llama"
    tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    explicit_plan(tiny_llama(tok), GridPoint(QuantConfig(bits=4, blocksize=64), 8), model_path=folder,
                  iters=1).save(tmp_path / "plan.json")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    run = subprocess.run([sys.executable, str(REPO / "examples" / "finetune_hf.py"), "--model", str(folder), "--plan",
                          str(tmp_path / "plan.json"), "--data", str(tmp_path / "d.jsonl"), "--steps", "2",
                          "--batch-size", "2", "--max-len", "32", "--gradient-checkpointing", "--out",
                          str(tmp_path / "out")],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "peak" in run.stdout and (tmp_path / "out" / "adapter").is_dir()
    assert "trained 2 steps" in run.stdout and "nan" not in run.stdout.split("mean loss")[1].split(";")[0]


def test_chat_records_split_each_paragraph_at_its_first_sentence():
    from planner.corpus import chat_records

    assert chat_records(["Why is it so. Because it is. Really.", "One sentence only."]) == [
        {"prompt": "Why is it so.", "completion": "Because it is. Really."}]
    records = chat_records()  # the pydoc train split the HF-route benches fine-tune on
    assert len(records) > 100 and all(r["prompt"].endswith(".") and r["completion"] for r in records)
