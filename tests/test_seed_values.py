"""The seeds' hand-computed examples, checked against numbers worked out independently here.

Every expected value below is derived by hand in the comments (or with math.exp /
math.sqrt in the test itself), never copied from attntrace's output.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import attntrace

# =========================================================================== seed 002
# /work/shared/seeds/002_67d3e51ceb4f0be7.txt: three 4-d words A, B, C, one head, d_k = 2.

X_002 = [[0, 1, 2, 3],      # A
         [4, 5, 6, 7],      # B
         [8, 9, 10, 11]]    # C
W_Q_002 = [[1, 0], [1, 0], [0, 1], [0, 1]]      # q = [x0 + x1, x2 + x3]
W_K_002 = [[0, 1], [0, 1], [1, 0], [1, 0]]      # k = [x2 + x3, x0 + x1]
W_V_002 = [[1, 0], [0, 1], [1, 0], [0, 1]]      # v = [x0 + x2, x1 + x3]

# Q: A [0+1, 2+3] = [1, 5]; B [4+5, 6+7] = [9, 13]; C [8+9, 10+11] = [17, 21]
Q_002 = [[1, 5], [9, 13], [17, 21]]
# K: A [2+3, 0+1] = [5, 1]; B [6+7, 4+5] = [13, 9]; C [10+11, 8+9] = [21, 17]
K_002 = [[5, 1], [13, 9], [21, 17]]
# V: A [0+2, 1+3] = [2, 4]; B [4+6, 5+7] = [10, 12]; C [8+10, 9+11] = [18, 20]
V_002 = [[2, 4], [10, 12], [18, 20]]
# Q·Kᵀ, entry (i, j) = q_i · k_j:
#   A·A = 1·5 + 5·1 = 10     A·B = 1·13 + 5·9 = 58      A·C = 1·21 + 5·17 = 106
#   B·A = 9·5 + 13·1 = 58    B·B = 9·13 + 13·9 = 234    B·C = 9·21 + 13·17 = 189 + 221 = 410
#   C·A = 17·5 + 21·1 = 106  C·B = 17·13 + 21·9 = 410   C·C = 17·21 + 21·17 = 714
# The article prints 400 for B·C and C·B (and 282.84 = 400/√2 after scaling): an
# arithmetic slip; 189 + 221 is 410.  The true value is asserted.
QK_002 = [[10, 58, 106], [58, 234, 410], [106, 410, 714]]
ARTICLE_QK_002 = [[10, 58, 106], [58, 234, 400], [106, 400, 714]]


def spec_002():
    return {"version": 1, "name": "seed002", "tokens": ["A", "B", "C"], "embeddings": X_002,
            "attention": {"heads": 1, "W_q": W_Q_002, "W_k": W_K_002, "W_v": W_V_002}}


@pytest.fixture(scope="module")
def trace_002():
    return attntrace.run(spec_002(), keep="all")


def test_002_projections(trace_002):
    np.testing.assert_array_equal(trace_002.hand_view("Q"), Q_002)
    np.testing.assert_array_equal(trace_002.hand_view("K"), K_002)
    np.testing.assert_array_equal(trace_002.hand_view("V"), V_002)
    # and the raw hook shapes keep batch and head axes
    assert trace_002["attn.hook_q"].shape == (1, 3, 1, 2)


def test_002_scores_true_value_410_not_article_400(trace_002):
    qk = trace_002.hand_view("attn.hook_qk")
    np.testing.assert_array_equal(qk, QK_002)
    assert qk[1, 2] == 410 and qk[2, 1] == 410
    assert not np.array_equal(qk, ARTICLE_QK_002)      # the article's 400 is wrong


def test_002_scaled_by_one_over_sqrt2(trace_002):
    scaled = trace_002.hand_view("attn.hook_scaled")
    by_hand = [[v / math.sqrt(2) for v in row] for row in QK_002]
    np.testing.assert_allclose(scaled, by_hand, rtol=1e-15)
    # the biggest score: 714/√2 = 504.87..., far beyond exp's float64 range (e^709.8)
    assert scaled.max() == pytest.approx(714 / math.sqrt(2), rel=1e-15)
    assert 504.87 < scaled.max() < 504.88
    assert scaled[1, 2] == pytest.approx(289.91, abs=0.005)      # 410/√2 (the article's 282.84 is 400/√2)
    assert np.isfinite(scaled).all()


def _softmax_by_hand(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def test_002_softmax_rows_are_almost_one_hot_on_C(trace_002):
    weights = trace_002.hand_view("weights")
    assert np.isfinite(weights).all() and not np.isnan(weights).any()
    by_hand = [_softmax_by_hand([v / math.sqrt(2) for v in row]) for row in QK_002]
    np.testing.assert_allclose(weights, by_hand, rtol=1e-12, atol=1e-300)
    # the article's rounding: every row ≈ [0, 0, 1]
    np.testing.assert_allclose(weights, [[0, 0, 1]] * 3, atol=1e-14)
    # row A, key B: e^{(58 - 106)/√2} = e^{-33.94} ≈ 1.8e-15, tiny but not zero
    assert weights[0, 1] == pytest.approx(math.exp(-48 / math.sqrt(2)) / (1 + math.exp(-48 / math.sqrt(2))
                                                                        + math.exp(-96 / math.sqrt(2))),
                                          rel=1e-12)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-15)


def test_002_output_is_V_of_C_for_every_row(trace_002):
    out = trace_002.hand_view("output")
    np.testing.assert_allclose(out, [[18, 20]] * 3, atol=1e-13)
    # exactly: out_i = Σ_j w_ij v_j with the hand weights
    for i, row in enumerate(QK_002):
        w = _softmax_by_hand([v / math.sqrt(2) for v in row])
        by_hand = [sum(w[j] * V_002[j][e] for j in range(3)) for e in range(2)]
        np.testing.assert_allclose(out[i], by_hand, rtol=1e-13)


def test_002_no_warnings(trace_002):
    assert trace_002.diagnoses == []


# =========================================================================== seed 000
# /work/shared/seeds/000_5ef47f78f964526e.txt: the query "powerful person" [1, 0, 0, 0]
# against king / queen / man, "key = first 2 dims, value = the full vector".

KING = [0.9, 0.1, 0.8, 0.2]
QUEEN = [0.9, 0.9, 0.7, 0.2]
MAN = [0.2, 0.1, 0.3, 0.9]
QUERY = [1.0, 0.0, 0.0, 0.0]
FIRST_TWO = [[1, 0], [0, 1], [0, 0], [0, 0]]          # x -> x[:2]


def spec_000(encoder_embeddings, W_qk=FIRST_TWO):
    return {"version": 1, "name": "seed000", "tokens": ["query"], "embeddings": [QUERY],
            "encoder": {"tokens": ["king", "queen", "man"], "embeddings": encoder_embeddings},
            "attention": {"heads": 1, "W_q": W_qk, "W_k": W_qk, "W_v": {"identity": 4}, "scale": "none"}}


# query[:2] = [1, 0]; keys: king [0.9, 0.1], queen [0.9, 0.9], man [0.2, 0.1]
# scores = 1·0.9 + 0·0.1 = 0.9,  1·0.9 + 0·0.9 = 0.9,  1·0.2 + 0·0.1 = 0.2
SCORES_000 = [0.9, 0.9, 0.2]


def _weights_000():
    e_king, e_queen, e_man = math.exp(0.9), math.exp(0.9), math.exp(0.2)
    total = e_king + e_queen + e_man
    return [e_king / total, e_queen / total, e_man / total]


@pytest.mark.parametrize("encoder_embeddings", [
    [KING, QUEEN, MAN],
    {"king": KING, "queen": QUEEN, "man": MAN},          # the seed's dict, looked up by token
], ids=["rows", "vocabulary"])
def test_000_king_queen_man(encoder_embeddings):
    trace = attntrace.run(spec_000(encoder_embeddings), keep="all")
    np.testing.assert_allclose(trace.hand_view("Q"), [[1.0, 0.0]], rtol=0, atol=0)
    np.testing.assert_allclose(trace.hand_view("K"), [[0.9, 0.1], [0.9, 0.9], [0.2, 0.1]], rtol=1e-15)
    np.testing.assert_allclose(trace.hand_view("V"), [KING, QUEEN, MAN], rtol=1e-15)   # value = full vector
    np.testing.assert_allclose(trace.hand_view("scores"), [SCORES_000], rtol=1e-15)
    # scale: none -> the scores go into softmax unchanged
    np.testing.assert_array_equal(trace.hand_view("scaled"), trace.hand_view("scores"))

    w = _weights_000()
    # e^0.9 ≈ 2.4596, e^0.2 ≈ 1.2214, sum ≈ 6.1406: weights ≈ 0.4005, 0.4005, 0.1989
    assert w == pytest.approx([0.4005, 0.4005, 0.1989], abs=1e-4)
    weights = trace.hand_view("weights")
    np.testing.assert_allclose(weights, [w], rtol=1e-14)
    assert weights[0, 0] == weights[0, 1]               # king and queen tie: same score
    assert weights[0, 0] > weights[0, 2]                # powerful entities win over "man"

    out = trace.hand_view("output")
    by_hand = [w[0] * KING[d] + w[1] * QUEEN[d] + w[2] * MAN[d] for d in range(4)]
    np.testing.assert_allclose(out, [by_hand], rtol=1e-14)
    assert trace.diagnoses == []


def test_000_without_key_value_separation():
    """The seed's first loop: score = query · full embedding (W_q = W_k = I₄): still 0.9, 0.9, 0.2."""
    trace = attntrace.run(spec_000([KING, QUEEN, MAN], W_qk={"identity": 4}), keep="all")
    # 1·0.9 + 0·0.1 + 0·0.8 + 0·0.2 = 0.9; queen 0.9; man 0.2
    np.testing.assert_allclose(trace.hand_view("scores"), [SCORES_000], rtol=1e-15)
    np.testing.assert_allclose(trace.hand_view("weights"), [_weights_000()], rtol=1e-14)
    assert trace.diagnoses == []
