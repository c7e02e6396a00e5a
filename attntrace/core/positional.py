"""Positional encodings: tables added to X, rotations of Q and K, and biases on the scores.

* sinusoidal -- PE[pos, 2i] = sin(pos / base^(2i/d_model)), PE[pos, 2i+1] = cos(same)
  (Vaswani et al.; seed 004's ``positional_encoding``), added to X.
* learned -- a (max_len, d_model) table from the spec; its first seq rows are added to X.
* RoPE -- rotary position embedding (Su et al., RoFormer): each pair of features of
  Q and K is rotated by the angle pos · base^(-2i/d_head), so q_m · k_n depends only on
  q, k and m − n.  Which features form a pair is a convention:
    "half" (default): feature i pairs with i + d_head/2 -- GPT-NeoX, Llama and every
        Hugging Face model that uses ``rotate_half``;
    "interleaved": feature 2i pairs with 2i+1 -- GPT-J, RoFormer, Meta's original Llama
        code (complex numbers).
  The two give the same scores only after permuting the weight columns, so a
  checkpoint must be read with the convention it was trained with.
* ALiBi -- attention with linear biases (Press et al.): no embedding; head h adds
  −slope_h · |i − j| to its scaled scores.  With a causal mask this is exactly the
  paper's bias; the slopes are a geometric sequence (see :func:`alibi_slopes`).

Positions follow :func:`attntrace.masks.positions`: the queries are the last
seq_q positions of the keys (KV-cache decoding), so a decoding step gives the
same rotations and biases as the full run.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

from attntrace.core.masks import positions as mask_positions

PAIRINGS = ("half", "interleaved")


def sinusoidal(seq: int, d_model: int, base: float = 10000.0) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / base^(2i/d_model)), PE[pos, 2i+1] = cos(same) (seed 004)."""
    position = np.arange(seq)[:, None]
    div_term = np.exp(np.arange(0, d_model, 2) * -(np.log(base) / d_model))
    table = np.zeros((seq, d_model))
    table[:, 0::2] = np.sin(position * div_term)
    table[:, 1::2] = np.cos(position * div_term)[:, : d_model // 2]   # odd d_model: one sin more
    return table


def learned(table: np.ndarray, seq: int) -> np.ndarray:
    """The first `seq` rows of a learned (max_len, d_model) table."""
    return np.asarray(table)[:seq]


# --------------------------------------------------------------------------- RoPE

def rope_frequencies(d_head: int, base: float = 10000.0) -> np.ndarray:
    """theta_i = base^(-2i/d_head) for the d_head/2 pairs."""
    return base ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)


