"""Head scores on patterns whose scores are known by hand, and against plain float64 loops written here.

The loop reference follows the definitions one row at a time; its duplicate-token and induction
scores rebuild TransformerLens' detection patterns the way transformer_lens/head_detector.py does
(equality matrix, diagonal zeroed, lower-triangular; for induction rolled one key right with the
first column zeroed) on the unpadded tokens of each item, and score Σ A·D / Σ A.
"""
import math

import numpy as np
import pytest

from attntrace.analysis.heads import (
    SCORES,
    SEP_TOKENS,
    detection_patterns,
    head_scores,
    rank_heads,
    repeated_random_tokens,
    sparkline,
)
from attntrace.errors import InputError


def one_head(rows):
    """A (1 layer, 1 batch, 1 head, seq, seq) pattern from a (seq, seq) matrix."""
    return np.asarray(rows, dtype=float)[None, None, None]


def only(scores, name):
    return float(scores[name][0, 0])


# --------------------------------------------------------------------------- analytic patterns

def test_pure_previous_token_head():
    n = 6
    p = np.zeros((n, n))
    p[0, 0] = 1.0                                     # the first token has no previous token: it keeps itself
    p[np.arange(1, n), np.arange(n - 1)] = 1.0
    s = head_scores(one_head(p))
    assert only(s, "previous_token") == 1.0
    assert only(s, "distance") == pytest.approx((n - 1) / n)     # row 0 attends at distance 0
    assert only(s, "same_token") == pytest.approx(1 / n)
    assert only(s, "max_weight") == 1.0 and only(s, "entropy") == 0.0 and only(s, "entropy_norm") == 0.0
    assert only(s, "sink") == pytest.approx(2 / n)               # rows 0 and 1 land on token 0
    np.testing.assert_allclose(s.offset_profile[0, 0, s.max_offset - 1], (n - 1) / n)
    np.testing.assert_allclose(s.offset_profile[0, 0, s.max_offset], 1 / n)
    assert s.offset_profile[0, 0, s.max_offset + 1:].sum() == 0


def test_previous_token_head_on_a_decoding_step():
    """seq_q < seq_k: query i sits at key position i + seq_k − seq_q."""
    p = np.zeros((2, 6))
    p[0, 3] = p[1, 4] = 1.0                           # queries at positions 4 and 5
    s = head_scores(one_head(p))
    assert only(s, "previous_token") == 1.0 and only(s, "distance") == 1.0 and only(s, "same_token") == 0.0


def test_uniform_causal_head():
    n = 7
    p = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    s = head_scores(one_head(p))
    counts = np.arange(1, n + 1)
    assert only(s, "entropy") == pytest.approx(np.mean(np.log(counts)), abs=1e-14)
    assert only(s, "entropy_norm") == pytest.approx((n - 1) / n, abs=1e-14)   # 1 per row, 0 for the first
    assert only(s, "max_weight") == pytest.approx(np.mean(1 / counts), abs=1e-14)
    assert only(s, "same_token") == pytest.approx(np.mean(1 / counts), abs=1e-14)
    assert only(s, "previous_token") == pytest.approx(np.mean(1 / counts[1:]), abs=1e-14)
    assert only(s, "distance") == pytest.approx((n - 1) / 4, abs=1e-14)       # row i: mean of 0..i = i/2
    assert only(s, "sink") == pytest.approx(np.mean(1 / counts), abs=1e-14)


def test_uniform_bidirectional_head():
    n = 5
    s = head_scores(one_head(np.full((n, n), 1 / n)))
    assert only(s, "entropy") == pytest.approx(math.log(n), abs=1e-14)
    assert only(s, "entropy_norm") == pytest.approx(1.0, abs=1e-14)
    # mean |i − j| over a 5×5 grid
    assert only(s, "distance") == pytest.approx(np.abs(np.subtract.outer(range(n), range(n))).mean(), abs=1e-14)


