"""The engine's fused score steps (tile by tile, bands on threads) against its plain steps.

Long layers run qk, scaled, attn_scores, pattern and z tile by tile (core.engine's fused steps);
here the threshold is lowered so that small specs take that path, with tiles of a few rows, and
every array, stat, preview, row sum, winner and pooled overview is compared with the plain steps."""
import numpy as np
import pytest

import attntrace
from attntrace.core import engine

SEQ = 61


def _spec(mask, *, batch=2, seq=SEQ, heads=4, kv=2, d=16, positional="none", seed=0, nan_at=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, seq, d))
    if nan_at is not None:
        x[nan_at] = np.nan
    return {"embeddings": x, "positional": positional,
            "attention": {"heads": heads, "kv_heads": kv, "W_q": rng.normal(size=(d, d)) / 2,
                          "W_k": rng.normal(size=(d, d // 2)) / 2, "W_v": rng.normal(size=(d, d // 2)),
                          "W_o": rng.normal(size=(d, d)) / 4, **({"mask": mask} if mask is not None else {})}}


def _trace(monkeypatch, spec, fused, **kw):
    monkeypatch.setattr(engine, "FUSED_MIN_ELEMENTS", 0 if fused else 1 << 62)
    monkeypatch.setattr(engine, "FUSED_TILE_BYTES", 7 * SEQ * 8)        # a few rows a tile, several a cell
    monkeypatch.setattr(engine, "PRODUCT_TILE_BYTES", 5 * SEQ * 8)
    return attntrace.run(spec, **kw)


MASKS = [
    None,
    "causal",
    {"causal": True, "padding": [[1] * SEQ, [1] * 40 + [0] * (SEQ - 40)]},
    {"causal": True, "padding": [[0] * 5 + [1] * (SEQ - 5), [1] * SEQ]},          # left padding
    {"causal": True, "window": 9},
    {"prefix": 6},
    {"padding": [[1] * SEQ, [0] * SEQ]},                                         # an item sees no key
]


def _close(a, b, dtype):
    tol = 1e-12 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _compare(plain, fused, dtype):
    assert set(plain.arrays) == set(fused.arrays) and set(plain.stats) == set(fused.stats)
    for hook, array in plain.arrays.items():
        _close(fused.arrays[hook], array, dtype)
    for hook, s in plain.stats.items():
        f = fused.stats[hook]
        assert (f.shape, f.dtype, f.nan, f.posinf, f.neginf, f.true) == (s.shape, s.dtype, s.nan, s.posinf,
                                                                         s.neginf, s.true), hook
        for name in ("min", "max", "mean"):
            a, b = getattr(f, name), getattr(s, name)
            assert (a is None) == (b is None), (hook, name)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-9 if dtype == "float64" else 1e-5, abs=1e-12), (hook, name)
    assert set(plain.previews) == set(fused.previews)
    for hook, p in plain.previews.items():
        _close(fused.previews[hook].values, p.values, dtype)
    for hook, (top, where) in plain.winners.items():
        _close(fused.winners[hook][0], top, dtype)
        np.testing.assert_array_equal(fused.winners[hook][1], where)
    for hook, sums in plain.row_sums.items():
        _close(fused.row_sums[hook], sums, dtype)
    assert set(plain.pooled) == set(fused.pooled)
    for hook, p in plain.pooled.items():
        _close(fused.pooled[hook].max, p.max, dtype)
        _close(fused.pooled[hook].mean, p.mean, dtype)
        np.testing.assert_array_equal(fused.pooled[hook].row_edges, p.row_edges)
        np.testing.assert_array_equal(fused.pooled[hook].col_edges, p.col_edges)
    assert [d.code for d in plain.diagnoses] == [d.code for d in fused.diagnoses]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("keep", ["all", ["hook_attn_out"]])
def test_fused_steps_equal_the_plain_steps(monkeypatch, mask, dtype, keep):
    spec = _spec(mask)
    _compare(_trace(monkeypatch, spec, False, dtype=dtype, keep=keep),
             _trace(monkeypatch, spec, True, dtype=dtype, keep=keep), dtype)


@pytest.mark.parametrize("positional", ["alibi", "rope"])
def test_fused_steps_with_positions(monkeypatch, positional):
    spec = _spec("causal", positional=positional)
    _compare(_trace(monkeypatch, spec, False, keep=["hook_attn_out"]),
             _trace(monkeypatch, spec, True, keep=["hook_attn_out"]), "float64")


def _poison(index, value):
    def hook(array, hook):
        array = array.copy()
        array[index] = value
        return array
    return hook


@pytest.mark.parametrize("hooks", [
    [("attn.hook_q", _poison((1, 30, 3, 2), np.nan))],                # a NaN score row in one head
    [("attn.hook_k", _poison((0, 7, 1, 0), np.inf))],                 # inf and NaN scores
    [("attn.hook_v", _poison((1, 50, 0, 1), np.nan))],                # NaN in V at a key some rows cannot see
])
def test_fused_steps_with_nan_and_inf(monkeypatch, hooks):
    """NaN and inf that attention produces: the tiles' stats see them and the plain passes count them."""
    spec = _spec({"causal": True, "padding": [[1] * SEQ, [1] * 40 + [0] * (SEQ - 40)]})
    plain = _trace(monkeypatch, spec, False, keep=["hook_attn_out"], hooks=hooks)
    fused = _trace(monkeypatch, spec, True, keep=["hook_attn_out"], hooks=hooks)
    _compare(plain, fused, "float64")
    assert any(d.code == "ATT-W204" for d in fused.diagnoses)


@pytest.mark.parametrize("bug", ["mask-after-softmax", "nan-leak-through-mask", "weak-mask-value",
                                 "softmax-wrong-axis", "inverted-mask", None])
def test_fused_steps_under_an_injected_bug_or_a_hook(monkeypatch, bug):
    """A replaced or hooked step takes no short cut: the trace equals the plain one."""
    from attntrace.analysis.bugs import get_bug
    spec = _spec({"causal": True, "padding": [[1] * SEQ, [1] * 40 + [0] * (SEQ - 40)]})
    runs = [{"overrides": get_bug(bug).overrides()}] if bug else [
        {"hooks": [("attn.hook_attn_scores", lambda a, hook: a * 0.5)]},
        {"hooks": [("attn.hook_pattern", lambda a, hook: np.sqrt(a))]},
        {"hooks": [("attn.hook_qk", lambda a, hook: None)]}]
    for kw in runs:
        _compare(_trace(monkeypatch, spec, False, keep=["hook_attn_out"], **kw),
                 _trace(monkeypatch, spec, True, keep=["hook_attn_out"], **kw), "float64")


def test_fused_bands_cover_rows_inside_cells():
    keep = np.tril(np.ones((1, 1, 100, 100), dtype=bool))
    bands = engine.Bands(100, 100, 8, keep)
    assert bands.edges[0] == 0 and bands.edges[-1] == 100 and (np.diff(bands.edges) > 0).all()
    assert set(bands.cells).issubset(set(bands.edges))
    for i in range(len(bands.edges) - 1):
        r0, r1, lo, hi = bands.span(0, i)
        assert lo == r0 + 1 and hi == r1                 # causal: only the band's diagonal block is mixed


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_steps_in_cross_attention(monkeypatch, dtype):
    """seq_q ≠ seq_k: queries from 29 decoder tokens, keys from 61 encoder tokens, the last ones padding."""
    rng = np.random.default_rng(3)
    spec = {"embeddings": rng.normal(size=(2, 29, 16)), "encoder": {"embeddings": rng.normal(size=(2, SEQ, 16))},
            "attention": {"heads": 4, "W_q": rng.normal(size=(16, 16)) / 2, "W_k": rng.normal(size=(16, 16)) / 2,
                          "W_v": rng.normal(size=(16, 16)), "mask": {"padding": [[1] * SEQ, [1] * 50 + [0] * 11]}}}
    for keep in ("all", ["hook_attn_out"]):
        _compare(_trace(monkeypatch, spec, False, dtype=dtype, keep=keep),
                 _trace(monkeypatch, spec, True, dtype=dtype, keep=keep), dtype)


def test_blas_threads_are_left_alone_for_toy_runs_and_limited_for_small_ones():
    # OpenBLAS keeps a product under 2·65536·4 flops on one thread by itself: a toy run does not
    # need (or load) threadpoolctl; a run above that but under ONE_THREAD_FLOPS gets one thread
    import contextlib

    from attntrace.core.plan import plan_from_spec

    def limit_of(seq, d):
        plan = plan_from_spec(attntrace.load_spec(_spec(None, batch=1, seq=seq, heads=2, kv=2, d=d)))
        return engine._blas_threads(plan)

    assert isinstance(limit_of(4, 8), contextlib.nullcontext)
    small = limit_of(256, 64)
    assert not isinstance(small, contextlib.nullcontext)
    small.restore_original_limits()
    assert isinstance(limit_of(4096, 512), contextlib.nullcontext)       # big: every core
