"""The model fingerprint sees every byte of the weights (issue 21, class 1): a change anywhere in a shard, even in the
middle where the old head/tail hash never looked, gives another fingerprint, so a profile cached for the old
weights is never reused; the per-file digest memo only speeds reruns up and is invalidated by any write."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from planner import cli
from planner.model import digests
from planner.model.weights import fingerprint


def _save_tiny_bert(folder, seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp") / "tiny"
    _save_tiny_bert(folder)
    return folder


@pytest.fixture(autouse=True)
def _memo(tmp_path, monkeypatch):
    monkeypatch.setenv(digests.MEMO_ENV, str(tmp_path / "memo.json"))


def _poke(path, offset: int, data: bytes, keep_mtime: bool = False) -> None:
    st_ = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:  # a writer that restores the old mtime must still not be read from the memo
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))


def _middle_of(path, key: str) -> int:
    """The file offset of the middle element of tensor `key`."""
    n = int.from_bytes(path.read_bytes()[:8], "little")
    meta = json.loads(path.read_bytes()[8:8 + n])[key]
    start, end = meta["data_offsets"]
    return 8 + n + (start + end) // 2 // 4 * 4


KEY = "encoder.layer.0.intermediate.dense.weight"


def test_fingerprint_format_and_stability(tiny, monkeypatch):
    fp = fingerprint(tiny)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fingerprint(tiny) == fp  # from the memo
    monkeypatch.setenv(digests.MEMO_ENV, "off")
    assert fingerprint(tiny) == fp  # the memo is only a speedup


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(0, 1), st.integers(1, 255))
def test_any_changed_byte_changes_the_fingerprint(tmp_path_factory, tiny, where, xor):
    folder = tmp_path_factory.mktemp("flip") / "m"
    shutil.copytree(tiny, folder)
    path = folder / "model.safetensors"
    before = fingerprint(folder)
    offset = int(where * (path.stat().st_size - 1))
    byte = path.read_bytes()[offset]
    _poke(path, offset, bytes([byte ^ xor]), keep_mtime=True)
    assert fingerprint(folder) != before


def test_memo_is_invalidated_by_a_write_that_keeps_the_mtime(tmp_path, tiny):
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    path = folder / "model.safetensors"
    before = fingerprint(folder)
    assert str(path.resolve()) in json.loads((tmp_path / "memo.json").read_text())
    _poke(path, _middle_of(path, KEY), b"\x00\x00\xc0\x7f", keep_mtime=True)
    assert fingerprint(folder) != before


def test_a_damaged_memo_is_ignored(tmp_path, tiny):
    fp = fingerprint(tiny)
    (tmp_path / "memo.json").write_text("{not json")
    assert fingerprint(tiny) == fp
    (tmp_path / "memo.json").write_text(json.dumps({str((tiny / "model.safetensors").resolve()): 5}))
    assert fingerprint(tiny) == fp


def test_nan_in_the_middle_of_a_shard_is_not_planned_from_the_clean_cache(tmp_path, tiny, capsys):
    """The issue's case: the clean model is profiled and cached, then a NaN is written into the middle of a tensor
    (same size): the rerun must not reuse the cache and must stop at the NaN."""
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    args = ["plan", "--budget", "8bits", "--model", str(folder), "--bits", "4", "--blocks", "64", "--ranks", "0,4",
            "--iters", "1", "--quiet", "--no-report", "--cache", str(tmp_path / "cache")]
    assert cli.main([*args, "--out", str(tmp_path / "clean")]) == 0
    path = folder / "model.safetensors"
    _poke(path, _middle_of(path, KEY), b"\x00\x00\xc0\x7f")  # float32 NaN
    with safe_open(str(path), framework="pt") as f:
        assert torch.isnan(f.get_tensor(KEY)).any()
    capsys.readouterr()
    assert cli.main([*args, "--out", str(tmp_path / "dirty")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "contains NaN or Inf" in err[0] and "encoder.layer.0.intermediate.dense" in err[0]
    assert not (tmp_path / "dirty").exists()


def test_digest_pieces_hash_in_parallel_and_agree(tmp_path, monkeypatch):
    """A file larger than one piece is hashed piecewise on several threads; the digest is the same with one."""
    monkeypatch.setattr(digests, "PIECE", 1 << 16)
    path = tmp_path / "big.safetensors"
    path.write_bytes(os.urandom((1 << 18) + 123))
    monkeypatch.setenv(digests.MEMO_ENV, "off")
    assert digests.file_digests([path], workers=4) == digests.file_digests([path], workers=1)
