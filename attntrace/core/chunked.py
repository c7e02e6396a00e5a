"""Attention by online softmax over key blocks (flash-attention style), traced block by block.

The full (seq_q × seq_k) pattern is never held.  Query rows are taken ``q_block`` at a
time and, for each query block, the keys ``k_block`` at a time.  Every query row carries
three running values through its key blocks:

    m    running max of the scores seen so far (−inf while every key so far is blocked)
    l    running sum  Σ exp(s_j − m)  over the keys seen so far
    acc  running *unnormalised* output  Σ exp(s_j − m) · v_j

A block whose max raises m from m_old to m_new first multiplies l and acc by the rescale
factor exp(m_old − m_new) (their terms were taken relative to the old max), then adds its
own terms.  After the last block the output is z = acc / l, which is softmax(s) · V up to
rounding (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; Dao et
al. 2022, FlashAttention).

Scores follow the engine's order: s = (Q·Kᵀ)·scale, + bias (ALiBi), then blocked keys set
to −inf.  Safe softmax, as in the engine: a row whose every key is blocked keeps m = −inf
and l = 0 and gets an all-zero output and all-zero weights, never NaN.  A tile whose every
key is blocked (above a causal diagonal, outside a window) is skipped: it could change
nothing, and skipping it halves the work of a causal layer.

Masks and biases come from *providers*: functions ``(q_start, q_stop, k_start, k_stop)``
that return the block only, so no (seq_q × seq_k) matrix is ever built.  Positions follow
attntrace/masks.py: query i sits at position i + seq_k − seq_q (bottom-right alignment:
with seq_q < seq_k the queries are the last positions of the keys, KV-cache decoding).

Hook points proposed for the lead (axes in brackets; ``row`` = a traced query row,
``k_block`` = the key block index; :data:`BLOCK_HOOKS` holds the same table):

    attn.hook_block_score_max  [batch, n_heads, row, k_block]       this block's own max score
    attn.hook_block_max        [batch, n_heads, row, k_block]       running max m after the block
    attn.hook_block_rescale    [batch, n_heads, row, k_block]       exp(m_old − m_new) applied to l and acc
    attn.hook_block_sum        [batch, n_heads, row, k_block]       running sum l after the block
    attn.hook_block_out        [batch, n_heads, row, k_block, d_v]  running unnormalised output acc
    attn.hook_block_z          [batch, n_heads, row, k_block, d_v]  acc / l: attention over the keys so far
    attn.hook_lse              [batch, n_heads, seq_q]              final log-sum-exp m + log l per row

The key range of block j is [key_starts[j], key_stops[j]).  The last block's
``attn.hook_block_z`` equals the row of ``attn.hook_z``.

A second, optional pass (``stats=True``) recomputes each weight block p = exp(s − m)/l from
the final m and l and reduces it on the spot: per-row max weight, argmax and sum, the min,
max and sum of the whole pattern, and a pooled heatmap (max and mean over a grid of token
ranges).  See :func:`working_bytes` for the peak memory.

Speed: the products are tile-sized (b·h small matrices of qb × d_head by d_head × kb), which
multi-threaded OpenBLAS handles badly on a busy machine (measured here: 6–10× slower
than with one thread); run with one BLAS thread (threadpoolctl or OPENBLAS_NUM_THREADS=1)
or larger blocks.  OpenBLAS's own per-thread buffers are outside the memory estimate.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from attntrace.errors import Location, input_error

BlockProvider = Callable[[int, int, int, int], "np.ndarray | None"]    # quoted: Python 3.9 has no X | None

BLOCK_HOOKS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("attn.hook_block_score_max", ("batch", "n_heads", "row", "k_block"), "max score within the key block"),
    ("attn.hook_block_max", ("batch", "n_heads", "row", "k_block"), "running max m after the block"),
    ("attn.hook_block_rescale", ("batch", "n_heads", "row", "k_block"), "exp(m_old − m_new) applied to l and acc"),
    ("attn.hook_block_sum", ("batch", "n_heads", "row", "k_block"), "running sum l = Σ exp(s − m)"),
    ("attn.hook_block_out", ("batch", "n_heads", "row", "k_block", "d_v"), "running unnormalised output acc"),
    ("attn.hook_block_z", ("batch", "n_heads", "row", "k_block", "d_v"), "acc / l: the output over keys so far"),
    ("attn.hook_lse", ("batch", "n_heads", "seq_q"), "log-sum-exp m + log l of each query row"),
)

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
TRACE_ALL_LIMIT = 1 << 24          # values a trace_rows="all" trace may hold (128 MiB in float64)
DEFAULT_BLOCK = 128
DEFAULT_GRID = 64


# --------------------------------------------------------------------------- mask and bias providers

def query_positions(q_start: int, q_stop: int, seq_q: int, seq_k: int) -> np.ndarray:
    """Absolute positions of queries q_start..q_stop−1: the queries are the last seq_q key positions."""
    return np.arange(q_start, q_stop) + (seq_k - seq_q)


def _distance(q_start: int, q_stop: int, k_start: int, k_stop: int, seq_q: int, seq_k: int) -> np.ndarray:
    """(q, k) block of query position − key position."""
    return query_positions(q_start, q_stop, seq_q, seq_k)[:, None] - np.arange(k_start, k_stop)[None, :]


def causal_keep(seq_q: int, seq_k: int) -> BlockProvider:
    """Causal mask blocks: a query sees keys at its own position or before (bottom-right aligned)."""
    def block(q_start, q_stop, k_start, k_stop):
        return _distance(q_start, q_stop, k_start, k_stop, seq_q, seq_k) >= 0
    return block


def window_keep(seq_q: int, seq_k: int, size: int, causal: bool) -> BlockProvider:
    """Sliding-window blocks with attntrace.masks.window's meaning: keys less than `size` positions
    away, looking back only when `causal` (0 ≤ q − k < size), both sides otherwise (|q − k| < size)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise input_error("ATT-E417", f"sliding window size must be a positive integer, got {size!r}",
                          Location(None, None, None, "window"), hint="a window of N keeps N keys per query")

    def block(q_start, q_stop, k_start, k_stop):
        distance = _distance(q_start, q_stop, k_start, k_stop, seq_q, seq_k)
        return ((distance >= 0) & (distance < size)) if causal else (np.abs(distance) < size)
    return block


