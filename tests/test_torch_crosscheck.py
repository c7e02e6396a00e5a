"""The engine against PyTorch: F.scaled_dot_product_attention and nn.MultiheadAttention (float64, CPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import attntrace  # noqa: E402

RTOL, ATOL = 1e-12, 1e-12


def t(array):
    return torch.from_numpy(np.ascontiguousarray(array))


# --------------------------------------------------------------------------- SDPA

def sdpa_case(seed, *, batch, seq_q, seq_k, d_model, heads, kv_heads, d_head, d_v, scale, mask_kind):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(batch, seq_q, d_model))
    X_enc = rng.normal(size=(batch, seq_k, d_model)) if seq_k != seq_q else None
    W_q = rng.normal(scale=d_model ** -0.5, size=(d_model, heads * d_head))
    W_k = rng.normal(scale=d_model ** -0.5, size=(d_model, kv_heads * d_head))
    W_v = rng.normal(scale=d_model ** -0.5, size=(d_model, kv_heads * d_v))
    attention = {"heads": heads, "kv_heads": kv_heads, "W_q": W_q, "W_k": W_k, "W_v": W_v,
                 "scale": "auto" if scale is None else scale}
    keep = None
    if mask_kind == "causal":
        attention["mask"] = "causal"
        keep = np.array([[j <= i + seq_k - seq_q for j in range(seq_k)] for i in range(seq_q)])
    elif mask_kind == "matrix":
        keep = rng.random((batch, seq_q, seq_k)) < 0.6
        keep[:, :, -1] = True
        attention["mask"] = keep.astype(int).tolist()
        keep = keep[:, None]
    spec = {"version": 1, "tokens": [f"t{i}" for i in range(seq_q)], "embeddings": X, "attention": attention}
    x_kv = X
    if X_enc is not None:
        spec["encoder"] = {"tokens": [f"e{j}" for j in range(seq_k)], "embeddings": X_enc}
        x_kv = X_enc
    # torch side: (batch, heads, seq, d)
    q = t(X @ W_q).reshape(batch, seq_q, heads, d_head).transpose(1, 2)
    k = t(x_kv @ W_k).reshape(batch, seq_k, kv_heads, d_head).transpose(1, 2)
    v = t(x_kv @ W_v).reshape(batch, seq_k, kv_heads, d_v).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if keep is None else t(keep),
                                         scale=scale, enable_gqa=kv_heads != heads)
    return spec, out.transpose(1, 2).numpy()          # (batch, seq_q, heads, d_v) like attn.hook_z


@pytest.mark.parametrize("case", [
    dict(batch=1, seq_q=4, seq_k=4, d_model=6, heads=1, kv_heads=1, d_head=3, d_v=3, scale=None, mask_kind=None),
    dict(batch=3, seq_q=5, seq_k=5, d_model=8, heads=4, kv_heads=4, d_head=2, d_v=3, scale=None, mask_kind="causal"),
    dict(batch=2, seq_q=5, seq_k=5, d_model=8, heads=8, kv_heads=2, d_head=4, d_v=4, scale=0.3, mask_kind="causal"),
    dict(batch=2, seq_q=3, seq_k=6, d_model=6, heads=4, kv_heads=1, d_head=2, d_v=5, scale=None, mask_kind="matrix"),
    dict(batch=3, seq_q=6, seq_k=2, d_model=4, heads=2, kv_heads=2, d_head=2, d_v=2, scale=1.0, mask_kind=None),
    dict(batch=2, seq_q=3, seq_k=5, d_model=6, heads=2, kv_heads=1, d_head=3, d_v=3, scale=None, mask_kind="causal"),
], ids=["plain", "causal", "gqa-causal-scale", "cross-mqa-matrix", "cross-more-queries", "cross-causal-kvcache"])
def test_against_sdpa(case):
    spec, expected_z = sdpa_case(1000 + sum(v for v in case.values() if isinstance(v, int)), **case)
    trace = attntrace.run(spec, keep="all")
    np.testing.assert_allclose(trace["attn.hook_z"], expected_z, rtol=RTOL, atol=ATOL)
    assert trace.diagnoses == []


def test_fully_masked_row_matches_torch_safe_softmax():
    """PyTorch's math SDPA gives 0 (not NaN) for a query that may attend to no key; so does the engine."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(1, 3, 4))
    W = [rng.normal(size=(4, 4)) for _ in range(3)]
    keep = np.array([[True, True, False], [False, False, False], [True, True, True]])
    spec = {"version": 1, "tokens": ["a", "b", "c"], "embeddings": X,
            "attention": {"heads": 2, "W_q": W[0], "W_k": W[1], "W_v": W[2], "mask": keep.astype(int).tolist()}}
    trace = attntrace.run(spec, keep="all")
    q, k, v = (t(X @ w).reshape(1, 3, 2, 2).transpose(1, 2) for w in W)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=t(keep)).transpose(1, 2).numpy()
    if np.isnan(z).any():
        pytest.skip("this torch build's math SDPA returns NaN for fully masked rows")
    np.testing.assert_allclose(trace["attn.hook_z"], z, rtol=RTOL, atol=ATOL)
    assert [d.code for d in trace.diagnoses] == ["ATT-W203"]


# --------------------------------------------------------------------------- nn.MultiheadAttention

