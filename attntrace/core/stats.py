"""Summaries of arrays: value ranges, previews of big matrices, per-row winners.

These are computed by the engine while the array is alive, so the renderers
can show a 4k-token run without the engine keeping every 4k×4k matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

PREVIEW_EDGE = 4                 # rows/columns kept at each end of a big array


@dataclass
class Stats:
    shape: Tuple[int, ...]
    dtype: str
    min: Optional[float]          # over finite values
    max: Optional[float]
    mean: Optional[float]
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    true: Optional[int] = None    # boolean arrays (masks): how many True

    def to_json(self) -> Dict:
        return {k: v for k, v in self.__dict__.items() if v is not None or k in ("min", "max", "mean")}


def array_stats(array: np.ndarray, valid: Optional[np.ndarray] = None, trusted: bool = False) -> Stats:
    """min/max/mean over finite values and counts of NaN/±inf.

    `valid` (broadcastable bool) marks where values are expected finite -- the
    unmasked scores -- so masked scores need four passes instead of a copy of
    every finite value."""
    shape, dtype = tuple(int(s) for s in array.shape), str(array.dtype)
    if valid is not None and array.dtype != bool:
        stats = _masked_stats(array, valid, shape, dtype, trusted)
        if stats is not None:
            return stats
    if array.dtype == bool:
        true = int(np.count_nonzero(array))
        return Stats(shape, dtype, 0.0 if true < array.size else 1.0, 1.0 if true else 0.0,
                     true / array.size, true=true)
    lo, hi, total = _min_max_sum(array)
    if np.isfinite(lo) and np.isfinite(hi) and np.isfinite(total):   # no NaN, no inf (a NaN shows in the sum)
        return Stats(shape, dtype, lo, hi, total / array.size)
    finite = np.isfinite(array)
    nan = int(np.isnan(array).sum())
    posinf = int(np.isposinf(array).sum())
    neginf = int(array.size - finite.sum() - nan - posinf)
    if not finite.any():
        return Stats(shape, dtype, None, None, None, nan, posinf, neginf)
    values = array[finite]
    return Stats(shape, dtype, float(values.min()), float(values.max()), float(values.mean(dtype=np.float64)),
                 nan, posinf, neginf)


CHUNK_VALUES = 1 << 18      # 2 MiB of float64: three reductions over a chunk while it is in cache


def _min_max_sum(array: np.ndarray) -> Tuple[float, float, float]:
    """min, max and sum in one sweep over cache-sized chunks (about 40% faster than three
    whole-array passes on score-sized arrays, which do not fit in cache)."""
    flat = array.reshape(-1) if array.flags.c_contiguous else np.ravel(array)
    if flat.size <= CHUNK_VALUES:
        return float(flat.min()), float(flat.max()), float(flat.sum(dtype=np.float64))
    lo, hi, total = np.inf, -np.inf, 0.0
    for start in range(0, flat.size, CHUNK_VALUES):
        chunk = flat[start:start + CHUNK_VALUES]
        lo = min(lo, float(chunk.min()))
        hi = max(hi, float(chunk.max()))
        total += float(chunk.sum(dtype=np.float64))
    return lo, hi, total


def _masked_stats(array: np.ndarray, valid: np.ndarray, shape, dtype, trusted: bool = False) -> Optional[Stats]:
    """Stats when exactly the invalid positions hold -inf; None when that is not so.

    `trusted`: the engine's own masking step wrote the -inf, so the pass that
    verifies it is skipped."""
    blocked = ~valid
    n_valid = int(np.broadcast_to(valid, array.shape).sum())
    if n_valid == 0:
        return None
    if not trusted and blocked.any() and np.max(array, where=blocked, initial=-np.inf) != -np.inf:
        return None                                   # something other than -inf where blocked
    lo = float(np.min(array, where=valid, initial=np.inf))
    hi = float(array.max())                           # -inf never wins while some position is valid
    total = float(np.sum(array, where=valid, dtype=np.float64))
    if not (np.isfinite(lo) and np.isfinite(hi) and np.isfinite(total)):
        return None                                   # NaN or inf among the valid: count them slowly
    return Stats(shape, dtype, lo, hi, total / n_valid, neginf=array.size - n_valid)


def stats_from_parts(shape, dtype, lo: float, hi: float, total: float, count: int,
                     neginf: int = 0) -> Optional[Stats]:
    """Stats from the min, max and sum a fused pass took over `count` values (the rest -inf, counted
    in `neginf`); None when a NaN or an inf shows among them (count those slowly, with array_stats)."""
    if count == 0 or not (np.isfinite(lo) and np.isfinite(hi) and np.isfinite(total)):
        return None
    return Stats(tuple(int(s) for s in shape), str(dtype), float(lo), float(hi), float(total) / count,
                 neginf=int(neginf))


def scaled_stats(stats: Stats, factor: float) -> Stats:
    """Stats of array·factor (factor > 0) from the stats of the array: no pass over the data."""
    def times(x):
        return None if x is None else x * factor
    return Stats(stats.shape, stats.dtype, times(stats.min), times(stats.max), times(stats.mean),
                 stats.nan, stats.posinf, stats.neginf)


def edge_indices(n: int, edge: int) -> np.ndarray:
    """Indices numpy would print: all when small, else the first and last `edge`."""
    if n <= 2 * edge + 1:
        return np.arange(n)
    return np.concatenate([np.arange(edge), np.arange(n - edge, n)])


@dataclass
class Preview:
    """A corner view of a big array: only the rows/columns a renderer shows."""

    values: np.ndarray
    row_axis: int
    col_axis: int
    rows: np.ndarray              # original indices of the kept rows
    cols: np.ndarray
    full_rows: int = 0            # sizes of the row and column axes before the cut
    full_cols: int = 0


def preview(array: np.ndarray, row_axis: int, col_axis: int, edge: int) -> Preview:
    rows = edge_indices(array.shape[row_axis], edge)
    cols = edge_indices(array.shape[col_axis], edge)
    values = np.take(np.take(array, rows, axis=row_axis), cols, axis=col_axis)
    return Preview(np.array(values), row_axis, col_axis, rows, cols,
                   array.shape[row_axis], array.shape[col_axis])


def row_winners(pattern: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per query row: the largest weight and the key it goes to."""
    top = pattern.argmax(axis=-1)
    return np.take_along_axis(pattern, top[..., None], axis=-1)[..., 0], top





