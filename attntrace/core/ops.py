"""Pure kernels: plain functions on numpy arrays, shared by the engine, the backward pass,
the mask command and model import.

Nothing here knows about specs, hooks or traces.  The tests' reference
(tests/reference.py) is written independently of these functions.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

# --------------------------------------------------------------------------- attention


def softmax(scores: np.ndarray, axis: int = -1, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Stable softmax; a row whose entries are all -inf gives zeros, not NaN (safe softmax).

    `out` may be `scores` itself (in place)."""
    out = scores if out is None else out
    top = scores.max(axis=axis, keepdims=True)
    top[~np.isfinite(top)] = 0                    # all-blocked rows: exp(-inf - 0) = 0
    np.subtract(scores, top, out=out)
    np.exp(out, out=out)
    total = out.sum(axis=axis, keepdims=True)
    total[total == 0] = 1
    out /= total
    return out


def softmax_prefix(block: np.ndarray, width: int, top: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`softmax` in place over the last axis of `block` whose columns from `width` on are all
    -inf: only the first `width` are computed, the rest are written as softmax would leave them (0,
    or NaN in a row whose normaliser is NaN).  `top`: each row's max (keepdims), when known.
    Returns the computed part."""
    live = block[..., :width]
    top = live.max(axis=-1, keepdims=True) if top is None else top.copy()
    top[~np.isfinite(top)] = 0
    np.subtract(live, top, out=live)
    np.exp(live, out=live)
    total = live.sum(axis=-1, keepdims=True)
    total[total == 0] = 1
    live /= total
    if width < block.shape[-1]:
        rest = block[..., width:]
        rest[...] = 0
        nan = np.isnan(total[..., 0])
        if nan.any():
            rest[nan] = np.nan                          # 0 / NaN
    return live


def grouped_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Q (b, sq, h, d) · K (b, sk, kv, d)ᵀ -> (b, h, sq, sk); query head i uses kv head i // (h/kv)."""
    b, sq, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, sq, kv, h // kv, d).transpose(0, 2, 3, 1, 4)      # (b, kv, g, sq, d)
    kt = k.transpose(0, 2, 3, 1)[:, :, None]                            # (b, kv, 1, d, sk)
    return (qg @ kt).reshape(b, h, sq, k.shape[1])


def grouped_mix(pattern: np.ndarray, v: np.ndarray) -> np.ndarray:
    """pattern (b, h, sq, sk) · V (b, sk, kv, dv) -> z (b, sq, h, dv)."""
    b, h, sq, sk = pattern.shape
    kv, dv = v.shape[2], v.shape[3]
    pg = pattern.reshape(b, kv, h // kv, sq, sk)
    vt = v.transpose(0, 2, 1, 3)[:, :, None]                            # (b, kv, 1, sk, dv)
    return (pg @ vt).reshape(b, h, sq, dv).transpose(0, 2, 1, 3)


def linear(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], layout: str) -> np.ndarray:
    """x·W (+ b): W is (in, out) for layout x_at_w, (out, in) for linear (nn.Linear)."""
    y = x @ (weight if layout == "x_at_w" else weight.T)
    if bias is not None:
        y += bias
    return y


# --------------------------------------------------------------------------- precision

def round_to(x: np.ndarray, precision: str) -> np.ndarray:
    """x rounded to `precision` (float16, bfloat16, float32 or float64), returned in x's own dtype:
    what storing the numbers in that precision does to them (float16 overflows to ±inf past
    65504; bfloat16 keeps float32's range with an 8-bit significand, rounded half to even)."""
    x = np.asarray(x)
    with np.errstate(over="ignore"):
        if precision != "bfloat16":
            return x.astype(np.dtype(precision)).astype(x.dtype)
        bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(x), x, rounded.view(np.float32).astype(x.dtype))


def holds_exactly(x: np.ndarray, precision: str) -> bool:
    """Whether every value of x is a number of `precision` (rounding to it changes nothing)."""
    x = np.asarray(x, dtype=np.float64)
    return bool(np.array_equal(round_to(x, precision), x, equal_nan=True))


# --------------------------------------------------------------------------- norms


def layer_norm(x: np.ndarray, weight: Optional[np.ndarray], bias: Optional[np.ndarray], eps: float) -> np.ndarray:
    """(x − mean) / √(var + eps) · weight + bias over the last axis (biased variance, as torch)."""
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = np.mean(centred * centred, axis=-1, keepdims=True)
    y = centred / np.sqrt(variance + eps)
    if weight is not None:
        y *= weight
    if bias is not None:
        y += bias
    return y


def rms_norm(x: np.ndarray, weight: Optional[np.ndarray], eps: float) -> np.ndarray:
    """x / √(mean(x²) + eps) · weight over the last axis (Llama's RMSNorm)."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y *= weight
    return y


# --------------------------------------------------------------------------- activations

_TAYLOR_LIMIT = 2.0          # |x| below: the Maclaurin series of erf; above: erfc's continued fraction
_TAYLOR_TERMS = 50
_FRACTION_DEPTH = 80


def erf(x: np.ndarray) -> np.ndarray:
    """The error function in float64, vectorised (numpy has none), to a few units in the last place.

    |x| < 2: erf x = 2/√π · Σ (−1)ⁿ x²ⁿ⁺¹ / (n! (2n+1)), summed to 50 terms (the largest
    term is about 20, so rounding costs about one digit of the sixteen);
    |x| ≥ 2: erfc x = e^(−x²)/√π · 1/(x + ½/(x + 1/(x + 3/2/(x + …)))), evaluated from
    depth 80 upwards, and erf = 1 − erfc."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    small = np.abs(x) < _TAYLOR_LIMIT
    if small.any():
        s = x[small]
        s2 = s * s
        term = s.copy()
        total = s.copy()
        for n in range(1, _TAYLOR_TERMS):
            term *= -s2 / n
            total += term / (2 * n + 1)
        out[small] = total * (2.0 / math.sqrt(math.pi))
    large = ~small
    if large.any():
        a = np.abs(x[large])
        tail = a.copy()
        for k in range(_FRACTION_DEPTH, 0, -1):
            tail = a + (k / 2.0) / tail
        erfc = np.exp(-a * a) / (math.sqrt(math.pi) * tail)
        out[large] = np.copysign(1.0 - erfc, x[large])
    return out


def gelu(x: np.ndarray) -> np.ndarray:
    """x · Φ(x) = x/2 · (1 + erf(x/√2)) (BERT; torch's default GELU)."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)).astype(x.dtype))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³))) (GPT-2's gelu_new)."""
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + np.tanh(inner))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def silu(x: np.ndarray) -> np.ndarray:
    """x · sigmoid(x) (Llama's SwiGLU gate), written to stay finite for large |x|."""
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"gelu": gelu, "gelu_tanh": gelu_tanh, "relu": relu, "silu": silu}
