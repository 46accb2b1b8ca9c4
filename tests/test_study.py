"""The GPU study's harness without a GPU: the task runner, the claims, the staging of pieces, the uniform plans."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from planner.model import packaged
from planner.study import install, stage
from planner.study.claims import claim_a, claim_b, claim_c, claim_d, claim_e, spearman
from planner.study.runner import Runner, Task
from planner.study.settings import StudySettings
from planner.study.tokens import known_answer


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _runner(tmp_path, deadline_s=120.0, slots=2, gpu_gb=None):
    lines = []
    r = Runner(slots, gpu_gb, time.monotonic() + deadline_s, None, tmp_path, lines.append, stop_margin_s=1.0)
    return r, lines


def test_runner_order_failure_resume_and_collectors(tmp_path):
    r, _ = _runner(tmp_path)
    seen = []
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "out").write_text("x")
    r.add(Task("resumed", "k", _py("raise SystemExit(3)"), done=tmp_path / "done" / "out", log=tmp_path / "r.log",
               on_done=lambda t: seen.append(t.key)))
    r.add(Task("a", "k", _py(f"open({str(tmp_path / 'a')!r}, 'w').write('1')"), log=tmp_path / "a.log",
               on_done=lambda t: seen.append(t.key)))
    r.add(Task("b", "k", _py("raise SystemExit(1)"), deps=("a",), log=tmp_path / "b.log"))
    r.add(Task("c", "k", _py("pass"), deps=("b",), log=tmp_path / "c.log"))
    r.add(Task("d", "k", fn=lambda: seen.append("d"), deps=("a", "resumed")))
    r.run()
    states = {k: t.state for k, t in r.tasks.items()}
    assert states == {"resumed": "ok", "a": "ok", "b": "failed", "c": "skipped", "d": "ok"}
    assert seen == ["resumed", "a", "d"]  # the existing output counts as done without running the failing command
    assert "exit 1" in r.tasks["b"].reason and "needs b" in r.tasks["c"].reason
    assert [c["key"] for c in r.commands] == ["a", "b"]


def test_runner_priority_slots_and_gpu_memory(tmp_path):
    r, _ = _runner(tmp_path, slots=2, gpu_gb=10.0)
    order = tmp_path / "order"
    for key, prio, gb in (("low", (1,), 1.0), ("big", (0,), 9.0), ("high", (0,), 1.0), ("small", (0,), 0.5)):
        r.add(Task(key, "k", _py(f"open({str(order)!r}, 'a').write({key!r} + '\\n')"), priority=prio, gpu_gb=gb,
                   log=tmp_path / f"{key}.log"))
    r.run()
    first_two = order.read_text().split()[:2]
    # "big" (9 GB) starts first; "high" (1 GB) fits beside it; "small" and "low" wait for a slot
    assert set(first_two) == {"big", "high"}
    assert all(t.state == "ok" for t in r.tasks.values())


def test_runner_deadline_stops_and_refuses_what_cannot_end_in_time(tmp_path):
    r, _ = _runner(tmp_path, deadline_s=6.0)
    r.add(Task("long", "k", _py("import time; time.sleep(60)"), est_s=1.0, log=tmp_path / "l.log"))
    r.add(Task("late", "k2", _py("pass"), est_s=500.0, log=tmp_path / "x.log"))
    t0 = time.monotonic()
    r.run()
    assert time.monotonic() - t0 < 30
    assert r.tasks["long"].state == "stopped" and r.tasks["late"].state == "not started"


def test_runner_retries_once_after_running_out_of_gpu_memory(tmp_path):
    r, lines = _runner(tmp_path, gpu_gb=100.0)
    flag = tmp_path / "tried"
    code = (f"import pathlib, sys; p = pathlib.Path({str(flag)!r})\n"
            "if not p.exists():\n    p.write_text('1'); print('torch.OutOfMemoryError: CUDA out of memory'); sys.exit(1)")
    r.add(Task("t", "k", _py(code), gpu_gb=3.0, log=tmp_path / "t.log"))
    r.run()
    assert r.tasks["t"].state == "ok" and r.tasks["t"].gpu_gb == 6.0 and any("[retry]" in x for x in lines)


# ---- claims ------------------------------------------------------------------------------------------------------
S = StudySettings(models=(("m", "m"),), budgets=(2.75,), near_budget=2.75)


def _arm(kind, objective, budget, ppl, kl=None, predicted=None, seeds=None):
    seeds = seeds or [ppl]
    return {"id": f"{kind}{objective}{budget}", "kind": kind, "objective": objective, "budget": budget,
            "budgets": [budget], "kl": kl, "ppl_after_mean": ppl, "ppl_after_std": 0.0, "ppl_after_seeds": seeds,
            "predicted": predicted or {}, "same_as": None}


def _model(arms, uniform=None):
    return {"arms": {a["id"]: a for a in arms}, "uniform": uniform or {}, "budgets": [2.75, 4.73],
            "budget_bits": {"2.75": 275, "4.73": 473}, "qlora_bits": 4.73}


def test_claims_a_to_d_exact_verdicts():
    arms = [_arm("qlora", None, 4.73, 10.0),
            _arm("plan", "output", 2.75, 10.4, kl=0.10), _arm("plan", "output", 4.73, 9.0, kl=0.02),
            _arm("plan", "fisher", 2.75, 10.6, kl=0.12), _arm("plan", "fisher", 4.73, 9.5, kl=0.03),
            _arm("plan", "data-free", 2.75, 11.0, kl=0.20), _arm("plan", "data-free", 4.73, 9.4, kl=0.01)]
    uniform = {"u2": {"label": "u2", "bits": 270, "kl": 0.15}, "u4": {"label": "u4", "bits": 470, "kl": 0.025}}
    m = _model(arms, uniform)
    a = claim_a(m, S)
    assert a["by_objective"] == {"data-free": "FAIL", "fisher": "FAIL", "output": "PASS"} and a["status"] == "PASS"
    b = claim_b(m, S)
    assert b["by_objective"] == {"data-free": "PASS", "fisher": "PASS", "output": "PASS"}
    c = claim_c(m, S)  # 10.4 / 10 = 1.04 <= 1.05; 10.6 and 11.0 are beyond
    assert c["by_objective"] == {"data-free": "FAIL", "fisher": "FAIL", "output": "PASS"}
    d = claim_d(m, S)  # at 4.73 fisher 9.5 > data-free 9.4
    assert d["status"] == "FAIL" and "ORDER BROKEN" in d["detail"][1] and "ORDER BROKEN" not in d["detail"][0]


def test_claims_not_measured_and_incomplete():
    m = _model([_arm("plan", "output", 2.75, 10.0, kl=0.1), _arm("plan", "fisher", 2.75, 10.1),
                _arm("plan", "data-free", 2.75, 10.2)], {"u": {"label": "u", "bits": 200, "kl": 0.5}})
    assert claim_a(m, S)["status"] == "INCOMPLETE"  # 2.75 compared, QLoRA's bits has no plan
    assert claim_b(m, S)["status"] == "NOT MEASURED"
    assert claim_d(m, S)["status"] == "INCOMPLETE"


def test_spearman_and_claim_e():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
    arms = [_arm("plan", "output", 2.75 + i, 10.0 + i, predicted={"output": float(i), "fisher": float(-i)})
            for i in range(4)]
    e = claim_e(_model(arms), StudySettings(models=(("m", "m"),), objectives=("fisher", "output")))
    assert e["rho_ppl"] == {"fisher": pytest.approx(-1.0), "output": pytest.approx(1.0)} and e["status"] == "PASS"


def test_the_commands_carry_each_objective_and_only_the_flags_evaluate_offers(tmp_path):
    from planner.study import calls

    s = StudySettings(models=(("m", "m"),), calib_tokens=512)
    caps = {"objectives": ["data-free", "fisher", "output"], "evaluate_plan": True, "evaluate_flags": ["--out"]}
    argv = calls.plan_argv("M", "output", 2.75, s, caps, tmp_path / "o", tmp_path / "c")
    assert argv[3:7] == ["plan", "--budget", "2.75bits", "--model"]
    assert " --objective output --calib pydoc --calib-tokens 512 " in " ".join(argv) + " "
    assert "--calib" not in calls.plan_argv("M", "data-free", 3, s, caps, tmp_path, tmp_path)
    old = {**caps, "objectives": None}  # an lqplan without --objective: Fisher is --calib, data-free is plain
    assert "--objective" not in calls.plan_argv("M", "fisher", 3, s, old, tmp_path, tmp_path)
    assert calls.supported_objectives(old) == {"data-free", "fisher"}
    ev = calls.evaluate_argv(tmp_path / "p.json", s, caps, tmp_path / "kl", tmp_path / "c")
    assert ev[3:] == ["evaluate", "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "kl"), "--device",
                      "auto"]
    (tmp_path / "kl").mkdir()
    (tmp_path / "kl" / "evaluate.json").write_text(json.dumps(
        {"kl": 0.25, "perplexity": {"quantized": 20.0, "full_precision": 17.0}, "tokens": {"scored": 4095}}))
    assert calls.read_evaluate(tmp_path / "kl") == {"kl": 0.25, "ppl": 20.0, "fp_ppl": 17.0, "tokens": 4095,
                                                    "top1_agreement": None, "tokenizer": None}


# ---- staging -----------------------------------------------------------------------------------------------------
def test_pieces_put_and_extract_round_trip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    blobs = {"dep.whl": b"d" * 5, "m-meta.tar.xz": b"meta" * 3, "m.whl": bytes(range(23)), "n.whl": b"n" * 9}
    owner = {"dep.whl": None, "m-meta.tar.xz": "m", "m.whl": "m", "n.whl": "n"}
    for k, v in blobs.items():
        (src / k).write_bytes(v)
    files = [{"name": k, "size": len(v), "kind": "wheel", "model": owner[k]} for k, v in blobs.items()]
    st = tmp_path / "stage"
    st.mkdir()
    man = {"schema": stage.SCHEMA, "models": {"m": {}, "n": {}},
           **stage.lay_out([src / k for k in blobs], files, st, 7)}
    (st / stage.MANIFEST).write_text(json.dumps(man))
    assert [p["size"] for p in man["pieces"]] == [7, 7, 7, 7, 7, 7, 7] and man["total"] == 49
    need_m = stage.pieces_for(man, ["m"])
    assert [p["name"] for p in need_m] == [f"piece-0{i}" for i in range(1, 7)]  # m ends at byte 40, in piece 6
    root = tmp_path / "device"
    for p in need_m:
        status = install.put(st / p["name"], st / stage.MANIFEST, root)
    assert "6 of 7 pieces" in status and "ready: m" in status and "missing piece-07" in status
    got = install.extract(man, root, ["m"], tmp_path / "files")
    assert {k: v.read_bytes() for k, v in got.items()} == {k: blobs[k] for k in ("dep.whl", "m-meta.tar.xz", "m.whl")}
    with pytest.raises(stage.StageError, match="pieces piece-07 are not"):
        install.extract(man, root, ["n"], tmp_path / "files")
    calls = stage.run_calls(man, ["m", "n"], "--steps 50")
    assert [c["piece"] for c in calls] == [f"piece-0{i}" for i in range(1, 7)] + ["piece-07", None]
    assert "install --models m &&" in calls[5]["command"] and "--model m=" in calls[5]["command"]
    assert "--model n=" not in calls[5]["command"] and "install --models n &&" in calls[6]["command"]
    assert all("--work /var/tmp/lqstudy --steps 50 --out $OUT --deadline-at $T" in c["command"] for c in calls[5:])
    (st / "piece-02").write_bytes(b"xxxxxxx")
    with pytest.raises(stage.StageError, match="sha256"):
        install.put(st / "piece-02", st / stage.MANIFEST, root)


def test_assemble_requires_every_byte_of_the_cpu_assembly(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "model.safetensors").write_bytes(b"weights")
    (here / "config.json").write_text("{}")
    (here / "tokenizer.json").write_text('{"right": true}')
    meta = tmp_path / "m-meta.tar.xz"
    meta.write_bytes(stage.meta_archive(here))
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "a.gguf").write_bytes(b"gguf-bytes")
    record = {"files": stage.model_files(here), "gguf": ["pkg/a.gguf"], "architecture": "LlamaForCausalLM",
              "gguf_sha256": stage.hashlib.sha256(b"gguf-bytes").hexdigest()}

    def fake_convert(weights: bytes):
        def convert(gguf, out, architecture):
            assert gguf.read_bytes() == b"gguf-bytes" and architecture == "LlamaForCausalLM"
            out.mkdir(parents=True)
            (out / "model.safetensors").write_bytes(weights)
            (out / "config.json").write_text('{"the device": "its own"}')
        return convert

    monkeypatch.setattr(packaged, "convert_weights", fake_convert(b"weights"))
    folder = install.assemble("m", record, meta, site, tmp_path / "models", log=lambda m: None)
    assert stage.model_files(folder) == record["files"]
    monkeypatch.setattr(packaged, "convert_weights", fake_convert(b"other weights"))
    with pytest.raises(stage.StageError, match="model.safetensors"):
        install.assemble("m2", record, meta, site, tmp_path / "models", log=lambda m: None)


def test_known_answer_names_a_tokenizer_that_splits_the_text_differently(tmp_path, minilm_path):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path)
    ok = known_answer("tiny", tmp_path)
    assert ok["status"] == "no known answer" and ok["digest"].startswith("sha256:")
    bad = known_answer("smollm2-135m", tmp_path)  # a BERT WordPiece tokenizer is not SmolLM2's BPE
    assert bad["status"] == "fail" and "instead of the 9" in bad["problem"] and bad["expected_tokens"] == 9


# ---- arms --------------------------------------------------------------------------------------------------------
def test_uniform_and_qlora_plans_cost_what_the_grid_says(tmp_path):
    from planner.model.discover import discover_matrices, planned_params
    from planner.model.resolve import resolve_model
    from planner.study.arms import budget_bits, qlora_bits, qlora_point, uniform_plan, uniform_points

    source = resolve_model(None)
    matrices = discover_matrices(source)
    s = StudySettings(models=(("m", "m"),), bits="2,4", blocks="64", ranks="8", qlora_rank=8)
    points = uniform_points(s, matrices, budget_bits(source, matrices, 3.0))
    assert [p.label for p in points] == ["nf2-b64-dq8/256-r8"]  # NF4 with an adapter costs more than 3 bits
    names = [m.name for m in matrices]
    rows = []
    for p in (points[0], qlora_point(8)):
        for m in matrices:
            rows.append({"matrix": m.name, "m": m.shape[0], "n": m.shape[1], "label": p.label, **p.config.to_dict(),
                         "rank": p.rank, "error": 2.0, "error_unweighted": 2.0, "quant_error": 5.0,
                         "storage_bits": p.bits(m.shape), "method": "lora"})
    import pandas as pd

    table = pd.DataFrame(rows)
    plan = uniform_plan(source, matrices, table, points[0], {"iters": 5, "solver": "x"})
    assert {e.point.label for e in plan.matrices} == {points[0].label} and [e.name for e in plan.matrices] == names
    assert plan.totals["error"] == pytest.approx(2.0 * len(names)) and plan.method["iters"] == 5
    q = uniform_plan(source, matrices, table, qlora_point(8), {"iters": 5, "solver": "x"}, zero_init=True)
    assert q.method["iters"] == 0 and q.totals["error"] == pytest.approx(5.0 * len(names))
    assert q.totals["bits_per_param"] <= qlora_bits(matrices, 8) < q.totals["bits_per_param"] + 1e-4
    assert plan.totals["bits"] == sum(points[0].bits(m.shape) for m in matrices)
    assert plan.totals["params"] == planned_params(matrices)


# ---- the whole study, every process run in this one (the real plan/train CLI, a stand-in for evaluate) ---------
class _Done:
    def __init__(self, rc: int):
        self.rc, self.pid = rc, -1

    def poll(self):
        return self.rc


class _InProcess(Runner):
    """Runs each `python -m planner VERB ...` through planner.cli.main in this process (the real CLI)."""

    def _launch(self, task):
        if task.argv is None:
            return super()._launch(task)
        from planner.cli import main

        task._t0, task.state = time.monotonic(), "running"
        task._proc = _Done(main(task.argv[3:]))
        self.commands.append({"key": task.key, "argv": task.argv})


@pytest.mark.slow
def test_the_study_end_to_end_on_a_tiny_decoder(tmp_path, monkeypatch, minilm_path):
    from conftest import seeded_tiny_llama
    from transformers import AutoTokenizer

    from planner.study import run as study_run
    from planner.study.settings import tiny_settings

    folder = tmp_path / "tiny"
    seeded_tiny_llama(30522, max_position_embeddings=256).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path, bos_token="[CLS]").save_pretrained(folder)
    caps = {"objectives": ["data-free", "fisher", "output"], "evaluate_plan": True,
            "evaluate_flags": ["--cache", "--eval-tokens", "--out", "--quiet"], "tie": True}
    monkeypatch.setattr(study_run.calls, "capabilities", lambda env=None: caps)
    monkeypatch.setattr(study_run, "Runner", _InProcess)
    s = tiny_settings((("tiny", str(folder)),), budgets=(4.5,), near_budget=5.0, objectives=("data-free",),
                      headline="data-free", steps=1, key_seeds=1, slots=1)
    r = study_run.run_study(s, tmp_path / "work", tmp_path / "out", command="test")
    assert {t["state"] for t in r["tasks"].values()} == {"ok"}
    m = r["models"][0]
    kinds = sorted((a["kind"], a["objective"] or "", a["budget"]) for a in m["arms"].values())
    assert kinds == [("loftq", "", 4.5), ("loftq", "", m["qlora_bits"]), ("plan", "data-free", 4.5),
                     ("plan", "data-free", m["qlora_bits"]), ("qlora", "", m["qlora_bits"])]
    q = next(a for a in m["arms"].values() if a["kind"] == "qlora")
    loftq4 = next(a for a in m["arms"].values() if a["kind"] == "loftq" and a["config"] == q["config"])
    assert len(q["runs"]) == 1 and q["init"] == "qlora" and q["kl"] > loftq4["kl"] > 0  # same codes, LoftQ's adapters
    assert [u["label"] for u in m["uniform"].values()] == ["nf2-b64-dq8/256-r4", "nf4-b64-dq8/256-r4"]
    assert all(u["kl"] is not None for u in m["uniform"].values())
    assert [c["id"] for c in m["claims"]] == list("abcde") and m["claims"][0]["status"] != "NOT MEASURED"
    assert m["fp_ppl"] > 1 and all(a["status"] == "ok" for a in m["arms"].values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "kl_vs_bits.png", "ppl_vs_bits.png", "results.json", "runs.tar.gz", "study.log", "study.md"]
    assert "| 4.5 | lqplan (data-free) |" in (tmp_path / "out" / "study.md").read_text()
    again = study_run.run_study(s, tmp_path / "work", tmp_path / "out2", command="test")  # resumes: nothing runs
    assert again["commands"] == []
    assert [(c["status"], c["detail"]) for c in again["models"][0]["claims"]] == \
        [(c["status"], c["detail"]) for c in m["claims"]]
