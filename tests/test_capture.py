"""Captures of real PyTorch attention, checked against attntrace: tutorial classes (correct ones
match, each classic mistake is named), nn.MultiheadAttention in its layouts and masks, the
Hugging Face BERT / GPT-2 / Llama attention modules, encoder/decoder layers, the capture file
format (read back bit for bit, also by the safetensors package) and damaged files.

The reference is PyTorch itself: a capture holds the numbers torch computed, and the check
says "matches" only when attntrace's float64 recomputation agrees within the dtype tolerance.
Under CI=true a missing torch (or transformers) fails these tests instead of skipping them.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

if os.environ.get("CI") == "true":
    import torch  # noqa: F401 -- CI must have torch: a missing one fails here, it is not skipped
else:
    torch = pytest.importorskip("torch")

import tutorial_attention as tutorial  # noqa: E402 -- needs torch (tests/ is on sys.path, as for reference.py)

from attntrace.analysis.capture import TOLERANCES, check_capture, load_capture, spec_from_capture  # noqa: E402
from attntrace.errors import InputError  # noqa: E402
from attntrace.models import capture as capture_mod  # noqa: E402
from attntrace.models.capture import capture, tap  # noqa: E402
from attntrace.render.capture_view import render_capture_report  # noqa: E402

B, S, D, H, D_K = 2, 5, 24, 4, 6          # sizes that never coincide, so no layout is ambiguous
KEEP = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])      # 1 = may attend; each item has pads


def needs_transformers():
    if os.environ.get("CI") == "true":
        import transformers
    else:
        transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def inputs(dtype=torch.float32, seed=0):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def linears(module):
    """capture()'s weights= for the tutorial classes (their nn.Linear projections)."""
    names = ("Wq", "Wk", "Wv", "Wo") if hasattr(module, "Wq") else ("W_q", "W_k", "W_v", "W_o")
    return {key: getattr(module, name) for key, name in zip("qkvo", names) if hasattr(module, name)}


def capture_tutorial(tmp_path, cls, *, mask=None, heads=H, dtype=torch.float32, convention="keep", args=(D, H)):
    """Run a tutorial class once under capture and check the file."""
    torch.manual_seed(1)
    module = cls(*args).eval().to(dtype)
    x = inputs(dtype)
    path = tmp_path / f"{cls.__name__}.safetensors"
    with torch.no_grad(), capture(module, path, weights=linears(module), heads=heads, mask=convention):
        if issubclass(cls, tutorial.MultiHeadAttentionPyTorch):
            module(x, x, x, None if mask is None else mask.to(dtype))
        else:
            module(x, None if mask is None else mask.to(dtype))
    return check_capture(path)


# =========================================================================== the tutorial classes

CORRECT = [
    pytest.param(tutorial.SimpleSelfAttention, None, dict(heads=1, args=(D, D_K)), id="seed001-single-head"),
    pytest.param(tutorial.SimpleSelfAttention, KEEP.unsqueeze(1), dict(heads=1, args=(D, D_K)),
                 id="seed001-single-head-masked"),
    pytest.param(tutorial.MultiHeadAttention, KEEP.unsqueeze(1), {}, id="seed001-multi-head"),
    pytest.param(tutorial.MultiHeadAttention, None, {}, id="seed001-multi-head-no-mask"),
    pytest.param(tutorial.MultiHeadAttentionPyTorch, KEEP[:, None, None, :], {}, id="seed004-multi-head"),
]


@pytest.mark.parametrize("cls, mask, options", CORRECT)
def test_correct_tutorial_classes_match(tmp_path, cls, mask, options):
    report = check_capture_of(tmp_path, cls, mask, options)
    part = report.parts[0]
    assert report.verdict == "matches" and report.exit_code == 0, part.summary()
    assert report.bug_names == [] and part.bugs == []
    compared = {h.hook for h in part.compared}
    assert {"attn.hook_pattern", "hook_attn_out"} <= compared, compared
    assert all(h.max_rel <= 1e-5 for h in part.compared), [(h.hook, h.max_rel) for h in part.compared]
    assert part.dtype == "float32" and part.rtol == TOLERANCES["float32"][0] == 1e-5


