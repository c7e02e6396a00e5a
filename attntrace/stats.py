"""Summaries of arrays: value ranges, previews of big matrices, per-row winners.

These are computed by the engine while the array is alive, so the renderers
can show a 4k-token run without the engine keeping every 4k×4k matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np


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


def array_stats(array: np.ndarray) -> Stats:
    shape, dtype = tuple(int(s) for s in array.shape), str(array.dtype)
    if array.dtype == bool:
        true = int(np.count_nonzero(array))
        return Stats(shape, dtype, 0.0 if true < array.size else 1.0, 1.0 if true else 0.0,
                     true / array.size, true=true)
    lo, hi = float(array.min()), float(array.max())
    if np.isfinite(lo) and np.isfinite(hi):        # the common case: three passes, no masks
        return Stats(shape, dtype, lo, hi, float(array.mean(dtype=np.float64)))
    finite = np.isfinite(array)
    nan = int(np.isnan(array).sum())
    posinf = int(np.isposinf(array).sum())
    neginf = int(array.size - finite.sum() - nan - posinf)
    if not finite.any():
        return Stats(shape, dtype, None, None, None, nan, posinf, neginf)
    values = array[finite]
    return Stats(shape, dtype, float(values.min()), float(values.max()), float(values.mean(dtype=np.float64)),
                 nan, posinf, neginf)


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

    @property
    def elided(self) -> bool:
        return len(self.rows) < self.full_rows or len(self.cols) < self.full_cols

    full_rows: int = 0
    full_cols: int = 0


def preview(array: np.ndarray, row_axis: int, col_axis: int, edge: int) -> Preview:
    rows = edge_indices(array.shape[row_axis], edge)
    cols = edge_indices(array.shape[col_axis], edge)
    values = np.take(np.take(array, rows, axis=row_axis), cols, axis=col_axis)
    return Preview(np.array(values), row_axis, col_axis, rows, cols,
                   array.shape[row_axis], array.shape[col_axis])


def row_winners(pattern: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per query row: the largest weight and the key it goes to."""
    return pattern.max(axis=-1), pattern.argmax(axis=-1)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"
