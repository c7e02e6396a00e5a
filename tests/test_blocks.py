"""Whole transformer blocks in a spec: seed 001's encoder layer, pre-norm and gated blocks, many layers.

The references are PyTorch modules written here the way the seeds and model code write them
(seed 001's TransformerEncoderLayer transcribed; a Llama-style pre-norm block), fed the spec's
own weights; attntrace's trace must match them hook by hook.
"""
import math

import numpy as np
import pytest
import yaml
from conftest import CONFIGS, require

import attntrace

torch = require("torch")
SEED001 = CONFIGS / "seed001_encoder_layer.yaml"


def _t(array):
    return torch.tensor(np.asarray(array, dtype=np.float64))


class Seed001MultiHeadAttention(torch.nn.Module):
    """Seed 001's MultiHeadAttention, transcribed (its mask: masked_fill(mask == 0, -1e9))."""

    def __init__(self, d_model, num_heads):
        super().__init__()
        self.d_model, self.num_heads, self.d_k = d_model, num_heads, d_model // num_heads
        self.Wq = torch.nn.Linear(d_model, d_model)
        self.Wk = torch.nn.Linear(d_model, d_model)
        self.Wv = torch.nn.Linear(d_model, d_model)
        self.Wo = torch.nn.Linear(d_model, d_model)

    def forward(self, x, mask=None):
        b, s, d = x.shape
        Q = self.Wq(x).view(b, s, self.num_heads, self.d_k).transpose(1, 2)
        K = self.Wk(x).view(b, s, self.num_heads, self.d_k).transpose(1, 2)
        V = self.Wv(x).view(b, s, self.num_heads, self.d_k).transpose(1, 2)
        scores = torch.matmul(Q, K.transpose(-2, -1)) / math.sqrt(self.d_k)
        if mask is not None:
            mask = mask.unsqueeze(1)
            scores = scores.masked_fill(mask == 0, -1e9)
        self.attn = torch.softmax(scores, dim=-1)
        context = torch.matmul(self.attn, V)
        context = context.transpose(1, 2).contiguous().view(b, s, d)
        return self.Wo(context)


class Seed001EncoderLayer(torch.nn.Module):
    """Seed 001's TransformerEncoderLayer, transcribed (dropout left out: eval mode)."""

    def __init__(self, d_model=512, num_heads=8, d_ff=2048):
        super().__init__()
        self.self_attn = Seed001MultiHeadAttention(d_model, num_heads)
        self.feed_forward = torch.nn.Sequential(torch.nn.Linear(d_model, d_ff), torch.nn.ReLU(),
                                                torch.nn.Linear(d_ff, d_model))
        self.norm1 = torch.nn.LayerNorm(d_model)
        self.norm2 = torch.nn.LayerNorm(d_model)

    def forward(self, x, mask=None):
        attn_out = self.self_attn(x, mask)
        self.resid_mid = x + attn_out
        x = self.norm1(self.resid_mid)
        self.after_norm1 = x
        ff_out = self.feed_forward(x)
        self.ff_out = ff_out
        self.resid_post = x + ff_out
        return self.norm2(self.resid_post)


def _seed001_module(spec):
    block = spec.blocks[0]
    att, mlp = block.attention, block.mlp
    layer = Seed001EncoderLayer(d_model=8, num_heads=2, d_ff=16).double()
    with torch.no_grad():
        for mine, name in (("Wq", "q"), ("Wk", "k"), ("Wv", "v"), ("Wo", "o")):
            linear = getattr(layer.self_attn, mine)
            linear.weight.copy_(_t(getattr(att, f"W_{name}").data))
            linear.bias.copy_(_t(getattr(att, f"b_{name}").data))
        layer.feed_forward[0].weight.copy_(_t(mlp.get("W_in").data))
        layer.feed_forward[0].bias.copy_(_t(mlp.get("b_in").data))
        layer.feed_forward[2].weight.copy_(_t(mlp.get("W_out").data))
        layer.feed_forward[2].bias.copy_(_t(mlp.get("b_out").data))
        for norm, spec_norm in ((layer.norm1, block.ln1), (layer.norm2, block.ln2)):
            norm.weight.copy_(_t(spec_norm.weight.data))
            norm.bias.copy_(_t(spec_norm.bias.data))
    return layer.eval()