def check_capture_of(tmp_path, cls, mask, options):
    return capture_tutorial(tmp_path, cls, mask=mask, **options)


BUGGY = [
    pytest.param(tutorial.MultiHeadAttentionNoTranspose, KEEP.unsqueeze(1), {}, "split-heads-without-transpose",
                 "attn.hook_q", id="missing-transpose"),
    pytest.param(tutorial.SimpleSelfAttentionSoftmaxDim1, None, dict(heads=1, args=(D, D_K)), "softmax-wrong-axis",
                 "attn.hook_pattern", id="softmax-dim-1"),
    pytest.param(tutorial.MultiHeadAttentionScaleByDModel, KEEP[:, None, None, :], {}, "scale-by-d-model",
                 "attn.hook_scaled", id="scale-by-d-model"),
    pytest.param(tutorial.MultiHeadAttentionMaskInverted, KEEP[:, None, None, :], {}, "inverted-mask",
                 "attn.hook_pattern", id="mask-inverted"),
    pytest.param(tutorial.MultiHeadAttentionMaskAfterSoftmax, KEEP.unsqueeze(1), {}, "mask-after-softmax",
                 "attn.hook_pattern", id="mask-after-softmax"),
]


@pytest.mark.parametrize("cls, mask, options, bug, first_hook", BUGGY)
def test_each_classic_mistake_is_named(tmp_path, cls, mask, options, bug, first_hook):
    report = check_capture_of(tmp_path, cls, mask, options)
    part = report.parts[0]
    assert report.verdict == "differs" and report.exit_code == 1
    assert part.first_divergence.hook == first_hook
    assert report.bug_names == [bug], part.summary()          # exactly this bug, nothing else
    match = part.bugs[0]
    assert match.full and match.max_rel <= 1e-5
    assert set(match.reproduced) == {h.hook for h in part.compared}
    assert match.fixes[0] and match.descriptions[0]
    assert f"`{bug}`" in part.summary() and first_hook in part.summary()


def test_later_hooks_are_consequences_or_own_divergences(tmp_path):
    """Split without transpose: Q is first; K and V carry the same mistake (they diverge on their
    own); everything computed from them is a consequence."""
    part = check_capture_of(tmp_path, tutorial.MultiHeadAttentionNoTranspose, KEEP.unsqueeze(1), {}).parts[0]
    status = {h.hook: h.status for h in part.hooks}
    assert status == {"attn.hook_q": "first divergence", "attn.hook_k": "diverges", "attn.hook_v": "diverges",
                      "attn.hook_scaled": "consequence", "attn.hook_attn_scores": "consequence",
                      "attn.hook_pattern": "consequence", "attn.hook_z": "consequence",
                      "hook_attn_out": "consequence"}
    first = part.first_divergence.first
    assert set(first["index"]) == {"batch", "query", "head", "d_head"}


