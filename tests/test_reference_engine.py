"""The engine against the plain-loop float64 reference (tests/reference.py), hook by hook, by value.

Every test builds a spec dict with random (numpy default_rng) arrays, runs
``attntrace.run(spec, keep="all")`` and compares EVERY hook of the run with
the reference at rtol 1e-12 (float64) -- not just shapes.  Masks given to the
reference are built independently of attntrace (plain loops in reference.py,
or written out literally here).
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref  # noqa: E402

import attntrace  # noqa: E402

RTOL64, ATOL64 = 1e-12, 1e-12
RTOL32, ATOL32 = 2e-5, 2e-5

HOOKS_ALWAYS = ["hook_embed", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_qk",
                "attn.hook_scaled", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
                "attn.hook_z_concat", "hook_attn_out"]


# --------------------------------------------------------------------------- building cases

def make_case(seed, *, batch=1, seq_q=5, seq_k=None, d_model=6, heads=2, kv_heads=None, d_head=3,
              d_v=None, w_o="back", layout="x_at_w", biases=False, scale="auto", mask=None, keep=None,
              embed_2d=None, weight_std=None):
    """A spec dict and the matching keyword arguments for reference.attention.

    seq_k given -> cross-attention (an `encoder:` block with seq_k tokens).
    w_o: "back" (maps heads*d_v back to d_model), None (no W_o) or an int d_out.
    mask: the spec's `attention.mask` value; keep: the same mask as a bool array for the reference.
    """
    rng = np.random.default_rng(seed)
    kv = heads if kv_heads is None else kv_heads
    d_v = d_head if d_v is None else d_v
    std = weight_std if weight_std is not None else 1.0 / math.sqrt(d_model)
    embed_2d = (batch == 1) if embed_2d is None else embed_2d

    def emb(seq):
        x = rng.normal(size=(batch, seq, d_model))
        return x[0] if embed_2d else x

    def weight(d_in, d_out):
        w = rng.normal(scale=std, size=(d_in, d_out))           # x_at_w: (d_in, d_out)
        return w if layout == "x_at_w" else np.ascontiguousarray(w.T)   # linear: (d_out, d_in)

    X = emb(seq_q)
    X_enc = emb(seq_k) if seq_k is not None else None
    W = {"W_q": weight(d_model, heads * d_head), "W_k": weight(d_model, kv * d_head),
         "W_v": weight(d_model, kv * d_v)}
    if w_o is not None:
        d_out = d_model if w_o == "back" else w_o
        W["W_o"] = weight(heads * d_v, d_out)
    if biases:
        W["b_q"] = rng.normal(size=heads * d_head)
        W["b_k"] = rng.normal(size=kv * d_head)
        W["b_v"] = rng.normal(size=kv * d_v)
        if w_o is not None:
            W["b_o"] = rng.normal(size=W["W_o"].shape[1 if layout == "x_at_w" else 0])

    attention = {"heads": heads, "layout": layout, "scale": scale, **W}
    if kv_heads is not None:
        attention["kv_heads"] = kv_heads
    if mask is not None:
        attention["mask"] = mask
    spec = {"version": 1, "tokens": [f"q{i}" for i in range(seq_q)], "embeddings": X,
            "attention": attention}
    if X_enc is not None:
        spec["encoder"] = {"tokens": [f"k{j}" for j in range(seq_k)], "embeddings": X_enc}

    ref_scale = {"auto": None, "none": 1.0}.get(scale, scale) if isinstance(scale, str) else scale
    kwargs = dict(W, X=X, X_enc=X_enc, heads=heads, kv_heads=kv, layout=layout, scale=ref_scale, keep=keep)
    return spec, kwargs


def run_both(spec, kwargs, dtype="float64"):
    trace = attntrace.run(spec, keep="all", dtype=dtype)
    expected = ref.attention(**kwargs)
    return trace, expected


def assert_matches(trace, expected, rtol=RTOL64, atol=ATOL64, dtype="float64"):
    """Every hook of the run equals the reference by value; no hook of the reference is missing."""
    hooks = list(trace.plan.hooks)
    wanted = list(HOOKS_ALWAYS)
    if "x_enc" in expected:
        wanted.append("hook_encoder_embed")
    if "mask" in expected:
        wanted.append("attn.hook_mask")
    assert sorted(hooks) == sorted(wanted), f"hooks of the run: {hooks}"
    for hook in hooks:
        got = trace[hook]
        want = expected[ref.HOOK_TO_KEY[hook]]
        if hook == "attn.hook_mask":
            assert got.dtype == bool
            assert got.ndim == 4 and got.shape[1:] == want.shape[1:] and got.shape[0] in (1, want.shape[0]), \
                f"mask shape {got.shape} vs {want.shape}"
            np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want, err_msg=hook)
            continue
        assert got.shape == want.shape, f"{hook}: shape {got.shape}, reference {want.shape}"
        assert got.dtype == np.dtype(dtype), f"{hook}: dtype {got.dtype}"
        # -inf must sit exactly where the reference has -inf (blocked positions)
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{hook}: -inf positions")
        assert not np.isnan(got).any(), f"{hook} holds NaN"
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=hook)


def codes(trace):
    return [d.code for d in trace.diagnoses]


def tril(seq):
    """Lower-triangular keep matrix written with a comprehension, independent of reference.causal_keep."""
    return np.array([[j <= i for j in range(seq)] for i in range(seq)])


# --------------------------------------------------------------------------- the reference itself

def test_reference_by_hand_tiny():
    """The reference on a 2-token example small enough to check with pen and paper."""
    X = [[1.0, 0.0], [0.0, 1.0]]
    eye = [[1.0, 0.0], [0.0, 1.0]]
    r = ref.attention(X, eye, eye, eye)              # Q = K = V = I, one head, d_head = 2
    np.testing.assert_array_equal(r["qk"][0, 0], eye)
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(r["scaled"][0, 0], [[s, 0], [0, s]], rtol=1e-15)
    e = math.exp(s)
    w = [[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]]
    np.testing.assert_allclose(r["pattern"][0, 0], w, rtol=1e-15)
    np.testing.assert_allclose(r["out"][0], w, rtol=1e-15)      # V = I: out = weights


def test_reference_causal_builder():
    assert ref.causal_keep(3, 3) == [[True, False, False], [True, True, False], [True, True, True]]
    # two queries that are the last two of four positions (KV-cache decoding)
    assert ref.causal_keep(2, 4) == [[True, True, True, False], [True, True, True, True]]


def test_reference_safe_softmax():
    assert ref.softmax_row([ref.NEG_INF, ref.NEG_INF]) == [0.0, 0.0]
    assert ref.softmax_row([1000.0, ref.NEG_INF, 1000.0]) == [0.5, 0.0, 0.5]


# --------------------------------------------------------------------------- plain self-attention

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_random_self_attention(seed, heads, batch):
    # d_model=6 != heads*d_head (3, 6, 12, 24); seq=5 != d_head=3; W_o maps heads*d_head back to 6
    spec, kwargs = make_case(seed, batch=batch, heads=heads, seq_q=5, d_model=6, d_head=3)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


@pytest.mark.parametrize("seed", [3, 4])
def test_no_w_o_output_is_concat(seed):
    spec, kwargs = make_case(seed, batch=3, heads=4, d_model=8, d_head=2, w_o=None)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    np.testing.assert_array_equal(trace["hook_attn_out"], trace["attn.hook_z_concat"])
    assert trace.diagnoses == []


@pytest.mark.parametrize("seed", [5, 6])
def test_d_v_and_d_out_differ(seed):
    # d_head=4, d_v=3, d_out=7, d_model=5, seq=2
    spec, kwargs = make_case(seed, batch=3, seq_q=2, heads=2, d_model=5, d_head=4, d_v=3, w_o=7)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace["hook_attn_out"].shape == (3, 2, 7)
    assert trace.diagnoses == []


def test_single_token():
    spec, kwargs = make_case(7, seq_q=1, heads=2, d_model=4, d_head=2)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    np.testing.assert_array_equal(trace["attn.hook_pattern"], np.ones((1, 2, 1, 1)))
    assert trace.diagnoses == []


def test_batch_one_as_2d_or_3d_embeddings():
    spec2, kwargs2 = make_case(8, batch=1, embed_2d=True)
    spec3, kwargs3 = make_case(8, batch=1, embed_2d=False)
    np.testing.assert_array_equal(spec2["embeddings"], spec3["embeddings"][0])
    t2, e2 = run_both(spec2, kwargs2)
    t3, e3 = run_both(spec3, kwargs3)
    assert_matches(t2, e2)
    assert_matches(t3, e3)
    for hook in t2.plan.hooks:
        np.testing.assert_array_equal(t2[hook], t3[hook])


def test_large_scores_are_stable():
    """Scores in the hundreds (as in seed 002) must not overflow: max subtraction."""
    spec, kwargs = make_case(9, batch=2, heads=2, d_model=8, d_head=4, weight_std=8.0)
    trace, expected = run_both(spec, kwargs)
    assert np.abs(expected["scaled"]).max() > 100
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_hand_view_drops_size_one_axes():
    spec, kwargs = make_case(10, batch=1, heads=1, seq_q=4, d_model=6, d_head=3)
    trace, expected = run_both(spec, kwargs)
    np.testing.assert_allclose(trace.hand_view("attn.hook_q"), expected["q"][0, :, 0, :], rtol=RTOL64, atol=ATOL64)
    np.testing.assert_allclose(trace.hand_view("attn.hook_pattern"), expected["pattern"][0, 0],
                               rtol=RTOL64, atol=ATOL64)
    np.testing.assert_allclose(trace.hand_view("hook_attn_out"), expected["out"][0], rtol=RTOL64, atol=ATOL64)


# --------------------------------------------------------------------------- layout and biases

@pytest.mark.parametrize("layout", ["x_at_w", "linear"])
@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_layout_and_biases(layout, biases, batch):
    spec, kwargs = make_case(11, batch=batch, heads=2, d_model=6, d_head=4, layout=layout, biases=biases)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_linear_layout_is_transpose_of_x_at_w():
    """The same numbers written in the two layouts give the same trace."""
    spec, kwargs = make_case(12, batch=2, heads=2, d_model=6, d_head=3, biases=True)
    lin = dict(spec, attention=dict(spec["attention"], layout="linear"))
    for key in ("W_q", "W_k", "W_v", "W_o"):
        lin["attention"][key] = spec["attention"][key].T.copy()
    a = attntrace.run(spec, keep="all")
    b = attntrace.run(lin, keep="all")
    for hook in a.plan.hooks:
        np.testing.assert_allclose(b[hook], a[hook], rtol=1e-13, atol=1e-13, err_msg=hook)


# --------------------------------------------------------------------------- scale

@pytest.mark.parametrize("scale", ["auto", "none", 0.25, 2.0])
def test_scale(scale):
    spec, kwargs = make_case(13, batch=3, heads=4, d_model=8, d_head=3, scale=scale)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    multiplier = {"auto": 1 / math.sqrt(3), "none": 1.0}.get(scale, scale)
    np.testing.assert_allclose(trace["attn.hook_scaled"], trace["attn.hook_qk"] * multiplier,
                               rtol=1e-15, atol=1e-15)
    assert trace.diagnoses == []


# --------------------------------------------------------------------------- grouped-query attention

@pytest.mark.parametrize("heads,kv_heads", [(2, 1), (4, 1), (4, 2), (8, 1), (8, 2), (8, 4), (4, 4)])
@pytest.mark.parametrize("batch", [1, 3])
def test_grouped_query(heads, kv_heads, batch):
    spec, kwargs = make_case(14 + heads + kv_heads, batch=batch, heads=heads, kv_heads=kv_heads,
                             d_model=6, d_head=2, d_v=3, biases=True)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace["attn.hook_k"].shape == (batch, 5, kv_heads, 2)
    assert trace.diagnoses == []


def test_grouped_query_head_sharing_explicit():
    """With kv_heads=2 and 4 heads, heads 0,1 read kv head 0 and heads 2,3 read kv head 1."""
    spec, kwargs = make_case(30, batch=1, heads=4, kv_heads=2, d_model=6, d_head=2)
    trace = attntrace.run(spec, keep="all")
    q, k = trace["attn.hook_q"][0], trace["attn.hook_k"][0]     # (seq, heads, d), (seq, kv, d)
    qk = trace["attn.hook_qk"][0]
    for h, g in [(0, 0), (1, 0), (2, 1), (3, 1)]:
        for i in range(q.shape[0]):
            for j in range(k.shape[0]):
                assert qk[h, i, j] == pytest.approx(sum(q[i, h, d] * k[j, g, d] for d in range(2)),
                                                    rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_grouped_query_causal(heads, kv_heads):
    spec, kwargs = make_case(31, batch=3, heads=heads, kv_heads=kv_heads, mask="causal", keep=tril(5))
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


# --------------------------------------------------------------------------- masks

@pytest.mark.parametrize("seed", [40, 41])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_causal(seed, batch, heads):
    keep = ref.causal_keep(6, 6)
    spec, kwargs = make_case(seed, batch=batch, seq_q=6, heads=heads, mask="causal", keep=keep)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    pattern = trace["attn.hook_pattern"]
    assert (pattern[..., ~tril(6)] == 0).all()            # the future gets exactly zero weight
    np.testing.assert_allclose(pattern[..., 0, 0], 1.0, rtol=0, atol=0)   # token 0 sees only itself
    assert trace.diagnoses == []


def test_causal_mapping_form():
    spec, kwargs = make_case(42, batch=2, mask={"causal": True}, keep=tril(5))
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


PADDING = [[1, 1, 1, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_padding_blocks_keys(heads):
    keep = ref.padding_keep(PADDING, seq_q=4)
    spec, kwargs = make_case(50 + heads, batch=2, seq_q=4, heads=heads, mask={"padding": PADDING}, keep=keep)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    pattern = trace["attn.hook_pattern"]
    assert (pattern[0, :, :, 3] == 0).all()
    assert (pattern[1, :, :, 2:] == 0).all()
    assert (pattern[0, :, :, :3] > 0).all() and (pattern[1, :, :, :2] > 0).all()
    assert trace.diagnoses == []


def test_padding_one_row_for_all_batch_items():
    keep = [[[[1, 0, 1, 1]]]]                             # (1, 1, 1, 4): broadcast over batch and queries
    spec, kwargs = make_case(55, batch=3, seq_q=4, mask={"padding": [1, 0, 1, 1]}, keep=keep)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_causal_and_padding():
    pad = ref.padding_keep(PADDING, seq_q=4)
    keep = [[[[pad[b][0][i][j] and j <= i for j in range(4)] for i in range(4)]] for b in range(2)]
    spec, kwargs = make_case(56, batch=2, seq_q=4, heads=2, mask={"causal": True, "padding": PADDING}, keep=keep)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


EXPLICIT = [[1, 0, 1, 0, 1],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0],
            [1, 1, 1, 1, 1],
            [0, 1, 0, 1, 0]]


@pytest.mark.parametrize("batch", [1, 3])
def test_explicit_matrix_keep(batch):
    spec, kwargs = make_case(60, batch=batch, seq_q=5, heads=2, mask=EXPLICIT, keep=np.array(EXPLICIT, bool))
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_explicit_matrix_bool_array():
    """A numpy bool array given directly as `attention.mask` (the Python API accepts numpy arrays)."""
    keep = np.array(EXPLICIT, dtype=bool)
    spec, kwargs = make_case(61, batch=2, seq_q=5, heads=2, mask=keep, keep=keep)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_explicit_matrix_per_batch_item():
    rng = np.random.default_rng(62)
    keep = rng.random((3, 5, 5)) < 0.6
    keep[:, :, 0] = True                                  # every query sees at least key 0
    spec, kwargs = make_case(62, batch=3, seq_q=5, heads=4, mask=keep.astype(int).tolist(),
                             keep=keep[:, None])
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_explicit_matrix_ignore_convention():
    ignore = [[1 - v for v in row] for row in EXPLICIT]   # 1 = blocked (nn.MultiheadAttention style)
    spec, kwargs = make_case(63, batch=2, seq_q=5, mask={"matrix": ignore, "convention": "ignore"},
                             keep=np.array(EXPLICIT, bool))
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_explicit_matrix_additive_convention():
    """An additive mask written as a nested list (as YAML gives it): 0 keeps, -inf and -1e9 block."""
    additive = [[0.0 if v else -math.inf for v in row] for row in EXPLICIT]
    additive[1][2] = -1e9                                 # a large negative number blocks too
    spec, kwargs = make_case(64, batch=1, seq_q=5, mask={"matrix": additive, "convention": "additive"},
                             keep=np.array(EXPLICIT, bool))
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_explicit_matrix_additive_numpy():
    """The same additive mask as a numpy array holding -inf."""
    additive = np.where(np.array(EXPLICIT, bool), 0.0, -np.inf)
    spec, kwargs = make_case(64, batch=2, seq_q=5, mask={"matrix": additive, "convention": "additive"},
                             keep=np.array(EXPLICIT, bool))
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_causal_and_explicit_matrix():
    keep = np.array(EXPLICIT, bool) & tril(5)
    assert keep.any(axis=1).all()
    spec, kwargs = make_case(65, batch=2, seq_q=5, mask={"causal": True, "matrix": EXPLICIT}, keep=keep)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


# --------------------------------------------------------------------------- fully masked rows

def _check_dead_row(trace, expected, dead, batch_items):
    """Rows `dead` of `batch_items` attend nowhere: weights 0 exactly, z 0, out = b_o (or 0)."""
    assert_matches(trace, expected)
    for name in trace.plan.hooks:
        if name != "attn.hook_mask":
            assert not np.isnan(trace[name]).any(), f"NaN in {name}"
    pattern, z = trace["attn.hook_pattern"], trace["attn.hook_z"]
    for b in batch_items:
        assert (pattern[b, :, dead, :] == 0.0).all()
        assert (z[b, dead] == 0.0).all()
        assert np.isneginf(trace["attn.hook_attn_scores"][b, :, dead, :]).all()
    assert codes(trace) == ["ATT-W203"]
    warning = trace.diagnoses[0]
    assert warning.severity == "warning"
    assert warning.hook == "attn.hook_pattern"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fully_masked_row_gives_zero_weights(dtype):
    keep = [row[:] for row in EXPLICIT]
    keep[2] = [0, 0, 0, 0, 0]
    spec, kwargs = make_case(70, batch=2, seq_q=5, heads=2, mask=keep, keep=np.array(keep, bool), biases=True)
    trace = attntrace.run(spec, keep="all", dtype=dtype)
    expected = ref.attention(**kwargs)
    np.testing.assert_array_equal(expected["pattern"][:, :, 2, :], 0.0)       # the reference agrees
    if dtype == "float64":
        _check_dead_row(trace, expected, 2, range(2))
    else:
        assert_matches(trace, expected, rtol=RTOL32, atol=ATOL32, dtype="float32")
        assert (trace["attn.hook_pattern"][:, :, 2, :] == 0).all()
        assert codes(trace) == ["ATT-W203"]
    # the output of a dead row is the output bias alone
    np.testing.assert_allclose(trace["hook_attn_out"][:, 2, :],
                               np.broadcast_to(kwargs["b_o"], (2, kwargs["b_o"].shape[0])), rtol=1e-6, atol=1e-6)


def test_fully_masked_row_in_one_batch_item():
    keep = np.ones((2, 4, 4), dtype=bool)
    keep[1, 3, :] = False
    spec, kwargs = make_case(71, batch=2, seq_q=4, heads=2, mask=keep.astype(int).tolist(), keep=keep[:, None])
    trace, expected = run_both(spec, kwargs)
    _check_dead_row(trace, expected, 3, [1])
    assert (trace["attn.hook_pattern"][0] > 0).all()


def test_fully_padded_batch_item():
    padding = [[1, 1, 0], [0, 0, 0]]                     # batch item 1 is all padding
    keep = ref.padding_keep(padding, seq_q=3)
    spec, kwargs = make_case(72, batch=2, seq_q=3, heads=2, mask={"padding": padding}, keep=keep)
    trace, expected = run_both(spec, kwargs)
    for row in range(3):
        _check_dead_row(trace, expected, row, [1])


# --------------------------------------------------------------------------- cross-attention

@pytest.mark.parametrize("seq_q,seq_k", [(3, 5), (5, 2), (4, 4)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("heads,kv_heads", [(2, None), (4, 2), (4, 1)])
def test_cross_attention(seq_q, seq_k, batch, heads, kv_heads):
    spec, kwargs = make_case(80 + seq_q * seq_k, batch=batch, seq_q=seq_q, seq_k=seq_k, heads=heads,
                             kv_heads=kv_heads, d_model=6, d_head=2, biases=True)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace["attn.hook_k"].shape[1] == seq_k and trace["attn.hook_pattern"].shape[-2:] == (seq_q, seq_k)
    assert trace.diagnoses == []


def test_cross_attention_keys_come_from_encoder():
    """Changing the decoder's embeddings must not change K and V; changing the encoder's must."""
    spec, kwargs = make_case(90, batch=2, seq_q=3, seq_k=4, heads=2)
    base = attntrace.run(spec, keep="all")
    other_x = dict(spec, embeddings=spec["embeddings"] + 1.0)
    moved = attntrace.run(other_x, keep="all")
    np.testing.assert_array_equal(moved["attn.hook_k"], base["attn.hook_k"])
    np.testing.assert_array_equal(moved["attn.hook_v"], base["attn.hook_v"])
    kv_x = ref.attention(**dict(kwargs, X_enc=None, X=kwargs["X_enc"]))        # self-attention on X_enc
    np.testing.assert_allclose(base["attn.hook_k"], kv_x["k"], rtol=RTOL64, atol=ATOL64)
    np.testing.assert_allclose(base["attn.hook_v"], kv_x["v"], rtol=RTOL64, atol=ATOL64)


def test_cross_attention_padding_on_encoder_keys():
    padding = [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    keep = ref.padding_keep(padding, seq_q=3)
    spec, kwargs = make_case(91, batch=2, seq_q=3, seq_k=5, heads=2, kv_heads=1, mask={"padding": padding},
                             keep=keep)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


@pytest.mark.parametrize("layout", ["x_at_w", "linear"])
def test_cross_attention_explicit_mask_and_layout(layout):
    keep = np.array([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)    # (seq_q=3, seq_k=4)
    spec, kwargs = make_case(92, batch=3, seq_q=3, seq_k=4, heads=2, layout=layout, biases=True,
                             mask=keep.astype(int).tolist(), keep=keep)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_causal_cross_attention_queries_are_the_last_positions():
    """seq_q < seq_k: query i is at absolute position i + seq_k - seq_q (KV-cache decoding)."""
    keep = ref.causal_keep(2, 5)
    assert keep == [[True, True, True, True, False], [True, True, True, True, True]]
    spec, kwargs = make_case(93, batch=2, seq_q=2, seq_k=5, heads=2, mask="causal", keep=keep)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert trace.diagnoses == []


def test_causal_cross_attention_more_queries_than_keys():
    """seq_q > seq_k: the same rule, query i at position i + seq_k - seq_q, so the first
    seq_q - seq_k queries see no key at all (bottom-right alignment, as flash-attn)."""
    keep = ref.causal_keep(5, 2)
    assert keep == [[False, False], [False, False], [False, False], [True, False], [True, True]]
    spec, kwargs = make_case(94, batch=2, seq_q=5, seq_k=2, heads=2, mask="causal", keep=keep)
    trace, expected = run_both(spec, kwargs)
    assert_matches(trace, expected)
    assert codes(trace) == ["ATT-W203"]


# --------------------------------------------------------------------------- float32

@pytest.mark.parametrize("case", [
    dict(batch=1, heads=1),
    dict(batch=3, heads=4, kv_heads=2, biases=True),
    dict(batch=2, heads=2, layout="linear", biases=True, scale=0.5),
    dict(batch=2, seq_q=4, heads=2, mask={"padding": PADDING}, keep=ref.padding_keep(PADDING, 4)),
    dict(batch=3, heads=2, mask="causal", keep=ref.causal_keep(5, 5)),
    dict(batch=2, seq_q=3, seq_k=4, heads=2, kv_heads=1),
    dict(batch=1, heads=8, d_model=16, d_head=4, w_o=None),
], ids=["one-head", "gqa-bias", "linear-scale", "padding", "causal", "cross", "8-heads-no-wo"])
def test_float32(case):
    spec, kwargs = make_case(100, **case)
    trace, expected = run_both(spec, kwargs, dtype="float32")
    assert trace.dtype == "float32"
    assert_matches(trace, expected, rtol=RTOL32, atol=ATOL32, dtype="float32")
    assert trace.diagnoses == []
    # and float32 is really float32: not bit-identical to the float64 run
    t64 = attntrace.run(spec, keep="all")
    assert not np.array_equal(t64["hook_attn_out"], trace["hook_attn_out"].astype(np.float64))


# --------------------------------------------------------------------------- keep="all"

def test_keep_all_keeps_every_hook_with_plan_shapes():
    spec, kwargs = make_case(110, batch=3, seq_q=4, seq_k=6, heads=4, kv_heads=2, d_head=2, d_v=3,
                             mask="causal", keep=ref.causal_keep(4, 6))
    trace, expected = run_both(spec, kwargs)
    assert set(trace.keys()) == set(trace.plan.hooks)
    for step in trace.plan.steps:
        if step.key != "mask":
            assert trace[step.hook].shape == trace.plan.shape(step.axes), step.hook
    assert_matches(trace, expected)


# --------------------------------------------------------------------------- the in-place path

@pytest.mark.parametrize("keep", ["hook_attn_out", ["attn.hook_pattern", "hook_attn_out"], "attn.hook_qk", "auto"])
def test_partial_keep_gives_the_same_numbers(keep):
    """Without keep="all" the engine reuses score buffers in place; results must not change."""
    spec, kwargs = make_case(120, batch=3, seq_q=6, heads=4, kv_heads=2, d_head=2, biases=True,
                             mask="causal", keep=ref.causal_keep(6, 6))
    trace = attntrace.run(spec, keep=keep)
    expected = ref.attention(**kwargs)
    assert trace.keys()
    for hook in trace.keys():
        want = expected[ref.HOOK_TO_KEY[hook]]
        got = trace[hook]
        if hook == "attn.hook_mask":
            np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)
        else:
            np.testing.assert_allclose(got, want, rtol=RTOL64, atol=ATOL64, err_msg=hook)
    assert trace.diagnoses == []


# --------------------------------------------------------------------------- the comparison has teeth

def _wrong_scale(state):                       # 1/sqrt(d_model) instead of 1/sqrt(d_head)
    return state["qk"] * state.plan.size("d_model") ** -0.5


def _softmax_over_queries(state):
    s = state["attn_scores"]
    e = np.exp(s - s.max(axis=-2, keepdims=True))
    return e / e.sum(axis=-2, keepdims=True)


def _mask_ignored(state):
    return state["scaled"].copy()


def _wrong_kv_grouping(state):                 # query head h reads kv head h % kv instead of h // (heads/kv)
    q, k = state["q"], state["k"]
    kv = k.shape[2]
    return np.stack([q[:, :, h] @ k[:, :, h % kv].transpose(0, 2, 1) for h in range(q.shape[2])], axis=1)


@pytest.mark.parametrize("key,fn", [("scaled", _wrong_scale), ("pattern", _softmax_over_queries),
                                    ("attn_scores", _mask_ignored), ("qk", _wrong_kv_grouping)])
def test_comparison_catches_injected_bugs(key, fn):
    spec, kwargs = make_case(130, batch=2, seq_q=5, heads=4, kv_heads=2, d_model=8, d_head=2,
                             mask="causal", keep=ref.causal_keep(5, 5))
    expected = ref.attention(**kwargs)
    trace = attntrace.run(spec, keep="all", overrides={key: fn}, check=False)
    with pytest.raises(AssertionError):
        assert_matches(trace, expected)
