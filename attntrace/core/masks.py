"""Attention masks as boolean "may attend" arrays of shape (batch or 1, 1, seq_q, seq_k).

Conventions differ between libraries, so attntrace keeps one inside:
True = this query may attend to this key (PyTorch's scaled_dot_product_attention,
the Annotated Transformer).  Other conventions are converted on the way in
(:func:`from_matrix`) and on the way out (:func:`to_convention`).

Positions: query i sits at position i + seq_k − seq_q, so with seq_q < seq_k the
queries are the *last* seq_q positions of the key sequence (KV-cache decoding)
and causal, window and prefix masks get the right offset.  This is the
bottom-right alignment of flash-attn and PyTorch's causal_lower_right; with
seq_q > seq_k the first seq_q − seq_k queries see no key.  Kinds combine with logical AND, except that a prefix-LM
*is* a causal mask with a visible prefix, so `causal` adds nothing to `prefix`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from attntrace.core.ops import softmax
from attntrace.inputs.spec import OLD_CONVENTION_NAMES

BLOCKED = -np.inf
LARGE_NEGATIVE = -1e9               # what seeds 001 and 004 (and many tutorials) add instead of -inf
ADDITIVE_BLOCK_THRESHOLD = -1e4     # additive values at or below this block (BERT used -10000)
CONVENTIONS = ("allow", "ignore", "additive", "additive-1e9")


# --------------------------------------------------------------------------- kinds

def positions(seq_q: int, seq_k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Absolute query positions (column vector) and key positions (row vector): the
    queries are the *last* seq_q positions (bottom-right alignment, KV-cache decoding)."""
    offset = seq_k - seq_q
    return np.arange(seq_q)[:, None] + offset, np.arange(seq_k)[None, :]


def causal(seq_q: int, seq_k: int) -> np.ndarray:
    q, k = positions(seq_q, seq_k)
    return k <= q


def window(seq_q: int, seq_k: int, size: int, is_causal: bool) -> np.ndarray:
    """Sliding window: keys less than `size` positions away (looking back only when causal),
    so every query sees `size` keys, itself included (Mistral's sliding_window)."""
    q, k = positions(seq_q, seq_k)
    distance = q - k
    return (distance >= 0) & (distance < size) if is_causal else np.abs(distance) < size


def prefix_lm(seq_q: int, seq_k: int, prefix: int) -> np.ndarray:
    """Prefix-LM: everyone sees the first `prefix` keys (bidirectional there); the rest is causal."""
    q, k = positions(seq_q, seq_k)
    return (k <= q) | (k < prefix)


def padding(keep: np.ndarray, seq_q: int) -> np.ndarray:
    """(seq_k,) or (batch, seq_k) with True = real token -> (batch or 1, 1, seq_q, seq_k)."""
    keep = np.asarray(keep).astype(bool)
    keep = keep[None, :] if keep.ndim == 1 else keep
    return np.broadcast_to(keep[:, None, None, :], (keep.shape[0], 1, seq_q, keep.shape[1]))


# --------------------------------------------------------------------------- conventions

def from_matrix(matrix: np.ndarray, convention: str) -> np.ndarray:
    """An array written in a named convention -> boolean may-attend."""
    if convention.startswith("additive"):
        return np.isfinite(matrix) & (matrix > ADDITIVE_BLOCK_THRESHOLD)   # -1e9 and -inf both block
    allowed = np.asarray(matrix).astype(bool)
    return ~allowed if convention == "ignore" else allowed


def to_convention(keep: np.ndarray, convention: str) -> np.ndarray:
    """Boolean may-attend -> the same mask written in `convention` (see CONVENTION_NOTES)."""
    convention = OLD_CONVENTION_NAMES.get(convention, convention)
    if convention == "allow":
        return np.asarray(keep, dtype=bool)
    if convention == "ignore":
        return ~np.asarray(keep, dtype=bool)
    if convention == "additive":
        return additive(keep, BLOCKED)
    if convention == "additive-1e9":
        return additive(keep, LARGE_NEGATIVE)
    raise ValueError(f"unknown mask convention {convention!r}; one of {', '.join(CONVENTIONS)}")


def additive(keep: np.ndarray, blocked: float = BLOCKED) -> np.ndarray:
    """The additive form: 0 where attending is allowed, `blocked` (-inf or -1e9) elsewhere."""
    return np.where(keep, 0.0, blocked)


