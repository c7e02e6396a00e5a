"""A test-only transformer forward in plain numpy, written from the papers' / transformers' formulas.

It shares no code with attntrace: it reads the arrays of a ModelWeights (the loader under
test) and the facts of a ModelConfig, and computes everything else itself -- embeddings,
LayerNorm/RMSNorm, GELU (erf and tanh forms), SiLU, RoPE with rotate_half pairing,
grouped-query attention, causal / sliding-window / key-padding masks, post- and pre-norm
residuals.  It computes in the dtype of the weights it is given (float64 or float32).

``forward`` returns, with transformers' conventions:

* ``hidden_states``: n_layers + 1 arrays (batch, seq, d_model) -- the embedding output, the
  output of each block, and for models with a final norm the LAST entry is the normed one
  (exactly what ``output_hidden_states=True`` gives);
* ``attentions``: one (batch, n_heads, seq, seq) pattern per layer;
* ``resid_post``: each block's output before any final norm;
* ``empty_rows``: per layer, (batch, seq) True where a query had no key to attend to (only
  padding queries can: a sliding window over padding).  Their pattern row is all zeros here;
  transformers' additive mask makes it uniform over every key, future ones included.  Such
  rows, and what flows from them, are padding: the tests leave them out of the comparison.
"""
from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def activation(name, x):
    if name == "gelu":                                     # exact GELU, x Φ(x)
        return (0.5 * x * (1.0 + _erf(x.astype(np.float64) / math.sqrt(2.0)))).astype(x.dtype)
    if name == "gelu_tanh":                                # GPT-2's gelu_new
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return np.maximum(x, 0)
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    raise ValueError(name)


def norm(x, spec):
    if spec.kind == "layernorm":
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + spec.eps) * spec.weight + spec.bias
    rms = np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + spec.eps)
    return x / rms * spec.weight


def linear(x, W, b):
    y = x @ W.T                     # W is (out, in)
    return y if b is None else y + b


def rope(x, theta):
    """x: (batch, heads, seq, d).  Dimension k pairs with k + d/2; angle = position · theta^(-2k/d)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.arange(x.shape[2], dtype=np.float64)[:, None] * inv_freq[None, :]     # (seq, d/2)
    cos = np.cos(np.concatenate([angles, angles], axis=-1)).astype(x.dtype)
    sin = np.sin(np.concatenate([angles, angles], axis=-1)).astype(x.dtype)
    rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return x * cos + rotated * sin


def keep_mask(cfg, layer, key_mask, seq):
    """(batch, 1, seq_q, seq_k) booleans: who may attend to whom."""
    i = np.arange(seq)[:, None]
    j = np.arange(seq)[None, :]
    keep = np.ones((seq, seq), dtype=bool)
    if cfg.causal:
        keep &= j <= i
    window = cfg.window(layer)
    if window is not None:
        keep &= j > i - window
    return keep[None, None] & (key_mask[:, None, None, :] != 0)


def attention(x, lw, cfg, layer, key_mask):
    b, s, _ = x.shape
    q = linear(x, lw.W_q, lw.b_q).reshape(b, s, cfg.n_heads, cfg.d_head).transpose(0, 2, 1, 3)
    k = linear(x, lw.W_k, lw.b_k).reshape(b, s, cfg.n_kv_heads, cfg.d_head).transpose(0, 2, 1, 3)
    v = linear(x, lw.W_v, lw.b_v).reshape(b, s, cfg.n_kv_heads, cfg.d_head).transpose(0, 2, 1, 3)
    if cfg.positional == "rope":
        q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    group = cfg.n_heads // cfg.n_kv_heads          # head h reads key/value head h // group
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(cfg.d_head)
    keep = np.broadcast_to(keep_mask(cfg, layer, key_mask, s), scores.shape)
    # a row with no key to attend to (a padding query inside a sliding window of padding) gets zeros
    empty = ~keep.any(axis=-1, keepdims=True)
    scores = np.where(keep, scores, -np.inf)
    scores = scores - np.where(empty, 0, scores.max(axis=-1, keepdims=True))
    weights = np.exp(scores)
    pattern = weights / np.where(empty, 1, weights.sum(axis=-1, keepdims=True))
    z = (pattern @ v).transpose(0, 2, 1, 3).reshape(b, s, cfg.n_heads * cfg.d_head)
    return linear(z, lw.W_o, lw.b_o), pattern, empty[:, 0, :, 0]


def mlp(x, lw, cfg):
    if cfg.mlp_gated:
        hidden = activation(cfg.activation, linear(x, lw.W_gate, lw.b_gate)) * linear(x, lw.W_up, lw.b_up)
        return linear(hidden, lw.W_down, lw.b_down)
    return linear(activation(cfg.activation, linear(x, lw.W_in, lw.b_in)), lw.W_out, lw.b_out)


def embed(weights, cfg, ids, token_type_ids):
    x = np.asarray(weights.embed)[ids]
    if cfg.positional == "learned":
        x = x + np.asarray(weights.pos_embed)[np.arange(ids.shape[1])][None]
    if cfg.type_vocab_size:
        types = np.zeros_like(ids) if token_type_ids is None else token_type_ids
        x = x + np.asarray(weights.token_type_embed)[types]
    if cfg.embed_norm:
        x = norm(x, weights.embed_norm)
    return x


def forward(weights, cfg, ids, attention_mask=None, token_type_ids=None):
    ids = np.asarray(ids)
    key_mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    x = embed(weights, cfg, ids, token_type_ids)
    hidden_states, attentions, resid_post, empty_rows = [x], [], [], []
    for layer in range(cfg.n_layers):
        lw = weights.layer(layer)
        if cfg.placement == "pre":
            attn_out, pattern, empty = attention(norm(x, lw.ln1), lw, cfg, layer, key_mask)
            x = x + attn_out
            x = x + mlp(norm(x, lw.ln2), lw, cfg)
        else:
            attn_out, pattern, empty = attention(x, lw, cfg, layer, key_mask)
            x = norm(x + attn_out, lw.ln1)
            x = norm(x + mlp(x, lw, cfg), lw.ln2)
        attentions.append(pattern)
        empty_rows.append(empty)
        resid_post.append(x)
        hidden_states.append(x)
    if cfg.final_norm:
        hidden_states[-1] = norm(x, weights.final_norm)
    return {"hidden_states": hidden_states, "attentions": attentions, "resid_post": resid_post,
            "empty_rows": empty_rows}
