"""`expect:`: checking a hand calculation, cell by cell (attntrace check, run).

True values are worked out here by hand or with math.exp / math.sqrt, never
copied from attntrace's output.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import CONFIGS

import attntrace
from attntrace.analysis.expect import cells_close, check_expectations
from attntrace.errors import InputError, ShapeError

# seed 002: Q rows A [1, 5], B [9, 13], C [17, 21]; K rows A [5, 1], B [13, 9], C [21, 17]
# B·C = 9·21 + 13·17 = 189 + 221 = 410 (the article prints 400)
TRUE_BC = 9 * 21 + 13 * 17
SEED002 = """
version: 1
tokens: [A, B, C]
embeddings: [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
attention:
  heads: 1
  W_q: [[1, 0], [1, 0], [0, 1], [0, 1]]
  W_k: [[0, 1], [0, 1], [1, 0], [1, 0]]
  W_v: [[1, 0], [0, 1], [1, 0], [0, 1]]
"""

# seed 003: the 机票 row
TICKET_SCORES = [1.1, 1.4, 1.6, 1.9, 1.1, 2.8, 1.5, 2.2, 0.5, 2.0]
ARTICLE_WEIGHTS = [0.05, 0.08, 0.10, 0.15, 0.05, 0.25, 0.10, 0.18, 0.02, 0.12]
TICKET_TOKENS = ["我", "请", "李雷", "帮", "我", "订了", "去", "北京", "的", "机票"]


def true_softmax(row):
    exps = [math.exp(x) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


# --------------------------------------------------------------------------- the seed configs

def test_seed002_article_fails_and_names_the_first_divergence(invoke):
    code, out = invoke("check", CONFIGS / "expect_seed002_article.yaml", "--width", "200")
    assert code == 1
    assert "ATT-E067" in out
    assert "first diverges at step 5/11 'scores = Q·Kᵀ'" in out
    assert "cell [B, C]" in out and f"written 400, true {TRUE_BC}" in out
    assert "400 ≠ 410" in out
    # 282.84 = 400 / 1.414 only carries the slip forward: reported as such
    assert "2 carried over from scores" in out
    assert "expect_seed002_article.yaml:27" in out      # the line holding [58, 234, 400]


def test_seed002_article_report_values():
    spec = attntrace.load_spec(CONFIGS / "expect_seed002_article.yaml")
    report = check_expectations(spec)
    assert not report.ok
    by_name = {c.name: c for c in report.comparisons}
    assert [m.label for m in by_name["scores"].mismatches] == ["[B, C]", "[C, B]"]
    assert all(m.carried_from is None for m in by_name["scores"].mismatches)
    scaled = by_name["scaled"].mismatches
    assert [m.label for m in scaled] == ["[B, C]", "[C, B]"]
    assert scaled[0].true == pytest.approx(TRUE_BC / math.sqrt(2))         # 289.91
    assert scaled[0].written == 282.84
    assert all(m.carried_from == "scores" for m in scaled)
    for name in ("Q", "K", "V", "weights", "output"):
        assert by_name[name].ok, name


def test_seed002_corrected_passes(invoke):
    code, out = invoke("check", CONFIGS / "expect_seed002_corrected.yaml")
    assert code == 0, out
    assert "the hand calculation matches: 7 expectation(s), 51 cell(s)" in out


def test_seed003_article_weights_fail_cell_by_cell(invoke):
    code, out = invoke("check", CONFIGS / "expect_seed003_ticket_row.yaml", "--format", "json")
    assert code == 1
    doc = json.loads(out)
    truth = true_softmax(TICKET_SCORES)
    # the article's weights do not even sum to 1
    assert sum(ARTICLE_WEIGHTS) == pytest.approx(1.10)
    scores, weights = doc["expectations"]
    assert scores["name"] == "scores" and scores["ok"]
    np.testing.assert_allclose(weights["true"], truth, rtol=1e-12)
    # 2 decimals: a written value w matches when |w - true| <= 0.005
    wrong = [j for j in range(10) if abs(ARTICLE_WEIGHTS[j] - truth[j]) > 0.005]
    assert [m["index"][-1] for m in weights["mismatches"]] == wrong
    assert [m["cell"] for m in weights["mismatches"]] == [f"[机票, {TICKET_TOKENS[j]}]" for j in wrong]
    first = doc["first_divergence"]
    assert first["hook"] == "attn.hook_pattern" and first["cell"] == f"[机票, {TICKET_TOKENS[wrong[0]]}]"
    assert any("sums to 1.1, not 1" in line for line in doc["diagnoses"][0]["details"])


def test_seed003_rich_output_names_cells(invoke):
    code, out = invoke("check", CONFIGS / "expect_seed003_ticket_row.yaml", "--width", "200")
    assert code == 1
    assert "cell [机票, 请]" in out and f"written 0.08, true {true_softmax(TICKET_SCORES)[1]:.6g}" in out
    assert "7 of 10 cell(s) differ" in out


def test_seed003_true_weights_pass(write_spec, invoke):
    text = (CONFIGS / "expect_seed003_ticket_row.yaml").read_text(encoding="utf-8")
    rounded = ", ".join(f"{w:.2f}" for w in true_softmax(TICKET_SCORES))
    start = text.index("  weights: {row: 机票")
    end = text.index("\n", start)
    fixed = text[:start] + f"  weights: {{row: 机票, values: [{rounded}]}}" + text[end:]
    code, out = invoke("check", write_spec(fixed))
    assert code == 0, out


# --------------------------------------------------------------------------- run also checks

def test_run_checks_expect_and_exits_1(invoke):
    code, out = invoke("run", CONFIGS / "expect_seed002_article.yaml", "--steps", "scores")
    assert code == 1
    assert "Hand calculation vs attention" in out and "400 ≠ 410" in out


def test_run_json_carries_the_expectations(invoke):
    code, out = invoke("run", CONFIGS / "expect_seed002_corrected.yaml", "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["expect"]["ok"] is True and doc["exit_code"] == 0


def test_check_without_expect_is_bad_input(invoke):
    code, out = invoke("check", CONFIGS / "seed002_abc.yaml")
    assert code == 2
    assert "ATT-E066" in out and "no `expect:`" in out


# --------------------------------------------------------------------------- partial forms

def check_text(write_spec, expect_yaml):
    return check_expectations(attntrace.load_spec(write_spec(SEED002 + expect_yaml)))


def test_one_row_by_token_and_by_index(write_spec):
    # row B of Q·Kᵀ: [58, 234, 410]
    report = check_text(write_spec, "expect:\n  scores: {row: B, values: [58, 234, 410]}\n")
    assert report.ok
    report = check_text(write_spec, "expect:\n  scores: {row: 1, values: [58, 234, 400]}\n")
    assert [m.label for m in report.comparisons[0].mismatches] == ["[B, C]"]


def test_one_cell_and_one_column(write_spec):
    # output row C: weights put (almost) everything on C, so out ≈ V_C = [18, 20]
    report = check_text(write_spec, "expect:\n  output: {cell: [C, 1], value: 20}\n  decimals: 6\n")
    assert report.ok
    report = check_text(write_spec, "expect:\n  scores: {col: A, values: [10, 58, 106]}\n")
    assert report.ok
    report = check_text(write_spec, "expect:\n  scores: {cell: [2, 2], value: 700}\n")
    (mismatch,) = report.comparisons[0].mismatches
    assert (mismatch.label, mismatch.written, mismatch.true) == ("[C, C]", 700.0, 17 * 21 + 21 * 17)


def test_list_of_partials_and_own_tolerance(write_spec):
    report = check_text(write_spec, """expect:
  scaled:
    - {cell: [A, A], value: 7.07, decimals: 2}       # 10/√2 = 7.0711
    - {cell: [B, C], value: 289.9, atol: 0.05}       # 410/√2 = 289.9138
  atol: 0
""")
    assert report.ok
    assert [c.tolerance.get("decimals") for c in report.comparisons] == [2, None]


def test_head_selector_on_two_heads(write_spec):
    spec = """
version: 1
tokens: [x, y]
embeddings: [[1, 0], [0, 1]]
attention:
  heads: 2
  W_q: [[1, 0], [0, 1]]
  W_k: [[1, 0], [0, 1]]
  W_v: [[1, 0], [0, 1]]
  scale: none
expect:
  scores: {head: 1, values: [[0, 0], [0, 1]]}
"""
    # head 1 sees only the second coordinate: q·k = x1·y1 -> [[0, 0], [0, 1]]
    assert check_expectations(attntrace.load_spec(write_spec(spec))).ok


def test_decimals_and_rtol_semantics():
    assert cells_close(np.array([0.05]), np.array([0.045]), {"atol": 0.005, "decimals": 2}).all()
    assert not cells_close(np.array([0.05]), np.array([0.0449]), {"atol": 0.005, "decimals": 2}).any()
    # rtol is relative to the true value: 282.84 vs 289.91 is 2.4% off
    assert not cells_close(np.array([282.84]), np.array([289.91]), {"atol": 0.0, "rtol": 0.01}).any()
    assert cells_close(np.array([282.84]), np.array([289.91]), {"atol": 0.0, "rtol": 0.03}).all()
    assert cells_close(np.array([-np.inf]), np.array([-np.inf]), {"atol": 0.0}).all()
    assert not cells_close(np.array([5.0]), np.array([np.inf]), {"atol": 0.0, "rtol": 1.0}).any()


def test_masked_scores_with_minus_infinity(write_spec):
    # causal: row A sees only A; scaled A·A = 10/√2
    a_a = 10 / math.sqrt(2)
    report = check_text(write_spec,
                        f'  mask: causal\nexpect:\n  masked: {{row: A, values: [{a_a:.4f}, -inf, -.inf]}}\n'
                        "  decimals: 4\n")
    assert report.ok


# --------------------------------------------------------------------------- bad expectations

@pytest.mark.parametrize("expect_yaml, code, words", [
    ("  scores: {row: Z, values: [1, 2, 3]}\n", "ATT-E066", "no row 'Z'"),
    ("  scores: {row: 7, values: [1, 2, 3]}\n", "ATT-E066", "out of range"),
    ("  scores: {row: 0}\n", "ATT-E066", "needs `values:`"),
    ("  scores: {rows: 0, values: [1, 2, 3]}\n", "ATT-E002", "unknown key 'rows'"),
    ("  scores: {head: 0, cell: [0, 0, 0], value: 1}\n", "ATT-E066", "cell is [row, column]"),
    ("  output: {head: 0, values: [[1, 2]]}\n", "ATT-E066", "has no head axis"),
    ("  scores: [[1, .nan, 2]]\n", "ATT-E066", "NaN"),
    ("  scorez: [[1]]\n", "ATT-E015", "did you mean"),
])
def test_malformed_expectations_exit_2(write_spec, invoke, expect_yaml, code, words):
    path = write_spec(SEED002 + "expect:\n" + expect_yaml)
    status, out = invoke("check", path, "--format", "json")
    assert status == 2, out
    (d,) = json.loads(out)["diagnoses"]
    assert d["code"] == code and words in d["message"] + " " + str(d["hint"])
    assert d["locations"][0]["line"] >= 10          # points into the expect: block
    status, out = invoke("check", path)
    assert status == 2 and code in out


def test_wrong_shape_is_a_shape_error(write_spec, invoke):
    path = write_spec(SEED002 + "expect:\n  scores: [[10, 58], [58, 234]]\n")
    with pytest.raises(ShapeError) as caught:
        check_expectations(attntrace.load_spec(path))
    assert caught.value.diagnosis.code == "ATT-E160"
    status, out = invoke("check", path, "--format", "json")
    assert status == 3
    message = json.loads(out)["diagnoses"][0]["message"]
    assert "shape (2, 2)" in message and "(seq_q=3, seq_k=3)" in message


def test_ambiguous_token_asks_for_an_index(write_spec):
    spec = attntrace.load_spec(CONFIGS / "expect_seed003_ticket_row.yaml").document.data
    spec = dict(spec, expect={"weights": {"row": "我", "values": [0.1] * 10}})
    with pytest.raises(InputError) as caught:
        check_expectations(attntrace.load_spec(spec))
    assert "appears at positions 0, 4" in caught.value.diagnosis.message


def test_all_shows_matching_tables_too(invoke):
    _, quiet = invoke("check", CONFIGS / "expect_seed002_corrected.yaml")
    code, loud = invoke("check", CONFIGS / "expect_seed002_corrected.yaml", "--all")
    assert code == 0
    # Q's rows [1, 5], [9, 13], [17, 21] appear only with --all
    assert "17" in loud.split("✓ K")[0] and "17" not in quiet.split("✓ K")[0]
