"""Cross-attention (seq_q ≠ seq_k), KV-cache decoding and grouped-/multi-query attention,
against a plain-loop reference written here."""
import json
import math

import numpy as np
import pytest
from conftest import CONFIGS
from reference import softmax_row  # the plain-loop softmax of tests/reference.py

import attntrace

# --------------------------------------------------------------------------- plain reference

def plain_attention(X, W_q, W_k, W_v, heads, kv_heads=None, X_kv=None, keep=None, W_o=None):
    """Loops over query i, key j, head h and feature d.  Query head h reads kv head
    h // (heads // kv_heads).  keep[i][j] False blocks a key.  Returns a dict of
    q (sq, H, d), k (sk, KV, d), pattern (H, sq, sk), z (sq, H, dv), out (sq, d_out)."""
    X = np.asarray(X, float)
    X_kv = X if X_kv is None else np.asarray(X_kv, float)
    kv_heads = kv_heads or heads
    d_head = W_q.shape[1] // heads
    d_v = W_v.shape[1] // kv_heads
    group = heads // kv_heads
    sq, sk = X.shape[0], X_kv.shape[0]
    Q, K, V = X @ W_q, X_kv @ W_k, X_kv @ W_v
    pattern = np.zeros((heads, sq, sk))
    z = np.zeros((sq, heads, d_v))
    for h in range(heads):
        g = h // group
        for i in range(sq):
            scores = []
            for j in range(sk):
                if keep is not None and not keep[i][j]:
                    scores.append(-math.inf)
                    continue
                s = 0.0
                for d in range(d_head):
                    s += Q[i, h * d_head + d] * K[j, g * d_head + d]
                scores.append(s / math.sqrt(d_head))
            pattern[h, i] = softmax_row(scores)
            for j in range(sk):
                for e in range(d_v):
                    z[i, h, e] += pattern[h, i, j] * V[j, g * d_v + e]
    concat = z.reshape(sq, heads * d_v)
    return {"q": Q.reshape(sq, heads, d_head), "k": K.reshape(sk, kv_heads, d_head), "pattern": pattern,
            "z": z, "out": concat if W_o is None else concat @ W_o}


def reference_for(spec, keep=None):
    att = spec.attention
    return plain_attention(spec.source.embeddings.data, att.W_q.data, att.W_k.data, att.W_v.data, att.heads,
                           att.kv_heads, spec.encoder.embeddings.data if spec.encoder else None, keep,
                           att.W_o.data if att.W_o is not None else None)