def half_precision_capture(tmp_path, dtype):
    """Seed 004's `scores + mask * -1e9` with left padding under a causal mask: the first query
    rows of item 0 see only padding, so every key of theirs is blocked."""
    causal = torch.triu(torch.ones(S, S), 1)
    left_pad = torch.tensor([[1.0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    blocked = ((causal[None] + left_pad[:, None, :]) > 0).float()[:, None]        # 1 = blocked
    return capture_tutorial(tmp_path, tutorial.MultiHeadAttentionHalfMask, mask=blocked, dtype=dtype,
                            convention="ignore")


def test_minus_1e9_mask_in_float16_differs_with_nan_rows(tmp_path):
    report = half_precision_capture(tmp_path, torch.float16)
    part = report.parts[0]
    assert report.verdict == "differs" and part.dtype == "float16"
    first = part.first_divergence
    assert first.hook == "attn.hook_pattern"
    assert np.isnan(first.first["captured"]) and first.first["expected"] == 0.0
    assert first.first["index"] == {"batch": 0, "head": 0, "query": 0, "key": 0}
    # -1e9 overflowed to -inf in float16, then softmax of an all -inf row: exactly this catalogue bug's numbers
    assert "fully-masked-row-neg-inf" in report.bug_names
    assert {h.hook: h.status for h in part.hooks}["attn.hook_scaled"] == "match"


def test_minus_1e9_mask_in_float16_is_named_weak_mask_value(tmp_path):
    report = half_precision_capture(tmp_path, torch.float16)
    assert report.verdict == "differs"
    assert "weak-mask-value" in report.bug_names


def test_minus_1e9_mask_in_float32_is_named_weak_mask_value_not_the_nan_bug(tmp_path):
    """In float32, -1e9 stays finite: every blocked score rounds to -1e9, so the fully blocked rows
    attend uniformly.  weak-mask-value, computed in the precision of the captured numbers, gives
    exactly these numbers; fully-masked-row-neg-inf (NaN rows) does not."""
    part = half_precision_capture(tmp_path, torch.float32).parts[0]
    assert part.verdict == "differs" and [b.name for b in part.bugs] == ["weak-mask-value"]
    row = part.first_divergence.first
    assert row["row_captured"] == pytest.approx([0.2] * 5) and row["row_expected"] == [0.0] * 5
    assert "`weak-mask-value`" in part.summary() and part.bugs[0].seen_in


@pytest.mark.parametrize("cls, bug", [(tutorial.GroupedQueryAttention, None),
                                      (tutorial.GroupedQueryAttentionTiled, "kv-heads-tiled")])
def test_grouped_query_attention_with_a_fused_projection(tmp_path, cls, bug):
    """A fused [q | k | v] projection is split by heads (4 query, 2 kv heads), not in thirds."""
    torch.manual_seed(2)
    module = cls(D, H, 2).eval()
    path = tmp_path / "gqa.safetensors"
    with capture(module, path, weights={"qkv": module.qkv, "o": module.out}, heads=H, kv_heads=2, mask="causal"):
        module(inputs())
    report = check_capture(path)
    spec = spec_from_capture(path)
    assert spec["attention"]["W_k"].shape == (2 * D_K, D) and spec["attention"]["kv_heads"] == 2
    if bug is None:
        assert report.verdict == "matches" and report.bug_names == []
    else:
        assert report.verdict == "differs" and report.bug_names == [bug]
        assert report.parts[0].first_divergence.hook == "attn.hook_pattern"


def test_assumptions_and_ambiguous_axes_are_warned(tmp_path):
    """No mask= for a forward that takes a mask: read as keep, said so (ATT-W343).  Q tapped as
    (batch, 5, 5, 6) with seq = heads = 5: two layouts fit, the head-major one is taken (ATT-W344)."""
    torch.manual_seed(0)
    module = tutorial.MultiHeadAttention(30, 5).eval()
    path = tmp_path / "ambiguous.safetensors"
    with capture(module, path, weights=linears(module), heads=5):
        module(torch.randn(2, 5, 30), KEEP.unsqueeze(1))
    report = check_capture(path)
    codes = {d.code for d in report.notes}
    assert {"ATT-W343", "ATT-W344"} <= codes
    assert report.verdict == "matches"           # head-major is how the tutorial holds Q



class SeqFirstHeads(torch.nn.Module):
    """Two heads held as (batch, seq, heads, d) -- attntrace's order, not PyTorch's usual -- with
    seq = heads = 2, so the shape alone cannot tell which axis is which."""

    def __init__(self, named: bool):
        super().__init__()
        self.named = named
        self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, 4) for p in (self.q, self.k, self.v))
        tap("Q", q, axes=("batch", "seq", "heads", "d_head") if self.named else None)
        w = tap("weights", torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 2, dim=-1))
        return tap("z", torch.einsum("bhqk,bkhd->bqhd", w, v), axes="batch seq heads d_v" if self.named else None)


