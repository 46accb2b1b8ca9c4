"""The output-aware objective in the planner: its calibration statistics against brute force on the seeded tiny Llama
and the embedded MiniLM (shared-input groups, padding left out), the cache (one layer held at a time, the objective
in the key), the settings' checks, a plan made with it, and its adapters initialised from the same decomposition."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import seeded_tiny_llama
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from planner.corpus import load_calib
from planner.errors import UserError
from planner.model.discover import discover_matrices
from planner.model.resolve import resolve_model
from planner.profile.fisher import calib_batches, example_pieces
from planner.profile.grid import make_grid
from planner.profile.output_stats import compute_output_stats, get_output_stats
from planner.profile.settings import ProfileSettings
from quant import SolverSettings, decompose
from quant.weighting import Metric, Weighting, check_weighting

TOKENS = 256


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, minilm_path):
    """The seeded tiny Llama with the MiniLM vocabulary and tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    seeded_tiny_llama(30522, max_position_embeddings=256).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_stats(llama_folder):
    matrices = discover_matrices(resolve_model(str(llama_folder)))
    return matrices, compute_output_stats(llama_folder, matrices, load_calib("pydoc"), max_tokens=TOKENS)


def brute_force(model, pieces, names, causal: bool):
    """Per module: the inputs of every real token stacked (tokens, n), and the squared output gradients of the summed
    loss per token (tokens, m), taken with torch.autograd.grad on the captured outputs."""
    inputs = {n: [] for n in names}
    grads = {n: [] for n in names}
    for piece in pieces:
        outputs = {}

        def keep(mod, i, o, name):
            inputs[name].append(i[0].detach())
            outputs[name] = o

        hooks = [model.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: keep(mod, i, o, n))
                 for n in names]
        embed = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        try:
            if causal:
                loss = model(**piece, labels=piece["input_ids"]).loss * (piece["input_ids"].shape[1] - 1)
            else:
                hidden = model(**piece).last_hidden_state
                mask = piece["attention_mask"].unsqueeze(-1).float()
                emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
                loss = torch.nn.functional.cross_entropy(emb @ emb.T / 0.05, torch.arange(len(emb)), reduction="sum")
            got = torch.autograd.grad(loss, [outputs[n] for n in names])
        finally:
            embed.remove()
            for h in hooks:
                h.remove()
        real = piece["attention_mask"].bool().reshape(-1)
        for n, g in zip(names, got):
            grads[n].append(g.reshape(-1, g.shape[-1])[real].double())
            inputs[n][-1] = inputs[n][-1].reshape(-1, inputs[n][-1].shape[-1])[real].double()
    return ({n: torch.cat(v) for n, v in inputs.items()}, {n: torch.cat(v) for n, v in grads.items()})


# ---- the statistics ----------------------------------------------------------------------------------------
def test_decoder_groups_share_one_input_statistic(llama_stats):
    _, groups = llama_stats
    members = sorted(tuple(m.rsplit(".", 1)[1] for m in g.members) for g in groups.values())
    assert members == [("down_proj",)] * 2 + [("gate_proj", "up_proj")] * 2 + [("o_proj",)] * 2 + \
        [("q_proj", "k_proj", "v_proj")] * 2
    for g in groups.values():
        n = 128 if g.members[0].endswith("down_proj") else 64
        assert g.second_moment.shape == (n, n) and torch.equal(g.second_moment, g.second_moment.T)
        assert g.layer == int(g.members[0].split(".")[2])


