"""Bugs from the field (issue 15): each one injected into its config shows and is caught; its
detector catches the same mistake made by hand (a hook), not only the catalogue's; its fix,
re-run, gives the clean output; and no detector says anything on a clean config.

References are independent of attntrace's code: the rotations, masks, slopes and softmaxes are
written out here with plain numpy (complex numbers, explicit loops, the formulas of the reports).
The model-level and torch references are in test_field_bugs_models.py.
"""
import json
import math

import numpy as np
import pytest
from conftest import CONFIGS

from attntrace.analysis.bugs import CATALOGUE, EXPENSIVE_CODES, inject, report_url
from attntrace.analysis.crosscheck import explaining_dtype
from attntrace.analysis.field_checks import input_precision, paper_slopes
from attntrace.analysis.run import run
from attntrace.errors import ShapeError
from attntrace.inputs.spec import load_spec

# each field bug, the config where it shows, and the detector that must name it
FIELD = {
    "rope-pairing-mismatch": ("positional_rope.yaml", "ATT-W240"),
    "rope-low-precision": ("bug_inject_rope_long_context.yaml", "ATT-W240"),
    "left-padding-positions": ("bug_inject_left_padding_positions.yaml", "ATT-W241"),
    "kv-cache-causal-alignment": ("mask_kv_cache.yaml", "ATT-W242"),
    "weak-mask-value": ("bug_inject_left_padding.yaml", "ATT-W248"),
    "nan-leak-through-mask": ("mask_padding.yaml", "ATT-W246"),
    "sliding-window-off-by-one": ("mask_sliding_window.yaml", "ATT-W243"),
    "alibi-slopes-non-power-of-two": ("bug_inject_alibi_12_heads.yaml", "ATT-W244"),
    "fused-qkv-split-under-gqa": ("gqa_8x2.yaml", "ATT-E103"),
    "softmax-in-half-precision": ("bug_inject_large_scores.yaml", "ATT-W204"),
}
FIELD_CODES = {"ATT-W240", "ATT-W241", "ATT-W242", "ATT-W243", "ATT-W244", "ATT-W246", "ATT-W247", "ATT-W248"}


def spec_of(config):
    return load_spec(CONFIGS / config)


def arrays(spec, overrides=None, dtype="float64"):
    return run(spec, overrides=overrides, keep="all", check=False, dtype=dtype).arrays


def buggy(spec, name, dtype="float64"):
    return arrays(spec, CATALOGUE[name].overrides(), dtype)


# =========================================================================== the catalogue

def test_catalogue_lists_23_bugs_each_with_a_public_report_and_a_fix(invoke):
    assert len(CATALOGUE) >= 23 and set(FIELD) <= set(CATALOGUE)
    for bug in CATALOGUE.values():
        assert bug.seen_in and bug.fix, bug.name
    for name in FIELD:                                    # the field bugs: every report is a GitHub thread
        reports = CATALOGUE[name].seen_in
        assert all(report_url(r) for r in reports), (name, reports)
    assert report_url("transformers#25199") == "https://github.com/huggingface/transformers/issues/25199"
    assert report_url("reczoo/FuxiCTR#30") == "https://github.com/reczoo/FuxiCTR/issues/30"
    assert report_url("(classic)") is None
    code, out = invoke("bugs", "--width", "200")
    assert code == 0
    for name, bug in CATALOGUE.items():
        assert name in out and bug.seen_in[0] in out
    code, doc = invoke("bugs", "--format", "json")
    listed = {b["name"]: b for b in json.loads(doc)["bugs"]}
    assert len(listed) >= 23
    assert listed["rope-low-precision"]["seen_in"] == [
        {"report": "gpt-neox#1003", "url": "https://github.com/EleutherAI/gpt-neox/issues/1003"}]
    assert listed["nan-leak-through-mask"]["fix"].startswith("mask with masked_fill")


def test_every_field_bug_has_a_cheap_detector_and_says_when_it_can_show():
    for name, (config, code) in FIELD.items():
        bug = CATALOGUE[name]
        assert code in bug.caught_by and code not in EXPENSIVE_CODES, name
        assert bug.cannot_show(*_spec_and_plan(config)) is None, name