@pytest.mark.parametrize("named", [True, False])
def test_tap_axes_settle_an_ambiguous_shape(tmp_path, named):
    torch.manual_seed(0)
    module = SeqFirstHeads(named).eval()
    path = tmp_path / "axes.safetensors"
    with capture(module, path, weights={"q": module.q, "k": module.k, "v": module.v}, heads=2):
        module(torch.randn(1, 2, 8))
    report = check_capture(path)
    ambiguous = [d for d in report.notes if d.code == "ATT-W344"]
    if named:
        assert report.verdict == "matches" and not ambiguous
    else:                                        # read head-major: wrong here, and the warning says why
        assert report.verdict == "differs" and {d.hook for d in ambiguous} == {"attn.hook_q", "attn.hook_z"}


# =========================================================================== nn.MultiheadAttention

def _causal_bool(n):
    return torch.triu(torch.ones(n, n, dtype=torch.bool), 1)          # True = blocked


PAD = torch.tensor([[False, False, False, True, True], [False, False, False, False, True]])
MHA_CASES = {
    "packed-batch-first-kpm-bool": (dict(batch_first=True), dict(key_padding_mask=PAD)),
    "seq-first-float-kpm": (dict(), dict(key_padding_mask=torch.zeros(B, S).masked_fill(PAD, float("-inf")))),
    "no-bias-causal-bool-2d": (dict(batch_first=True, bias=False), dict(attn_mask=_causal_bool(S))),
    "float-3d-mask-per-head-weights": (dict(batch_first=True), dict(
        attn_mask=torch.zeros(S, S).masked_fill(_causal_bool(S), float("-inf")).expand(B * H, S, S),
        average_attn_weights=False)),
    "kdim-vdim-cross": (dict(batch_first=True, kdim=7, vdim=9), dict(key_padding_mask=PAD)),
    "add-bias-kv-zero-attn": (dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
                              dict(attn_mask=_causal_bool(S), key_padding_mask=PAD)),
    "is-causal-no-weights": (dict(batch_first=True), dict(attn_mask=_causal_bool(S), is_causal=True,
                                                          need_weights=False)),
    "unbatched": (dict(batch_first=True), dict()),
}


def run_mha(path, module_options, call_options, modify=None):
    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(D, H, **module_options).eval()
    batch_first = module_options.get("batch_first", False)
    shape = (B, S) if batch_first else (S, B)
    x = torch.randn(*shape, D) if "unbatched" not in str(path) else torch.randn(S, D)
    key = torch.randn(*shape, module_options.get("kdim", D))
    value = torch.randn(*shape, module_options.get("vdim", D))
    handle = mha.register_forward_hook(modify) if modify else None
    with capture(mha, path):
        if "kdim" in module_options:
            mha(x, key, value, **call_options)
        else:
            mha(x, x, x, **call_options)
    if handle:
        handle.remove()
    return check_capture(path)


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_matches(tmp_path, case):
    module_options, call_options = MHA_CASES[case]
    report = run_mha(tmp_path / f"{case}.safetensors", module_options, call_options)
    part = report.parts[0]
    assert report.verdict == "matches", part.summary()
    expected = {"hook_attn_out"} | ({"attn.hook_pattern"} if call_options.get("need_weights", True) else set())
    assert {h.hook for h in part.compared} == expected
    assert all(h.max_rel <= 1e-5 for h in part.compared)


def test_multihead_attention_mask_keeps_its_convention(tmp_path):
    """Masks go into the spec in the convention they were given: MHA's bool masks are True = blocked."""
    module_options, call_options = MHA_CASES["packed-batch-first-kpm-bool"]
    run_mha(tmp_path / "kpm.safetensors", module_options, call_options)
    spec = spec_from_capture(tmp_path / "kpm.safetensors")
    mask = spec["attention"]["mask"]
    assert mask["convention"] == "ignore" and np.array_equal(mask["padding"], PAD.numpy())
    assert spec["attention"]["layout"] == "linear" and spec["attention"]["heads"] == H


def test_is_causal_hint_that_contradicts_attn_mask(tmp_path):
    """need_weights=False, no key_padding_mask: PyTorch trusts is_causal and ignores attn_mask."""
    not_causal = torch.zeros(S, S, dtype=torch.bool)
    not_causal[:, 0] = True
    report = run_mha(tmp_path / "hint.safetensors", dict(batch_first=True),
                     dict(attn_mask=not_causal, is_causal=True, need_weights=False))
    assert report.verdict == "matches"
    assert "ATT-W345" in {d.code for d in report.notes}
    assert spec_from_capture(tmp_path / "hint.safetensors")["attention"]["mask"] == "causal"


