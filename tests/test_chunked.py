"""Chunked (online-softmax) attention against a plain float64 numpy reference written here.

The reference builds the whole score matrix, masks it with full boolean matrices built from
positions (query i at position i + seq_k − seq_q), applies a safe softmax and mixes V;
nothing in it comes from attntrace.
"""
import math
import tracemalloc

import numpy as np
import pytest

from attntrace.core.chunked import (
    BLOCK_HOOKS,
    alibi_bias,
    all_keep,
    causal_keep,
    chunked_attention,
    grid_edges,
    padding_keep,
    window_keep,
    working_bytes,
)
from attntrace.core.positional import alibi_slopes
from attntrace.errors import InputError

# --------------------------------------------------------------------------- the reference


def positions(seq_q, seq_k):
    return np.arange(seq_q)[:, None] + (seq_k - seq_q), np.arange(seq_k)[None, :]


def full_keep(kind, batch, seq_q, seq_k, pad=None, size=3):
    """(batch, 1, seq_q, seq_k) True = may attend, for one named combination of masks."""
    qpos, kpos = positions(seq_q, seq_k)
    keep = np.ones((batch, 1, seq_q, seq_k), dtype=bool)
    if "causal" in kind:
        keep &= kpos <= qpos
    if "window" in kind:
        looking_back = "causal" in kind
        near = (qpos - kpos >= 0) & (qpos - kpos < size) if looking_back else np.abs(qpos - kpos) < size
        keep &= near
    if "padding" in kind:
        keep &= pad[:, None, None, :]
    return keep


def reference(q, k, v, scale, keep=None, bias=None):
    """Plain float64 attention: returns z (b, sq, h, dv), scores s and pattern p (b, h, sq, sk)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k_full, v_full = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k_full) * scale
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    p = np.zeros_like(s)
    for index in np.ndindex(*s.shape[:3]):                      # one row at a time: obviously right
        row = s[index]
        if np.isfinite(row).any():
            e = np.exp(row - row.max())
            p[index] = e / e.sum()
    return np.einsum("bhqk,bkhd->bqhd", p, v_full), s, p


def alibi_full(slopes, seq_q, seq_k):
    qpos, kpos = positions(seq_q, seq_k)
    return -np.asarray(slopes)[:, None, None] * np.abs(qpos - kpos)[None].astype(float)


def make_qkv(batch=2, seq_q=7, seq_k=7, heads=4, kv_heads=2, d=5, d_v=3, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, seq_q, heads, d)).astype(dtype)
    k = rng.normal(size=(batch, seq_k, kv_heads, d)).astype(dtype)
    v = rng.normal(size=(batch, seq_k, kv_heads, d_v)).astype(dtype)
    return q, k, v


def providers(kind, seq_q, seq_k, pad=None, size=3):
    causal = "causal" in kind
    return all_keep(causal_keep(seq_q, seq_k) if causal else None,
                    window_keep(seq_q, seq_k, size, causal) if "window" in kind else None,
                    padding_keep(pad) if "padding" in kind else None)


MASKS = ["none", "causal", "padding", "window", "causal+window", "causal+padding", "window+padding",
         "causal+window+padding"]
SHAPES = [(7, 7), (5, 9), (9, 4)]                   # square, KV-cache (seq_q < seq_k), seq_q > seq_k


def padding_for(batch, seq_k):
    pad = np.ones((batch, seq_k), dtype=bool)
    pad[0, -2:] = False                              # right padding
    pad[1, : min(3, seq_k)] = False                  # left padding (the first queries of a causal row see nothing)
    return pad


# --------------------------------------------------------------------------- output


@pytest.mark.parametrize("k_block", [1, 3, 16, "seq", "more"])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("seq_q,seq_k", SHAPES)
def test_output_equals_full_softmax_attention(k_block, kind, seq_q, seq_k):
    q, k, v = make_qkv(seq_q=seq_q, seq_k=seq_k)
    block = {"seq": seq_k, "more": seq_k + 5}.get(k_block, k_block)
    pad = padding_for(2, seq_k)
    z_ref, _, _ = reference(q, k, v, 1 / math.sqrt(5), full_keep(kind, 2, seq_q, seq_k, pad))
    for q_block in (1, 4, seq_q):
        result = chunked_attention(q, k, v, keep=providers(kind, seq_q, seq_k, pad), q_block=q_block, k_block=block)
        assert result.z.shape == (2, seq_q, 4, 3) and result.z.dtype == np.float64
        np.testing.assert_allclose(result.z, z_ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("k_block", [1, 3, 16])
def test_gqa_and_alibi(kv_heads, k_block):
    q, k, v = make_qkv(seq_q=6, seq_k=10, heads=4, kv_heads=kv_heads, seed=kv_heads)
    slopes = alibi_slopes(4)
    keep = full_keep("causal", 2, 6, 10)
    z_ref, _, _ = reference(q, k, v, 0.3, keep, alibi_full(slopes, 6, 10))
    result = chunked_attention(q, k, v, scale=0.3, keep=causal_keep(6, 10), bias=alibi_bias(6, 10, slopes),
                               q_block=4, k_block=k_block)
    np.testing.assert_allclose(result.z, z_ref, rtol=0, atol=1e-9)


def test_gqa_head_mapping_is_h_over_group():
    """Query head h must use kv head h // (heads / kv_heads): give kv head 1 values of 100."""
    q, k, v = make_qkv(seq_q=3, seq_k=3, heads=4, kv_heads=2)
    v[:, :, 0], v[:, :, 1] = 0.0, 100.0
    z = chunked_attention(q, k, v, k_block=2).z
    np.testing.assert_allclose(z[:, :, :2], 0.0)
    np.testing.assert_allclose(z[:, :, 2:], 100.0)