def _spec_and_plan(config):
    from attntrace.analysis.run import prepare
    spec, plan, _ = prepare(CONFIGS / config)
    return spec, plan


@pytest.mark.parametrize("name, config, reason", [
    ("rope-pairing-mismatch", "causal_gpt.yaml", "no RoPE here"),
    ("left-padding-positions", "mask_padding.yaml", "positions enter only through none"),
    ("left-padding-positions", "positional_alibi.yaml", "a shift changes nothing"),
    ("left-padding-positions", "positional_learned.yaml", "no item starts with padding"),
    ("kv-cache-causal-alignment", "causal_gpt.yaml", "seq_q = seq_k"),
    ("weak-mask-value", "seed000_cat_mouse.yaml", "the spec has no mask"),
    ("nan-leak-through-mask", "causal_gpt.yaml", "no padded key"),
    ("sliding-window-off-by-one", "causal_gpt.yaml", "no sliding window"),
    ("alibi-slopes-non-power-of-two", "positional_alibi.yaml", "n_heads = 4 is a power of two"),
    ("fused-qkv-split-under-gqa", "causal_gpt.yaml", "the three parts are equal"),
    ("fused-qkv-split-under-gqa", "mask_kv_cache.yaml", "cross-attention"),
])
def test_cannot_show_is_said_and_true(name, config, reason):
    verdict = inject(spec_of(config), name)
    assert reason in verdict.cannot_show and not verdict.changed
    assert verdict.status in ("cannot show", "caught")


# =========================================================================== shown and caught

@pytest.mark.parametrize("name", list(FIELD))
def test_inject_shows_it_and_check_all_catches_it(name, invoke):
    config, code = FIELD[name]
    spec = spec_of(config)
    default = inject(spec, name)
    everything = inject(spec, name, check="all")
    for verdict in (default, everything):
        assert verdict.status == "caught", verdict.summary()
        assert code in verdict.codes and verdict.changed
    assert set(everything.codes) <= set(CATALOGUE[name].caught_by) | {"ATT-W202", "ATT-W204", "ATT-W224",
                                                                       "ATT-W201", "ATT-W205", "ATT-W225"}
    if everything.trace is not None:                     # the cross-check sees every numeric one
        assert "ATT-W247" in everything.codes
    exit_code, out = invoke("run", CONFIGS / config, "--inject", name, "--check", "all", "--strict")
    assert exit_code == (3 if code.startswith("ATT-E") else 1)
    assert f"injected  {name}" in out and "seen in" in out and CATALOGUE[name].seen_in[0] in out
    assert "caught by" in out and code in out


@pytest.mark.parametrize("name", [n for n in FIELD if n != "fused-qkv-split-under-gqa"])
def test_the_fix_re_run_gives_the_clean_output(name):
    config, _ = FIELD[name]
    verdict = inject(spec_of(config), name)
    check = verdict.fix_check
    assert check["verified"] and check["hook"] == "hook_attn_out", check
    assert "verified: re-run with the fix" in verdict.fix_summary()
    spec = spec_of(config)
    clean = arrays(spec)["hook_attn_out"]
    bug = buggy(spec, name)["hook_attn_out"]
    fixed = arrays(spec, CATALOGUE[name].fixed_overrides())["hook_attn_out"]
    assert np.isfinite(fixed).all()
    allowed = 5e-3 if CATALOGUE[name].fixed_precision == "float16" else 1e-12
    assert np.abs(fixed - clean).max() <= allowed * np.abs(clean).max()
    # the bug itself is far from the clean output (so the comparison can fail)
    assert not np.allclose(np.nan_to_num(bug, nan=1e6), clean, atol=10 * allowed * np.abs(clean).max()), name


# =========================================================================== what each bug computes