def test_seed001_encoder_layer_matches_the_seeds_pytorch_class():
    spec = attntrace.load_spec(SEED001)
    trace = attntrace.run(spec, keep="all")
    layer = _seed001_module(spec)
    x = _t(spec.source.embeddings.data)[None]
    mask = _t(spec.blocks[0].attention.mask.padding.data)[None, None, :].expand(1, 5, 5)
    with torch.no_grad():
        out = layer(x, mask)
    close = dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(trace["blocks.0.attn.hook_pattern"], layer.self_attn.attn.numpy(), **close)
    np.testing.assert_allclose(trace["blocks.0.hook_resid_mid"], layer.resid_mid.numpy(), **close)
    np.testing.assert_allclose(trace["blocks.0.ln1.hook_normalized"], layer.after_norm1.numpy(), **close)
    np.testing.assert_allclose(trace["blocks.0.hook_mlp_out"], layer.ff_out.numpy(), **close)
    np.testing.assert_allclose(trace["blocks.0.hook_resid_post"], layer.resid_post.numpy(), **close)
    np.testing.assert_allclose(trace["blocks.0.ln2.hook_normalized"], out.numpy(), **close)
    assert trace["blocks.0.attn.hook_pattern"][0, :, :, 4].max() == 0.0          # the padding key
    assert not trace.warnings


# --------------------------------------------------------------------------- pre-norm, RMSNorm, SwiGLU, many layers

def _llama_spec(rng, n_layers=3, d=8, heads=4, kv=2, d_mlp=12, seq=5):
    d_head = d // heads

    def w(*shape, scale=0.4):
        return rng.normal(0, scale, size=shape)
    blocks = []
    for _ in range(n_layers):
        blocks.append({
            "attention": {"heads": heads, "kv_heads": kv, "layout": "linear",
                          "W_q": w(heads * d_head, d), "W_k": w(kv * d_head, d), "W_v": w(kv * d_head, d),
                          "W_o": w(d, heads * d_head)},
            "norm": {"kind": "rmsnorm", "placement": "pre", "eps": 1e-6},
            "ln1": {"weight": 1 + w(d, scale=0.1)}, "ln2": {"weight": 1 + w(d, scale=0.1)},
            "mlp": {"activation": "silu", "layout": "linear", "W_gate": w(d_mlp, d), "W_up": w(d_mlp, d),
                    "W_down": w(d, d_mlp)}})
    return {"tokens": [f"t{i}" for i in range(seq)], "embeddings": w(seq, d, scale=1.0), "positional": "rope",
            "mask": "causal", "blocks": blocks, "ln_final": {"kind": "rmsnorm", "weight": 1 + w(d, scale=0.1),
                                                             "eps": 1e-6}}


def _torch_llama(spec_dict):
    """A Llama-style forward in torch: pre-RMSNorm, RoPE (rotate_half), GQA, causal softmax, SwiGLU."""
    x = _t(spec_dict["embeddings"])[None]
    seq, d = x.shape[1], x.shape[2]
    outs = {"resid": [], "pattern": []}

    def rms(v, weight, eps=1e-6):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * _t(weight)

    for block in spec_dict["blocks"]:
        att = block["attention"]
        heads, kv = att["heads"], att["kv_heads"]
        d_head = d // heads
        h = rms(x, block["ln1"]["weight"])
        q = (h @ _t(att["W_q"]).T).view(1, seq, heads, d_head).transpose(1, 2)
        k = (h @ _t(att["W_k"]).T).view(1, seq, kv, d_head).transpose(1, 2)
        v = (h @ _t(att["W_v"]).T).view(1, seq, kv, d_head).transpose(1, 2)
        inv = 1.0 / (10000.0 ** (torch.arange(0, d_head, 2, dtype=torch.float64) / d_head))
        ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

        def rot(t, cos=cos, sin=sin):
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin
        q, k = rot(q), rot(k)
        k = k.repeat_interleave(heads // kv, dim=1)
        v = v.repeat_interleave(heads // kv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)
        scores = scores.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), float("-inf"))
        p = scores.softmax(-1)
        outs["pattern"].append(p.numpy())
        z = (p @ v).transpose(1, 2).reshape(1, seq, d)
        x = x + z @ _t(att["W_o"]).T
        h = rms(x, block["ln2"]["weight"])
        mlp = block["mlp"]
        gate = h @ _t(mlp["W_gate"]).T
        x = x + (torch.nn.functional.silu(gate) * (h @ _t(mlp["W_up"]).T)) @ _t(mlp["W_down"]).T
        outs["resid"].append(x.numpy())
    outs["final"] = rms(x, spec_dict["ln_final"]["weight"]).numpy()
    return outs


