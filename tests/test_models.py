"""Model resolution, matrix discovery, streaming and the config-only memory estimate (planner/models.py)."""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from planner.errors import UserError
from planner.model import resolve as models_resolve
from planner.model import stream as models_stream
from planner.model import weights as models_weights
from planner.model.discover import (
    MatrixInfo,
    discover_matrices,
    planned_params,
    unplanned_bytes,
)
from planner.model.memory import memory_table
from planner.model.resolve import ALIASES, ModelSource, list_aliases, resolve_model
from planner.model.stream import iter_matrices
from quant.config import QuantConfig

LLAMA_KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _llama(tmp: Path, hidden=256, inter=688, layers=4, heads=4, kv=2, shard="1MB", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=1000)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp, max_shard_size=shard, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = _llama(folder)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return folder, state


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- the embedded default -----------------------------------------------------------------------------------

def test_default_model_resolves_and_discovers_36_bert_matrices():
    src = resolve_model(None)
    assert isinstance(src, ModelSource)
    assert src.name == "minilm" and src.folder == models_resolve.default_model_path()
    assert [p.name for p in src.files] == ["model.safetensors"]
    assert src.config["model_type"] == "bert" and src.fingerprint == models_weights.fingerprint(src.folder)
    assert resolve_model("minilm").fingerprint == src.fingerprint

    mats = discover_matrices(src)
    # BERT's pooler.dense (384x384) is an nn.Linear too, but it sits outside the layer blocks: the plan covers
    # attention and MLP projections only, so the pooler (like the embeddings) stays unplanned.
    assert len(mats) == 36 and all(isinstance(m, MatrixInfo) for m in mats)
    per_layer = [("attention.self.query", (384, 384)), ("attention.self.key", (384, 384)),
                 ("attention.self.value", (384, 384)), ("attention.output.dense", (384, 384)),
                 ("intermediate.dense", (1536, 384)), ("output.dense", (384, 1536))]
    expected = [(f"encoder.layer.{i}.{k}", i, k, s) for i in range(6) for k, s in per_layer]
    assert [(m.name, m.layer, m.kind, m.shape) for m in mats] == expected
    assert all(m.tensor_key == m.name + ".weight" and m.dtype == "float32" and not m.transposed for m in mats)
    assert not any("pooler" in m.name or "embeddings" in m.name for m in mats)
    assert planned_params(mats) == 6 * (4 * 384 * 384 + 2 * 1536 * 384)
    total_bytes = sum(e.nbytes for e in src.tensors.values())
    assert unplanned_bytes(src, mats) == total_bytes - 4 * planned_params(mats)


def test_prefix_differences_between_skeleton_and_checkpoint(tmp_path):
    # skeleton BertForMaskedLM names modules "bert.encoder...", a checkpoint may store them as "encoder...": match
    # by suffix (the checkpoint holds the MLM head, so it is a BertForMaskedLM's)
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "mlm"
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, max_position_embeddings=64)).save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k.removeprefix("bert."): v for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    mats = discover_matrices(resolve_model(folder), include_head=True)  # MLM decoder is tied: still excluded
    assert len(mats) == 12
    assert mats[0].name == "bert.encoder.layer.0.attention.self.query"
    assert mats[0].tensor_key == "encoder.layer.0.attention.self.query.weight"