def test_cls_sink_and_sep_heads():
    tokens = ["[CLS]", "the", "cat", "sat", "[SEP]"]
    sink = np.zeros((5, 5))
    sink[:, 0] = 1.0
    sep = np.zeros((5, 5))
    sep[:, 4] = 1.0
    s = head_scores(np.stack([one_head(sink)[0], one_head(sep)[0]]), tokens=tokens)
    assert s["sink"][:, 0].tolist() == [1.0, 0.0]
    assert s["sep"][:, 0].tolist() == [0.0, 1.0]
    assert s["distance"][0, 0] == pytest.approx(np.mean(range(5)))
    assert s["entropy"][:, 0].tolist() == [0.0, 0.0]
    assert "[SEP]" in SEP_TOKENS


def test_gpt2_endoftext_as_bos_is_a_sink_not_a_sep():
    tokens = ["<|endoftext|>", "a", "b", "<|endoftext|>"]
    p = np.tril(np.ones((4, 4)))
    p /= p.sum(-1, keepdims=True)
    s = head_scores(one_head(p), tokens=tokens)
    assert only(s, "sep") == pytest.approx(1 / 16)               # only the last row sees it, with weight 1/4
    assert only(s, "sink") == pytest.approx(np.mean([1, 1 / 2, 1 / 3, 1 / 4]))


def test_sep_per_batch_item_from_token_lists():
    p = np.zeros((2, 1, 3, 3))
    p[:, 0, :, 2] = 1.0                               # everything on the last token
    s = head_scores(p[None], tokens=[["a", "b", "</s>"], ["a", "b", "c"]])
    assert only(s, "sep") == 1.0                      # item 1 has no EOS: left out, not counted as 0


def test_explicit_sink_and_sep_positions():
    p = np.full((4, 4), 0.25)
    s = head_scores(one_head(p), sink_positions=[0, 1], sep_positions=np.array([False, False, False, True]))
    assert only(s, "sink") == pytest.approx(0.5) and only(s, "sep") == pytest.approx(0.25)


def induction_patterns(n, bos=True):
    """Hand-built heads on BOS + r + r: (induction head, duplicate-token head), each parking on BOS when
    it has nothing to do (the first half), as real ones do."""
    seq = n * 2 + bos
    induction, duplicate = np.zeros((seq, seq)), np.zeros((seq, seq))
    for i in range(seq):
        second_half = i >= n + bos
        induction[i, i - n + 1 if second_half else 0] = 1.0     # the token after the earlier copy
        duplicate[i, i - n if second_half else 0] = 1.0         # the earlier copy itself
    return induction, duplicate


def test_hand_built_induction_and_duplicate_heads():
    n = 6
    ids = repeated_random_tokens(50, n, seed=1, bos_id=0)
    induction, duplicate = induction_patterns(n)
    layers = np.stack([one_head(induction)[0], one_head(duplicate)[0]])
    # TransformerLens' measure counts every row: the n second-half rows out of 2n + 1
    s = head_scores(layers, token_ids=ids)
    assert s["induction"][:, 0].tolist() == pytest.approx([n / (2 * n + 1), 0.0])
    assert s["duplicate_token"][:, 0].tolist() == pytest.approx([0.0, n / (2 * n + 1)])
    # ... and with the BOS column left out (exclude_bos), a perfect head scores exactly 1
    s = head_scores(layers, token_ids=ids, exclude_bos=True)
    assert s["induction"][:, 0].tolist() == [1.0, 0.0]
    assert s["duplicate_token"][:, 0].tolist() == [0.0, 1.0]
    # the induction head reads as attention n − 1 keys back (n rows, plus the first-half row
    # n − 1 whose BOS happens to sit n − 1 keys back)
    assert s.offset_profile[0, 0, s.max_offset - (n - 1)] == pytest.approx((n + 1) / (2 * n + 1))


def test_exclude_current_token():
    ids = np.array([[5, 5, 5]])
    p = np.eye(3)                                     # all weight on the current token
    s = head_scores(one_head(p), token_ids=ids)
    assert only(s, "duplicate_token") == 0.0
    assert math.isnan(only(head_scores(one_head(p), token_ids=ids, exclude_current_token=True), "duplicate_token"))