def rotate(x, pos, base, pairs):
    """RoPE by explicit loops: for pair (a, b) at angle pos · base^(-2i/d): (a cos − b sin, a sin + b cos)."""
    out = np.array(x, dtype=np.float64)
    d = x.shape[-1]
    for s in range(x.shape[1]):
        for i, (a, b) in enumerate(pairs(d)):
            t = pos[s] * base ** (-2 * i / d)
            out[:, s, :, a] = x[:, s, :, a] * math.cos(t) - x[:, s, :, b] * math.sin(t)
            out[:, s, :, b] = x[:, s, :, a] * math.sin(t) + x[:, s, :, b] * math.cos(t)
    return out


def interleaved(d):
    return [(2 * i, 2 * i + 1) for i in range(d // 2)]


def halves(d):
    return [(i, i + d // 2) for i in range(d // 2)]


def test_rope_pairing_mismatch_rotates_interleaved_pairs():
    spec = spec_of("positional_rope.yaml")                     # pairing: half, 6 tokens, d_head 4
    clean, bug = arrays(spec), buggy(spec, "rope-pairing-mismatch")
    q = clean["attn.hook_q"]
    assert np.allclose(clean["attn.hook_rot_q"], rotate(q, range(6), 10000.0, halves), atol=1e-12)
    assert np.allclose(bug["attn.hook_rot_q"], rotate(q, range(6), 10000.0, interleaved), atol=1e-12)
    assert not np.allclose(bug["attn.hook_rot_q"], clean["attn.hook_rot_q"], atol=1e-3)


def test_rope_low_precision_is_gpt_neox_1003s_half_cache():
    spec = spec_of("bug_inject_rope_long_context.yaml")        # keys at positions 0..3071, d_head 4
    clean, bug = arrays(spec), buggy(spec, "rope-low-precision")
    k = clean["attn.hook_k"]
    d, seq = k.shape[-1], k.shape[1]
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, d, 2) / d)).astype(np.float16)           # the report's recipe
    angles = (np.arange(seq).astype(np.float16)[:, None] * inv_freq[None, :]).astype(np.float16)
    # torch computes half-precision cos/sin in float32 and rounds (numpy's own float16 cos differs by version)
    wide = angles.astype(np.float32)
    cos = np.cos(wide).astype(np.float16).astype(np.float64)
    sin = np.sin(wide).astype(np.float16).astype(np.float64)
    expected = np.empty_like(k)
    expected[..., :2] = k[..., :2] * cos[None, :, None] - k[..., 2:] * sin[None, :, None]
    expected[..., 2:] = k[..., :2] * sin[None, :, None] + k[..., 2:] * cos[None, :, None]
    assert np.allclose(bug["attn.hook_rot_k"], expected, atol=1e-12)
    error = np.abs(bug["attn.hook_rot_k"] - clean["attn.hook_rot_k"]).max(axis=(0, 2, 3))
    assert error[:8].max() < 0.01 * np.abs(k).max() < error[2048:].max()        # grows with the position


def test_left_padding_positions_counts_from_the_pads():
    spec = spec_of("bug_inject_left_padding_positions.yaml")   # item 1: two pads, then 4 real tokens
    table = spec.positional.table.data
    x = spec.source.embeddings.data
    clean, bug = arrays(spec), buggy(spec, "left-padding-positions")
    real = [2, 3, 4, 5]
    assert np.allclose(clean["hook_pos_embed"][1, real], x[1, real] + table[[0, 1, 2, 3]])   # "the" is position 0
    assert np.allclose(bug["hook_pos_embed"][1, real], x[1, real] + table[real])
    assert np.allclose(clean["hook_pos_embed"][0], bug["hook_pos_embed"][0])                # no pads: the same


def test_kv_cache_causal_alignment_is_torch_is_causal_top_left():
    spec = spec_of("mask_kv_cache.yaml")                       # 3 queries, 8 keys
    bug, clean = buggy(spec, "kv-cache-causal-alignment"), arrays(spec)
    top_left = np.tril(np.ones((3, 8), dtype=bool))            # torch: ones(L, S).tril(diagonal=0)
    bottom_right = np.tril(np.ones((8, 8), dtype=bool))[-3:]   # the last 3 rows of a full causal mask
    assert np.array_equal(bug["attn.hook_mask"][0, 0], top_left)
    assert np.array_equal(clean["attn.hook_mask"][0, 0], bottom_right)


def test_weak_mask_value_in_the_inputs_precision():
    spec = spec_of("bug_inject_left_padding.yaml")             # item 1's queries 0, 1 see no key
    assert input_precision(spec) == "float64"
    bug, clean = buggy(spec, "weak-mask-value"), arrays(spec)
    scaled = clean["attn.hook_scaled"]
    row = scaled[1, 0, 0] - 1e9                                # every key blocked: scores - 1e9, softmax
    e = np.exp(row - row.max())
    assert np.allclose(bug["attn.hook_pattern"][1, 0, 0], e / e.sum())
    assert np.allclose(bug["attn.hook_pattern"][0], clean["attn.hook_pattern"][0])      # rows with a visible key
    half = {**_spec_dict(spec), "embeddings": np.float16(spec.source.embeddings.data).astype(float).tolist()}
    for w in ("W_q", "W_k", "W_v", "W_o"):
        half["attention"][w] = np.float16(getattr(spec.attention, w).data).astype(float).tolist()
    half_spec = load_spec(half)
    assert input_precision(half_spec) == "float16"             # numbers of a float16 model: -1e9 is -inf there
    assert np.isnan(buggy(half_spec, "weak-mask-value")["attn.hook_pattern"][1, :, :2]).all()


def _spec_dict(spec):
    att = spec.attention
    return {"version": 1, "tokens": spec.tokens, "embeddings": spec.source.embeddings.data.tolist(),
            "attention": {"heads": att.heads, "mask": {"causal": True, "padding": att.mask.padding.data.tolist()},
                          **{w: getattr(att, w).data.tolist() for w in ("W_q", "W_k", "W_v", "W_o")}}}


def test_nan_leak_through_mask_is_nan_plus_minus_inf_and_zero_times_nan():
    spec = spec_of("mask_padding.yaml")                        # item 0: keys 3, 4 are padding
    bug = buggy(spec, "nan-leak-through-mask")
    assert np.isnan(bug["attn.hook_k"][0, 3:]).all() and np.isfinite(bug["attn.hook_k"][0, :3]).all()
    assert np.isnan(bug["attn.hook_attn_scores"][0, :, :, 3:]).all()           # NaN + (-inf) = NaN
    assert np.isnan(bug["hook_attn_out"][0]).all()
    assert np.isnan(np.float64(0.0) * np.nan) and np.isnan(np.nan + -np.inf)  # the arithmetic of the report
    fixed = arrays(spec, CATALOGUE["nan-leak-through-mask"].fixed_overrides())
    assert np.isnan(fixed["attn.hook_v"][0, 3:]).all() and np.isfinite(fixed["hook_attn_out"]).all()


def test_sliding_window_off_by_one_keeps_w_plus_one_keys():
    spec = spec_of("mask_sliding_window.yaml")                 # window 3, 8 tokens
    i, j = np.indices((8, 8))
    assert np.array_equal(arrays(spec)["attn.hook_mask"][0, 0], (j <= i) & (i - j < 3))
    bug = buggy(spec, "sliding-window-off-by-one")["attn.hook_mask"][0, 0]
    assert np.array_equal(bug, (j <= i) & (i - j <= 3))
    assert bug.sum(axis=1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4]


def test_alibi_slopes_the_paper_against_the_power_of_two_formula():
    # the paper's reference get_slopes(12): the 8-head slopes, then every other slope of 16 heads
    paper = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -(k + 0.5) for k in range(4)]
    assert np.allclose(paper_slopes(12), paper)
    assert np.allclose(paper_slopes(8), [2.0 ** -k for k in range(1, 9)])
    spec = spec_of("bug_inject_alibi_12_heads.yaml")
    clean, bug = arrays(spec), buggy(spec, "alibi-slopes-non-power-of-two")
    scale = 1 / math.sqrt(2)
    distance = np.abs(np.arange(6)[:, None] - np.arange(6)[None, :])
    naive = 2.0 ** (-8.0 * np.arange(1, 13) / 12)              # mlx#343
    qk = clean["attn.hook_qk"]
    assert np.allclose(clean["attn.hook_scaled"], qk * scale - np.array(paper)[:, None, None] * distance)
    assert np.allclose(bug["attn.hook_scaled"], qk * scale - naive[:, None, None] * distance)


