"""Acceptance criteria and the recommendation, on crafted numbers."""

import pytest

from mpq.acceptance import Criteria, failures, quality_drop, recommend

BASE_LM = {"ppl": 20.0, "loss": 20.0}
BASE_ENC = {"mean_cosine": 1.0, "loss": 0.0}


def lm(ppl, speedup=None):
    return {"ppl": ppl, "loss": ppl, **({} if speedup is None else {"speedup": speedup})}


def row(name, nbytes, ppl, speedup=None):
    return {"name": name, "bytes": nbytes, "metrics": lm(ppl, speedup)}


def judged(rows, criteria):
    for r in rows:
        r["accepted"] = not failures(r["bytes"], r["metrics"], BASE_LM, criteria)
    return rows


def test_quality_drop_is_a_perplexity_ratio_for_lms_and_a_cosine_drop_for_encoders():
    assert quality_drop(lm(20.2), BASE_LM) == pytest.approx(0.01)
    assert quality_drop({"mean_cosine": 0.97}, BASE_ENC) == pytest.approx(0.03)


def test_each_criterion_fails_on_its_own_and_says_why():
    c = Criteria(max_quality_drop=0.01, min_speedup=1.2, max_bytes=1000)
    assert failures(1000, lm(20.19, speedup=1.2), BASE_LM, c) == []  # limits are inclusive
    assert failures(1000, lm(20.3, speedup=1.3), BASE_LM, c) == ["perplexity ratio 1.0150 > 1.0100"]
    assert failures(1000, lm(20.0, speedup=1.1), BASE_LM, c) == ["speedup 1.10x < 1.20x"]
    assert failures(1001, lm(20.0, speedup=1.3), BASE_LM, c) == ["1001 bytes > 1000"]
    assert failures(500, lm(20.0), BASE_LM, c) == ["speedup not measured"]
    assert failures(500, {"mean_cosine": 0.95}, BASE_ENC, Criteria(max_quality_drop=0.02)) == ["cosine drop 0.0500 > 0.0200"]
    assert failures(10 ** 12, lm(1e9), BASE_LM, Criteria()) == []  # nothing asked, nothing fails


def test_the_perplexity_targeted_decides():
    """With --eval-data code, `loss` is the code perplexity: a text-only regression passes."""
    code_target = {"ppl": 20.0, "ppl_text": 25.0, "ppl_code": 15.0, "loss": 15.0}
    worse_text = {"ppl": 21.0, "ppl_text": 27.0, "ppl_code": 15.1, "loss": 15.1}
    assert failures(1, worse_text, code_target, Criteria(max_quality_drop=0.01)) == []
    assert failures(1, {**worse_text, "loss": 15.3}, code_target, Criteria(max_quality_drop=0.01))


def test_recommendation_is_the_smallest_or_the_fastest_that_passes():
    rows = judged([row("a", 300, 21.0, 2.0), row("b", 500, 20.1, 1.5), row("c", 500, 20.05, 1.4),
                   row("d", 900, 20.0, 1.0)], Criteria(max_quality_drop=0.01))
    assert [r["accepted"] for r in rows] == [False, True, True, True]
    assert recommend(rows, Criteria(max_quality_drop=0.01))["name"] == "c"  # same bytes: the better quality
    assert recommend(rows, Criteria(max_quality_drop=0.01, prefer="fastest"))["name"] == "b"
    assert recommend(judged(rows, Criteria(max_quality_drop=0.001)), Criteria())["name"] == "d"
    assert recommend(judged(rows, Criteria(max_quality_drop=-0.5)), Criteria()) is None


def test_an_unknown_preference_is_refused():
    with pytest.raises(ValueError, match="smallest, fastest"):
        Criteria(prefer="cheapest")
