"""Constructed data for the explorer tests, and a decoder of its pages written from the
documented format (not from attntrace.render.explorer), so the tests check the page, not
the encoder against itself."""
from __future__ import annotations

import base64
import json
import re
import zlib

import numpy as np

from attntrace.render.explorer import ExplorerData, ExplorerDiagnosis, ExplorerLayer, ExplorerStep

TOKENS = ["<s>", "The", " cat", " sat", " on", " the", " mat", "</s>"]
CROSS_KEYS = ["[src0]", "le", "chat", "dort", "."]
LEVELS = 250          # the documented number of value levels (codes 1..250)
NAN, POSINF, NEGINF = 251, 252, 253


def previous_token(n: int) -> np.ndarray:
    """One-hot on the previous token (the first token on itself): weights exactly 1.0 and 0.0."""
    w = np.zeros((n, n))
    w[0, 0] = 1.0
    w[np.arange(1, n), np.arange(n - 1)] = 1.0
    return w


def uniform_causal(n: int) -> np.ndarray:
    """Row q spreads 1/(q+1) over keys 0..q; keys after q are exactly 0."""
    return np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]


def sink_with_row3(n: int) -> np.ndarray:
    """Every query on token 0, except query 3: 0.25 on key 0 and 0.75 on key 1."""
    w = np.zeros((n, n))
    w[:, 0] = 1.0
    w[3, :2] = [0.25, 0.75]
    return w


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(-1, keepdims=True)


def small_data() -> ExplorerData:
    n = len(TOKENS)
    self_attn = np.stack([previous_token(n), uniform_causal(n), sink_with_row3(n)])[None].astype(np.float32)
    rng = np.random.default_rng(7)
    cross = softmax(rng.standard_normal((2, 2, n, len(CROSS_KEYS))) * 2).astype(np.float32)
    steps = [
        ExplorerStep("blocks.0.attn.hook_scores", (1, 3, n, n), ("batch", "n_heads", "seq_q", "seq_k"), "float32",
                     min=-1e-300, max=12.5, mean=0.1 + 0.2, nan=0, posinf=0, neginf=84),
        ExplorerStep("blocks.0.attn.hook_pattern", (1, 3, n, n), ("batch", "n_heads", "seq_q", "seq_k"), "float32",
                     min=0.0, max=1.0, mean=float(np.float32(0.125))),
        ExplorerStep("blocks.0.attn.hook_mask", (n, n), ("seq_q", "seq_k"), "bool", min=0.0, max=1.0,
                     mean=0.5625, true=36),
        ExplorerStep("blocks.1.cross.hook_pattern", (2, 2, n, 5), ("batch", "n_heads", "seq_q", "seq_k"), "float32",
                     min=None, max=None, mean=None, nan=80),
    ]
    diagnoses = [
        ExplorerDiagnosis("ATT-W250", "head 2 puts 7 of 8 rows wholly on the first token", "warning",
                          hint="an attention sink; expected in many trained models", hook="blocks.0.attn.hook_pattern",
                          layer=0, head=2),
        ExplorerDiagnosis("ATT-E130", "a constructed error without a head", "error"),
    ]
    layers = [ExplorerLayer("blocks.0.attn", self_attn),
              ExplorerLayer("blocks.1.cross", cross, key_tokens=CROSS_KEYS)]
    return ExplorerData("constructed: the cat sat", TOKENS, None, layers, steps, diagnoses)


def long_layer(n: int = 2048, heads: int = 12, seed: int = 0) -> np.ndarray:
    """The budget case, shaped (1, heads, n, n) float32: head 0 one-hot on the previous token, the
    others causal softmaxes of N(0, 2²) scores (dense, like a real layer's spread-out heads)."""
    rng = np.random.default_rng(seed)
    w = np.empty((1, heads, n, n), np.float32)
    upper = np.triu(np.ones((n, n), bool), 1)
    w[0, 0] = previous_token(n)
    for h in range(1, heads):
        scores = rng.standard_normal((n, n), dtype=np.float32) * 2
        scores[upper] = -np.inf
        scores -= scores.max(-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(-1, keepdims=True)
        w[0, h] = scores
    return w


def long_data(n: int = 2048, heads: int = 12) -> ExplorerData:
    return ExplorerData(f"{n} tokens, {heads} heads", [f"tok{i}" for i in range(n)], None,
                        [ExplorerLayer("blocks.0.attn", long_layer(n, heads))], [], [])


# ------------------------------------------------------------- page decoder

def page_parts(page: str):
    """(meta, {chunk key: base64 text}) read out of an explorer page."""
    meta = re.search(r'<script type="application/json" id="attntrace-meta">(.*?)</script>', page, re.S)
    chunks = dict(re.findall(r'<script type="application/octet-stream" data-chunk="([^"]+)">([^<]*)</script>', page))
    return json.loads(meta.group(1)), chunks


def chunk_codes(text: str, seq_q: int, seq_k: int) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8).reshape(seq_q, seq_k)


def decoded(codes: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The documented decoding: 0 -> 0, 1..250 -> lo + (code-1)·(hi-lo)/249, then NaN, +inf, -inf."""
    values = lo + (codes.astype(np.float64) - 1) * (hi - lo) / (LEVELS - 1)
    values[codes == 0] = 0.0
    values[codes == NAN] = np.nan
    values[codes == POSINF] = np.inf
    values[codes == NEGINF] = -np.inf
    return values