def test_fused_qkv_split_in_thirds_is_diagnosed_before_numpy():
    spec = spec_of("gqa_8x2.yaml")                             # 8 heads, 2 kv heads, d_head 4: 48 fused columns
    with pytest.raises(ShapeError) as raised:
        run(spec, overrides=CATALOGUE["fused-qkv-split-under-gqa"].overrides())
    (d,) = raised.value.diagnoses
    assert d.code == "ATT-E103" and "(6, 16) cannot be reshaped" in d.message
    assert "[W_q|W_k|W_v] (48 columns: 8+2·2 heads of 4) → chunk(3): part 1, 16 columns" in d.operands[0].origin
    assert "qkv.split([n_heads·d_head" in d.hint


def test_softmax_in_half_precision_overflows_like_float16():
    spec = spec_of("bug_inject_large_scores.yaml")
    clean, bug = arrays(spec), buggy(spec, "softmax-in-half-precision")
    scores = clean["attn.hook_attn_scores"]
    assert np.nanmax(scores[np.isfinite(scores)]) > 11.1                       # e^11.09 = 65504
    with np.errstate(over="ignore", invalid="ignore"):                         # the overflow is the point
        e = np.exp(scores.astype(np.float16))
        expected = (e / e.sum(axis=-1, keepdims=True, dtype=np.float16)).astype(np.float64)
    assert np.array_equal(np.isnan(bug["attn.hook_pattern"]), np.isnan(expected)) and np.isnan(expected).any()
    assert np.allclose(bug["attn.hook_pattern"], expected, equal_nan=True)
    small = spec_of("causal_gpt.yaml")                         # no overflow: float16 rounding only
    half = buggy(small, "softmax-in-half-precision")["attn.hook_pattern"]
    rounding = np.abs(half - arrays(small)["attn.hook_pattern"])
    assert 1e-6 < rounding.max() < 2e-3


