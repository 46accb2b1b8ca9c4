"""planner.model.pages: a file's mapped pages leave the process's resident set and read back the same; the HF route
(from_pretrained with LqplanConfig) holds at most about one shard of mapped pages while it quantizes, where
transformers alone keeps every page it read until the load ends."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from planner.hf import LqplanConfig, LqplanHfQuantizer
from planner.model.pages import release_mapped_pages
from planner.profile.grid import GridPoint
from planner.testing.models import seeded_llama
from planner.train.apply import explicit_plan
from quant import QuantConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")


def resident_bytes(paths) -> int:
    """Bytes of `paths` mapped into this process and resident (/proc/self/smaps' Rss of their mappings)."""
    names = {str(Path(p).resolve()) for p in paths}
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
            inside = len(head) >= 6 and head[5] in names
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def test_released_pages_leave_the_resident_set_and_read_back_the_same(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * (4 << 12)  # 4 MiB
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:] == data  # every page touched
        assert resident_bytes([path]) >= len(data) // 2  # resident (the kernel may still be reading some ahead)
        assert release_mapped_pages([path]) >= len(data)
        assert resident_bytes([path]) == 0
        assert m[:] == data  # faulted back in, unchanged


def test_a_private_mapping_with_written_pages_and_other_files_are_left_alone(tmp_path):
    """safetensors maps files private and writable: clean, such a mapping is released; once a page was written
    (copied on write) the advice would throw the write away, so it is left alone, as are files not named."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * (1 << 20))
    b.write_bytes(b"y" * (1 << 20))
    with open(a, "rb") as fa, mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_COPY) as ma, open(b, "rb") as fb, \
            mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as mb:
        _ = ma[:], mb[:]
        assert release_mapped_pages([a]) >= 1 << 20 and resident_bytes([a]) == 0  # private, clean: released
        assert resident_bytes([b]) > 0  # b was not named
        ma[:4] = b"abcd"  # now one page is the process's own copy
        assert release_mapped_pages([a]) == 0
        assert ma[:4] == b"abcd"
    assert release_mapped_pages([tmp_path / "missing"]) == 0


def test_hf_route_holds_about_one_shard_of_mapped_pages_while_it_quantizes(tmp_path, monkeypatch):
    """A 4-layer Llama in shards of ~1 layer each: at every planned weight, the shards' resident mapped pages stay
    below two shards' bytes (before, transformers held every page read so far: all four layers by the last one)."""
    folder = tmp_path / "llama"
    model = seeded_llama(1000, 64, 1024, layers=4, heads=4, kv_heads=2)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    model.save_pretrained(folder, max_shard_size=f"{layer_bytes // 1000 + 1}KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 4
    plan = explicit_plan(model, GridPoint(QuantConfig(bits=4, blocksize=64), 0), model_path=folder, iters=0)
    seen = []
    original = LqplanHfQuantizer.quantize_weight

    def watched(self, model, key, value):
        seen.append(resident_bytes(shards))
        return original(self, model, key, value)

    monkeypatch.setattr(LqplanHfQuantizer, "quantize_weight", watched)
    AutoModelForCausalLM.from_pretrained(folder, quantization_config=LqplanConfig(plan, init="qlora"),
                                         device_map="cpu", dtype=torch.float32)
    assert len(seen) == len(plan.matrices)
    largest = max(p.stat().st_size for p in shards)
    assert max(seen) < 2 * largest, (max(seen), largest, seen)