def test_rebuilt_spec_computes_what_torch_computed(tmp_path):
    """The spec alone, run by attntrace, gives torch's output (no check machinery in between)."""
    import attntrace
    torch.manual_seed(4)
    mha = torch.nn.MultiheadAttention(D, H, kdim=7, vdim=9, add_bias_kv=True).eval()      # side by side inputs
    x, key, value = torch.randn(S, B, D), torch.randn(S + 1, B, 7), torch.randn(S + 1, B, 9)
    with capture(mha, tmp_path / "cross.safetensors"):
        out, weights = mha(x, key, value, average_attn_weights=False)
    spec = spec_from_capture(tmp_path / "cross.safetensors")
    trace = attntrace.run(spec, keep="all")
    assert np.allclose(trace["hook_attn_out"], out.detach().numpy().transpose(1, 0, 2), rtol=0, atol=1e-5)
    assert np.allclose(trace["attn.hook_pattern"], weights.detach().numpy(), rtol=0, atol=1e-6)
    assert spec["encoder"]["tokens"][-1] == "bias_kv" and trace["attn.hook_pattern"].shape == (B, H, S, S + 2)


def test_training_mode_dropout_is_warned(tmp_path):
    mha = torch.nn.MultiheadAttention(D, H, dropout=0.5, batch_first=True).train()
    x = inputs()
    with capture(mha, tmp_path / "train.safetensors"):
        mha(x, x, x)
    report = check_capture(tmp_path / "train.safetensors")
    assert "ATT-W340" in {d.code for d in report.notes}
    assert report.verdict == "differs"             # dropped weights: not attention as specified


@pytest.mark.parametrize("error", [1e-4, 1e-3])
def test_a_slightly_wrong_output_never_matches(tmp_path, error):
    """An output off by 0.01% is already a different computation in float32."""
    def nudge(module, args, output):
        return output[0] * (1 + error), output[1]
    report = run_mha(tmp_path / "nudged.safetensors", dict(batch_first=True), {}, modify=nudge)
    part = report.parts[0]
    assert report.verdict == "differs"
    assert part.first_divergence.hook == "hook_attn_out"
    assert part.bugs == []                              # and no catalogue bug is blamed for it


def test_multihead_attention_in_half_precision_uses_its_tolerance(tmp_path):
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        torch.manual_seed(0)
        mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval().to(dtype)
        x = torch.randn(2, 16, 64).to(dtype)
        path = tmp_path / f"{name}.safetensors"
        with capture(mha, path):
            mha(x, x, x, average_attn_weights=False)
        part = check_capture(path).parts[0]
        assert part.dtype == name and part.rtol == TOLERANCES[name][0]
        assert part.matches, part.summary()
        worst = max(h.max_rel for h in part.compared)
        assert worst <= part.rtol / 3                   # the tolerance has room; it is not hiding anything
        assert worst > TOLERANCES["float32"][0]         # ... and float32's would be too strict


# =========================================================================== Hugging Face

def test_bert_self_attention_matches(tmp_path):
    needs_transformers()
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertAttention, BertSelfAttention
    config = BertConfig(hidden_size=12, num_attention_heads=3, intermediate_size=16, num_hidden_layers=1)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12)
    mask = torch.zeros(2, 1, 1, 5)
    mask[1, ..., 3:] = torch.finfo(torch.float32).min          # the additive mask BERT builds
    for cls, hooks in ((BertSelfAttention, 5), (BertAttention, 6)):
        module = cls(config).eval()
        path = tmp_path / f"{cls.__name__}.safetensors"
        with capture(module, path):
            module(x, attention_mask=mask)
        report = check_capture(path)
        part = report.parts[0]
        assert report.verdict == "matches", part.summary()
        assert len(part.compared) == hooks and {"attn.hook_q", "attn.hook_pattern", "hook_attn_out"} <= {
            h.hook for h in part.compared}
        assert all(h.max_rel <= 1e-5 for h in part.compared)
    assert report.not_comparable and "LayerNorm" in report.not_comparable[0]["reason"]


