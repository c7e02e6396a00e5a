"""Attention masks as boolean "may attend" arrays of shape (batch or 1, 1, seq_q, seq_k).

Conventions differ between libraries, so attntrace keeps one inside:
True = this query may attend to this key (PyTorch's scaled_dot_product_attention,
the Annotated Transformer).  Other conventions are converted on the way in.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

BLOCKED = -np.inf


def positions(seq_q: int, seq_k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Absolute query and key positions.  With seq_q < seq_k the queries are the
    *last* seq_q positions (KV-cache decoding), so causal masks get the right offset."""
    offset = max(seq_k - seq_q, 0)
    return np.arange(seq_q)[:, None] + offset, np.arange(seq_k)[None, :]


def causal(seq_q: int, seq_k: int) -> np.ndarray:
    q, k = positions(seq_q, seq_k)
    return k <= q


def window(seq_q: int, seq_k: int, size: int, is_causal: bool) -> np.ndarray:
    """Sliding window: keys within `size` positions (looking back only when causal)."""
    q, k = positions(seq_q, seq_k)
    distance = q - k
    return (distance >= 0) & (distance < size) if is_causal else np.abs(distance) < size


def prefix_lm(seq_q: int, seq_k: int, prefix: int) -> np.ndarray:
    """Prefix-LM: everyone sees the first `prefix` keys; the rest is causal."""
    q, k = positions(seq_q, seq_k)
    return (k <= q) | (k < prefix)


def padding(keep: np.ndarray, seq_q: int) -> np.ndarray:
    """(seq_k,) or (batch, seq_k) with 1 = real token -> (batch or 1, 1, seq_q, seq_k)."""
    keep = np.asarray(keep).astype(bool)
    keep = keep[None, :] if keep.ndim == 1 else keep
    return np.broadcast_to(keep[:, None, None, :], (keep.shape[0], 1, seq_q, keep.shape[1]))


def from_matrix(matrix: np.ndarray, convention: str) -> np.ndarray:
    """An explicit mask written in a named convention -> boolean may-attend."""
    if convention == "additive":
        return np.isfinite(matrix) & (matrix > -1e4)   # -1e9 and -inf both block
    keep = matrix.astype(bool)
    return ~keep if convention == "ignore" else keep


def build(mask_spec, batch: int, seq_q: int, seq_k: int) -> Optional[np.ndarray]:
    """The AND of every mask kind in the spec, as (batch or 1, 1, seq_q, seq_k) bool; None if none."""
    if mask_spec.is_empty:
        return None
    keep = np.ones((1, 1, seq_q, seq_k), dtype=bool)
    if mask_spec.causal and not mask_spec.window:
        keep = keep & causal(seq_q, seq_k)
    if mask_spec.window:
        keep = keep & window(seq_q, seq_k, mask_spec.window, mask_spec.causal)
    if mask_spec.prefix:
        keep = keep & prefix_lm(seq_q, seq_k, mask_spec.prefix)
    if mask_spec.padding is not None:
        keep = keep & padding(mask_spec.padding.data, seq_q)
    if mask_spec.matrix is not None:
        explicit = from_matrix(mask_spec.matrix.data, mask_spec.convention)
        explicit = explicit[None, None] if explicit.ndim == 2 else explicit[:, None]
        keep = keep & explicit
    if keep.shape[0] == 1 and batch > 1:
        return keep
    return np.ascontiguousarray(keep)


def additive(keep: np.ndarray, blocked: float = BLOCKED) -> np.ndarray:
    """The additive form: 0 where attending is allowed, `blocked` (-inf or -1e9) elsewhere."""
    return np.where(keep, 0.0, blocked)
