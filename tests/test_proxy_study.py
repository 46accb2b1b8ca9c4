"""planner.study.proxy's summary: Spearman per objective over distinct plans, the misranked pairs, KL at equal
bits against the uniform configurations that fit (synthetic rows; the study itself runs real decoders)."""

import pytest

from planner.study.proxy import render, summarize


def row(id_, obj, predicted, kl, bits, kind="plan", budget=None, same_as=None):
    return {"id": id_, "objective": obj, "predicted": predicted, "kl": kl, "bits_per_param": bits, "kind": kind,
            "budget": budget, "same_as": same_as, "ppl": 20.0, "fp_ppl": 17.0, "top1_agreement": 0.9}


def test_summary_ranks_counts_and_compares_at_equal_bits():
    rows = [row("a@3", "a", 3.0, 0.30, 3.0, budget=3.0), row("a@4", "a", 1.0, 0.10, 4.0, budget=4.0),
            row("a@4b", "a", 1.0, 0.10, 4.0, budget=4.5, same_as="a@4"),
            row("u:a:2", "a", 5.0, 0.20, 2.9, kind="uniform"), row("u:a:3", "a", 2.0, 0.50, 3.9, kind="uniform"),
            row("b@3", "b", 1.0, 0.40, 3.0, budget=3.0), row("u:b:2", "b", 2.0, 0.15, 2.9, kind="uniform"),
            row("u:b:3", "b", 3.0, 0.10, 3.9, kind="uniform")]
    out = summarize(rows, ("a", "b"), (3.0, 4.0, 4.5))
    assert out["points_per_objective"] == {"a": 4, "b": 3}  # the same plan at another budget counts once
    # a: predicted 3,1,5,2 against KL .3,.1,.2,.5 -> ranks (3,1,4,2) vs (3,1,2,4): rho = 1 - 6*8/60 = 0.2;
    # b: predicted 1,2,3 against KL .4,.15,.1 -> -1
    assert out["spearman"]["a"] == pytest.approx(0.2)
    assert out["spearman"]["b"] == pytest.approx(-1.0) and out["best_objective"] == "a"
    assert sorted(map(tuple, out["misranked"]["a"])) == [("a@3", "u:a:2"), ("a@3", "u:a:3"), ("u:a:2", "u:a:3")]
    at3, at4, at45 = out["equal_bits"]
    assert at3["best_uniform"] == "u:b:2" and at3["uniform_fitting"] == 2 and at3["plans"]["a"]["kl"] == 0.30
    assert at4["best_uniform"] == "u:b:3" and at4["uniform_fitting"] == 4
    assert at45["plans"] == {"a": {"kl": 0.10, "bits_per_param": 4.0}}  # a duplicate plan still reports its KL


def test_render_names_every_objective_and_the_misranked_pairs():
    rows = [row("a@3", "a", 3.0, 0.30, 3.0, budget=3.0), row("u:a:2", "a", 5.0, 0.20, 2.9, kind="uniform"),
            row("u:a:3", "a", 2.0, 0.50, 3.9, kind="uniform")]
    result = {"model": "m", "command": "c", "machine": "x", "versions": {}, "fingerprint": "f",
              "tokenizer": {"digest": "d", "status": "pass"}, "planned_params": 10,
              "settings": {"bits": "2,3", "blocks": "64", "ranks": "8", "iters": 5, "kl_tokens": 2048, "stride": 512},
              "seconds": 1, **summarize(rows, ("a",), (3.0,)),
              "rows": rows}
    text = render(result)
    assert "| a | 3 | -1.000 |" in text and "a@3 vs u:a:2" in text and "| 3.0 | 0.300 (3.000) | u:a:2 | 0.200 | 1 |" in text
