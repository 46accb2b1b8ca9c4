"""Shared fixtures: the embedded MiniLM model (no hub), its 36 linear weight matrices, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from planner.model.resolve import default_model_path
from planner.testing.models import seeded_tiny_llama  # noqa: F401 (the suite's tiny decoder: tests import it from here)

# One intra-op thread: the test tensors are small, and on the 2-core machine thread hand-offs cost more than they
# save (measured: the numeric-core tests take 19 s with 1 thread, 38 s with 2 on an idle machine, and several
# minutes with 2 while other processes load the CPU, e.g. a 256-value bucketize taking 9 ms instead of 3 us).
torch.set_num_threads(1)

# The suite is a CPU suite wherever it runs: "auto" devices resolve to the CPU (planner.devices reads this), so a
# GPU machine runs the same tests; the GPU tests ask for cuda explicitly. Subprocesses inherit it.
os.environ.setdefault("LQPLAN_DEVICE", "cpu")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need CUDA: skipped, with the reason shown, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m planner` child: this checkout first on PYTHONPATH, whatever else was there
    kept (a machine may provide dependencies through PYTHONPATH), one thread unless told otherwise."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}

# The six projections of every BERT layer that lqplan plans (the pooler and embeddings are not LoRA targets).
LINEAR_SUFFIXES = (
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
)


def _is_planned_linear(name: str) -> bool:
    return name.startswith("encoder.layer.") and name.endswith(LINEAR_SUFFIXES)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_path():
    return default_model_path()


@pytest.fixture(scope="session")
def tok(minilm_path):
    """The embedded model's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def minilm_weights(minilm_path) -> dict[str, torch.Tensor]:
    """name -> fp32 tensor (out, in) of the 36 linear weight matrices of all-MiniLM-L6-v2, in file order."""
    with safe_open(str(minilm_path / "model.safetensors"), framework="pt") as f:
        names = [k for k in f.keys() if _is_planned_linear(k)]
        weights = {k: f.get_tensor(k).float() for k in names}
    assert len(weights) == 36, f"expected 36 linear matrices in {minilm_path}, found {len(weights)}"
    assert all(w.dim() == 2 for w in weights.values())
    return weights


@pytest.fixture(scope="session")
def encoder_plan_file(minilm_path, tmp_path_factory):
    """encoder_plan_file(bits) -> path of a saved plan putting every encoder linear of MiniLM at NF-`bits`, block 64,
    rank 8 (LoftQ T=1): the fine-tuning tests' plan, made once per bit width."""
    from torch import nn
    from transformers import AutoModel

    from planner.profile.grid import GridPoint
    from planner.train.apply import explicit_plan
    from quant import QuantConfig

    made = {}

    def make(bits: int):
        if bits not in made:
            model = AutoModel.from_pretrained(minilm_path)
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
            plan = explicit_plan(model, GridPoint(QuantConfig(bits=bits, blocksize=64), 8), model_path=minilm_path,
                                 names=names, iters=1)
            made[bits] = tmp_path_factory.mktemp(f"plan-nf{bits}") / "plan.json"
            plan.save(made[bits])
        return made[bits]

    return make