def padding_keep(key_keep: np.ndarray) -> BlockProvider:
    """Key-padding blocks from (seq_k,) or (batch, seq_k), True = real token, as (batch or 1, 1, 1, k)."""
    keep = np.asarray(key_keep)
    if keep.ndim not in (1, 2) or keep.dtype.kind not in "biu":
        raise input_error("ATT-E417", f"padding mask must be (seq_k,) or (batch, seq_k) of bool or 0/1, "
                          f"got shape {keep.shape} of {keep.dtype}", Location(None, None, None, "padding"),
                          hint="True (1) marks a real token, False (0) a padding position")
    keep = keep.astype(bool)
    keep = keep[None] if keep.ndim == 1 else keep

    def block(q_start, q_stop, k_start, k_stop):
        return keep[:, None, None, k_start:k_stop]
    return block


def all_keep(*providers: BlockProvider | None) -> BlockProvider | None:
    """The AND of mask providers (None entries are skipped; None when nothing is left)."""
    present = [p for p in providers if p is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def block(q_start, q_stop, k_start, k_stop):
        keep = present[0](q_start, q_stop, k_start, k_stop)
        for provider in present[1:]:
            keep = keep & provider(q_start, q_stop, k_start, k_stop)
        return keep
    return block


def alibi_bias(seq_q: int, seq_k: int, slopes: Sequence[float]) -> BlockProvider:
    """ALiBi blocks −slope_h · |i − j| as (heads, q, k); pass attntrace.positional.alibi_slopes(n_heads)."""
    slopes = np.asarray(slopes, dtype=np.float64)
    if slopes.ndim != 1 or not np.all(np.isfinite(slopes)):
        raise input_error("ATT-E417", f"ALiBi slopes must be a finite vector (one per head), got shape "
                          f"{slopes.shape}", Location(None, None, None, "alibi slopes"),
                          hint="use attntrace.positional.alibi_slopes(n_heads)")

    def block(q_start, q_stop, k_start, k_stop):
        distance = np.abs(_distance(q_start, q_stop, k_start, k_stop, seq_q, seq_k)).astype(np.float64)
        return -slopes[:, None, None] * distance[None]
    return block


# --------------------------------------------------------------------------- results

@dataclass
class BlockTrace:
    """The online-softmax state of the traced query rows after every key block (see BLOCK_HOOKS)."""

    rows: np.ndarray            # (row,) query indices traced
    key_starts: np.ndarray      # (k_block,) first key of each block
    key_stops: np.ndarray       # (k_block,) one past the last key
    score_max: np.ndarray       # (batch, heads, row, k_block) the block's own max score
    running_max: np.ndarray     # (batch, heads, row, k_block) m after the block
    rescale: np.ndarray         # (batch, heads, row, k_block) exp(m_old − m_new): 1 when m did not change
                                # (also while every key so far is blocked), 0 at the first visible key
    running_sum: np.ndarray     # (batch, heads, row, k_block) l after the block
    partial_out: np.ndarray     # (batch, heads, row, k_block, d_v) acc after the block

    @property
    def partial_z(self) -> np.ndarray:
        """acc / l after each block: attention over the keys seen so far (0 while l = 0)."""
        total = self.running_sum[..., None]
        return self.partial_out / np.where(total == 0, 1, total)

    def hooks(self) -> dict[str, np.ndarray]:
        """The arrays under their proposed hook names."""
        return {"attn.hook_block_score_max": self.score_max, "attn.hook_block_max": self.running_max,
                "attn.hook_block_rescale": self.rescale, "attn.hook_block_sum": self.running_sum,
                "attn.hook_block_out": self.partial_out, "attn.hook_block_z": self.partial_z}


@dataclass
class PatternStats:
    """What the tracer shows of the pattern, reduced block by block (the pattern is never whole)."""

    row_max: np.ndarray         # (batch, heads, seq_q) largest weight of each query row (0 when fully masked)
    row_argmax: np.ndarray      # (batch, heads, seq_q) its key (first one on ties; 0 when fully masked)
    row_sums: np.ndarray        # (batch, heads, seq_q) Σ_j p_ij: 1, or 0 for a fully masked row
    min: float                  # over every entry of the pattern, blocked ones (0) included
    max: float
    sum: float                  # per-cell sums in the pattern's dtype, added up in float64
    size: int                   # batch · heads · seq_q · seq_k
    row_edges: np.ndarray       # (rows + 1,) query ranges of the pooled cells: [row_edges[r], row_edges[r+1])
    col_edges: np.ndarray       # (cols + 1,) key ranges of the pooled cells
    pooled_max: np.ndarray      # (batch, heads, rows, cols) max weight in each cell
    pooled_mean: np.ndarray     # (batch, heads, rows, cols) float64 mean weight in each cell

    @property
    def mean(self) -> float:
        return self.sum / self.size


@dataclass
class ChunkedResult:
    z: np.ndarray               # (batch, seq_q, heads, d_v), the engine's attn.hook_z layout
    row_max_score: np.ndarray   # (batch, heads, seq_q) final m (−inf for a fully masked row)
    row_sum_exp: np.ndarray     # (batch, heads, seq_q) final l (0 for a fully masked row)
    q_block: int
    k_block: int
    trace: BlockTrace | None = None
    stats: PatternStats | None = None

    @property
    def lse(self) -> np.ndarray:
        """log Σ_j exp(s_ij) per row (attn.hook_lse); −inf for a fully masked row."""
        with np.errstate(divide="ignore"):
            return self.row_max_score + np.log(self.row_sum_exp)


# --------------------------------------------------------------------------- input checks

def _where(name: str) -> Location:
    return Location(None, None, None, name)


def _checked_inputs(q, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.dtype]:
    arrays = {"q": np.asarray(q), "k": np.asarray(k), "v": np.asarray(v)}
    axes = {"q": "(batch, seq_q, heads, d_head)", "k": "(batch, seq_k, kv_heads, d_head)",
            "v": "(batch, seq_k, kv_heads, d_v)"}
    for name, array in arrays.items():
        if array.ndim != 4 or 0 in array.shape:
            raise input_error("ATT-E410", f"{name} must be a non-empty 4-D array {axes[name]}, got shape "
                              f"{array.shape}", _where(name), hint="split the heads: x.reshape(batch, seq, heads, d)")
        if array.dtype not in SUPPORTED_DTYPES:
            raise input_error("ATT-E412", f"{name} has dtype {array.dtype}; chunked attention works in "
                              "float32 or float64", _where(name), hint=f"cast it: {name}.astype(np.float32)")
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise input_error("ATT-E410", f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}",
                          _where("q/k/v batch"), hint="q, k and v must hold the same batch items")
    if q.shape[3] != k.shape[3]:
        raise input_error("ATT-E410", f"d_head differs: q has {q.shape[3]}, k has {k.shape[3]}",
                          _where("q/k d_head"), hint="q·kᵀ needs the same feature size on both sides")
    if k.shape[1:3] != v.shape[1:3]:
        raise input_error("ATT-E410", f"k (seq_k, kv_heads) = {k.shape[1:3]} but v has {v.shape[1:3]}",
                          _where("k/v"), hint="every key needs its value, for the same kv heads")
    if q.shape[2] % k.shape[2]:
        raise input_error("ATT-E411", f"{q.shape[2]} query heads cannot share {k.shape[2]} kv heads "
                          "(GQA needs heads to be a multiple of kv_heads)", _where("q/k heads"),
                          hint="query head h uses kv head h // (heads / kv_heads)")
    dtype = np.result_type(q, k, v)
    return q.astype(dtype, copy=False), k.astype(dtype, copy=False), v.astype(dtype, copy=False), dtype


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise input_error("ATT-E413", f"{name} must be a positive integer, got {value!r}", _where(name),
                          hint=f"e.g. {name}={DEFAULT_BLOCK if 'block' in name else DEFAULT_GRID}")
    return int(value)