def test_architectures_naming_another_class_than_the_weights_is_refused(tmp_path):
    # MiniLM's weights are a BertModel's: config.json naming BertForMaskedLM would be recorded in plan.json
    src_dir = models_resolve.default_model_path()
    folder = tmp_path / "mlm"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(src_dir / "model.safetensors")
    cfg = json.loads((src_dir / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"names BertForMaskedLM, whose cls\.predictions.*another class"):
        discover_matrices(resolve_model(folder), include_head=True)


# ---- a Llama-architecture model made here -------------------------------------------------------------------

def test_tiny_llama_sharded_discovery_and_streaming(tiny_llama):
    folder, state = tiny_llama
    src = resolve_model(str(folder))
    assert (folder / "model.safetensors.index.json").exists() and len(src.files) > 3
    mats = discover_matrices(src)
    assert len(mats) == 28
    assert [(m.layer, m.kind) for m in mats] == [(i, k) for i in range(4) for k in LLAMA_KINDS]
    shapes = {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (128, 256), "self_attn.v_proj": (128, 256),
              "self_attn.o_proj": (256, 256), "mlp.gate_proj": (688, 256), "mlp.up_proj": (688, 256),
              "mlp.down_proj": (256, 688)}
    assert all(m.shape == shapes[m.kind] and m.tensor_key == m.name + ".weight" for m in mats)
    assert all(m.file.name == json.loads((folder / "model.safetensors.index.json").read_text())
               ["weight_map"][m.tensor_key] for m in mats)
    assert planned_params(mats) == 4 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 688 * 256)
    norms = 4 * 2 * 256 + 256
    assert unplanned_bytes(src, mats) == 4 * (2 * 1000 * 256 + norms)

    with_head = discover_matrices(src, include_head=True)
    assert with_head[:28] == mats and len(with_head) == 29
    head = with_head[-1]
    assert (head.name, head.tensor_key, head.shape, head.layer) == ("lm_head", "lm_head.weight", (1000, 256), None)
    assert unplanned_bytes(src, with_head) == 4 * (1000 * 256 + norms)

    for prefetch in (False, True):
        seen = []
        for m, w in iter_matrices(src, mats, prefetch=prefetch):
            assert w.dtype == torch.float32 and w.is_contiguous()
            assert torch.equal(w, state[m.tensor_key]), m.name
            seen.append(m.name)
        assert seen == [m.name for m in mats]
    (m, w), = list(iter_matrices(src, mats[:1], dtype=torch.bfloat16))
    assert w.dtype == torch.bfloat16 and torch.equal(w, state[m.tensor_key].bfloat16())


def test_prefetch_keeps_at_most_two_matrices_alive_and_overlaps(tiny_llama, monkeypatch):
    folder, _ = tiny_llama
    src = resolve_model(folder)
    mats = discover_matrices(src)
    alive = {"now": 0, "max": 0}
    lock = threading.Lock()
    asked = [0]  # how many matrices the caller has finished with (and so asked for the next of)
    asked_at_read = []
    real_load = models_stream.load_matrix

    def counting_load(info, device, dtype):
        asked_at_read.append(asked[0])
        t = real_load(info, device, dtype)
        with lock:
            alive["now"] += 1
            alive["max"] = max(alive["max"], alive["now"])

        def dec():
            with lock:
                alive["now"] -= 1
        weakref.finalize(t, dec)
        return t

    monkeypatch.setattr(models_stream, "load_matrix", counting_load)
    for i, (m, w) in enumerate(iter_matrices(src, mats, prefetch=True)):
        # the caller's "work" lasts until the next read has started, so the check waits on no clock; without
        # prefetch the next read would never start here and the wait gives up
        deadline = time.monotonic() + 5
        while len(asked_at_read) < min(i + 2, len(mats)) and time.monotonic() < deadline:
            time.sleep(0.001)
        asked[0] += 1
    assert alive["max"] <= 2
    # real prefetch: the read of matrix j starts before the caller is done with matrix j-1
    assert asked_at_read == [0] + list(range(len(mats) - 1)), asked_at_read

    # a for-loop holds the previous tensor until next() returns; a slow rebind stretches that moment: the read
    # of the matrix after next must still wait for the previous tensor to go (ungated prefetch would reach 3)
    alive["max"] = 0
    it = iter_matrices(src, mats, prefetch=True)
    _, w = next(it)
    for _ in range(len(mats) - 1):
        _, w_next = next(it)
        time.sleep(0.03)
        w = w_next
    del w, w_next
    assert alive["max"] == 2

    # a caller that keeps every tensor must not deadlock the gated prefetch, nor must an abandoned generator
    kept = [w for _, w in iter_matrices(src, mats[:5], prefetch=True)]
    assert len(kept) == 5
    gen = iter_matrices(src, mats, prefetch=True)
    next(gen)
    next(gen)
    gen.close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to read the RSS")