def rope_pairs(d_head: int, pairing: str = "half") -> Tuple[np.ndarray, np.ndarray]:
    """Feature indices (first, second) of each rotated pair, pair i rotating at theta_i."""
    if pairing == "half":
        first = np.arange(d_head // 2)
        return first, first + d_head // 2
    if pairing == "interleaved":
        first = np.arange(0, d_head, 2)
        return first, first + 1
    raise ValueError(f"unknown RoPE pairing {pairing!r}; one of {', '.join(PAIRINGS)}")


def rope_angles(pos: np.ndarray, d_head: int, base: float = 10000.0) -> np.ndarray:
    """(..., d_head/2) rotation angles pos · theta_i, for positions of any shape ((seq,) or (batch, seq))."""
    return np.asarray(pos, dtype=np.float64)[..., None] * rope_frequencies(d_head, base)


def rope(x: np.ndarray, pos: np.ndarray, base: float = 10000.0, pairing: str = "half") -> np.ndarray:
    """Rotate x (batch, seq, heads, d_head) at positions `pos`, (seq,) or per item (batch or 1, seq);
    d_head must be even.

    For each pair (a, b) at angle t: a' = a·cos t − b·sin t, b' = a·sin t + b·cos t.
    """
    pos = np.asarray(pos)
    angles = rope_angles(pos if pos.ndim == 2 else pos[None], x.shape[-1], base)[:, :, None, :]   # (b, seq, 1, d/2)
    return rotate_pairs(x, np.cos(angles), np.sin(angles), pairing)


def rotate_pairs(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pairing: str = "half") -> np.ndarray:
    """The RoPE rotation of x (batch, seq, heads, d_head) by given cos/sin tables (broadcasting to
    (batch, seq, heads, d_head/2)), in x's dtype."""
    first, second = rope_pairs(x.shape[-1], pairing)
    cos, sin = np.asarray(cos).astype(x.dtype), np.asarray(sin).astype(x.dtype)
    a, b = x[..., first], x[..., second]
    out = np.empty_like(x)
    out[..., first] = a * cos - b * sin
    out[..., second] = a * sin + b * cos
    return out


def rope_positions(seq_q: int, seq_k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Query and key positions for RoPE, with the KV-cache offset of the masks."""
    q, k = mask_positions(seq_q, seq_k)
    return q[:, 0], k[0]


def leading_pads(keep: np.ndarray) -> np.ndarray:
    """(batch,) how many padding tokens come before each item's first real token
    (keep: (batch, seq), True = a real token; an item of padding only counts 0)."""
    keep = np.asarray(keep, dtype=bool)
    return np.where(keep.any(axis=-1), keep.argmax(axis=-1), 0)


def from_first_real_token(pos: np.ndarray, lead: np.ndarray) -> np.ndarray:
    """Positions (seq,) of every item counted from its first real token: (batch, seq).

    With left padding (lead pads first) the first real token is position 0, as the
    same text alone would be, and as transformers' generate() builds position_ids;
    the pads before it get position 0 (they are masked out as keys)."""
    return np.maximum(np.asarray(pos)[None, :] - np.asarray(lead)[:, None], 0)


# --------------------------------------------------------------------------- ALiBi

def alibi_slopes(n_heads: int) -> np.ndarray:
    """Per-head slopes of the ALiBi paper: for n a power of two, 2^(-8/n), 2^(-16/n), ...;
    otherwise the slopes of the nearest lower power of two p, then every other slope of 2p."""
    def power_of_two(n: int) -> List[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return np.array(power_of_two(n_heads))
    closest = 2 ** int(math.floor(math.log2(n_heads)))
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return np.array(power_of_two(closest) + extra)


def alibi_bias(n_heads: int, seq_q: int, seq_k: int) -> np.ndarray:
    """(n_heads, seq_q, seq_k) bias −slope_h · |i − j| added to the scaled scores."""
    q, k = mask_positions(seq_q, seq_k)
    distance = np.abs(q - k).astype(np.float64)
    return -alibi_slopes(n_heads)[:, None, None] * distance[None]


# --------------------------------------------------------------------------- one view for `positions`

KINDS = ("sinusoidal", "rope", "alibi", "learned")


def encoding_table(kind: str, seq: int, d_model: int, base: float = 10000.0, heads: int = 8,
                   pairing: str = "half", table: np.ndarray = None) -> np.ndarray:
    """A 2-D picture of an encoding, for `attntrace positions`:

    sinusoidal / learned: (seq, d_model) the table added to X;
    rope: (seq, d_model) cos of the rotation angle each feature gets (pairs share it);
    alibi: (heads, seq) the bias a query at the last position gives each key.
    """
    if kind == "sinusoidal":
        return sinusoidal(seq, d_model, base)
    if kind == "learned":
        return learned(table, seq)
    if kind == "rope":
        angles = rope_angles(np.arange(seq), d_model, base)
        first, second = rope_pairs(d_model, pairing)
        picture = np.empty((seq, d_model))
        picture[:, first] = np.cos(angles)
        picture[:, second] = np.cos(angles)
        return picture
    if kind == "alibi":
        return alibi_bias(heads, 1, seq)[:, 0, :]
    raise ValueError(f"unknown positional kind {kind!r}")


def rope_relative_check(d_head: int, base: float = 10000.0, pairing: str = "half", seed: int = 0,
                        shifts: Tuple[int, ...] = (0, 3, 17)) -> float:
    """The largest change of q_m · k_n when m and n move together: 0 up to rounding,
    because RoPE scores depend on m − n only.  Shown by `attntrace positions --kind rope`."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(1, 1, 1, d_head))
    k = rng.normal(size=(1, 1, 1, d_head))
    scores = []
    for shift in shifts:
        qm = rope(q, np.array([5 + shift]), base, pairing)
        kn = rope(k, np.array([2 + shift]), base, pairing)
        scores.append(float((qm * kn).sum()))
    return float(max(scores) - min(scores))


FORMULAS = {
    "sinusoidal": "PE[pos, 2i] = sin(pos / base^(2i/d_model)),  PE[pos, 2i+1] = cos(pos / base^(2i/d_model));  "
                  "X = X + PE",
    "learned": "PE = table[:seq] (a trained (max_len, d_model) table);  X = X + PE",
    "rope": "pair (a, b) of q and k at position pos, angle t = pos · base^(-2i/d_head):  "
            "a' = a·cos t − b·sin t,  b' = a·sin t + b·cos t",
    "alibi": "scaled[h, i, j] += −slope_h · |i − j|,  slope_h = 2^(−8(h+1)/n_heads) for a power-of-two n_heads",
}
PAIRING_NOTES = {
    "half": "feature i rotates with feature i + d/2 (GPT-NeoX, Llama, Hugging Face rotate_half)",
    "interleaved": "feature 2i rotates with feature 2i+1 (GPT-J, RoFormer, Meta's original Llama code)",
}