def test_detection_patterns_follow_transformer_lens():
    ids = np.array([1, 2, 1, 2, 2])
    patterns = detection_patterns(ids)
    np.testing.assert_array_equal(patterns["duplicate_token"][0], tl_duplicate(ids))
    np.testing.assert_array_equal(patterns["induction"][0], tl_induction(ids))
    # padded tokens (any id) take part in neither pattern: the real block is TL's on the real tokens
    for real in ([False, True, True, True, False, False], [True, True, True, True, False, False]):
        real = np.array(real)
        padded_ids = np.array([2, 1, 2, 1, 1, 2])
        patterns = detection_patterns(padded_ids, real[None])
        for name, build in (("duplicate_token", tl_duplicate), ("induction", tl_induction)):
            expected = np.zeros((6, 6), dtype=bool)
            expected[np.ix_(real, real)] = build(padded_ids[real])
            np.testing.assert_array_equal(patterns[name][0], expected, err_msg=name)
    # a gap of padding inside the sequence: still nothing on a padded row or column
    real = np.array([True, True, True, False, True, True])
    patterns = detection_patterns(np.array([1, 2, 3, 3, 3, 2]), real[None])
    for name in ("duplicate_token", "induction"):
        assert not patterns[name][0][~real].any() and not patterns[name][0][:, ~real].any(), name


# --------------------------------------------------------------------------- the loop reference

def tl_duplicate(ids):
    """transformer_lens head_detector: eq matrix, diagonal zeroed, tril."""
    seq = len(ids)
    token_pattern = np.tile(ids, (seq, 1))
    eq = (token_pattern == token_pattern.T).astype(int)
    np.fill_diagonal(eq, 0)
    return np.tril(eq)


def tl_induction(ids):
    """transformer_lens head_detector: the duplicate pattern rolled one key right, first column 0, tril."""
    shifted = np.roll(tl_duplicate(ids), 1, axis=1)
    shifted[:, 0] = 0
    return np.tril(shifted)


def loop_scores(pattern, key_real, ids, sink, sep, exclude_bos=False, exclude_current_token=False):
    layers, batch, heads, seq_q, seq_k = pattern.shape
    offset = seq_k - seq_q
    out = {name: np.full((layers, heads), np.nan) for name in SCORES}
    for layer in range(layers):
        for head in range(heads):
            per_item = {name: [] for name in SCORES}
            for b in range(batch):
                rows = {name: [] for name in SCORES}
                for i in range(seq_q):
                    pos = i + offset
                    w = [pattern[layer, b, head, i, j] if key_real[b, j] else 0.0 for j in range(seq_k)]
                    if sum(w) == 0 or (0 <= pos < seq_k and not key_real[b, pos]):
                        continue                                     # fully masked or a padded query
                    entropy = -sum(x * math.log(x) for x in w if x > 0)
                    visible = sum(1 for x in w if x > 0)
                    rows["entropy"].append(entropy)
                    rows["entropy_norm"].append(entropy / math.log(visible) if visible > 1 else 0.0)
                    rows["max_weight"].append(max(w))
                    rows["sink"].append(sum(x for x, s in zip(w, sink[b]) if s))
                    if sep[b].any():
                        rows["sep"].append(sum(x for x, s in zip(w, sep[b]) if s))
                    if 1 <= pos <= seq_k and key_real[b, pos - 1]:
                        rows["previous_token"].append(w[pos - 1])
                    if 0 <= pos < seq_k:
                        rows["same_token"].append(w[pos])
                    rows["distance"].append(sum(x * abs(pos - j) for j, x in enumerate(w)))
                for name, values in rows.items():
                    if values:
                        per_item[name].append(sum(values) / len(values))
                real = np.flatnonzero(key_real[b])                   # TL on the unpadded tokens of the item
                a = pattern[layer, b, head][np.ix_(real, real)].copy()
                a[a.sum(axis=1) == 0] = 0
                if exclude_bos:
                    a[:, 0] = 0
                if exclude_current_token:
                    np.fill_diagonal(a, 0)
                for name, build in (("duplicate_token", tl_duplicate), ("induction", tl_induction)):
                    if a.sum() > 0:
                        per_item[name].append((a * build(ids[b, real])).sum() / a.sum())
            for name, values in per_item.items():
                if values:
                    out[name][layer, head] = sum(values) / len(values)
    return out