def fully_masked_row_outcomes(seq_k: int) -> Dict[str, np.ndarray]:
    """What softmax gives a query row whose every key is blocked, written three ways.

    -inf with a plain softmax: max is -inf, -inf - (-inf) = NaN, so the row is NaN.
    -1e9: every entry is the same finite number, so the row is *uniform* (1/seq_k):
          the query silently attends to padding.  (In float16, -1e9 overflows to -inf.)
    -inf with a safe softmax (attntrace; PyTorch SDPA's _safe_softmax): all zeros.
    """
    blocked_inf = np.full(seq_k, BLOCKED)
    with np.errstate(invalid="ignore"):
        shifted = blocked_inf - blocked_inf.max()
        naive = np.exp(shifted) / np.exp(shifted).sum()
    large = np.full(seq_k, LARGE_NEGATIVE)
    return {"-inf, plain softmax": naive,
            "-1e9, plain softmax": softmax(large.copy()),
            "-inf, safe softmax": softmax(blocked_inf.copy())}


# --------------------------------------------------------------------------- building

def combine(seq_q: int, seq_k: int, *, causal_: bool = False, padding_keep: Optional[np.ndarray] = None,
            window_size: Optional[int] = None, prefix: Optional[int] = None,
            matrix_keep: Optional[np.ndarray] = None) -> np.ndarray:
    """The AND of the given kinds as (batch or 1, 1, seq_q, seq_k) bool.

    padding_keep: (seq_k,) or (batch, seq_k), True = real token.
    matrix_keep: (seq_q, seq_k) or (batch, seq_q, seq_k), True = may attend.
    The window looks back only when the mask is causal (or a prefix-LM).
    """
    keep = np.ones((1, 1, seq_q, seq_k), dtype=bool)
    if prefix:
        keep = keep & prefix_lm(seq_q, seq_k, prefix)
    elif causal_:
        keep = keep & causal(seq_q, seq_k)
    if window_size:
        keep = keep & window(seq_q, seq_k, window_size, bool(causal_ or prefix))
    if padding_keep is not None:
        keep = keep & padding(padding_keep, seq_q)
    if matrix_keep is not None:
        explicit = np.asarray(matrix_keep, dtype=bool)
        keep = keep & (explicit[None, None] if explicit.ndim == 2 else explicit[:, None])
    return np.ascontiguousarray(keep)


def build(mask_spec, batch: int, seq_q: int, seq_k: int) -> Optional[np.ndarray]:
    """The spec's mask as (batch or 1, 1, seq_q, seq_k) bool; None when there is none.

    `mask_spec.convention` says how the arrays the user wrote (padding and
    matrix) mark positions; the result is always True = may attend.
    """
    if mask_spec.is_empty:
        return None
    convention = mask_spec.convention
    pad = None if mask_spec.padding is None else from_matrix(mask_spec.padding.data, convention)
    matrix = None if mask_spec.matrix is None else from_matrix(mask_spec.matrix.data, convention)
    return combine(seq_q, seq_k, causal_=mask_spec.causal, padding_keep=pad, window_size=mask_spec.window,
                   prefix=mask_spec.prefix, matrix_keep=matrix)


# --------------------------------------------------------------------------- reading a mask

def empty_rows(keep: np.ndarray) -> List[Tuple[int, int]]:
    """(batch item, query) pairs whose every key is blocked, for a (batch, 1, seq_q, seq_k) mask."""
    empty = ~np.asarray(keep).any(axis=-1)             # (batch, 1, seq_q)
    return [(int(b), int(q)) for b, _, q in np.argwhere(empty)]


def visible_counts(keep: np.ndarray) -> np.ndarray:
    """How many keys each query may attend to: (batch, seq_q)."""
    return np.asarray(keep).sum(axis=-1)[:, 0]


def looks_like_ignore(keep_matrix: np.ndarray) -> bool:
    """True when a square mask read as keep is exactly the anti-causal mask: somebody
    wrote np.triu(ones, k=1) (1 = blocked) where 1 = may attend was expected."""
    m = np.asarray(keep_matrix, dtype=bool)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        return False
    return bool(np.array_equal(~m, causal(m.shape[0], m.shape[1])))


def query_labels(key_tokens: Sequence[str], seq_q: int) -> List[str]:
    """Query labels for a mask over `key_tokens`: the last seq_q tokens (KV-cache offset);
    queries before the first key (seq_q > seq_k) are labelled by their position."""
    offset = len(key_tokens) - seq_q
    return [key_tokens[offset + i] if offset + i >= 0 else str(offset + i) for i in range(seq_q)]