def _trace_rows(trace_rows, seq_q: int, n_values_per_row: int) -> np.ndarray | None:
    if trace_rows is None:
        return None
    if isinstance(trace_rows, str):
        if trace_rows != "all":
            raise input_error("ATT-E416", f"trace_rows must be a row index, a list of them or 'all', got "
                              f"{trace_rows!r}", _where("trace_rows"), hint="e.g. trace_rows=0")
        if seq_q * n_values_per_row > TRACE_ALL_LIMIT:
            raise input_error("ATT-E416", f"tracing all {seq_q} query rows would hold "
                              f"{seq_q * n_values_per_row:,} values (limit {TRACE_ALL_LIMIT:,})",
                              _where("trace_rows"), hint="trace a few chosen rows, e.g. trace_rows=[0, -1]")
        return np.arange(seq_q)
    rows = np.atleast_1d(np.asarray(trace_rows))
    if rows.ndim != 1 or rows.dtype.kind not in "iu" or rows.size == 0:
        raise input_error("ATT-E416", f"trace_rows must be integer query indices, got {trace_rows!r}",
                          _where("trace_rows"), hint="e.g. trace_rows=0 or trace_rows=[0, 5]")
    if np.any(rows >= seq_q) or np.any(rows < -seq_q):
        raise input_error("ATT-E416", f"trace_rows {rows.tolist()} out of range for seq_q={seq_q}",
                          _where("trace_rows"), hint=f"use 0..{seq_q - 1} (negative counts from the end)")
    return rows % seq_q