def random_case(seed=0, layers=2, batch=3, heads=3, seq=9, vocab=4):
    rng = np.random.default_rng(seed)
    key_real = np.ones((batch, seq), dtype=bool)
    key_real[1, :2] = False                           # left padding
    key_real[2, -3:] = False                          # right padding
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    scores = rng.normal(size=(layers, batch, heads, seq, seq)) * 2
    keep = causal[None, None, None] & key_real[None, :, None, None, :]
    scores = np.where(keep, scores, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    p = np.nan_to_num(p)
    padded_rows = ~key_real[None, :, None, :, None]
    p = np.where(padded_rows, 1 / seq, p)             # garbage rows for padded queries: must be ignored
    p[0, 0, :, 4] = 0.0                               # a fully masked row
    ids = rng.integers(0, vocab, size=(batch, seq))
    sep = np.zeros((batch, seq), dtype=bool)
    sep[0, 8] = sep[1, 5] = True                      # item 2 has none
    return p, key_real, ids, sep


@pytest.mark.parametrize("exclude_bos,exclude_current_token", [(False, False), (True, False), (True, True)])
def test_against_plain_loops(exclude_bos, exclude_current_token):
    p, key_real, ids, sep = random_case()
    sink = np.zeros_like(key_real)
    sink[np.arange(3), key_real.argmax(1)] = True
    s = head_scores(p, key_mask=key_real, token_ids=ids, sep_positions=sep, exclude_bos=exclude_bos,
                    exclude_current_token=exclude_current_token)
    expected = loop_scores(p, key_real, ids, sink, sep, exclude_bos, exclude_current_token)
    for name in SCORES:
        np.testing.assert_allclose(s[name], expected[name], rtol=0, atol=1e-12, err_msg=name)
    assert not any(np.isnan(s[name]).any() for name in SCORES)      # NaN == NaN would pass assert_allclose


def test_list_of_layers_and_float32_match_the_array():
    p, key_real, ids, _ = random_case(seed=4)
    from_array = head_scores(p, key_mask=key_real, token_ids=ids)
    from_list = head_scores([layer.astype(np.float32) for layer in p], key_mask=key_real, token_ids=ids)
    for name in SCORES:
        np.testing.assert_allclose(from_list[name], from_array[name], rtol=0, atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------- edge cases

def test_padding_changes_nothing():
    """A left-padded copy of a sequence scores exactly like the sequence alone."""
    n, pad = 5, 3
    ids = np.array([[7, 8, 7, 8, 9]])
    base = np.tril(np.arange(1, n * n + 1, dtype=float).reshape(n, n))
    base /= base.sum(-1, keepdims=True)
    padded = np.full((n + pad, n + pad), 0.3)        # garbage on padded queries and keys ...
    padded[pad:, pad:] = base
    padded[pad:, :pad] = 0.0                         # ... but real queries put nothing on padding
    padded[:pad] /= padded[:pad].sum(-1, keepdims=True)
    key_real = np.r_[np.zeros(pad, bool), np.ones(n, bool)]
    ids_padded = np.c_[np.zeros((1, pad), int), ids]
    alone = head_scores(one_head(base), token_ids=ids)
    with_pad = head_scores(one_head(padded), token_ids=ids_padded, key_mask=key_real)
    for name in SCORES:
        np.testing.assert_allclose(with_pad[name], alone[name], rtol=0, atol=1e-14, err_msg=name)


def test_weight_on_padded_keys_is_dropped():
    p = np.full((3, 3), 1 / 3)
    s = head_scores(one_head(p), key_mask=[True, True, False])
    assert only(s, "max_weight") == pytest.approx(1 / 3)
    assert only(s, "entropy") == pytest.approx(2 / 3 * math.log(3))   # two weights of 1/3 kept, not renormalised


def test_one_token():
    s = head_scores(one_head([[1.0]]), token_ids=[[3]])
    assert only(s, "entropy") == 0.0 and only(s, "entropy_norm") == 0.0 and only(s, "max_weight") == 1.0
    assert only(s, "sink") == 1.0 and only(s, "same_token") == 1.0 and only(s, "distance") == 0.0
    assert math.isnan(only(s, "previous_token"))                     # no row has a previous token
    assert only(s, "duplicate_token") == 0.0 and only(s, "induction") == 0.0


def test_fully_masked_rows_and_items_are_left_out():
    p = np.zeros((2, 1, 3, 3))
    p[0, 0] = np.eye(3)
    p[0, 0, 1] = 0.0                                   # one fully masked row in item 0; item 1 entirely masked
    s = head_scores(p)
    assert s["same_token"][0, 0] == 1.0 and s["entropy"][0, 0] == 0.0
    empty = head_scores(np.zeros((1, 2, 3, 3)))
    assert all(np.isnan(empty[name]).all() for name in ("entropy", "max_weight", "distance"))


def test_keep_mask_sets_the_entropy_normaliser():
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    keep = np.tril(np.ones((3, 3), bool))
    s = head_scores(one_head(p), keep=keep)
    # row 1: ln2/ln2 = 1; row 2: ln2/ln3 (three visible keys, one of them unused)
    assert only(s, "entropy_norm") == pytest.approx((0 + 1 + math.log(2) / math.log(3)) / 3)
    assert only(head_scores(one_head(p)), "entropy_norm") == pytest.approx(2 / 3)


def test_scores_without_tokens_are_nan_with_a_note():
    s = head_scores(one_head(np.eye(3)))
    assert np.isnan(s["sep"]).all() and np.isnan(s["induction"]).all() and np.isnan(s["duplicate_token"]).all()
    assert any("sep" in note for note in s.notes) and any("induction" in note for note in s.notes)
    document = s.to_json()
    assert document["scores"]["sep"] == [[None]] and document["scores"]["same_token"] == [[1.0]]
    assert set(document["scores"]) == set(SCORES) and len(document["offset_profile"][0][0]) == 17


# --------------------------------------------------------------------------- helpers

def test_repeated_random_tokens():
    ids = repeated_random_tokens(30, 10, seed=3, special_ids=[1, 2, 3], bos_id=0, eos_id=4, batch=2)
    assert ids.shape == (2, 22) and ids.dtype == np.int64
    assert (ids[:, 0] == 0).all() and (ids[:, -1] == 4).all()
    body = ids[:, 1:-1]
    np.testing.assert_array_equal(body[:, :10], body[:, 10:])
    assert not np.isin(body, [0, 1, 2, 3, 4]).any() and (body < 30).all()
    assert all(len(set(row[:10])) == 10 for row in body)                 # distinct: the only repeats are designed
    assert not np.array_equal(body[0], body[1])
    np.testing.assert_array_equal(ids, repeated_random_tokens(30, 10, seed=3, special_ids=[1, 2, 3], bos_id=0,
                                                              eos_id=4, batch=2))
    assert not np.array_equal(ids, repeated_random_tokens(30, 10, seed=4, special_ids=[1, 2, 3], bos_id=0,
                                                          eos_id=4, batch=2))
    with_repeats = repeated_random_tokens(3, 50, seed=0, distinct=False)
    assert with_repeats.shape == (1, 100) and set(with_repeats.ravel()) <= {0, 1, 2}


def test_rank_heads():
    p = np.zeros((2, 1, 2, 3, 3))
    p[0, 0, 0] = np.eye(3)                             # layer 0 head 0: diagonal
    p[0, 0, 1, :, 0] = 1.0                             # layer 0 head 1: sink
    p[1, 0, 0] = np.full((3, 3), 1 / 3)                # layer 1 head 0: uniform
    p[1, 0, 1] = np.eye(3)[[0, 0, 1]]                  # layer 1 head 1: previous token
    s = head_scores(p)
    ranked = rank_heads(s, "distance")             # 0, 1, 8/9 and 2/3 by hand
    assert [(r.layer, r.head) for r in ranked] == [(0, 1), (1, 0), (1, 1), (0, 0)]
    assert [r.value for r in ranked] == pytest.approx([1, 8 / 9, 2 / 3, 0])
    assert [(r.layer, r.head) for r in rank_heads(s, "max_weight")] == [(0, 0), (0, 1), (1, 1), (1, 0)]  # ties
    assert [(r.layer, r.head) for r in rank_heads(s, "entropy", top=2, descending=False)] == [(0, 0), (0, 1)]
    assert rank_heads(s, "previous_token", top=1)[0][:2] == (1, 1)
    ranked_nan = rank_heads(s, "induction")                          # all NaN: kept, in order
    assert [(r.layer, r.head) for r in ranked_nan] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_sparkline():
    assert sparkline([0, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1]) == "▁▂▃▄▅▆▇█"
    assert sparkline([0.0, 0.5, np.nan, 1.0]) == "▁▅ █"
    assert sparkline([0, 0, 0]) == "▁▁▁"
    assert sparkline([2, 2]) == "██"                                 # zero is the floor by default
    assert sparkline([0.5], lo=0, hi=1) == "▅"
    assert sparkline([0, 0, 1, 1, 1, 1], width=3) == "▁██"           # pooled by mean
    assert sparkline([np.nan, np.nan]) == "  "
    assert head_scores(one_head(np.eye(3))).sparkline(0, 0) == "▁" * 8 + "█" + "▁" * 8


# --------------------------------------------------------------------------- bad input

def raises(code, call):
    with pytest.raises(InputError) as caught:
        call()
    assert caught.value.diagnosis.code == code and caught.value.diagnosis.hint
    return caught.value.diagnosis


def test_errors_on_bad_input():
    good = one_head(np.eye(3))
    raises("ATT-E400", lambda: head_scores([]))
    raises("ATT-E400", lambda: head_scores(np.eye(3)))
    raises("ATT-E400", lambda: head_scores([good[0], one_head(np.eye(4))[0]]))
    raises("ATT-E400", lambda: head_scores(np.zeros((1, 1, 0, 3))))
    raises("ATT-E401", lambda: head_scores(good, key_mask=[True, False]))
    raises("ATT-E401", lambda: head_scores(good, sink_positions=[5]))
    raises("ATT-E401", lambda: head_scores(good, keep=np.ones((2, 2), bool)))
    raises("ATT-E402", lambda: head_scores(good, token_ids=[[1, 2]]))
    raises("ATT-E402", lambda: head_scores(good, token_ids=[[1.0, 2.0, 3.0]]))
    raises("ATT-E402", lambda: head_scores(good, tokens=["a", "b"]))
    raises("ATT-E403", lambda: head_scores(one_head(np.eye(3)[:2]), token_ids=[[1, 2, 3]]))
    raises("ATT-E404", lambda: repeated_random_tokens(5, 10))
    raises("ATT-E404", lambda: repeated_random_tokens(3, 2, special_ids=[0, 1, 2]))
    raises("ATT-E404", lambda: repeated_random_tokens(100, 0))
    raises("ATT-E405", lambda: rank_heads(head_scores(good), "nope"))
    raises("ATT-E405", lambda: rank_heads(head_scores(good), "entropy", top=0))
    where = raises("ATT-E406", lambda: head_scores(one_head(np.full((3, 3), 0.5))))
    assert "sums to 1.5" in where.message
    raises("ATT-E406", lambda: head_scores(one_head(np.full((3, 3), np.nan))))
    raises("ATT-E406", lambda: head_scores(one_head(-np.eye(3))))
    raises("ATT-E407", lambda: head_scores(good, max_offset=-1))
    raises("ATT-E407", lambda: sparkline([1, 2], width=0))