def test_fully_masked_rows_give_zero_output_and_no_nan():
    q, k, v = make_qkv(seq_q=4, seq_k=6)
    pad = np.ones((2, 6), dtype=bool)
    pad[1] = False                                   # batch item 1: every key is padding
    result = chunked_attention(q, k, v, keep=padding_keep(pad), k_block=2, trace_rows=0, stats=True)
    assert not np.isnan(result.z).any()
    np.testing.assert_array_equal(result.z[1], 0.0)
    np.testing.assert_array_equal(result.row_sum_exp[1], 0.0)
    assert np.isneginf(result.row_max_score[1]).all() and np.isneginf(result.lse[1]).all()
    np.testing.assert_array_equal(result.stats.row_sums[1], 0.0)
    np.testing.assert_allclose(result.stats.row_sums[0], 1.0, atol=1e-12)
    trace = result.trace
    assert not np.isnan(trace.partial_z).any() and not np.isnan(trace.rescale).any()
    np.testing.assert_array_equal(trace.rescale[1], 1.0)        # m stays −inf: nothing to rescale


def test_first_key_blocks_all_masked_then_visible():
    """Left padding in the first blocks: m goes −inf → finite, and the rescale of the empty past is harmless."""
    q, k, v = make_qkv(batch=1, seq_q=5, seq_k=9)
    pad = np.ones((1, 9), dtype=bool)
    pad[0, :6] = False
    z_ref, _, _ = reference(q, k, v, 1 / math.sqrt(5), full_keep("padding", 1, 5, 9, pad))
    result = chunked_attention(q, k, v, keep=padding_keep(pad), k_block=2, trace_rows="all")
    np.testing.assert_allclose(result.z, z_ref, rtol=0, atol=1e-9)
    assert np.isneginf(result.trace.running_max[..., :3]).all()
    np.testing.assert_array_equal(result.trace.rescale[..., 3], 0.0)    # exp(−inf − m): the empty past counts 0


def test_scale_default_and_large_scores_stay_finite():
    q, k, v = make_qkv(seq_q=4, seq_k=5)
    q *= 300.0                                       # scores in the thousands: a naive exp overflows
    z_ref, _, _ = reference(q, k, v, 1 / math.sqrt(5))
    z = chunked_attention(q, k, v, k_block=2).z
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-9)


def test_window_semantics_match_masks_module():
    """The window provider reproduces attntrace.masks.window (the meaning the engine uses)."""
    from attntrace.core import masks
    for seq_q, seq_k in SHAPES:
        for causal in (True, False):
            block = window_keep(seq_q, seq_k, 3, causal)(0, seq_q, 0, seq_k)
            np.testing.assert_array_equal(block, masks.window(seq_q, seq_k, 3, causal))
        np.testing.assert_array_equal(causal_keep(seq_q, seq_k)(0, seq_q, 0, seq_k), masks.causal(seq_q, seq_k))