# =========================================================================== the detectors, bug-agnostic

def hooked(spec, hook, change):
    """Run with a hand-made change at `hook` (no catalogue bug): what the detectors see."""
    def fn(array, hook):
        return change(array.copy())
    return run(spec, hooks=[(hook, fn)], check="all")


def codes(trace):
    return {d.code for d in trace.diagnoses}


def test_detectors_catch_hand_made_mistakes():
    rope = spec_of("positional_rope.yaml")
    assert "ATT-W240" in codes(hooked(rope, "attn.hook_rot_q", lambda a: a + 1e-6))       # any wrong rotation

    def swap_pairs(a):
        a[..., [0, 1, 2, 3]] = a[..., [0, 2, 1, 3]]
        return a
    assert "ATT-W240" in codes(hooked(rope, "attn.hook_rot_k", swap_pairs))

    def wider(mask):
        i, j = np.indices(mask.shape[-2:])
        return mask | ((j <= i) & (i - j == 3))
    assert codes(hooked(spec_of("mask_sliding_window.yaml"), "attn.hook_mask", wider)) >= {"ATT-W243", "ATT-W247"}

    def blind(mask):
        mask[..., 0, :] = False
        mask[..., 0, 0] = True
        return mask
    assert "ATT-W242" in codes(hooked(spec_of("mask_kv_cache.yaml"), "attn.hook_mask", blind))

    def finite(scores):
        return np.where(np.isneginf(scores), -1e4, scores)
    assert "ATT-W248" in codes(hooked(spec_of("causal_gpt.yaml"), "attn.hook_attn_scores", finite))

    def nan_value(v):
        v[0, 4] = np.nan
        return v
    found = hooked(spec_of("mask_padding.yaml"), "attn.hook_v", nan_value)
    assert "ATT-W246" in codes(found)
    leak = next(d for d in found.diagnoses if d.code == "ATT-W246")
    assert "0 × NaN" in leak.details[0] and "key(s) 4 with weight 0" in leak.message

    def steeper(scaled):
        i, j = np.indices(scaled.shape[-2:])
        return scaled - 0.01 * np.abs(i - j)
    assert "ATT-W244" in codes(hooked(spec_of("positional_alibi.yaml"), "attn.hook_scaled", steeper))

    def shifted(x):
        return x + 0.1
    assert "ATT-W241" in codes(hooked(spec_of("positional_learned.yaml"), "hook_pos_embed", shifted))