def assert_trace_matches(trace, ref):
    np.testing.assert_allclose(trace["attn.hook_q"][0], ref["q"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(trace["attn.hook_k"][0], ref["k"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(trace["attn.hook_pattern"][0], ref["pattern"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(trace["attn.hook_z"][0], ref["z"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(trace["hook_attn_out"][0], ref["out"], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- cross-attention

def test_seed001_cross_attention_against_plain_loops():
    spec = attntrace.load_spec(CONFIGS / "cross_seed001.yaml")
    trace = attntrace.run(spec, keep="all")
    keep = [[j < 4 for j in range(5)] for _ in range(3)]           # the encoder's <pad> is blocked
    assert_trace_matches(trace, reference_for(spec, keep))
    assert trace["attn.hook_pattern"][0, :, :, 4].max() == 0


def test_cross_attention_keeps_seq_q_and_seq_k_apart_in_every_step():
    trace = attntrace.run(CONFIGS / "cross_seed001.yaml", keep="all")
    shapes = {hook: trace[hook].shape for hook in trace.keys()}
    assert shapes["hook_embed"] == (1, 3, 8) and shapes["hook_encoder_embed"] == (1, 5, 8)
    assert shapes["attn.hook_q"] == (1, 3, 2, 4)
    assert shapes["attn.hook_k"] == shapes["attn.hook_v"] == (1, 5, 2, 4)
    for hook in ("attn.hook_qk", "attn.hook_scaled", "attn.hook_attn_scores", "attn.hook_pattern"):
        assert shapes[hook] == (1, 2, 3, 5)
    assert shapes["attn.hook_mask"] == (1, 1, 3, 5)
    assert shapes["attn.hook_z"] == (1, 3, 2, 4) and shapes["hook_attn_out"] == (1, 3, 8)


def test_cross_attention_tables_are_labelled_with_both_sequences(invoke):
    code, out = invoke("run", CONFIGS / "cross_seed001.yaml", "--steps", "weights,hook_encoder_embed", "--head", "0")
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if "猫" in line and "<pad>" in line and "max" in line)
    assert header.split()[:5] == ["猫", "抓", "了", "老鼠", "<pad>"]
    rows = [line.split()[0] for line in lines[lines.index(header) + 2:][:3]]
    assert rows == ["<s>", "the", "cat"]                             # queries: decoder tokens
    assert "shape (seq_q=3, seq_k=5)" in out or "seq_q=3, seq_k=5" in out
    assert "encoder tokens 猫 抓 了 老鼠 <pad>" in out
    code, out = invoke("run", CONFIGS / "cross_seed001.yaml", "--format", "json")
    doc = json.loads(out)
    assert doc["tokens"] == ["<s>", "the", "cat"] and doc["key_tokens"] == ["猫", "抓", "了", "老鼠", "<pad>"]


def test_cross_attention_with_an_explicit_rectangular_mask():
    spec = attntrace.load_spec(CONFIGS / "cross_seed001.yaml")
    keep = [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]]
    from dataclasses import replace

    from attntrace.inputs.spec import Array, MaskSpec
    mask = MaskSpec(matrix=Array("m", np.array(keep, bool), None))
    spec = replace(spec, attention=replace(spec.attention, mask=mask))
    trace = attntrace.run(spec, keep="all")
    assert_trace_matches(trace, reference_for(spec, keep))


def test_encoder_width_mismatch_is_a_shape_error(invoke, write_spec):
    path = write_spec("""version: 1
tokens: [a, b]
embeddings: [[1, 0], [0, 1]]
encoder:
  tokens: [x, y, z]
  embeddings: [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
attention: {W_q: {identity: 2}, W_k: {identity: 2}, W_v: {identity: 2}}
""")
    code, out = invoke("run", path)
    assert code == 3 and "encoder" in out


# --------------------------------------------------------------------------- KV-cache decoding

def _full_sequence_spec(kv_spec):
    """The self-attention spec over all 8 tokens that the KV-cache config decodes the end of."""
    from dataclasses import replace
    return replace(kv_spec, source=kv_spec.encoder, encoder=None)


def test_kv_cache_weights_are_the_last_rows_of_the_full_causal_run():
    spec = attntrace.load_spec(CONFIGS / "mask_kv_cache.yaml")
    trace = attntrace.run(spec, keep="all")
    keep = [[j <= i + 5 for j in range(8)] for i in range(3)]       # queries at positions 5, 6, 7
    assert_trace_matches(trace, reference_for(spec, keep))
    full = attntrace.run(_full_sequence_spec(spec), keep="all")
    np.testing.assert_allclose(trace["attn.hook_pattern"], full["attn.hook_pattern"][:, :, 5:], rtol=1e-12)
    np.testing.assert_allclose(trace["hook_attn_out"], full["hook_attn_out"][:, 5:], rtol=1e-12)


def test_kv_cache_with_rope_uses_the_absolute_query_positions():
    spec = attntrace.load_spec(CONFIGS / "mask_kv_cache.yaml")
    from dataclasses import replace

    from attntrace.inputs.spec import PositionalSpec
    spec = replace(spec, positional=PositionalSpec(kind="rope"))
    trace = attntrace.run(spec, keep="all")
    full = attntrace.run(_full_sequence_spec(spec), keep="all")
    np.testing.assert_allclose(trace["attn.hook_rot_q"], full["attn.hook_rot_q"][:, 5:], rtol=1e-12)
    np.testing.assert_allclose(trace["attn.hook_pattern"], full["attn.hook_pattern"][:, :, 5:], rtol=1e-12)


def test_kv_cache_with_alibi_matches_the_full_run():
    spec = attntrace.load_spec(CONFIGS / "mask_kv_cache.yaml")
    from dataclasses import replace

    from attntrace.inputs.spec import PositionalSpec
    spec = replace(spec, positional=PositionalSpec(kind="alibi"))
    trace = attntrace.run(spec, keep="all")
    full = attntrace.run(_full_sequence_spec(spec), keep="all")
    np.testing.assert_allclose(trace["attn.hook_scaled"], full["attn.hook_scaled"][:, :, 5:], rtol=1e-12)


# --------------------------------------------------------------------------- GQA / MQA

@pytest.mark.parametrize("config,heads,kv", [("gqa_8x2.yaml", 8, 2), ("gqa_mqa.yaml", 4, 1)])
def test_grouped_query_attention_against_plain_loops(config, heads, kv):
    spec = attntrace.load_spec(CONFIGS / config)
    trace = attntrace.run(spec, keep="all")
    assert trace.plan.size("n_kv_heads") == kv
    assert trace["attn.hook_k"].shape[2] == kv and trace["attn.hook_v"].shape[2] == kv
    assert trace["attn.hook_q"].shape[2] == heads and trace["attn.hook_pattern"].shape[1] == heads
    keep = [[j <= i for j in range(6)] for i in range(6)]
    assert_trace_matches(trace, reference_for(spec, keep))


def test_gqa_equals_multi_head_with_repeated_kv_weights():
    spec = attntrace.load_spec(CONFIGS / "gqa_8x2.yaml")
    gqa = attntrace.run(spec, keep="all")
    att = spec.attention
    d_head = 4
    # kv head g serves query heads 4g..4g+3: copy its columns once per query head
    def repeat(w):
        return np.concatenate([w.data[:, (h // 4) * d_head:(h // 4 + 1) * d_head] for h in range(8)], axis=1)
    from dataclasses import replace

    from attntrace.inputs.spec import Array
    mha = replace(spec, attention=replace(att, kv_heads=None, W_k=Array("W_k", repeat(att.W_k), None),
                                          W_v=Array("W_v", repeat(att.W_v), None)))
    full = attntrace.run(mha, keep="all")
    np.testing.assert_allclose(gqa["attn.hook_pattern"], full["attn.hook_pattern"], rtol=1e-12)
    np.testing.assert_allclose(gqa["hook_attn_out"], full["hook_attn_out"], rtol=1e-12)


def test_gqa_k_table_is_labelled_kv_head(invoke):
    code, out = invoke("run", CONFIGS / "gqa_8x2.yaml", "--steps", "K")
    assert code == 0 and "kv head 1" in out and "n_kv_heads=2" in out


def test_kv_heads_that_do_not_divide_heads_are_diagnosed(invoke, write_spec):
    path = write_spec("""version: 1
tokens: [a, b]
embeddings: {random: {shape: [2, 12], seed: 0}}
attention:
  heads: 4
  kv_heads: 3
  W_q: {random: {shape: [12, 12], seed: 1}}
  W_k: {random: {shape: [12, 9], seed: 2}}
  W_v: {random: {shape: [12, 9], seed: 3}}
""")
    code, out = invoke("run", path)
    assert code == 3
    assert "kv" in out


def test_kv_weight_sized_for_all_heads_is_diagnosed(invoke, write_spec):
    # a common slip: W_k written for 8 heads while kv_heads is 2
    path = write_spec("""version: 1
tokens: [a, b]
embeddings: {random: {shape: [2, 16], seed: 0}}
attention:
  heads: 8
  kv_heads: 2
  W_q: {random: {shape: [16, 16], seed: 1}}
  W_k: {random: {shape: [16, 16], seed: 2}}
  W_v: {random: {shape: [16, 4], seed: 3}}
""")
    code, out = invoke("run", path)
    assert code == 3 and "W_k" in out