def test_float32_stays_float32_and_close():
    q, k, v = make_qkv(seq_q=33, seq_k=33, dtype=np.float32)
    pad = padding_for(2, 33)
    z_ref, _, p_ref = reference(q, k, v, 1 / math.sqrt(5), full_keep("causal+padding", 2, 33, 33, pad))
    result = chunked_attention(q, k, v, keep=providers("causal+padding", 33, 33, pad), q_block=8, k_block=5,
                               stats=True)
    assert result.z.dtype == np.float32 and result.stats.row_max.dtype == np.float32
    np.testing.assert_allclose(result.z, z_ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(result.stats.row_max, p_ref.max(-1), rtol=0, atol=2e-6)


def test_long_float32_smoke_against_reference_rows():
    """2,048 tokens, 4 heads, causal, float32: a few rows against the float64 reference."""
    seq, heads, d = 2048, 4, 32
    q, k, v = make_qkv(batch=1, seq_q=seq, seq_k=seq, heads=heads, kv_heads=heads, d=d, d_v=d,
                       dtype=np.float32, seed=3)
    result = chunked_attention(q, k, v, keep=causal_keep(seq, seq), q_block=256, k_block=256)
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    for row in (0, 1, 777, 1500, seq - 1):
        s = np.einsum("hd,khd->hk", q64[0, row], k64[0, : row + 1]) / math.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(result.z[0, row], np.einsum("hk,khd->hd", p, v64[0, : row + 1]),
                                   rtol=0, atol=2e-5)


# --------------------------------------------------------------------------- the block trace


@pytest.mark.parametrize("seq_q,seq_k,kind,q_block,k_block,rows,expected_rows", [
    (6, 11, "causal+padding", 4, 4, [0, 3, -1], [0, 3, 5]),
    (10, 10, "causal", 2, 3, "all", list(range(10))),          # tiles above the diagonal are skipped
])
def test_trace_equals_values_computed_directly(seq_q, seq_k, kind, q_block, k_block, rows, expected_rows):
    q, k, v = make_qkv(seq_q=seq_q, seq_k=seq_k)
    pad = padding_for(2, seq_k)
    keep = full_keep(kind, 2, seq_q, seq_k, pad)
    _, s, _ = reference(q, k, v, 0.5, keep)
    v_full = np.repeat(v, 2, axis=2)
    result = chunked_attention(q, k, v, scale=0.5, keep=providers(kind, seq_q, seq_k, pad), q_block=q_block,
                               k_block=k_block, trace_rows=rows)
    trace = result.trace
    np.testing.assert_array_equal(trace.rows, expected_rows)
    np.testing.assert_array_equal(trace.key_starts, np.arange(0, seq_k, k_block))
    np.testing.assert_array_equal(trace.key_stops, np.minimum(np.arange(0, seq_k, k_block) + k_block, seq_k))
    for b in range(2):
        for h in range(4):
            for r, row in enumerate(trace.rows):
                previous = -np.inf
                for j, stop in enumerate(trace.key_stops):
                    seen = s[b, h, row, :stop]
                    m = seen.max()
                    weights = np.exp(seen - m) if np.isfinite(m) else np.zeros(stop)
                    l_direct = weights.sum()
                    out_direct = weights @ v_full[b, :stop, h]
                    rescale = 1.0 if previous == m else np.exp(previous - m)
                    block_max = s[b, h, row, trace.key_starts[j]:stop].max()
                    assert trace.score_max[b, h, r, j] == pytest.approx(block_max, abs=1e-12)
                    assert trace.running_max[b, h, r, j] == pytest.approx(m, abs=1e-12)
                    assert trace.running_sum[b, h, r, j] == pytest.approx(l_direct, abs=1e-12)
                    assert trace.rescale[b, h, r, j] == pytest.approx(rescale, abs=1e-12)
                    np.testing.assert_allclose(trace.partial_out[b, h, r, j], out_direct, atol=1e-12)
                    previous = m
    np.testing.assert_allclose(trace.partial_z[..., -1, :], result.z[:, trace.rows].transpose(0, 2, 1, 3),
                               atol=1e-12)
    np.testing.assert_allclose(result.lse, np.log(np.exp(s).sum(-1)), atol=1e-12)
    assert set(trace.hooks()) == {name for name, _, _ in BLOCK_HOOKS} - {"attn.hook_lse"}
    for name, axes, _ in BLOCK_HOOKS:
        if name in trace.hooks():
            assert trace.hooks()[name].ndim == len(axes)


# --------------------------------------------------------------------------- the stats pass


def pooled_reference(p, row_edges, col_edges):
    b, h = p.shape[:2]
    cells_max = np.zeros((b, h, len(row_edges) - 1, len(col_edges) - 1))
    cells_mean = np.zeros_like(cells_max)
    for r in range(len(row_edges) - 1):
        for c in range(len(col_edges) - 1):
            cell = p[:, :, row_edges[r]:row_edges[r + 1], col_edges[c]:col_edges[c + 1]]
            cells_max[:, :, r, c] = cell.max(axis=(2, 3))
            cells_mean[:, :, r, c] = cell.mean(axis=(2, 3))
    return cells_max, cells_mean


@pytest.mark.parametrize("q_block,k_block,grid", [(1, 1, 4), (3, 5, 4), (4, 16, (3, 7)), (64, 64, 64), (2, 3, 1)])
@pytest.mark.parametrize("kind", ["none", "causal", "causal+padding", "window+padding"])
@pytest.mark.parametrize("seq_k", [13, 4])                   # 4: the first queries of a causal mask see nothing
def test_stats_equal_those_of_the_full_pattern(q_block, k_block, grid, kind, seq_k):
    q, k, v = make_qkv(seq_q=9, seq_k=seq_k)
    pad = padding_for(2, seq_k)
    _, _, p = reference(q, k, v, 1 / math.sqrt(5), full_keep(kind, 2, 9, seq_k, pad))
    stats = chunked_attention(q, k, v, keep=providers(kind, 9, seq_k, pad), q_block=q_block, k_block=k_block,
                              stats=True, grid=grid).stats
    np.testing.assert_allclose(stats.row_max, p.max(-1), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(stats.row_argmax, p.argmax(-1))
    np.testing.assert_allclose(stats.row_sums, p.sum(-1), rtol=0, atol=1e-12)
    assert stats.min == pytest.approx(p.min(), abs=1e-15)
    assert stats.max == pytest.approx(p.max(), abs=1e-12)
    assert stats.sum == pytest.approx(p.sum(), abs=1e-10)
    assert stats.mean == pytest.approx(p.mean(), abs=1e-12)
    assert stats.size == p.size
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    assert len(stats.row_edges) == min(rows, 9) + 1 and len(stats.col_edges) == min(cols, seq_k) + 1
    cells_max, cells_mean = pooled_reference(p, stats.row_edges, stats.col_edges)
    np.testing.assert_allclose(stats.pooled_max, cells_max, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.pooled_mean, cells_mean, rtol=0, atol=1e-12)


def test_argmax_ties_go_to_the_first_key_across_blocks():
    q, k, v = make_qkv(batch=1, seq_q=2, seq_k=7)
    k[:] = 0.0                                        # every score exactly 0: uniform rows
    stats = chunked_attention(q, k, v, k_block=2, stats=True).stats
    np.testing.assert_array_equal(stats.row_argmax, 0)
    np.testing.assert_allclose(stats.row_max, 1 / 7, atol=1e-15)


@pytest.mark.parametrize("n,cells", [(1, 64), (7, 3), (64, 64), (100, 64), (2048, 64), (13, 1)])
def test_grid_edges_cover_the_sequence_in_near_equal_ranges(n, cells):
    edges = grid_edges(n, cells)
    sizes = np.diff(edges)
    assert edges[0] == 0 and edges[-1] == n and len(sizes) == min(n, cells)
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1


# --------------------------------------------------------------------------- memory


def test_peak_memory_is_within_the_estimate_and_far_below_the_pattern():
    batch, seq, heads, d = 1, 1024, 4, 16
    q, k, v = make_qkv(batch=batch, seq_q=seq, seq_k=seq, heads=heads, kv_heads=heads, d=d, d_v=d)
    keep = all_keep(causal_keep(seq, seq), padding_keep(np.ones((batch, seq), dtype=bool)))
    estimate = working_bytes(batch, heads, heads, seq, seq, d, d, 64, 64, 8, keep=True, stats=True, traced_rows=1)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        chunked_attention(q, k, v, keep=keep, q_block=64, k_block=64, stats=True, trace_rows=5)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    full_pattern = batch * heads * seq * seq * 8
    assert peak <= estimate["peak"]
    assert estimate["peak"] <= 2 * peak               # an estimate, not a wild bound
    assert estimate["peak"] < full_pattern / 8


def test_working_bytes_formula():
    # s·b·h·qb·kb with the blocks capped at the sequence
    assert working_bytes(2, 3, 3, 10, 20, 4, 4, 128, 8, 8)["tile"] == 8 * 2 * 3 * 10 * 8
    small = working_bytes(1, 12, 12, 16384, 16384, 64, 64, 128, 128, 4, keep=True, stats=True)
    assert small["tile"] == 4 * 12 * 128 * 128
    assert small["working"] < 8 << 20 and small["results"] < 64 << 20


# --------------------------------------------------------------------------- bad input


def raises(code, call):
    with pytest.raises(InputError) as caught:
        call()
    assert caught.value.diagnosis.code == code
    assert caught.value.diagnosis.hint
    return caught.value.diagnosis


def test_errors_on_bad_input():
    q, k, v = make_qkv()
    raises("ATT-E410", lambda: chunked_attention(q[0], k, v))
    raises("ATT-E410", lambda: chunked_attention(q, k[:1], v[:1]))
    raises("ATT-E410", lambda: chunked_attention(q, k[..., :4], v))
    raises("ATT-E410", lambda: chunked_attention(q, k, v[:, :3]))
    raises("ATT-E410", lambda: chunked_attention(q[:, :0], k, v))
    raises("ATT-E411", lambda: chunked_attention(q[:, :, :3], k, v))
    raises("ATT-E412", lambda: chunked_attention(q.astype(np.float16), k, v))
    raises("ATT-E412", lambda: chunked_attention(q.astype(int), k, v))
    for bad in (0, -1, 2.5, True, "8"):
        raises("ATT-E413", lambda bad=bad: chunked_attention(q, k, v, k_block=bad))
    raises("ATT-E413", lambda: chunked_attention(q, k, v, q_block=0))
    raises("ATT-E413", lambda: chunked_attention(q, k, v, stats=True, grid=(4, 0)))
    raises("ATT-E413", lambda: chunked_attention(q, k, v, stats=True, grid=(4, 4, 4)))
    raises("ATT-E414", lambda: chunked_attention(q, k, v, keep=lambda *span: np.ones((3, 3), bool), k_block=2))
    raises("ATT-E414", lambda: chunked_attention(q, k, v, keep=lambda a, b, c, d: np.zeros((b - a, d - c))))
    raises("ATT-E415", lambda: chunked_attention(q, k, v, bias=alibi_bias(7, 7, [1.0, 2.0, 3.0])))
    where = raises("ATT-E416", lambda: chunked_attention(q, k, v, trace_rows=7))
    assert "seq_q=7" in where.message
    raises("ATT-E416", lambda: chunked_attention(q, k, v, trace_rows="first"))
    raises("ATT-E416", lambda: chunked_attention(q, k, v, trace_rows=[1.5]))
    big_q, big_k, big_v = make_qkv(batch=1, seq_q=4096, seq_k=4096, heads=16, kv_heads=16, d=1, d_v=1)
    raises("ATT-E416", lambda: chunked_attention(big_q, big_k, big_v, k_block=16, trace_rows="all"))
    raises("ATT-E417", lambda: window_keep(7, 7, 0, True))
    raises("ATT-E417", lambda: padding_keep(np.ones((2, 3, 4))))
    raises("ATT-E417", lambda: alibi_bias(7, 7, [[1.0]]))


def test_negative_trace_rows_count_from_the_end():
    q, k, v = make_qkv()
    np.testing.assert_array_equal(chunked_attention(q, k, v, trace_rows=[-1, -7]).trace.rows, [6, 0])


# --------------------------------------------------------------------------- chunked attention in a trace

def _trace_spec(seed=0, batch=2, seq=37, heads=4, kv=2, d=16, mask=None, positional="none"):
    rng = np.random.default_rng(seed)
    return {"embeddings": rng.normal(size=(batch, seq, d)), "positional": positional,
            "attention": {"heads": heads, "kv_heads": kv, "W_q": rng.normal(size=(d, d)) / 2,
                          "W_k": rng.normal(size=(d, d // 2)) / 2, "W_v": rng.normal(size=(d, d // 2)),
                          "mask": mask or "causal"}}


@pytest.mark.parametrize("chunk", [1, 3, 16, 37, 100])
@pytest.mark.parametrize("mask, positional", [
    ("causal", "none"),
    ({"causal": True, "window": 9, "padding": [[1] * 37, [1] * 30 + [0] * 7]}, "alibi"),
    ({"padding": [[1] * 37, [1] * 5 + [0] * 32]}, "rope"),
    ({"prefix": 6}, "none"),
])
def test_run_with_chunk_equals_the_full_trace(chunk, mask, positional):
    import attntrace
    spec = _trace_spec(mask=mask, positional=positional)
    full = attntrace.run(spec, keep="all")
    chunked_trace = attntrace.run(spec, keep="all", chunk=chunk)
    for hook in ("attn.hook_z", "hook_attn_out"):
        np.testing.assert_allclose(chunked_trace[hook], full[hook], rtol=0, atol=1e-9)
    # the weights were never held, but what the trace says of them is theirs
    pattern = full["attn.hook_pattern"]
    np.testing.assert_allclose(chunked_trace.row_sums["attn.hook_pattern"], pattern.sum(-1), atol=1e-12)
    np.testing.assert_allclose(chunked_trace.winners["attn.hook_pattern"][0], pattern.max(-1), atol=1e-12)
    assert abs(chunked_trace.stats["attn.hook_pattern"].max - pattern.max()) < 1e-12
    assert "attn.hook_pattern" not in chunked_trace.arrays and "attn.hook_qk" not in chunked_trace.plan.hooks
    # the traced row: the last query; its final running max is that row's largest (scaled, biased) score
    blocks = -(-37 // chunk)
    assert chunked_trace["attn.hook_block_max"].shape == (2, 4, 1, blocks)
    scores = np.where(full["attn.hook_mask"], full["attn.hook_scaled"], -np.inf)[:, :, -1]
    final = chunked_trace["attn.hook_block_max"][..., 0, -1]
    np.testing.assert_allclose(np.where(np.isfinite(final), final, 0), np.where(np.isfinite(final),
                               scores.max(-1), 0), atol=1e-12)


def test_chunk_from_the_spec_and_the_cli(invoke, write_spec):
    import json

    import yaml
    spec = _trace_spec(batch=1, seq=20)
    spec["attention"]["chunk"] = 8
    text = yaml.safe_dump({k: (v.tolist() if isinstance(v, np.ndarray) else
                               {kk: (vv.tolist() if isinstance(vv, np.ndarray) else vv) for kk, vv in v.items()}
                               if isinstance(v, dict) else v) for k, v in spec.items()})
    code, out = invoke("run", write_spec(text), "--format", "json")
    assert code == 0, out
    doc = json.loads(out)
    assert "attn.hook_block_max" in doc["steps"] and "attn.hook_pattern" not in doc["steps"]
    assert doc["hooks"]["attn.hook_block_out"]["shape"] == [1, 4, 1, 3, 4]      # (batch, heads, row, blocks, d_v)
    code, out = invoke("run", write_spec(text), "--chunk", "5", "--chunk-row", "3", "--steps", "block_max")
    assert code == 0 and "m = running max" in out and "query 3" in out


def test_a_run_that_would_not_fit_is_refused_before_allocating(invoke, write_spec, monkeypatch):
    from attntrace.core import memory
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * memory.MiB)
    text = ("version: 1\nembeddings: {random: {shape: [2048, 64], seed: 0}}\n"
            "attention: {heads: 8, W_q: {identity: 64}, W_k: {identity: 64}, W_v: {identity: 64}, mask: causal}\n")
    code, out = invoke("run", write_spec(text), "--format", "json")
    import json
    d = json.loads(out)["diagnoses"][0]
    assert code == 2 and d["code"] == "ATT-E020"
    assert "this run needs about" in d["message"] and "64.0 MiB is available" in d["message"]
    assert "--chunk" in d["hint"]
    code, out = invoke("run", write_spec(text), "--chunk", "256", "--steps", "out")
    assert code == 0, out                                     # the advice works