POOL_CELLS = 48          # a pooled overview of a long sequence: at most this many cells a side


@dataclass
class Pooled:
    """A score-shaped array reduced to a grid of token ranges: what a long sequence's overview shows."""

    max: np.ndarray               # (..., R, C) block maximum
    mean: np.ndarray              # (..., R, C) block mean
    row_edges: np.ndarray         # R + 1 boundaries: cell r covers rows row_edges[r] .. row_edges[r+1]-1
    col_edges: np.ndarray


def grid_edges(n: int, cells: int) -> np.ndarray:
    """Boundaries of `cells` (or n, if smaller) nearly equal ranges covering 0..n."""
    return np.unique(np.linspace(0, n, min(n, cells) + 1).round().astype(np.int64))


def pool(array: np.ndarray, cells: int = POOL_CELLS) -> Pooled:
    """Block max and mean over the last two axes (finite values; weights are), a band of rows at a
    time: the temporaries stay one band of the array, not its size."""
    rows, cols = grid_edges(array.shape[-2], cells), grid_edges(array.shape[-1], cells)
    lead = array.shape[:-2]
    block_max = np.empty(lead + (len(rows) - 1, len(cols) - 1), dtype=array.dtype)
    block_sum = np.empty(block_max.shape, dtype=np.float64)
    for r in range(len(rows) - 1):
        band = array[..., rows[r]:rows[r + 1], :]
        block_max[..., r, :] = np.maximum.reduceat(band.max(axis=-2), cols[:-1], axis=-1)
        block_sum[..., r, :] = np.add.reduceat(band.sum(axis=-2, dtype=np.float64), cols[:-1], axis=-1)
    sizes = np.diff(rows)[:, None] * np.diff(cols)[None, :]
    return Pooled(block_max, block_sum / sizes, rows, cols)


def coarsen_columns(grid: np.ndarray, col_edges: np.ndarray, how: str, max_cols: int):
    """A pooled grid (..., R, C) with every k adjacent columns merged (k the smallest that leaves at
    most `max_cols`; a narrow terminal): the max of maxima, or the mean weighted by each range's
    width.  Returns the grid and its column edges."""
    cells = grid.shape[-1]
    if cells <= max_cols:
        return grid, col_edges
    k = -(-cells // max(1, max_cols))
    starts = np.arange(0, cells, k)
    merged_edges = np.append(col_edges[starts], col_edges[-1])
    if how == "max":
        return np.maximum.reduceat(grid, starts, axis=-1), merged_edges
    widths = np.diff(col_edges).astype(np.float64)
    sums = np.add.reduceat(grid * widths, starts, axis=-1)
    return sums / np.diff(merged_edges), merged_edges