def mha_module(seed, embed_dim, heads):
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():                               # nonzero biases so they are really checked
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha.eval()


def mha_attention_block(mha, heads):
    E = mha.embed_dim
    W = mha.in_proj_weight.detach().numpy()
    b = mha.in_proj_bias.detach().numpy()
    return {"heads": heads, "layout": "linear",
            "W_q": W[:E], "W_k": W[E:2 * E], "W_v": W[2 * E:],
            "b_q": b[:E], "b_k": b[E:2 * E], "b_v": b[2 * E:],
            "W_o": mha.out_proj.weight.detach().numpy(), "b_o": mha.out_proj.bias.detach().numpy()}


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_against_multihead_attention(heads, batch):
    E, seq = 16, 5
    mha = mha_module(heads * 10 + batch, E, heads)
    X = np.random.default_rng(heads + batch).normal(size=(batch, seq, E))
    spec = {"version": 1, "tokens": [f"t{i}" for i in range(seq)], "embeddings": X,
            "attention": mha_attention_block(mha, heads)}
    trace = attntrace.run(spec, keep="all")
    with torch.no_grad():
        out, weights = mha(t(X), t(X), t(X), need_weights=True, average_attn_weights=False)
    np.testing.assert_allclose(trace["attn.hook_pattern"], weights.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(trace["hook_attn_out"], out.numpy(), rtol=RTOL, atol=ATOL)
    assert trace.diagnoses == []


def test_multihead_attention_causal_and_padding():
    E, heads, seq, batch = 8, 2, 4, 2
    mha = mha_module(3, E, heads)
    X = np.random.default_rng(3).normal(size=(batch, seq, E))
    padding = [[1, 1, 1, 0], [1, 1, 0, 0]]
    attention = dict(mha_attention_block(mha, heads), mask={"causal": True, "padding": padding})
    spec = {"version": 1, "tokens": list("abcd"), "embeddings": X, "attention": attention}
    trace = attntrace.run(spec, keep="all")
    blocked_future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)    # True = not allowed
    key_padding = t(np.array(padding) == 0)                                           # True = ignore
    with torch.no_grad():
        out, weights = mha(t(X), t(X), t(X), attn_mask=blocked_future, key_padding_mask=key_padding,
                           need_weights=True, average_attn_weights=False)
    np.testing.assert_allclose(trace["attn.hook_pattern"], weights.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(trace["hook_attn_out"], out.numpy(), rtol=RTOL, atol=ATOL)
    assert trace.diagnoses == []


def test_multihead_attention_cross():
    E, heads, batch, seq_q, seq_k = 12, 3, 2, 3, 7
    mha = mha_module(5, E, heads)
    rng = np.random.default_rng(5)
    X, X_enc = rng.normal(size=(batch, seq_q, E)), rng.normal(size=(batch, seq_k, E))
    spec = {"version": 1, "tokens": list("abc"), "embeddings": X,
            "encoder": {"tokens": [f"e{j}" for j in range(seq_k)], "embeddings": X_enc},
            "attention": mha_attention_block(mha, heads)}
    trace = attntrace.run(spec, keep="all")
    with torch.no_grad():
        out, weights = mha(t(X), t(X_enc), t(X_enc), need_weights=True, average_attn_weights=False)
    np.testing.assert_allclose(trace["attn.hook_pattern"], weights.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(trace["hook_attn_out"], out.numpy(), rtol=RTOL, atol=ATOL)
    assert trace.diagnoses == []


def test_multihead_attention_float32():
    E, heads, batch, seq = 16, 4, 2, 6
    mha = mha_module(9, E, heads)
    X = np.random.default_rng(9).normal(size=(batch, seq, E))
    spec = {"version": 1, "tokens": [f"t{i}" for i in range(seq)], "embeddings": X,
            "attention": mha_attention_block(mha, heads)}
    trace = attntrace.run(spec, keep="all", dtype="float32")
    mha32 = mha.float()
    with torch.no_grad():
        x = t(X.astype(np.float32))
        out, weights = mha32(x, x, x, need_weights=True, average_attn_weights=False)
    assert trace["hook_attn_out"].dtype == np.float32
    np.testing.assert_allclose(trace["attn.hook_pattern"], weights.numpy(), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(trace["hook_attn_out"], out.numpy(), rtol=2e-5, atol=2e-5)
    assert trace.diagnoses == []


def test_default_scale_is_one_over_sqrt_d_head_like_torch():
    """SDPA's default scale is 1/√(last dim of q) = 1/√d_head, not 1/√d_model."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(1, 4, 8))
    W = [rng.normal(size=(8, 8)) for _ in range(3)]
    spec = {"version": 1, "tokens": list("abcd"), "embeddings": X,
            "attention": {"heads": 4, "W_q": W[0], "W_k": W[1], "W_v": W[2]}}
    trace = attntrace.run(spec, keep="all")
    np.testing.assert_allclose(trace["attn.hook_scaled"], trace["attn.hook_qk"] / math.sqrt(2), rtol=1e-15)
    q, k, v = (t(X @ w).reshape(1, 4, 4, 2).transpose(1, 2) for w in W)
    z = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).numpy()
    np.testing.assert_allclose(trace["attn.hook_z"], z, rtol=RTOL, atol=ATOL)