def test_crosscheck_names_the_dtype_that_explains_a_difference():
    assert explaining_dtype(3e-16) == "float64" and explaining_dtype(2e-7) == "float32"
    assert explaining_dtype(4e-4) == "float16" and explaining_dtype(1e-2) == "bfloat16"
    assert explaining_dtype(0.5) is None
    spec = spec_of("causal_gpt.yaml")
    clean64 = run(spec, check="all")
    assert any("independent float64 recomputation agrees to" in c and "float64 rounding" in c
               for c in clean64.checks_passed)
    clean32 = run(spec, check="all", dtype="float32")
    assert not clean32.warnings
    assert any("float32 rounding" in c for c in clean32.checks_passed)
    verdict = inject(spec, "softmax-in-half-precision", check="all")          # no overflow: rounding only
    (w247,) = [d for d in verdict.caught if d.code == "ATT-W247"]
    assert w247.hook == "attn.hook_pattern" and "the size of float16 rounding" in w247.message
    verdict = inject(spec_of("mask_kv_cache.yaml"), "kv-cache-causal-alignment", check="all")
    (w247,) = [d for d in verdict.caught if d.code == "ATT-W247"]
    assert w247.hook == "attn.hook_mask" and "beyond any rounding" in w247.message


# =========================================================================== clean configs: not a word

def _runnable_configs():
    names = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        try:
            run(load_spec(path), check=False)
        except ShapeError:
            continue                              # the shape-error examples (bug_*.yaml) never run
        names.append(path.name)
    return names


@pytest.mark.parametrize("config", _runnable_configs())
def test_no_false_alarm_on_any_config(config):
    for dtype in ("float64", "float32"):
        trace = run(load_spec(CONFIGS / config), check="all", dtype=dtype)
        assert trace.warnings == [], (config, dtype, [d.message for d in trace.warnings])
        assert not codes(trace) & FIELD_CODES


# =========================================================================== padding rows: information, once

def test_padding_query_rows_are_information_said_once():
    trace = run(spec_of("bug_inject_left_padding.yaml"))
    assert [d.code for d in trace.diagnoses] == ["ATT-I240"] and trace.diagnoses[0].severity == "info"
    assert "'<pad>'" in trace.diagnoses[0].message and "batch item(s) 1" in trace.diagnoses[0].message
    blocks = {"version": 1, "tokens": ["<pad>", "a", "b"], "embeddings": np.eye(3)[None].repeat(2, 0).tolist(),
              "blocks": [{"attention": {"heads": 1, **{w: np.eye(3).tolist() for w in ("W_q", "W_k", "W_v")},
                                        "mask": {"causal": True, "padding": [[1, 1, 1], [0, 1, 1]]}}}] * 3}
    trace = run(blocks)
    assert [d.code for d in trace.diagnoses] == ["ATT-I240"]               # three layers, said once
    every_pad = {"version": 1, "tokens": ["a", "b"], "embeddings": np.eye(2)[None].repeat(2, 0).tolist(),
                 "attention": {"heads": 1, **{w: np.eye(2).tolist() for w in ("W_q", "W_k", "W_v")},
                               "mask": {"causal": True, "padding": [[1, 1], [0, 0]]}}}
    assert [d.code for d in run(every_pad).diagnoses] == ["ATT-W203"]   # an item of padding only: suspicious
