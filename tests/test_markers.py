"""The suite's markers: a `gpu` test is skipped, with its reason, on a machine without CUDA and runs where there is one."""

from __future__ import annotations

import pytest

import conftest


class _Item:
    def __init__(self, *markers: str):
        self.markers = set(markers)
        self.added = []

    def get_closest_marker(self, name):
        return name if name in self.markers else None

    def add_marker(self, marker):
        self.added.append(marker)


@pytest.mark.parametrize("cuda", [False, True])
def test_gpu_tests_are_skipped_only_without_cuda(cuda, monkeypatch):
    monkeypatch.setattr(conftest.torch.cuda, "is_available", lambda: cuda)
    gpu, slow, plain = _Item("gpu"), _Item("slow"), _Item()
    conftest.pytest_collection_modifyitems(None, [gpu, slow, plain])
    assert slow.added == plain.added == []
    if cuda:
        assert gpu.added == []
    else:
        (mark,) = gpu.added
        assert mark.name == "skip" and "CUDA" in mark.kwargs["reason"]
