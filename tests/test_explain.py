"""`attntrace explain-shapes`: shapes, FLOPs and bytes from sizes alone; bad sizes are bad input."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _flow(invoke, *args):
    code, out = invoke("explain-shapes", *args, "--format", "json")
    return code, json.loads(out)


def _by_hook(doc):
    return {s["hook"]: s for s in doc["flow"]["steps"]}


def expected_flops(b, s, sk, d, h, kv, dh, dv, masked):
    """Plain formulas: a multiply-add is 2 FLOPs; softmax is max, subtract, exp, sum, divide."""
    return {
        "hook_embed": 0,
        "attn.hook_q": 2 * b * s * d * h * dh,
        "attn.hook_k": 2 * b * sk * d * kv * dh,
        "attn.hook_v": 2 * b * sk * d * kv * dv,
        "attn.hook_qk": 2 * b * h * s * sk * dh,
        "attn.hook_scaled": b * h * s * sk,
        "attn.hook_attn_scores": b * h * s * sk if masked else 0,
        "attn.hook_pattern": 5 * b * h * s * sk,
        "attn.hook_z": 2 * b * h * s * sk * dv,
        "attn.hook_z_concat": 0,
        "hook_attn_out": 2 * b * s * h * dv * d,
    }


def test_shapes_flops_and_bytes_from_sizes(invoke):
    code, doc = _flow(invoke, "--seq", "10", "--d-model", "512", "--heads", "8")
    assert code == 0 and doc["exit_code"] == 0
    steps = _by_hook(doc)
    assert steps["attn.hook_q"]["output"] == {"axes": ["seq", "n_heads", "d_head"], "shape": [10, 8, 64]}
    assert steps["attn.hook_qk"]["output"] == {"axes": ["n_heads", "seq_q", "seq_k"], "shape": [8, 10, 10]}
    assert steps["attn.hook_q"]["inputs"] == [{"name": "X", "axes": ["seq", "d_model"], "shape": [10, 512]},
                                             {"name": "W_q", "axes": ["d_model", "n_heads·d_head"],
                                              "shape": [512, 512]}]
    for hook, flops in expected_flops(1, 10, 10, 512, 8, 8, 64, 64, False).items():
        assert steps[hook]["flops"] == flops, hook
    assert steps["hook_attn_out"]["bytes"] == 10 * 512 * 8
    assert steps["attn.hook_pattern"]["bytes"] == 8 * 10 * 10 * 8
    assert doc["flow"]["total_flops"] == sum(expected_flops(1, 10, 10, 512, 8, 8, 64, 64, False).values())


def test_grouped_query_cross_batch_and_d_head(invoke):
    code, doc = _flow(invoke, "--seq", "6", "--seq-k", "9", "--d-model", "64", "--heads", "8", "--kv-heads", "2",
                      "--d-head", "16", "--batch", "3", "--mask", "--dtype", "float32")
    assert code == 0
    steps = _by_hook(doc)
    assert steps["attn.hook_k"]["output"]["shape"] == [3, 9, 2, 16]
    assert steps["attn.hook_q"]["inputs"][1]["shape"] == [64, 128]          # W_q: d_model × heads·d_head
    assert steps["attn.hook_mask"]["bytes"] == 3 * 6 * 9                      # one byte per (query, key)
    assert steps["hook_attn_out"]["bytes"] == 3 * 6 * 64 * 4                  # float32
    for hook, flops in expected_flops(3, 6, 9, 64, 8, 2, 16, 16, True).items():
        assert steps[hook]["flops"] == flops, hook
    assert doc["flow"]["dims"]["d_head"]["bound_by"] == "--d-head"


def test_a_million_tokens_uses_sizes_only(invoke):
    # sizes only: no array of this size could exist (its time is measured in benchmarks/)
    code, doc = _flow(invoke, "--seq", "1000000", "--d-model", "4096", "--heads", "32", "--mask")
    assert code == 0
    qk = _by_hook(doc)["attn.hook_qk"]
    assert qk["output"]["shape"] == [32, 1000000, 1000000]
    assert qk["bytes"] == 32 * 10 ** 12 * 8 and qk["flops"] == 2 * 32 * 10 ** 12 * 128


def test_rich_view_has_table_and_diagram(invoke):
    code, out = invoke("explain-shapes", "--seq", "10", "--d-model", "512", "--heads", "8")
    assert code == 0
    assert "attn.hook_pattern" in out and "5.24 MFLOP" in out        # 2·10·512·512 = 5,242,880
    assert "─┴─ Q·Kᵀ ─▶ scores 8×10×10" in out and "─▶ z 10×8×64" in out


@pytest.mark.parametrize("args, text", [
    (("--seq", "0", "--d-model", "8", "--heads", "2"), "--seq 0"),
    (("--seq", "4", "--d-model", "8", "--heads", "-2"), "--heads -2"),
    (("--seq", "4", "--d-model", "10", "--heads", "3"), "does not split into --heads 3"),
    (("--seq", "4", "--d-model", "8", "--heads", "8", "--kv-heads", "3"), "--kv-heads 3 does not divide"),
    (("--seq", "4", "--d-model", "8"), "missing --heads"),
])
def test_impossible_sizes_are_bad_input(invoke, args, text):
    code, out = invoke("explain-shapes", *args)
    assert code == 2 and text in out
    code, doc = _flow(invoke, *args)
    assert code == 2 and doc["exit_code"] == 2 and doc["diagnoses"][0]["code"].startswith("ATT-E0")


def test_d_head_flag_allows_any_d_model(invoke):
    code, doc = _flow(invoke, "--seq", "4", "--d-model", "10", "--heads", "3", "--d-head", "4")
    assert code == 0 and _by_hook(doc)["attn.hook_q"]["output"]["shape"] == [4, 3, 4]


def test_from_a_spec_and_its_shape_errors(invoke):
    code, doc = _flow(invoke, CONFIGS / "causal_gpt.yaml")
    assert code == 0 and doc["diagnoses"] == []
    assert doc["flow"]["dims"]["n_heads"]["bound_by"] == "attention.heads"
    assert _by_hook(doc)["attn.hook_q"]["inputs"][1]["axes"] == ["n_heads·d_head", "d_model"]   # layout: linear
    code, doc = _flow(invoke, CONFIGS / "bug_qk_d_head.yaml")
    assert code == 3 and doc["diagnoses"][0]["code"] == "ATT-E101"
    code, out = invoke("explain-shapes", CONFIGS / "causal_gpt.yaml", "--seq", "4")
    assert code == 2 and "not both" in out


def test_the_memory_a_run_would_need(invoke, monkeypatch, tmp_path):
    """explain-shapes ends with the run's estimated peak: the inputs (X and the four projections),
    the score buffer (b·h·q·k) and, when it does not fit the free memory, what would."""
    code, doc = _flow(invoke, "--seq", "1000", "--d-model", "64", "--heads", "4")
    memory = doc["flow"]["memory"]
    assert code == 0 and memory["dtype"] == "float64"
    assert memory["inputs"] == (1000 * 64 + 4 * 64 * 64) * 8
    assert 4 * 1000 * 1000 * 8 <= memory["working"] <= 2 * 4 * 1000 * 1000 * 8
    assert memory["peak"] == memory["inputs"] + memory["retained"] + memory["working"]
    from attntrace.core import memory as memory_mod
    monkeypatch.setattr(memory_mod, "available_bytes", lambda: 8 * memory_mod.MiB)
    spec = tmp_path / "long.yaml"
    spec.write_text("version: 1\nembeddings: {random: {shape: [1000, 64], seed: 0}}\n"
                    "attention: {heads: 4, W_q: {identity: 64}, W_k: {identity: 64}, W_v: {identity: 64}, "
                    "mask: causal}\n")
    code, doc = _flow(invoke, str(spec))
    memory = doc["flow"]["memory"]
    assert code == 0 and not memory["fits"] and memory["available"] == 8 * memory_mod.MiB
    assert memory["options"][0].startswith("--chunk ")
    code, out = invoke("explain-shapes", str(spec))
    assert "too much, a run would be refused (ATT-E020)" in out and "· --chunk" in out
