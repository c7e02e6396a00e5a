"""The score buffer a long run leaves for the next one (core/memory.py ReusableBuffer): reused only
when nobody holds it, so a trace, a kept array or a view of it is never written over."""
from __future__ import annotations

import numpy as np
import pytest

import attntrace
from attntrace.core import engine, memory
from attntrace.core.memory import ReusableBuffer


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_a_free_buffer_of_the_same_shape_is_handed_out_again():
    pool = ReusableBuffer()
    first = pool.empty((2, 3, 5, 5), np.float32)
    where = address(first)
    del first
    again = pool.empty((2, 3, 5, 5), np.float32)
    assert address(again) == where and again.shape == (2, 3, 5, 5) and again.dtype == np.float32


@pytest.mark.parametrize("holder", ["array", "view", "other shape", "other dtype"])
def test_a_held_buffer_or_another_shape_gets_a_new_one(holder):
    pool = ReusableBuffer()
    first = pool.empty((4, 64), np.float64)
    first[...] = 7.0
    held = {"array": first, "view": first[1:3]}.get(holder)
    where = address(first)
    del first
    shape, dtype = {"other shape": ((4, 32), np.float64), "other dtype": ((4, 64), np.float32)}.get(
        holder, ((4, 64), np.float64))
    second = pool.empty(shape, dtype)
    second[...] = -1.0
    if held is not None:
        assert address(second) != where
        assert (held == 7.0).all()                      # what a user holds is never written over
    assert second.shape == shape and second.dtype == dtype


def test_held_bytes_count_as_available_and_release_frees_them(monkeypatch):
    pool = ReusableBuffer()
    monkeypatch.setattr(memory, "SCORE_BUFFER", pool)
    array = pool.empty((1 << 10,), np.float64)
    assert pool.held == 0                               # in use: not free
    del array
    assert pool.held == 8 << 10
    monkeypatch.setattr(memory, "release_buffers", memory.release_buffers)
    memory.SCORE_BUFFER.release()
    assert pool.held == 0


def _spec(seed: int, seq: int = 48):
    rng = np.random.default_rng(seed)
    return {"embeddings": rng.normal(size=(seq, 16)),
            "attention": {"heads": 4, "mask": "causal", "W_q": rng.normal(size=(16, 16)) / 2,
                          "W_k": rng.normal(size=(16, 16)) / 2, "W_v": rng.normal(size=(16, 16))}}


def test_runs_reuse_the_buffer_and_never_write_over_a_kept_trace(monkeypatch):
    """Run 1 keeps its weights (keep='all'): run 2 must take a new buffer.  Run 3 follows run 2,
    whose trace kept no score array (only the output): it writes into run 2's buffer, and every
    trace equals the same run in a fresh buffer, bit for bit."""
    monkeypatch.setattr(memory, "SCORE_BUFFER", ReusableBuffer())
    monkeypatch.setattr(engine, "SCORE_BUFFER", memory.SCORE_BUFFER)
    monkeypatch.setattr(engine, "FUSED_MIN_ELEMENTS", 0)
    kept = attntrace.run(_spec(1), keep="all")
    before = {hook: kept[hook].copy() for hook in kept}
    second = attntrace.run(_spec(2), keep=["hook_attn_out"])
    buffer = memory.SCORE_BUFFER._buffer
    assert buffer is not None and not any(np.shares_memory(buffer, kept[hook]) for hook in kept)
    where = address(buffer)
    del buffer
    third = attntrace.run(_spec(3), keep=["hook_attn_out"])
    assert address(memory.SCORE_BUFFER._buffer) == where              # reused
    for hook, array in before.items():
        np.testing.assert_array_equal(kept[hook], array)
    for seed, trace in ((2, second), (3, third)):
        memory.SCORE_BUFFER.release()                 # the reference: the same run in a fresh buffer
        fresh = attntrace.run(_spec(seed), keep=["hook_attn_out"])
        np.testing.assert_array_equal(trace["output"], fresh["output"])
        for hook in ("attn.hook_qk", "attn.hook_attn_scores", "attn.hook_pattern"):
            assert trace.stats[hook] == fresh.stats[hook]
        np.testing.assert_array_equal(trace.row_sums["attn.hook_pattern"], fresh.row_sums["attn.hook_pattern"])


def test_the_api_can_let_the_buffer_go():
    attntrace.release_buffers()
    assert memory.SCORE_BUFFER.held == 0
