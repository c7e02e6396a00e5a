"""An independent, deliberately plain float64 reference for scaled dot-product attention.

This module does NOT import attntrace and does not vectorise anything: every
number is produced by an explicit Python loop over batch, head, query, key and
feature, on Python floats (which are IEEE float64).  It exists so the tests can
check the engine's vectorised numpy against something written the slow, obvious
way, the way the formula is written on paper:

    Q = X · W_q (+ b_q)          K = X_kv · W_k (+ b_k)      V = X_kv · W_v (+ b_v)
    qk[h][i][j]      = Σ_d Q[i][h][d] · K[j][g(h)][d]       g(h) = h // (heads // kv_heads)
    scaled           = qk · scale                            scale defaults to 1/√d_head
    attn_scores      = scaled where keep, else -inf
    pattern[h][i][:] = softmax over keys j (max subtracted first; a row with no
                       visible key gets all-zero weights instead of NaN)
    z[i][h][e]       = Σ_j pattern[h][i][j] · V[j][g(h)][e]
    z_concat[i]      = z[i][0] ++ z[i][1] ++ ...
    out              = z_concat · W_o (+ b_o)                (= z_concat when there is no W_o)

Weights follow one of two layouts:
    "x_at_w": W has shape (d_in, d_out) and Y = X · W      (the textbook way)
    "linear": W has shape (d_out, d_in) and Y = X · Wᵀ     (torch.nn.Linear)

Only the outermost containers touch numpy: inputs are turned into nested lists
with ``.tolist()`` and results are wrapped with ``np.array`` so tests can call
``np.testing.assert_allclose``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

NEG_INF = -math.inf


# --------------------------------------------------------------------------- helpers

def _as_batched_lists(x) -> List[List[List[float]]]:
    """(seq, d) or (batch, seq, d) -> nested lists [batch][seq][d] of Python floats."""
    array = np.asarray(x, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"expected (seq, d) or (batch, seq, d), got shape {array.shape}")
    return array.tolist()


def _matrix(w) -> List[List[float]]:
    array = np.asarray(w, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"a weight must be a matrix, got shape {array.shape}")
    return array.tolist()


def _vector(b) -> Optional[List[float]]:
    return None if b is None else np.asarray(b, dtype=np.float64).reshape(-1).tolist()


def project(x: List[List[List[float]]], w: List[List[float]], b: Optional[List[float]],
            layout: str) -> List[List[List[float]]]:
    """Y[b][s][c] = Σ_m X[b][s][m] · W[m][c]  (x_at_w)   or   Σ_m X[b][s][m] · W[c][m]  (linear), plus b[c]."""
    if layout == "x_at_w":
        d_in, d_out = len(w), len(w[0])
    elif layout == "linear":
        d_out, d_in = len(w), len(w[0])
    else:
        raise ValueError(f"unknown layout {layout!r}")
    result = []
    for batch_item in x:
        rows = []
        for row in batch_item:
            if len(row) != d_in:
                raise ValueError(f"input width {len(row)} does not match the weight's d_in={d_in}")
            out_row = []
            for c in range(d_out):
                total = 0.0
                for m in range(d_in):
                    weight = w[m][c] if layout == "x_at_w" else w[c][m]
                    total += row[m] * weight
                if b is not None:
                    total += b[c]
                out_row.append(total)
            rows.append(out_row)
        result.append(rows)
    return result


def split_heads(y: List[List[List[float]]], n_heads: int) -> List[List[List[List[float]]]]:
    """[batch][seq][n_heads*width] -> [batch][seq][n_heads][width]: head h owns columns h*width ... (h+1)*width-1."""
    result = []
    for batch_item in y:
        rows = []
        for row in batch_item:
            if len(row) % n_heads:
                raise ValueError(f"{len(row)} columns cannot split into {n_heads} heads")
            width = len(row) // n_heads
            rows.append([row[h * width:(h + 1) * width] for h in range(n_heads)])
        result.append(rows)
    return result


def causal_keep(seq_q: int, seq_k: int) -> List[List[bool]]:
    """Causal "may attend" matrix [seq_q][seq_k].

    Query i sits at absolute position i + seq_k - seq_q (the queries are the
    last seq_q positions, as when decoding with a KV cache); it may attend key
    j iff j <= that position.
    """
    keep = []
    for i in range(seq_q):
        position = i + seq_k - seq_q
        row = []
        for j in range(seq_k):
            row.append(j <= position)
        keep.append(row)
    return keep


def padding_keep(padding: Sequence[Sequence[int]], seq_q: int) -> List[List[List[List[bool]]]]:
    """padding[b][j] (1 = real token, 0 = padding) -> keep[b][0][i][j]: padded keys are blocked for every query."""
    keep = []
    for pad_row in padding:
        rows = []
        for _i in range(seq_q):
            rows.append([bool(p) for p in pad_row])
        keep.append([rows])
    return keep


def expand_keep(keep, batch: int, seq_q: int, seq_k: int) -> List[List[List[List[bool]]]]:
    """Any mask broadcastable to (batch, 1, seq_q, seq_k) -> nested lists of exactly that shape.

    Broadcasting is done by hand: an axis of size 1 is read at index 0 whatever the index asked for.
    """
    array = np.asarray(keep)
    while array.ndim < 4:
        array = array[None]
    grid = array.tolist()
    sizes = array.shape
    target = (batch, 1, seq_q, seq_k)
    for axis in range(4):
        if sizes[axis] not in (1, target[axis]):
            raise ValueError(f"mask shape {array.shape} does not broadcast to {target}")

    def pick(axis: int, index: int) -> int:
        return 0 if sizes[axis] == 1 else index

    result = []
    for b in range(batch):
        rows = []
        for i in range(seq_q):
            row = []
            for j in range(seq_k):
                row.append(bool(grid[pick(0, b)][0][pick(2, i)][pick(3, j)]))
            rows.append(row)
        result.append([rows])
    return result


def softmax_row(scores: List[float]) -> List[float]:
    """Softmax of one row, written out: subtract the row max, exp each entry, divide by the sum.

    Blocked entries are -inf and get weight exactly 0.  When every entry is
    blocked there is no max to subtract; the row gets all-zero weights (the
    "safe softmax" convention) instead of 0/0 = NaN.
    """
    finite = [s for s in scores if s != NEG_INF]
    if not finite:
        return [0.0 for _ in scores]
    top = max(finite)
    exps = []
    for s in scores:
        if s == NEG_INF:
            exps.append(0.0)
        else:
            exps.append(math.exp(s - top))
    total = 0.0
    for e in exps:
        total += e
    return [e / total for e in exps]


# --------------------------------------------------------------------------- attention

def attention(X, W_q, W_k, W_v, W_o=None, *, X_enc=None, b_q=None, b_k=None, b_v=None, b_o=None,
              heads: int = 1, kv_heads: Optional[int] = None, layout: str = "x_at_w",
              scale: Optional[float] = None, keep=None) -> Dict[str, np.ndarray]:
    """Every intermediate of (multi-head, grouped-query, optionally cross-) attention.

    X      (seq_q, d_model) or (batch, seq_q, d_model)
    X_enc  same for keys/values (cross-attention); None = self-attention
    scale  a multiplier of Q·Kᵀ; None = 1/√d_head
    keep   bool, True = may attend, broadcastable to (batch, 1, seq_q, seq_k); None = no mask

    Returns float64 numpy arrays (the mask as bool):
      x (batch, seq_q, d_model), x_enc (batch, seq_k, d_model) when given,
      q (batch, seq_q, heads, d_head), k (batch, seq_k, kv_heads, d_head),
      v (batch, seq_k, kv_heads, d_v), qk / scaled / attn_scores / pattern
      (batch, heads, seq_q, seq_k), mask (batch, 1, seq_q, seq_k) when keep is given,
      z (batch, seq_q, heads, d_v), z_concat (batch, seq_q, heads*d_v), out (batch, seq_q, d_out).
    """
    kv_heads = heads if kv_heads is None else kv_heads
    if heads % kv_heads:
        raise ValueError(f"{heads} heads cannot share {kv_heads} kv heads")
    group = heads // kv_heads                        # query heads per kv head

    x = _as_batched_lists(X)
    x_kv = x if X_enc is None else _as_batched_lists(X_enc)
    batch, seq_q, seq_k = len(x), len(x[0]), len(x_kv[0])
    if len(x_kv) != batch:
        raise ValueError("encoder batch differs from decoder batch")

    # 1. projections, split into heads
    q = split_heads(project(x, _matrix(W_q), _vector(b_q), layout), heads)
    k = split_heads(project(x_kv, _matrix(W_k), _vector(b_k), layout), kv_heads)
    v = split_heads(project(x_kv, _matrix(W_v), _vector(b_v), layout), kv_heads)
    d_head = len(q[0][0][0])
    d_v = len(v[0][0][0])
    if len(k[0][0][0]) != d_head:
        raise ValueError("queries and keys have different d_head")
    multiplier = 1.0 / math.sqrt(d_head) if scale is None else float(scale)

    mask = None if keep is None else expand_keep(keep, batch, seq_q, seq_k)

    qk, scaled, attn_scores, pattern = [], [], [], []
    z = [[[None] * heads for _ in range(seq_q)] for _ in range(batch)]
    for b in range(batch):
        qk_b, scaled_b, scores_b, pattern_b = [], [], [], []
        for h in range(heads):
            g = h // group                               # the kv head this query head reads
            qk_h, scaled_h, scores_h, pattern_h = [], [], [], []
            for i in range(seq_q):
                # 2. raw scores: one dot product per key
                raw = []
                for j in range(seq_k):
                    dot = 0.0
                    for d in range(d_head):
                        dot += q[b][i][h][d] * k[b][j][g][d]
                    raw.append(dot)
                # 3. scale
                row_scaled = [s * multiplier for s in raw]
                # 4. mask: blocked positions become -inf
                if mask is None:
                    row_scores = list(row_scaled)
                else:
                    row_scores = [s if mask[b][0][i][j] else NEG_INF for j, s in enumerate(row_scaled)]
                # 5. softmax over keys
                weights = softmax_row(row_scores)
                # 6. weighted sum of the values
                mixed = []
                for e in range(d_v):
                    total = 0.0
                    for j in range(seq_k):
                        total += weights[j] * v[b][j][g][e]
                    mixed.append(total)
                z[b][i][h] = mixed
                qk_h.append(raw)
                scaled_h.append(row_scaled)
                scores_h.append(row_scores)
                pattern_h.append(weights)
            qk_b.append(qk_h)
            scaled_b.append(scaled_h)
            scores_b.append(scores_h)
            pattern_b.append(pattern_h)
        qk.append(qk_b)
        scaled.append(scaled_b)
        attn_scores.append(scores_b)
        pattern.append(pattern_b)

    # 7. concatenate the heads: head 0's d_v values, then head 1's, ...
    z_concat = []
    for b in range(batch):
        rows = []
        for i in range(seq_q):
            row = []
            for h in range(heads):
                row.extend(z[b][i][h])
            rows.append(row)
        z_concat.append(rows)

    # 8. output projection
    if W_o is None:
        out = [[list(row) for row in rows] for rows in z_concat]
    else:
        out = project(z_concat, _matrix(W_o), _vector(b_o), layout)

    result = {
        "x": np.array(x, dtype=np.float64),
        "q": np.array(q, dtype=np.float64),
        "k": np.array(k, dtype=np.float64),
        "v": np.array(v, dtype=np.float64),
        "qk": np.array(qk, dtype=np.float64),
        "scaled": np.array(scaled, dtype=np.float64),
        "attn_scores": np.array(attn_scores, dtype=np.float64),
        "pattern": np.array(pattern, dtype=np.float64),
        "z": np.array(z, dtype=np.float64),
        "z_concat": np.array(z_concat, dtype=np.float64),
        "out": np.array(out, dtype=np.float64),
        "scale": multiplier,
    }
    if X_enc is not None:
        result["x_enc"] = np.array(x_kv, dtype=np.float64)
    if mask is not None:
        result["mask"] = np.array(mask, dtype=bool)
    return result


# hook name -> key of the dict returned by attention()
HOOK_TO_KEY = {
    "hook_embed": "x",
    "hook_encoder_embed": "x_enc",
    "attn.hook_q": "q",
    "attn.hook_k": "k",
    "attn.hook_v": "v",
    "attn.hook_qk": "qk",
    "attn.hook_scaled": "scaled",
    "attn.hook_mask": "mask",
    "attn.hook_attn_scores": "attn_scores",
    "attn.hook_pattern": "pattern",
    "attn.hook_z": "z",
    "attn.hook_z_concat": "z_concat",
    "hook_attn_out": "out",
}