def test_prenorm_rmsnorm_swiglu_gqa_rope_blocks_match_torch():
    spec = _llama_spec(np.random.default_rng(0))
    trace = attntrace.run(spec, keep="all")
    ref = _torch_llama(spec)
    for layer in range(3):
        np.testing.assert_allclose(trace[f"blocks.{layer}.attn.hook_pattern"], ref["pattern"][layer],
                                   rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(trace[f"blocks.{layer}.hook_resid_post"], ref["resid"][layer],
                                   rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(trace["ln_final.hook_normalized"], ref["final"], rtol=1e-11, atol=1e-12)
    assert not trace.warnings


def test_block_hook_names_follow_transformerlens():
    trace = attntrace.run(_llama_spec(np.random.default_rng(1), n_layers=2), keep="all")
    hooks = trace.plan.hooks
    assert hooks[:2] == ["hook_embed", "blocks.0.hook_resid_pre"]
    for name in ("blocks.1.ln1.hook_normalized", "blocks.1.attn.hook_rot_q", "blocks.1.hook_attn_out",
                 "blocks.1.hook_resid_mid", "blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_pre",
                 "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"):
        assert name in hooks
    assert hooks[-1] == "ln_final.hook_normalized"
    # the next block reads the previous block's output
    np.testing.assert_array_equal(trace["blocks.1.hook_resid_pre"], trace["blocks.0.hook_resid_post"])
    with pytest.raises(attntrace.AttnTraceError, match="in every block"):
        trace["attn.hook_pattern"]


def test_a_block_shape_error_names_the_block_and_its_line(write_spec, invoke):
    spec = _llama_spec(np.random.default_rng(2), n_layers=2)
    spec["blocks"][1]["mlp"]["W_up"] = spec["blocks"][1]["mlp"]["W_up"][:, :5]
    doc = yaml.safe_dump(_lists(spec))
    code, out = invoke("run", write_spec(doc), "--format", "json")
    import json
    report = json.loads(out)
    assert code == 3
    first = report["diagnoses"][0]
    assert first["code"] == "ATT-E110" and first["hook"] == "blocks.1.mlp.hook_post"
    assert "blocks[1].mlp.W_up" in first["message"]
    assert first["locations"][0]["line"] is not None


def test_hooks_expect_diff_and_exports_understand_blocks(tmp_path, invoke, write_spec):
    spec = _lists(_llama_spec(np.random.default_rng(3), n_layers=2))
    path = write_spec(yaml.safe_dump(spec))
    code, out = invoke("run", path, "--hook", "blocks.1.attn.hook_pattern:ablate-head=2", "--format", "json",
                       "--export", tmp_path / "t.npz")
    assert code == 0
    saved = np.load(tmp_path / "t.npz")
    assert saved["blocks.1.attn.hook_pattern"][0, 2].max() == 0.0
    assert saved["blocks.0.attn.hook_pattern"][0, 2].max() > 0.0
    trace = attntrace.run(attntrace.load_spec(path), keep="all")
    spec["expect"] = {"blocks.1.attn.hook_pattern": {"head": 0, "row": 0, "values": [1, 0, 0, 0, 0]}}
    code, out = invoke("check", write_spec(yaml.safe_dump(spec), "expect.yaml"))
    assert code == 0, out
    other = _lists(_llama_spec(np.random.default_rng(3), n_layers=2))
    other["blocks"][1]["mlp"]["W_down"][0][0] += 0.5
    code, out = invoke("diff", path, write_spec(yaml.safe_dump(other), "other.yaml"))
    assert code == 1 and "blocks.1.hook_mlp_out" in out
    code, out = invoke("run", path, "--step", input="c\n")
    assert code == 0 and f"Step {len(trace.plan.steps)}/{len(trace.plan.steps)}" in out


def _lists(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lists(v) for v in value]
    return value