def test_decoder_statistics_equal_brute_force(llama_folder, llama_stats):
    matrices, groups = llama_stats
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.up_proj",
             "model.layers.0.mlp.down_proj"]
    model = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pieces = [p for enc in calib_batches(llama_folder, load_calib("pydoc"), TOKENS, 128, 16)
              for p in example_pieces(dict(enc), True) if p["input_ids"].shape[1] >= 2]
    x, g = brute_force(model, pieces, names, causal=True)
    by_member = {m: grp for grp in groups.values() for m in grp.members}
    for n in names:
        grp = by_member[n]
        assert grp.tokens == len(x[n])  # every token of every example, none twice
        r = x[n].T @ x[n] / len(x[n])  # this module's own inputs, whichever member led its group
        assert torch.allclose(grp.second_moment.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
        d = g[n].pow(2).mean(0)
        assert torch.allclose(grp.rows[n].double(), d, rtol=1e-4, atol=1e-6 * float(d.max()))
        assert float(d.min()) >= 0 and float(d.max()) > 0


def test_encoder_statistics_leave_padding_out(minilm_path):
    source = resolve_model(None)
    names = ["encoder.layer.0.attention.self.key", "encoder.layer.2.output.dense"]
    matrices = [m for m in discover_matrices(source) if m.layer in (0, 2)]
    groups = compute_output_stats(minilm_path, matrices, load_calib("pydoc"), max_tokens=TOKENS)
    members = sorted(tuple(m.split(".", 3)[3] for m in g.members) for g in groups.values() if g.layer == 0)
    assert members == [("attention.output.dense",), ("attention.self.query", "attention.self.key",
                                                     "attention.self.value"),
                       ("intermediate.dense",), ("output.dense",)]
    by_member = {m: grp for grp in groups.values() for m in grp.members}
    assert by_member["encoder.layer.0.attention.self.key"].members[0] == "encoder.layer.0.attention.self.query"
    model = AutoModel.from_pretrained(minilm_path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batches = calib_batches(minilm_path, load_calib("pydoc"), TOKENS, 128, 16)
    x, g = brute_force(model, [dict(b) for b in batches], names, causal=False)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)  # padding exists
    for n in names:
        grp = by_member[n]
        assert grp.tokens == real == len(x[n])
        r = x[n].T @ x[n] / real
        assert torch.allclose(grp.second_moment.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
        d = g[n].pow(2).mean(0)
        assert torch.allclose(grp.rows[n].double(), d, rtol=1e-4, atol=1e-6 * float(d.max()))


def test_the_cache_holds_one_layer_and_reuses_the_pass(llama_folder, tmp_path, monkeypatch):
    source = resolve_model(str(llama_folder))
    matrices = discover_matrices(source)
    stats, key, _ = get_output_stats(source, matrices, "pydoc", tmp_path, TOKENS, "cpu", False, 0.01)
    folder = stats.folder
    assert folder.parent.name == "output-stats" and key == folder.name and f"-{TOKENS}-tok" in key
    index = json.loads((folder / "index.json").read_text())
    assert len(index["groups"]) == 8 and len(list(folder.glob("*.safetensors"))) == 8
    for m in matrices:
        w = stats.get(m.name)
        assert isinstance(w, Weighting) and w.chol.shape == (m.shape[1],) * 2 and w.rows.shape == (m.shape[0],)
        check_weighting(w, m.shape)
        assert {index["groups"][k]["layer"] for k in stats._held} == {m.layer}  # only this layer's groups are held
    import planner.profile.output_stats as mod

    monkeypatch.setattr(mod, "compute_output_stats", lambda *a, **k: pytest.fail("the cached pass was recomputed"))
    again, *_ = get_output_stats(source, matrices, "pydoc", tmp_path, TOKENS, "cpu", False, 0.01)
    name = matrices[0].name
    assert torch.equal(again.get(name).chol, stats.get(name).chol)


def test_settings_check_the_objective():
    grid = make_grid("2", "64", "4")
    assert ProfileSettings(grid).objective == "data-free"
    assert ProfileSettings(grid, calib="pydoc").objective == "fisher"
    out = ProfileSettings(grid, calib="pydoc", objective="output")
    fisher = ProfileSettings(grid, calib="pydoc")
    assert fisher.cache_key("k") == ProfileSettings(grid).cache_key("k")  # the Fisher key reads as it always has
    assert out.cache_key("k") != fisher.cache_key("k") and "-ok-d0.01" in out.cache_key("k")
    assert out.data_free().objective == "data-free" and out.data_free().calib is None
    with pytest.raises(UserError, match="--objective output needs calibration text; add --calib pydoc"):
        ProfileSettings(grid, objective="output")
    with pytest.raises(UserError, match="--objective data-free reads no calibration text"):
        ProfileSettings(grid, calib="pydoc", objective="data-free")
    with pytest.raises(UserError, match="plans LoRA points only"):
        ProfileSettings(make_grid("2", "64", "4", method="both", groups="64"), calib="pydoc", objective="output")
    with pytest.raises(UserError, match="--objective 'kl' is not supported"):
        ProfileSettings(grid, calib="pydoc", objective="kl")


# ---- a plan, and its adapters --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def output_plan(llama_folder, tmp_path_factory):
    from planner.api import make_plan

    root = tmp_path_factory.mktemp("output-plan")
    settings = ProfileSettings(make_grid("2,4", "64", "4"), iters=2, calib="pydoc", calib_tokens=TOKENS,
                               objective="output")
    res = make_plan(str(llama_folder), "5bits", settings, out_dir=root / "out", cache_dir=root / "cache",
                    progress=False, reports=False)
    return res, root


def test_an_output_plan_records_its_objective_and_minimises_the_output_error(output_plan, llama_folder):
    from planner.plan.weighted_error import weighted_plan_error
    from planner.plan.document import Plan

    res, root = output_plan
    plan = Plan.load(root / "out" / "plan.json")
    assert plan.method["objective"] == "output" and plan.method["fisher"] is None
    record = plan.method["output"]
    assert (record["source"], record["tokens"], record["damping"], record["row_weights"]) == ("pydoc", TOKENS, 0.01,
                                                                                                True)
    key = json.loads((root / "out" / "profile.json").read_text())["settings"]
    assert key.endswith(f"-o{record['key']}-d0.01")
    assert len(list((root / "cache").glob(f"*/{key}/*.json"))) == 14
    # the plan's total is the sum of its matrices' output errors, each what the weighted decomposition gives
    assert plan.totals["error"] == pytest.approx(sum(e.error for e in plan.matrices), rel=1e-12)
    source = resolve_model(str(llama_folder))
    stats, *_ = get_output_stats(source, discover_matrices(source), "pydoc", root / "cache", TOKENS, "cpu", False, 0.01)
    settings = ProfileSettings(make_grid("2,4", "64", "4"), iters=2, calib="pydoc", objective="output")
    assert weighted_plan_error(source, plan, stats, True, settings, "cpu") == pytest.approx(plan.totals["error"],
                                                                                           rel=2e-2)
    c = record["comparison"]
    assert c["objective"] == "output" and c["fisher_plan_weighted_error"] == plan.totals["error"]
    assert c["fisher_plan_weighted_error"] <= c["plain_plan_weighted_error"]


def test_apply_initialises_the_output_plan_from_its_calibrated_decomposition(output_plan, llama_folder):
    from planner.plan.document import Plan
    from planner.profile.objective import plan_weights
    from planner.train.apply import apply_plan

    res, root = output_plan
    plan = Plan.load(root / "out" / "plan.json")
    source = resolve_model(str(llama_folder))
    weights = plan_weights(plan, source, root / "cache", "cpu")
    model = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32)
    fp = {e.name: model.get_submodule(e.name).weight.detach().clone() for e in plan.matrices}
    apply_plan(model, plan, model_path=llama_folder, device="cpu", fisher=weights, progress=False)
    solver = SolverSettings()
    for e in plan.matrices[:4]:
        layer = model.get_submodule(e.name)
        w = weights.get(e.name)
        d = decompose(fp[e.name], e.point.config, e.point.rank, 2, fisher=w, solver=solver)
        got = layer.merged_weight().float()
        assert torch.allclose(got, d.q.dequantize() + d.a @ d.b.T, atol=1e-5)
        metric = Metric.of(w, "cpu")
        assert metric.error(fp[e.name] - got) == pytest.approx(e.error, rel=2e-2)  # what the profile measured


def test_finetune_decomposes_an_output_plan_with_its_statistics(output_plan, monkeypatch):
    import importlib

    from planner.profile.output_stats import OutputStats
    from planner.train.settings import TrainSettings

    ft = importlib.import_module("planner.train.finetune")  # the package exports the function under the same name
    res, root = output_plan
    seen = {}

    class Stop(Exception):
        pass

    def capture(plan, init, method, fisher=None):
        seen["fisher"] = fisher
        raise Stop

    monkeypatch.setattr(ft.LayerRecipe, "of", capture)
    with pytest.raises(Stop):
        ft.finetune(root / "out" / "plan.json", TrainSettings(steps=1), progress=False, cache_dir=root / "cache")
    assert isinstance(seen["fisher"], OutputStats) and seen["fisher"].folder.parent.parent.parent == root / "cache"
    with pytest.raises(Stop):
        ft.finetune(root / "out" / "plan.json", TrainSettings(steps=1, init="qlora"), progress=False,
                    cache_dir=root / "cache")
    assert seen["fisher"] is None