def test_gpt2_and_llama_attention_match(tmp_path):
    needs_transformers()
    from transformers import GPT2Config, LlamaConfig
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    torch.manual_seed(0)
    gpt2 = GPT2Attention(GPT2Config(n_embd=12, n_head=3, n_layer=1), layer_idx=0).eval()
    with capture(gpt2, tmp_path / "gpt2.safetensors"):
        gpt2(torch.randn(2, 5, 12))
    config = LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                         num_hidden_layers=1)
    llama, rotary = LlamaAttention(config, 0).eval(), LlamaRotaryEmbedding(config)
    x = torch.randn(2, 6, 16)
    cos, sin = rotary(x, torch.arange(6)[None].expand(2, 6))
    causal = torch.full((6, 6), torch.finfo(torch.float32).min).triu(1)[None, None].expand(2, 1, 6, 6)
    with capture(llama, tmp_path / "llama.safetensors"):
        llama(x, position_embeddings=(cos, sin), attention_mask=causal)
    for name in ("gpt2", "llama"):
        report = check_capture(tmp_path / f"{name}.safetensors")
        assert report.verdict == "matches", report.parts[0].summary()
        assert len(report.parts[0].compared) == 6
    spec = spec_from_capture(tmp_path / "llama.safetensors")
    assert spec["positional"] == {"kind": "rope", "base": 10000.0, "pairing": "half"}
    assert spec["attention"]["kv_heads"] == 2


def test_llama_with_shifted_positions_is_not_comparable(tmp_path):
    needs_transformers()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    config = LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                         num_hidden_layers=1)
    llama, rotary = LlamaAttention(config, 0).eval(), LlamaRotaryEmbedding(config)
    x = torch.randn(1, 4, 16)
    with capture(llama, tmp_path / "shifted.safetensors"):
        llama(x, position_embeddings=rotary(x, torch.arange(3, 7)[None]), attention_mask=None)
    with pytest.raises(InputError) as error:
        check_capture(tmp_path / "shifted.safetensors")
    assert error.value.diagnosis.code == "ATT-E351" and "RoPE" in error.value.diagnosis.message


# =========================================================================== blocks

@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_compares_its_attention_and_says_the_block_is_not_yet_comparable(tmp_path, norm_first):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), capture(layer, tmp_path / "layer.safetensors"):
        expected = layer(x, src_key_padding_mask=PAD)
    assert torch.backends.mha.get_fastpath_enabled()            # restored after the capture
    report = check_capture(tmp_path / "layer.safetensors")
    assert [p.part for p in report.parts] == ["self_attn"] and report.verdict == "matches"
    assert report.not_comparable[-1]["part"] == "block" and "not yet comparable" in report.not_comparable[-1]["reason"]
    capture_file = load_capture(tmp_path / "layer.safetensors")
    root = capture_file.root
    assert root["config"]["norm_first"] is norm_first and set(root["modules"]) == {"norm1", "norm2", "linear1",
                                                                                   "linear2"}
    output = capture_file.read(root["hooks"]["blocks.0.hook_resid_post"]["tensor"])
    assert np.array_equal(output, expected.numpy())
    assert "self_attn.in_proj_weight" in root["weights"] and "linear1.weight" in root["weights"]
    with pytest.raises(InputError) as error:
        spec_from_capture(capture_file)
    assert error.value.diagnosis.code == "ATT-E351"