def _checked_block(array, expected: tuple[int, ...], what: str, span: tuple[int, int, int, int]) -> np.ndarray:
    """A provider's block, checked to broadcast to `expected` without growing."""
    block = np.asarray(array)
    try:
        fits = block.ndim <= len(expected) and np.broadcast_shapes(block.shape, expected) == expected
    except ValueError:
        fits = False
    if what == "mask" and block.dtype.kind not in "biu":
        raise input_error("ATT-E414", f"the mask provider returned {block.dtype} values for queries "
                          f"{span[0]}:{span[1]}, keys {span[2]}:{span[3]}; it must return bool (True = may attend)",
                          _where("mask provider"), hint="additive masks (0 / −inf) belong in the bias provider")
    if not fits:
        raise input_error("ATT-E414" if what == "mask" else "ATT-E415",
                          f"the {what} provider returned shape {block.shape} for queries {span[0]}:{span[1]}, "
                          f"keys {span[2]}:{span[3]}; it must broadcast to {expected}", _where(f"{what} provider"),
                          hint="return only the block asked for, e.g. (q_stop − q_start, k_stop − k_start)")
    return block


# --------------------------------------------------------------------------- blocks of scores

def block_ranges(n: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(index, start, stop) of consecutive blocks of `size` covering 0..n−1."""
    for index, start in enumerate(range(0, n, size)):
        yield index, start, min(start + size, n)


class _Tiles:
    """Scores and value mixes of one (query block, key block) tile, in a buffer reused by every tile."""

    def __init__(self, q, k, v, scale, keep: BlockProvider | None, bias: BlockProvider | None,
                 q_block: int, k_block: int):
        self.q, self.k, self.v = q, k, v
        self.batch, self.seq_q, self.heads, self.d_head = q.shape
        self.seq_k, self.kv_heads = k.shape[1], k.shape[2]
        self.group = self.heads // self.kv_heads
        self.dtype = q.dtype
        self.scale = self.dtype.type(scale)
        self.keep, self.bias = keep, bias
        self.buffer = np.empty(self.batch * self.heads * q_block * k_block, dtype=self.dtype)

    def query_block(self, q_start: int, q_stop: int) -> np.ndarray:
        """Scaled queries (batch, kv_heads, group, q, d_head): head h = kv·group + g, as the engine groups them."""
        block = self.q[:, q_start:q_stop].reshape(self.batch, q_stop - q_start, self.kv_heads, self.group,
                                                   self.d_head)
        return block.transpose(0, 2, 3, 1, 4) * self.scale

    def keep_block(self, q_start: int, q_stop: int, k_start: int, k_stop: int) -> np.ndarray | None:
        """The tile's mask block, True = may attend; None without a mask."""
        if self.keep is None:
            return None
        span = (q_start, q_stop, k_start, k_stop)
        block = _checked_block(self.keep(*span), (self.batch, 1, q_stop - q_start, k_stop - k_start), "mask", span)
        return block.astype(bool, copy=False)

    def scores(self, query_block: np.ndarray, q_start: int, q_stop: int, k_start: int, k_stop: int,
               keep: np.ndarray | None) -> np.ndarray:
        """(batch, heads, q, k) scaled, biased and masked scores, written into the shared buffer."""
        nq, nk = q_stop - q_start, k_stop - k_start
        grouped = self.buffer[: self.batch * self.heads * nq * nk].reshape(
            self.batch, self.kv_heads, self.group, nq, nk)
        keys = self.k[:, k_start:k_stop].transpose(0, 2, 3, 1)[:, :, None]     # (batch, kv, 1, d_head, k)
        np.matmul(query_block, keys, out=grouped)
        scores = grouped.reshape(self.batch, self.heads, nq, nk)
        span = (q_start, q_stop, k_start, k_stop)
        if self.bias is not None:
            bias = _checked_block(self.bias(*span), (self.batch, self.heads, nq, nk), "bias", span)
            scores += bias                  # float64 bias rounds into the scores' dtype: no cast copy
            del bias                        # freed before the mask block is built
        if keep is not None and not keep.all():
            np.copyto(scores, self.dtype.type(-np.inf), where=~keep)
        return scores

    def mix(self, weights: np.ndarray, k_start: int, k_stop: int) -> np.ndarray:
        """weights (batch, heads, q, k) · V[k_start:k_stop] -> (batch, heads, q, d_v)."""
        b, h, nq, nk = weights.shape
        values = self.v[:, k_start:k_stop].transpose(0, 2, 1, 3)[:, :, None]   # (batch, kv, 1, k, d_v)
        mixed = weights.reshape(b, self.kv_heads, self.group, nq, nk) @ values
        return mixed.reshape(b, h, nq, -1)


def _safe_shift(row_max: np.ndarray) -> np.ndarray:
    """The max to subtract: 0 where every key so far is blocked, so exp(−inf − 0) = 0 and not NaN."""
    return np.where(np.isfinite(row_max), row_max, 0).astype(row_max.dtype, copy=False)


# --------------------------------------------------------------------------- the two passes

def chunked_attention(q, k, v, *, scale: float | None = None, keep: BlockProvider | None = None,
                      bias: BlockProvider | None = None, q_block: int = DEFAULT_BLOCK,
                      k_block: int = DEFAULT_BLOCK, trace_rows: int | Sequence[int] | str | None = None,
                      stats: bool = False, grid: int | tuple[int, int] = DEFAULT_GRID) -> ChunkedResult:
    """softmax((q·kᵀ)·scale + bias, masked) · v by online softmax, never holding the full pattern.

    q (batch, seq_q, heads, d_head), k (batch, seq_k, kv_heads, d_head), v (batch, seq_k, kv_heads,
    d_v); query head h uses kv head h // (heads / kv_heads) (GQA; MQA when kv_heads = 1).
    scale: default 1/√d_head.  keep: mask provider, True = may attend (see causal_keep, padding_keep,
    window_keep, all_keep).  bias: additive provider on the scaled scores (see alibi_bias).
    trace_rows: query row(s) whose online-softmax state is recorded after every key block
    (negative indices count from the end; "all" for small inputs).  stats: run the second pass
    (PatternStats).  grid: cells of the pooled heatmap, int (both axes) or (rows, cols), capped
    at seq_q and seq_k.  Computes in the inputs' dtype (float32 or float64).
    """
    q, k, v, dtype = _checked_inputs(q, k, v)
    q_block, k_block = _positive_int(q_block, "q_block"), _positive_int(k_block, "k_block")
    batch, seq_q, heads, d_head = q.shape
    seq_k, d_v = k.shape[1], v.shape[3]
    q_block, k_block = min(q_block, seq_q), min(k_block, seq_k)
    n_k_blocks = -(-seq_k // k_block)
    rows = _trace_rows(trace_rows, seq_q, batch * heads * n_k_blocks * (4 + d_v))
    tiles = _Tiles(q, k, v, 1.0 / math.sqrt(d_head) if scale is None else scale, keep, bias, q_block, k_block)

    z = np.empty((batch, seq_q, heads, d_v), dtype=dtype)
    final_max = np.empty((batch, heads, seq_q), dtype=dtype)
    final_sum = np.empty((batch, heads, seq_q), dtype=dtype)
    trace = None if rows is None else _empty_trace(rows, seq_k, k_block, batch, heads, d_v, dtype)
    for _, q_start, q_stop in block_ranges(seq_q, q_block):
        acc, m, total = _online_rows(tiles, q_start, q_stop, k_block, trace)
        final_max[:, :, q_start:q_stop], final_sum[:, :, q_start:q_stop] = m, total
        acc /= np.where(total == 0, 1, total)[..., None]           # safe: a fully masked row stays 0
        z[:, q_start:q_stop] = acc.transpose(0, 2, 1, 3)
    result = ChunkedResult(z, final_max, final_sum, q_block, k_block, trace)
    if stats:
        result.stats = _pattern_stats(tiles, final_max, final_sum, q_block, k_block, _grid_shape(grid))
    return result


def _empty_trace(rows, seq_k, k_block, batch, heads, d_v, dtype) -> BlockTrace:
    starts = np.arange(0, seq_k, k_block)
    stops = np.minimum(starts + k_block, seq_k)
    shape = (batch, heads, rows.size, starts.size)
    return BlockTrace(rows, starts, stops, *(np.zeros(shape, dtype=dtype) for _ in range(4)),
                      np.zeros(shape + (d_v,), dtype=dtype))


def _online_rows(tiles: _Tiles, q_start: int, q_stop: int, k_block: int, trace: BlockTrace | None):
    """One query block through every key block: the final (acc, m, l), recording the traced rows."""
    queries = tiles.query_block(q_start, q_stop)
    shape = (tiles.batch, tiles.heads, q_stop - q_start)
    running_max = np.full(shape, -np.inf, dtype=tiles.dtype)
    running_sum = np.zeros(shape, dtype=tiles.dtype)
    acc = np.zeros(shape + (tiles.v.shape[3],), dtype=tiles.dtype)
    traced = None
    if trace is not None:
        inside = (trace.rows >= q_start) & (trace.rows < q_stop)
        traced = (np.flatnonzero(inside), trace.rows[inside] - q_start) if inside.any() else None
    for j, k_start, k_stop in block_ranges(tiles.seq_k, k_block):
        keep = tiles.keep_block(q_start, q_stop, k_start, k_stop)
        if keep is not None and not keep.any():         # every key blocked (e.g. above the causal diagonal):
            if traced is not None:                      # the tile changes nothing, so skip its products
                _record(trace, traced, j, np.full(shape, -np.inf, dtype=tiles.dtype), running_max,
                        np.ones(shape, dtype=tiles.dtype), running_sum, acc)
            continue
        scores = tiles.scores(queries, q_start, q_stop, k_start, k_stop, keep)
        block_max = scores.max(axis=-1)
        new_max = np.maximum(running_max, block_max)
        shift = _safe_shift(new_max)
        rescale = np.exp(running_max - shift)                     # 0 when nothing was seen before
        rescale[running_max == new_max] = 1                       # max unchanged (also: still all blocked)
        np.subtract(scores, shift[..., None], out=scores)
        np.exp(scores, out=scores)
        running_sum *= rescale
        running_sum += scores.sum(axis=-1)
        acc *= rescale[..., None]
        acc += tiles.mix(scores, k_start, k_stop)
        running_max = new_max
        if traced is not None:
            _record(trace, traced, j, block_max, running_max, rescale, running_sum, acc)
    return acc, running_max, running_sum


def _record(trace: BlockTrace, traced, j: int, score_max, running_max, rescale, running_sum, acc) -> None:
    """Copy the traced rows' state after key block j into the trace."""
    where, local = traced
    for field, values in ((trace.score_max, score_max), (trace.running_max, running_max),
                          (trace.rescale, rescale), (trace.running_sum, running_sum), (trace.partial_out, acc)):
        field[:, :, where, j] = values[:, :, local]


def _grid_shape(grid) -> tuple[int, int]:
    cells = (grid, grid) if not isinstance(grid, (tuple, list)) else tuple(grid)
    if len(cells) != 2:
        raise input_error("ATT-E413", f"grid must be an int or (rows, cols), got {grid!r}", _where("grid"),
                          hint="e.g. grid=64 for at most 64×64 cells")
    return _positive_int(cells[0], "grid"), _positive_int(cells[1], "grid")


def grid_edges(n: int, cells: int) -> np.ndarray:
    """Edges of min(cells, n) near-equal token ranges covering 0..n−1 (sizes differ by at most 1)."""
    count = min(cells, n)
    return (np.arange(count + 1) * n) // count


def _cells_in(edges: np.ndarray, start: int, stop: int) -> tuple[int, int, np.ndarray]:
    """Cells first..last−1 meeting [start, stop), and where each begins inside that range (for reduceat)."""
    first = int(np.searchsorted(edges, start, side="right")) - 1
    last = int(np.searchsorted(edges, stop - 1, side="right"))
    return first, last, np.maximum(edges[first:last], start) - start


def _pattern_stats(tiles: _Tiles, final_max, final_sum, q_block: int, k_block: int,
                   grid: tuple[int, int]) -> PatternStats:
    """Second pass: p = exp(s − m)/l block by block, reduced into per-row and pooled stats."""
    batch, heads, seq_q, seq_k = tiles.batch, tiles.heads, tiles.seq_q, tiles.seq_k
    row_edges, col_edges = grid_edges(seq_q, grid[0]), grid_edges(seq_k, grid[1])
    pooled_max = np.zeros((batch, heads, row_edges.size - 1, col_edges.size - 1), dtype=tiles.dtype)
    pooled_sum = np.zeros(pooled_max.shape, dtype=np.float64)
    row_max = np.full((batch, heads, seq_q), -1.0, dtype=tiles.dtype)   # below any weight: block 0 always wins
    row_argmax = np.zeros((batch, heads, seq_q), dtype=np.int64)
    row_sums = np.zeros((batch, heads, seq_q), dtype=tiles.dtype)
    lowest = np.inf
    for _, q_start, q_stop in block_ranges(seq_q, q_block):
        queries = tiles.query_block(q_start, q_stop)
        shift = _safe_shift(final_max[:, :, q_start:q_stop])[..., None]
        total = final_sum[:, :, q_start:q_stop]
        total = np.where(total == 0, 1, total)[..., None]
        r0, r1, row_starts = _cells_in(row_edges, q_start, q_stop)
        for _, k_start, k_stop in block_ranges(seq_k, k_block):
            keep = tiles.keep_block(q_start, q_stop, k_start, k_stop)
            if keep is not None and not keep.any():     # all weights 0: only the minimum can notice
                lowest = 0.0
                continue
            weights = tiles.scores(queries, q_start, q_stop, k_start, k_stop, keep)
            np.subtract(weights, shift, out=weights)
            np.exp(weights, out=weights)
            np.divide(weights, total, out=weights)
            _update_row_winners(weights, k_start, row_max[:, :, q_start:q_stop], row_argmax[:, :, q_start:q_stop])
            lowest = min(lowest, float(weights.min()))
            c0, c1, col_starts = _cells_in(col_edges, k_start, k_stop)
            col_sums = np.add.reduceat(weights, col_starts, axis=3)   # in the weights' dtype: no cast buffer
            row_sums[:, :, q_start:q_stop] += col_sums.sum(axis=-1)
            pooled_sum[:, :, r0:r1, c0:c1] += np.add.reduceat(col_sums, row_starts, axis=2)
            del col_sums                                            # free it before the maxima's temporaries
            cell_max = np.maximum.reduceat(np.maximum.reduceat(weights, col_starts, axis=3), row_starts, axis=2)
            np.maximum(pooled_max[:, :, r0:r1, c0:c1], cell_max, out=pooled_max[:, :, r0:r1, c0:c1])
    np.maximum(row_max, 0, out=row_max)                # rows whose every tile was skipped: max weight 0
    total_sum = float(pooled_sum.sum())
    pooled_sum /= np.diff(row_edges)[:, None] * np.diff(col_edges)[None, :]     # in place: now the cell means
    return PatternStats(row_max, row_argmax, row_sums, lowest, float(row_max.max()), total_sum,
                        batch * heads * seq_q * seq_k, row_edges, col_edges, pooled_max, pooled_sum)


def _update_row_winners(weights: np.ndarray, k_start: int, row_max: np.ndarray, row_argmax: np.ndarray) -> None:
    """Running per-row max and argmax (views, updated in place); strictly greater wins, so ties keep the first key."""
    local = weights.argmax(axis=-1)
    value = np.take_along_axis(weights, local[..., None], axis=-1)[..., 0]
    better = value > row_max
    row_max[better] = value[better]
    row_argmax[better] = local[better] + k_start


# --------------------------------------------------------------------------- memory

def working_bytes(batch: int, heads: int, kv_heads: int, seq_q: int, seq_k: int, d_head: int, d_v: int,
                  q_block: int = DEFAULT_BLOCK, k_block: int = DEFAULT_BLOCK, itemsize: int = 4, *,
                  keep: bool = False, bias: bool = False, stats: bool = False,
                  grid: int | tuple[int, int] = DEFAULT_GRID, traced_rows: int = 0) -> dict[str, int]:
    """Peak memory of chunked_attention beyond its inputs, in bytes (an upper estimate, checked with
    tracemalloc in the tests).

    With b = batch, h = heads, kv = kv_heads, qb = min(q_block, seq_q), kb = min(k_block, seq_k),
    s = itemsize (4 float32, 8 float64), R × C the pooled grid and nc the grid columns one key
    block can meet (≤ min(kb, C)):

      tile      = s·b·h·qb·kb                          score/weight tile, one buffer reused by every tile
      operands  = s·b·(h·qb·(d_head + 2·d_v + 10)      scaled query block, acc, p·V, running m/l/rescale
                       + kv·kb·(d_head + d_v))         K and V blocks, if BLAS needs contiguous copies
      mask_tmp  = 3·b·qb·kb + 24·qb·kb                 (keep) bool blocks and int64 position differences
      bias_tmp  = 8·h·qb·kb + 24·qb·kb                 (bias) the float64 ALiBi block and its distances
      stats_tmp = 3s·b·h·qb·nc + (16 + 2s)·b·h·qb      (stats) per-cell sums and maxima, row argmax
      working   = tile + operands + max(mask_tmp, bias_tmp, stats_tmp) + 128 KiB (ufunc buffers etc.)

    and what it returns:

      results   = s·b·seq_q·h·d_v + 2·s·b·h·seq_q                   z, final m and l
                + (2s + 8)·b·h·seq_q + (s + 8)·b·h·R·C              (stats) row max/sums/argmax, pooled grids
                + (4 + d_v)·s·b·h·traced_rows·⌈seq_k / kb⌉          (trace)

    peak = working + results, O(b·h·qb·kb) + O(outputs).  Example: 16,384 tokens, 12 heads,
    d_head = d_v = 64, float32, blocks of 128, causal, stats: tile 0.75 MiB, working 3.2 MiB,
    results 53 MiB (z alone is 48 MiB); the full pattern would be 12 GiB.
    """
    qb, kb, s = min(q_block, seq_q), min(k_block, seq_k), itemsize
    rows_cells, cols_cells = (grid, grid) if isinstance(grid, int) else grid
    rows_cells, cols_cells = min(rows_cells, seq_q), min(cols_cells, seq_k)
    cols_per_block = min(kb, cols_cells, -(-kb // max(1, seq_k // cols_cells)) + 1)
    tile = s * batch * heads * qb * kb
    operands = s * batch * (heads * qb * (d_head + 2 * d_v + 10) + kv_heads * kb * (d_head + d_v))
    mask_tmp = (3 * batch * qb * kb + 24 * qb * kb) if keep else 0
    bias_tmp = (8 * heads * qb * kb + 24 * qb * kb) if bias else 0
    stats_tmp = (3 * s * batch * heads * qb * cols_per_block + (16 + 2 * s) * batch * heads * qb) if stats else 0
    working = tile + operands + max(mask_tmp, bias_tmp, stats_tmp) + (128 << 10)
    results = s * batch * seq_q * heads * d_v + 2 * s * batch * heads * seq_q
    if stats:
        results += (2 * s + 8) * batch * heads * seq_q + (s + 8) * batch * heads * rows_cells * cols_cells
    if traced_rows:
        results += (4 + d_v) * s * batch * heads * traced_rows * (-(-seq_k // kb))
    return {"tile": tile, "working": working, "results": results, "peak": working + results}


# --------------------------------------------------------------------------- a spec's mask, block by block

def mask_provider(mask_spec, batch: int, seq_q: int, seq_k: int) -> BlockProvider | None:
    """The blocks of a spec's mask (causal, window, prefix-LM, padding, an explicit matrix), with
    attntrace.core.masks' meaning, built per block: no (seq_q × seq_k) matrix is made."""
    from attntrace.core.masks import from_matrix
    if mask_spec.is_empty:
        return None
    providers = []
    if mask_spec.prefix:
        prefix = mask_spec.prefix

        def prefix_block(q_start, q_stop, k_start, k_stop):
            distance = _distance(q_start, q_stop, k_start, k_stop, seq_q, seq_k)
            return (distance >= 0) | (np.arange(k_start, k_stop)[None, :] < prefix)
        providers.append(prefix_block)
    elif mask_spec.causal:
        providers.append(causal_keep(seq_q, seq_k))
    if mask_spec.window:
        providers.append(window_keep(seq_q, seq_k, mask_spec.window, bool(mask_spec.causal or mask_spec.prefix)))
    if mask_spec.padding is not None:
        providers.append(padding_keep(from_matrix(mask_spec.padding.data, mask_spec.convention)))
    if mask_spec.matrix is not None:
        explicit = from_matrix(mask_spec.matrix.data, mask_spec.convention)
        explicit = explicit[None] if explicit.ndim == 2 else explicit         # (batch or 1, q, k)

        def matrix_block(q_start, q_stop, k_start, k_stop):
            return explicit[:, None, q_start:q_stop, k_start:k_stop]
        providers.append(matrix_block)
    return all_keep(*providers)