def test_streaming_peak_memory_stays_near_one_matrix(tmp_path):
    # 6 layers of 13 MB of fp32 matrices (largest 3 MB): loading them all would add ~78 MB
    _llama(tmp_path, hidden=512, inter=1536, layers=6, heads=8, kv=8, shard="20MB")
    gc.collect()
    src = resolve_model(tmp_path)
    mats = discover_matrices(src)
    largest = max(m.numel for m in mats) * 4
    total = planned_params(mats) * 4
    # the allocator settles after one pass (a worker thread gets its own malloc arena), so measure the second;
    # one pass kept 6-9 MB more than before it, loading everything would add ~78 MB
    assert 8 * largest < total / 3
    for prefetch in (False, True):
        for _ in iter_matrices(src, mats, prefetch=prefetch):
            pass
        gc.collect()
        base = peak = _rss_bytes()
        checksum = 0.0
        for m, w in iter_matrices(src, mats, prefetch=prefetch):
            checksum += float(w[0, 0])
            peak = max(peak, _rss_bytes())
        assert peak - base < 8 * largest, (prefetch, (peak - base) / 2**20)


def test_nan_in_a_matrix_names_it(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = _copy(tiny_llama[0], tmp_path / "nan")
    src = resolve_model(folder)
    target = discover_matrices(src)[9]  # layer 1, self_attn.v_proj
    tensors = load_file(target.file)
    tensors[target.tensor_key][3, 5] = float("nan")
    save_file(tensors, target.file, metadata={"format": "pt"})
    src = resolve_model(folder)
    mats = discover_matrices(src)
    with pytest.raises(UserError, match=r"model\.layers\.1\.self_attn\.v_proj.*NaN or Inf.*re-download"):
        for _ in iter_matrices(src, mats, prefetch=True):
            pass


def test_gpt2_conv1d_is_transposed_and_base_prefix_matched(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2Model"]  # skeleton without "transformer." while the file keys have it
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    src = resolve_model(tmp_path)
    mats = discover_matrices(src, include_head=True)  # GPT-2's head is tied: never planned
    assert [(m.name, m.shape) for m in mats] == [
        (f"h.{i}.{k}", s) for i in range(2)
        for k, s in [("attn.c_attn", (192, 64)), ("attn.c_proj", (64, 64)),
                     ("mlp.c_fc", (256, 64)), ("mlp.c_proj", (64, 256))]]
    assert all(m.transposed and m.tensor_key == "transformer." + m.name + ".weight" for m in mats)
    modules = dict(model.transformer.named_modules())
    for m, w in iter_matrices(src, mats):
        assert w.shape == m.shape and torch.equal(w, modules[m.name].weight.detach().t())


def test_unknown_architecture_falls_back_to_layer_block_matrices(tiny_llama, tmp_path):
    folder = _copy(tiny_llama[0], tmp_path / "mystery")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mystery-net"
    cfg["architectures"] = ["MysteryNetForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    mats = discover_matrices(resolve_model(folder))
    # layer-major; inside a layer the fallback can only use the key order (alphabetical)
    assert [(m.layer, m.kind) for m in mats] == [(i, k) for i in range(4) for k in sorted(LLAMA_KINDS)]
    with pytest.raises(UserError, match="cannot build the architecture"):
        memory_table(folder)


# ---- the Hugging Face cache, aliases ------------------------------------------------------------------------

def test_alias_and_hub_id_resolve_offline_from_the_cache(tiny_llama, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc"
    _copy(tiny_llama[0], snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    src = resolve_model("llama2-7b")
    assert (src.name, src.folder, src.hub_id) == ("llama2-7b", snap, "meta-llama/Llama-2-7b-hf")
    assert len(discover_matrices(src)) == 28
    assert resolve_model("meta-llama/Llama-2-7b-hf").folder == snap

    # HF_HOME/hub when HF_HUB_CACHE is unset; refs/main wins over a newer snapshot
    newer = _copy(snap, snap.parent / "def")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    assert resolve_model("llama2-7b").folder == snap
    (snap.parent.parent / "refs" / "main").unlink()
    os.utime(newer, (time.time() + 10, time.time() + 10))
    assert resolve_model("llama2-7b").folder == newer


def test_aliases_listed_with_hub_ids():
    aliases = list_aliases()
    assert aliases["llama2-7b"] == "meta-llama/Llama-2-7b-hf"
    assert aliases["llama2-13b"] == "meta-llama/Llama-2-13b-hf"
    assert aliases["llama2-70b"] == "meta-llama/Llama-2-70b-hf"
    assert {"llama3.1-8b", "mistral-7b", "qwen2.5-7b", "gemma2-9b", "phi3-mini", "minilm"} <= set(aliases)
    assert all(v.count("/") == 1 for v in aliases.values()) and aliases == ALIASES


def test_missing_model_errors_name_what_where_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(UserError) as e:
        resolve_model("llama2-13b")
    msg = str(e.value)
    assert "meta-llama/Llama-2-13b-hf" in msg and str(tmp_path / "empty-hub") in msg
    assert "`hf download meta-llama/Llama-2-13b-hf" in msg and "--model" in msg and "\n" not in msg

    with pytest.raises(UserError, match=r"'llama9-1t'.*alias.*--model /path/to/hf-folder"):
        resolve_model("llama9-1t")
    with pytest.raises(UserError, match=r"'\./no/such/folder'.*--model"):
        resolve_model("./no/such/folder")
    with pytest.raises(UserError, match=r"someorg/somemodel.*`hf download someorg/somemodel"):
        resolve_model("someorg/somemodel")


def test_folder_problems_raise_user_errors_with_the_fix(tiny_llama, tmp_path):
    from transformers import LlamaConfig
    no_weights = tmp_path / "no-weights"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match=r"no \*\.safetensors weights \(it has pytorch_model\.bin\).*safe_serialization"):
        resolve_model(no_weights)

    no_config = _copy(tiny_llama[0], tmp_path / "no-config")
    (no_config / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json.*copy the model's config.json"):
        resolve_model(no_config)

    missing_shard = _copy(tiny_llama[0], tmp_path / "missing-shard")
    sorted(missing_shard.glob("*.safetensors"))[2].unlink()
    with pytest.raises(UserError, match=r"lacks shard.*incomplete download"):
        resolve_model(missing_shard)

    with pytest.raises(UserError, match="is a file; pass the folder"):
        resolve_model(tiny_llama[0] / "config.json")


def _single_file_model(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {}
    for p in src.glob("*.safetensors"):
        tensors.update(load_file(p))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst / "model.safetensors"


def test_truncated_or_corrupt_safetensors(tiny_llama, tmp_path):
    weights = _single_file_model(tiny_llama[0], tmp_path / "cut")
    data = weights.read_bytes()
    assert len(discover_matrices(resolve_model(weights.parent))) == 28
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserError, match=r"model\.safetensors is truncated: tensor .* ends at byte .*re-download"):
        resolve_model(weights.parent)
    weights.write_bytes(data[:100])
    with pytest.raises(UserError, match="truncated or not safetensors.*re-download"):
        resolve_model(weights.parent)
    weights.write_bytes(data[:8] + b"\x00garbage" + data[16:])
    with pytest.raises(UserError, match="unreadable safetensors header"):
        resolve_model(weights.parent)


def test_config_disagreeing_with_weights(tiny_llama, tmp_path):
    folder = _copy(tiny_llama[0], tmp_path / "wrong-config")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 700}))
    with pytest.raises(UserError, match=r"disagrees with the weights: model\.layers\.0\.mlp\.gate_proj\.weight is "
                                        r"\[688, 256\].*implies \[700, 256\].*config\.json that was saved"):
        discover_matrices(resolve_model(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(UserError, match=r"num_hidden_layers=5 but the weights hold 4 layer blocks.*disagree"):
        discover_matrices(resolve_model(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(UserError, match="already quantized \\(gptq\\).*original"):
        resolve_model(folder)


# ---- memory estimate from config.json alone -----------------------------------------------------------------

def test_memory_table_from_llama2_13b_config_only(tmp_path, monkeypatch):
    from transformers import LlamaConfig
    folder = tmp_path / "hub" / "models--meta-llama--Llama-2-13b-hf" / "snapshots" / "c0ffee"
    LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                vocab_size=32000).save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    table = memory_table(folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # the alias needs only config.json in the cache
    assert memory_table("llama2-13b").equals(table) and memory_table(folder / "config.json").equals(table)
    table = table.set_index(["config", "rank"])
    total_params = 13_015_864_320
    shapes = [(5120, 5120)] * 4 + [(13824, 5120)] * 2 + [(5120, 13824)]
    planned = 40 * sum(m * n for m, n in shapes)
    fp16 = table.loc[("fp16", 0)]
    assert fp16.planned_params == planned and fp16.other_params == total_params - planned
    assert fp16.total_GiB == pytest.approx(2 * total_params / 2**30, rel=1e-12)
    assert abs(fp16.total_GiB * 2**30 / 1e9 - 26.0) / 26.0 < 0.02

    nf4 = QuantConfig()  # NF4, block 64, double quant 8-bit/256: QLoRA's 4.127 bits
    for rank in (0, 16, 32, 64):
        row = table.loc[(nf4.label, rank)]
        bits = 40 * sum(nf4.matrix_bits(s, rank) for s in shapes)
        assert row.total_GiB == pytest.approx((bits / 8 + 2 * (total_params - planned)) / 2**30, rel=1e-12)
    assert table.loc[(nf4.label, 0)].bits_per_param == pytest.approx(4.127, abs=1e-3)
    assert table.loc[(nf4.label, 0)].total_GiB == pytest.approx(7.2e9 / 2**30, abs=0.1)  # 12.69e9*4.127/8 + 0.33e9*2
    # the ranks `lqplan plan` profiles for a 5120-wide model (16,32,64), each with and without an adapter
    assert list(table.index) == [("fp16", 0)] + [(QuantConfig(bits=b).label, r) for b in (4, 3, 2)
                                                 for r in (0, 16, 32, 64)]
    assert table.loc[("nf2-b64-dq8/256", 0)].total_GiB < table.loc[(nf4.label, 0)].total_GiB < fp16.total_GiB


def test_memory_table_uses_the_ranks_plan_profiles_for_the_model():
    """The embedded MiniLM (384 wide) is profiled at ranks 8,16,32: its memory table shows those, not rank 64."""
    table = memory_table(None)
    assert sorted(set(table["rank"])) == [0, 8, 16, 32]
    assert sorted(set(memory_table(None, ranks=[64])["rank"])) == [0, 64]


def test_memory_table_of_the_default_model_matches_its_weights():
    table = memory_table(None).set_index(["config", "rank"])
    src = resolve_model(None)
    stored = [e for k, e in src.tensors.items() if e.dtype == "F32"]  # parameters; position_ids is int64
    fp16 = table.loc[("fp16", 0)]
    assert fp16.planned_params == planned_params(discover_matrices(src))
    assert fp16.planned_params + fp16.other_params == sum(e.nbytes for e in stored) // 4


def test_meta_skeleton_parameters_on_meta_buffers_as_asked(tiny_llama):
    from planner.model.hfload import auto_config, meta_skeleton

    config = auto_config(tiny_llama[0])
    for kwargs in ({"architecture": "LlamaForCausalLM"}, {"causal": True}):
        model = meta_skeleton(config, **kwargs)
        assert type(model).__name__ == "LlamaForCausalLM" and all(p.is_meta for p in model.parameters())
        assert any(not b.is_meta for b in model.buffers())  # rotary frequencies computed at init, kept real
    shapes_only = meta_skeleton(config, meta_buffers=True)
    assert type(shapes_only).__name__ == "LlamaModel" and all(b.is_meta for b in shapes_only.buffers())
    with pytest.raises(UserError, match="'NoSuchForCausalLM' is not in this transformers version"):
        meta_skeleton(config, "NoSuchForCausalLM")