def test_decoder_layer_compares_self_and_cross_attention(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(16, 4, 32, batch_first=True).eval()
    target, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    with capture(layer, tmp_path / "decoder.safetensors"):
        layer(target, memory, tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(4), tgt_is_causal=True)
    report = check_capture(tmp_path / "decoder.safetensors")
    assert [p.part for p in report.parts] == ["self_attn", "multihead_attn"] and report.verdict == "matches"
    cross = spec_from_capture(tmp_path / "decoder.safetensors", part="multihead_attn")
    assert cross["encoder"]["embeddings"].shape == (2, 6, 16)


# =========================================================================== the file format

def test_capture_file_reads_back_bit_for_bit_also_with_safetensors(tmp_path, monkeypatch):
    """Every dtype, streamed in tiny chunks, is read back exactly (by attntrace and by safetensors)."""
    safetensors = pytest.importorskip("safetensors")
    monkeypatch.setattr(capture_mod, "CHUNK_BYTES", 8)
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(4, 3).half(), "bf16": torch.randn(7).bfloat16(),
               "f64": torch.randn(2, 2, 2).double(), "i64": torch.arange(5), "b": torch.rand(3, 3) > 0.5,
               "strided": torch.randn(4, 6).t()}

    class Identity(torch.nn.Module):
        def forward(self, x):
            for name, t in tensors.items():
                tap(f"blocks.0.{name}", t)          # block hooks: stored, not compared
            return x
    path = tmp_path / "dtypes.safetensors"
    identity = Identity()
    with capture(identity, path):
        identity(torch.zeros(1))
    capture_file = load_capture(path)
    hooks = capture_file.root["hooks"]
    with safetensors.safe_open(str(path), framework="pt") as reader:
        for name, t in tensors.items():
            key = hooks[f"blocks.0.{name}"]["tensor"]
            assert torch.equal(reader.get_tensor(key), t)
            ours = capture_file.read(key)
            assert ours.shape == tuple(t.shape)
            assert np.array_equal(ours, t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
    document = capture_file.document
    assert document["format"] == "attntrace-capture" and document["version"] == 1
    assert document["tensors"][hooks["blocks.0.bf16"]["tensor"]]["dtype"] == "bfloat16"


def test_tap_outside_a_capture_does_nothing(tmp_path):
    t = torch.randn(3)
    assert tap("weights", t) is t
    assert capture_mod._ACTIVE == []


def _capture_file(tmp_path):
    module = tutorial.MultiHeadAttention(D, H).eval()
    path = tmp_path / "good.safetensors"
    with capture(module, path, weights=linears(module), heads=H):
        module(inputs())
    return path


def _rewrite_header(path, change):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def _set_metadata(**changes):
    def change(header):
        document = json.loads(header["__metadata__"]["attntrace.capture"])
        document.update(changes)
        header["__metadata__"]["attntrace.capture"] = json.dumps(document)
    return change


CORRUPTIONS = {
    "missing": ("ATT-E345", lambda p: p.unlink()),
    "empty": ("ATT-E346", lambda p: p.write_bytes(b"")),
    "huge-header-length": ("ATT-E346", lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")),
    "header-not-json": ("ATT-E346", lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{oops")),
    "truncated": ("ATT-E346", lambda p: p.write_bytes(p.read_bytes()[:-40])),
    "not-a-capture": ("ATT-E347", lambda p: _rewrite_header(p, lambda h: h.pop("__metadata__"))),
    "bad-metadata-json": ("ATT-E347", lambda p: _rewrite_header(
        p, lambda h: h["__metadata__"].update({"attntrace.capture": "{"}))),
    "newer-version": ("ATT-E348", lambda p: _rewrite_header(p, _set_metadata(version=99))),
    "no-components": ("ATT-E347", lambda p: _rewrite_header(p, _set_metadata(components=[]))),
    "missing-tensor": ("ATT-E349", lambda p: _rewrite_header(p, lambda h: h.pop("weights.W_q"))),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_capture_files_give_a_clean_input_error(tmp_path, case):
    code, damage = CORRUPTIONS[case]
    path = _capture_file(tmp_path)
    damage(path)
    with pytest.raises(InputError) as error:
        check_capture(path)
    diagnosis = error.value.diagnosis
    assert diagnosis.code == code
    assert str(path) in diagnosis.message


def test_safetensors_written_by_the_package_is_not_a_capture(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({"w": torch.randn(2, 2)}, str(path))
    with pytest.raises(InputError) as error:
        load_capture(path)
    assert error.value.diagnosis.code == "ATT-E347"


# =========================================================================== capture() errors

def test_capture_argument_errors(tmp_path):
    module = tutorial.MultiHeadAttention(D, H)
    cases = [
        (lambda: capture(object(), tmp_path / "x"), "ATT-E340", "torch.nn.Module"),
        (lambda: capture(module, tmp_path / "x", weights={"qq": module.Wq}, heads=H), "ATT-E340", "did you mean"),
        (lambda: capture(torch.nn.MultiheadAttention(8, 2), tmp_path / "x", heads=2), "ATT-E340", "read from"),
        (lambda: capture(module, tmp_path / "x", heads=0), "ATT-E340", "heads"),
        (lambda: capture(module, tmp_path / "x", mask="causla"), "ATT-E340", "mask"),
    ]
    for make, code, text in cases:
        with pytest.raises(InputError) as error:
            with make():
                pass
        assert error.value.diagnosis.code == code
        assert text in (error.value.diagnosis.message + (error.value.diagnosis.hint or ""))


def test_module_not_called_and_in_place_changes_are_errors(tmp_path):
    module = tutorial.MultiHeadAttention(D, H)
    with pytest.raises(InputError) as error:
        with capture(module, tmp_path / "never.safetensors", weights=linears(module), heads=H):
            pass
    assert error.value.diagnosis.code == "ATT-E341" and not (tmp_path / "never.safetensors").exists()

    class InPlace(torch.nn.Module):
        def forward(self, x):
            scores = x @ x.transpose(-2, -1)
            tap("attn.hook_qk", scores)
            scores.mul_(2)                         # the tapped values are gone
            return scores
    in_place = InPlace()
    with pytest.raises(InputError) as error:
        with capture(in_place, tmp_path / "inplace.safetensors", heads=1):
            in_place(torch.randn(1, 3, 4))
    assert error.value.diagnosis.code == "ATT-E342" and "clone" in error.value.diagnosis.hint


def test_a_tapped_module_without_weights_cannot_be_rebuilt(tmp_path):
    class Bare(torch.nn.Module):
        def forward(self, x):
            return tap("output", x * 2)
    bare = Bare()
    with capture(bare, tmp_path / "bare.safetensors"):
        bare(torch.randn(1, 3, 4))
    with pytest.raises(InputError) as error:
        check_capture(tmp_path / "bare.safetensors")
    assert error.value.diagnosis.code == "ATT-E350" and "weights=" in error.value.diagnosis.hint


def test_unknown_tap_name_is_named_with_a_suggestion(tmp_path):
    module = tutorial.MultiHeadAttention(D, H).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, x):
            return tap("attn.hook_patern", self.inner(x))
    path = tmp_path / "typo.safetensors"
    wrapped = Wrapped()
    with capture(wrapped, path, weights=linears(module), heads=H):
        wrapped(inputs())
    with pytest.raises(InputError) as error:
        check_capture(path)
    assert error.value.diagnosis.code == "ATT-E352" and "hook_pattern" in error.value.diagnosis.hint


# =========================================================================== report forms

def test_report_as_json_and_as_text(tmp_path):
    report = half_precision_capture(tmp_path, torch.float16)     # NaN in the capture
    document = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert document["verdict"] == "differs" and document["exit_code"] == 1
    part = document["parts"][0]
    assert part["first_divergence"] == "attn.hook_pattern" and part["hooks"][2]["first"]["captured"] == "nan"
    assert part["bugs"][0]["bugs"] == ["fully-masked-row-neg-inf"] and part["bugs"][0]["fixes"]
    from rich.console import Console
    console = Console(width=160, no_color=True, color_system=None, record=True)
    console.print(render_capture_report(report))
    text = console.export_text()
    assert "✗ first divergence" in text and "fully-masked-row-neg-inf" in text and "fix" in text
    good = check_capture(_capture_file(tmp_path))
    console = Console(width=160, no_color=True, color_system=None, record=True)
    console.print(render_capture_report(good))
    assert "✓ matches" in console.export_text()
