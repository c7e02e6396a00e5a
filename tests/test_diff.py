"""`attntrace diff`: two traces (specs or saved .npz/.json) compared hook by hook."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import yaml

from attntrace.analysis.diff import differences

X = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
ABC = {"version": 1, "tokens": ["A", "B", "C"], "embeddings": X,
       "attention": {"heads": 1, "W_q": [[1, 0], [1, 0], [0, 1], [0, 1]],
                     "W_k": [[0, 1], [0, 1], [1, 0], [1, 0]], "W_v": [[1, 0], [0, 1], [1, 0], [0, 1]]}}
HOOK_ORDER = ["hook_embed", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_qk"]


@pytest.fixture
def spec_file(tmp_path):
    def write(data, name="a.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path
    return write


def diff_json(invoke, *args):
    code, out = invoke("diff", *args, "--format", "json")
    return code, json.loads(out)


def test_a_spec_against_itself_is_the_same(invoke, spec_file):
    path = spec_file(ABC)
    code, doc = diff_json(invoke, path, path)
    assert code == 0 and doc["same"] and doc["first_divergence"] is None
    assert all(h["differing"] == 0 and h["max_abs_diff"] == 0 for h in doc["hooks"])
    code, out = invoke("diff", path, path)
    assert code == 0 and "the traces agree" in out


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_a_spec_against_its_saved_trace(invoke, spec_file, tmp_path, suffix):
    path = spec_file(ABC)
    saved = tmp_path / f"saved{suffix}"
    code, _ = invoke("run", path, "--export", saved)
    assert code == 0
    code, doc = diff_json(invoke, path, saved)
    assert code == 0, doc
    assert [h["hook"] for h in doc["hooks"]][:5] == HOOK_ORDER


def test_scaled_scores_diverge_at_qk(invoke, spec_file):
    path = spec_file(ABC)
    code, doc = diff_json(invoke, path, path, "--hook-b", "scores:scale=0.5", "--top", "3")
    assert code == 1
    assert doc["first_divergence"] == "attn.hook_qk"
    by_hook = {h["hook"]: h for h in doc["hooks"]}
    for hook in HOOK_ORDER[:4]:
        assert by_hook[hook]["differing"] == 0
    qk = by_hook["attn.hook_qk"]
    # Q·Kᵀ = [[10, 58, 106], [58, 234, 410], [106, 410, 714]]; halved, every cell differs by half itself
    assert qk["differing"] == 9 and qk["max_abs_diff"] == 714 / 2 and qk["max_rel_diff"] == 0.5
    assert [c["cell"] for c in qk["top"]] == ["[C, C]", "[B, C]", "[C, B]"]
    assert (qk["top"][0]["a"], qk["top"][0]["b"]) == (714, 357)


def test_different_values_diverge_at_v(invoke, spec_file):
    other = copy.deepcopy(ABC)
    other["attention"]["W_v"] = [[2, 0], [0, 1], [1, 0], [0, 1]]     # V column 0 gains x0: A +0, B +4, C +8
    code, doc = diff_json(invoke, spec_file(ABC), spec_file(other, "b.yaml"))
    assert code == 1 and doc["first_divergence"] == "attn.hook_v"
    v = {h["hook"]: h for h in doc["hooks"]}["attn.hook_v"]
    assert v["differing"] == 2 and v["max_abs_diff"] == 8 and v["top"][0]["cell"] == "[C, d0]"


def test_shapes_that_differ_are_reported(invoke, spec_file):
    short = copy.deepcopy(ABC)
    short["tokens"], short["embeddings"] = ["A", "B"], X[:2]
    code, doc = diff_json(invoke, spec_file(ABC), spec_file(short, "b.yaml"))
    assert code == 1
    first = doc["hooks"][0]
    assert first["comparable"] is False and first["shape_a"] == [1, 3, 4] and first["shape_b"] == [1, 2, 4]
    code, out = invoke("diff", spec_file(ABC), spec_file(short, "b.yaml"))
    assert "shape (1, 3, 4) vs (1, 2, 4)" in out


def test_rich_output_marks_the_first_divergence(invoke, spec_file):
    path = spec_file(ABC)
    code, out = invoke("diff", path, path, "--hook-b", "V:zero", "--width", "160")
    assert code == 1
    assert "▶ 4/11" in out and "first divergence: step" in out and "cells that differ most in attn.hook_v" in out


@pytest.mark.parametrize("make, code_word", [
    (lambda d: d / "notes.txt", "ATT-E065"),
    (lambda d: d / "missing.npz", "ATT-E007"),
])
def test_bad_sides_exit_2(invoke, spec_file, tmp_path, make, code_word):
    target = make(tmp_path)
    if target.suffix == ".txt":
        target.write_text("hello")
    code, out = invoke("diff", spec_file(ABC), target)
    assert code == 2 and code_word in out


def test_saved_files_that_are_not_traces(invoke, spec_file, tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    (tmp_path / "other.json").write_text('{"hello": 1}')
    for name in ("broken.npz", "other.npz", "other.json"):
        code, out = invoke("diff", spec_file(ABC), tmp_path / name, "--format", "json")
        assert code == 2, name
        assert json.loads(out)["diagnoses"][0]["code"] == "ATT-E065"


def test_hook_option_needs_a_spec(invoke, spec_file, tmp_path):
    path = spec_file(ABC)
    invoke("run", path, "--export", tmp_path / "t.npz")
    code, out = invoke("diff", path, tmp_path / "t.npz", "--hook-b", "V:zero")
    assert code == 2 and "applies to a spec" in out


def test_differences_treat_equal_infinities_as_equal():
    a = np.array([1.0, -np.inf, np.inf, np.nan, 0.0])
    b = np.array([3.0, -np.inf, 5.0, np.nan, 0.0])
    absolute, relative = differences(a, b)
    assert absolute.tolist() == [2.0, 0.0, np.inf, 0.0, 0.0]
    assert relative.tolist() == [2.0 / 3.0, 0.0, np.inf, 0.0, 0.0]
