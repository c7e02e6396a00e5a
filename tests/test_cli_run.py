"""`attntrace run` as a user runs it: built-in example, configs, options, JSON, big inputs."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import CONFIGS, ROOT

SEED002 = CONFIGS / "seed002_abc.yaml"


def test_run_without_a_file_shows_the_builtin_example(invoke):
    code, out = invoke("run")
    assert code == 0, out
    assert "猫" in out and "老鼠" in out
    for hook in ("hook_embed", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_qk", "attn.hook_scaled",
                 "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_z_concat", "hook_attn_out"):
        assert hook in out
    assert "every row of weights sums to 1" in out


def test_builtin_example_is_the_seed000_config():
    from attntrace.cli.run import BUILTIN_EXAMPLE
    builtin = BUILTIN_EXAMPLE.read_text(encoding="utf-8")
    assert builtin == (CONFIGS / "seed000_cat_mouse.yaml").read_text(encoding="utf-8")


def test_seed002_prints_the_true_values(invoke):
    code, out = invoke("run", SEED002, "--steps", "scores,scaled,weights,output")
    assert code == 0
    # Q_B·K_C = 9*21 + 13*17 = 410 (the article prints 400)
    assert "410" in out and " 400 " not in out
    assert f"{410 / math.sqrt(2):.4f}" in out          # 289.9138
    assert f"{714 / math.sqrt(2):.4f}" in out          # 504.8742: the largest scaled score
    assert "nan" not in out.replace("NaN or inf", "")
    assert "shape (seq_q=3, seq_k=3)" in out


def test_named_shapes(invoke):
    code, out = invoke("run", "--steps", "Q")
    assert "shape (seq=4, d_head=8)" in out


def test_steps_by_number_alias_and_pattern(invoke):
    code, out = invoke("run", SEED002, "--steps", "5,weights")
    assert code == 0 and "attn.hook_qk" in out and "attn.hook_pattern" in out and "attn.hook_v " not in out
    code, out = invoke("run", SEED002, "--steps", "attn.hook_s*")
    assert code == 0 and "attn.hook_scaled" in out and "attn.hook_qk" not in out


def test_unknown_step_suggests(invoke):
    code, out = invoke("run", SEED002, "--steps", "attn.hook_patern")
    assert code == 2 and "ATT-E015" in out and "attn.hook_pattern" in out
    code, out = invoke("run", SEED002, "--steps", "99")
    assert code == 2 and "no step 99" in out


def test_head_and_batch_selection(invoke):
    spec = CONFIGS / "seed004_batch_multihead.yaml"
    code, out = invoke("run", spec, "--steps", "weights", "--head", "3", "--batch", "1", "--values")
    assert code == 0
    assert "batch 1 · head 3" in out and "head 0" not in out and "batch 0" not in out
    code, out = invoke("run", spec, "--head", "8")
    assert code == 2 and "8 head(s)" in out
    code, out = invoke("run", spec, "--batch", "2")
    assert code == 2 and "ATT-E017" in out and "2 batch item(s)" in out


def test_multihead_grid_of_heatmaps(invoke):
    code, out = invoke("run", CONFIGS / "seed004_batch_multihead.yaml", "--steps", "weights")
    assert code == 0 and "heatmaps" in out and "batch 1 · head 7" in out


def test_json_twin_values(invoke):
    code, out = invoke("run", SEED002, "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["exit_code"] == 0 and doc["tokens"] == ["A", "B", "C"]
    assert doc["dims"]["d_head"] == 2 and doc["dims"]["seq_q"] == 3
    steps = doc["hooks"]
    qk = np.array(steps["attn.hook_qk"]["values"])[0, 0]
    np.testing.assert_array_equal(qk, [[10, 58, 106], [58, 234, 410], [106, 410, 714]])
    assert steps["attn.hook_pattern"]["axes"] == ["batch", "n_heads", "seq_q", "seq_k"]
    assert steps["attn.hook_scaled"]["stats"]["max"] == pytest.approx(714 / math.sqrt(2))
    out_values = np.array(steps["hook_attn_out"]["values"])[0]
    np.testing.assert_allclose(out_values, [[18, 20]] * 3, atol=1e-12)
    assert doc["diagnoses"] == []


def test_json_marks_blocked_scores_as_strings(invoke):
    code, out = invoke("run", CONFIGS / "causal_gpt.yaml", "--format", "json")
    doc = json.loads(out)          # plain JSON: no bare -Infinity
    masked = doc["hooks"]["attn.hook_attn_scores"]["values"]
    assert masked[0][0][0][1] == "-inf"


def test_float32(invoke):
    code, out = invoke("run", SEED002, "--dtype", "float32", "--format", "json")
    doc = json.loads(out)
    assert doc["dtype"] == "float32" and code == 0


def test_strict_fails_on_warnings(invoke, write_spec):
    # every key masked for query 0: a warning (ATT-W203), exit 1 only under --strict
    spec = write_spec("version: 1\ntokens: [A, B]\nembeddings: [[1, 0], [0, 1]]\n"
                      "attention: {heads: 1, W_q: {identity: 2}, W_k: {identity: 2}, W_v: {identity: 2},\n"
                      "            mask: [[0, 0], [1, 1]]}\n")
    code, out = invoke("run", spec)
    assert code == 0 and "ATT-W203" in out and "0 'A'" in out
    code, out = invoke("run", spec, "--strict")
    assert code == 1


def test_big_matrices_are_elided(tmp_path, invoke):
    n, d = 300, 16
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(n, d)))
    for name in ("q", "k", "v"):
        np.save(tmp_path / f"w{name}.npy", rng.normal(size=(d, d)) * 0.3)
    (tmp_path / "big.yaml").write_text(
        "version: 1\nembeddings: {npy: x.npy}\nattention:\n  heads: 2\n  W_q: {npy: wq.npy}\n"
        "  W_k: {npy: wk.npy}\n  W_v: {npy: wv.npy}\n  mask: causal\n")
    code, out = invoke("run", tmp_path / "big.yaml", "--steps", "weights", "--values")
    assert code == 0
    # the gaps are visible and counted: 300 rows shown as 0–3 and 296–299
    assert "⋯ 292 tokens ⋯ (4–295 not shown)" in out and "⋯292⋯" in out
    assert len(out.splitlines()) < 60
    assert "max →" in out
    # the heatmap of a long sequence is a pooled overview labelled with token ranges
    code, out = invoke("run", tmp_path / "big.yaml", "--steps", "weights", "--head", "0", "--width", "120")
    assert code == 0 and "pooled: each cell is the block max over up to 7 queries × 7 keys" in out
    assert "  0–5 " in out and "294–299 " in out
    for width in (100, 70):          # a narrower terminal: coarser ranges, never a wrapped row
        code, out = invoke("run", tmp_path / "big.yaml", "--steps", "weights", "--head", "0", "--width", width)
        grid = [line for line in out.splitlines() if line.lstrip()[:1].isdigit() and "–" in line.split()[0]]
        assert code == 0 and len(grid) > 20 and max(len(line.rstrip()) for line in grid) <= width
        assert not [line for line in out.splitlines() if line[:1] in "░▒▓█"]      # no row wrapped
    code, out = invoke("run", tmp_path / "big.yaml", "--steps", "weights", "--head", "0", "--full", "--values",
                       "--width", "120")
    pages = [(int(a), int(b)) for a, b in re.findall(r"head 0 · keys (\d+)–(\d+) of 300", out)]
    assert code == 0 and pages[0][0] == 0 and pages[-1][1] == 299       # every key, page after page
    assert all(b + 1 == a for (_, b), (a, _) in zip(pages, pages[1:]))
    assert max(len(line) for line in out.splitlines()) <= 120       # pages fit the width
    assert max(b - a + 1 for a, b in pages) >= 7                    # and filled: at least 7 columns fit
    # JSON carries a preview, not 2×300×300 values
    code, out = invoke("run", tmp_path / "big.yaml", "--format", "json")
    pattern = json.loads(out)["hooks"]["attn.hook_pattern"]
    assert "values" not in pattern and pattern["preview"]["rows"] == [0, 1, 2, 3, 296, 297, 298, 299]


def test_help_lists_commands(invoke):
    code, out = invoke("--help")
    assert code == 0 and "run" in out and "Exit codes" in out
    code, out = invoke("run", "--help")
    assert code == 0 and "--steps" in out and "built-in example" in out


def test_python_dash_m_and_lazy_imports():
    result = subprocess.run([sys.executable, "-m", "attntrace", "--version"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0 and "attntrace" in result.stdout
    probe = ("import sys, attntrace.cli.main; "
             "print(any(m in sys.modules for m in ('numpy', 'rich', 'yaml')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "False", "attntrace --help must not import numpy, rich or yaml"


def test_api_run_from_path_and_dict():
    import attntrace
    trace = attntrace.run(str(SEED002))
    assert trace["attn.hook_pattern"].shape == (1, 1, 3, 3)
    assert trace["weights"] is trace["attn.hook_pattern"]
    assert "blocks.0.attn.hook_q" in trace
    trace = attntrace.run({"tokens": ["a"], "embeddings": [[2.0]],
                           "attention": {"W_q": [[1.0]], "W_k": [[1.0]], "W_v": [[3.0]]}})
    assert trace.hand_view("output").tolist() == [[6.0]]


@pytest.mark.parametrize("spec_text, exit_code, code", [
    ("version: 1\ntokens: [A\n", 2, "ATT-E001"),                            # YAML syntax
    ("version: 1\nembeddings: [[1, 2]]\nattention: {W_q: [[1]], W_k: [[1]], W_v: [[1]]}\n", 3, "ATT-E101"),
])
def test_bad_input_in_a_real_process_shows_no_traceback(tmp_path, spec_text, exit_code, code):
    """The CLI in its own process (not click's runner, which would hide a traceback): a message, never a traceback."""
    path = tmp_path / "broken.yaml"
    path.write_text(spec_text, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "attntrace", "run", str(path)], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, NO_COLOR="1"))
    assert result.returncode == exit_code
    assert code in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_head_lists_and_ranges_are_parsed_once(invoke):
    """--head takes 2, 0,2, 0-3 or all; a malformed list is a usage error naming the option (exit 2)."""
    from attntrace.cli.params import HEADS
    assert HEADS.convert("1-3,7", None, None) == (1, 2, 3, 7)
    assert HEADS.convert("all", None, None) is None
    spec = CONFIGS / "seed004_batch_multihead.yaml"
    code, out = invoke("run", spec, "--steps", "weights", "--head", "2-3", "--values")
    assert code == 0 and "head 2" in out and "head 3" in out and "head 1 " not in out
    code, out = invoke("run", spec, "--head", "3-1")
    assert code == 2 and "--head" in out and "smaller number to a larger one" in out
    code, out = invoke("mask", "--causal", "--padding", "1,2,0")
    assert code == 2 and "--padding" in out and "write 1 for a real token" in out


def test_redirected_output_honours_columns(tmp_path):
    """Piped or redirected, the output is COLUMNS wide when COLUMNS says so (120 otherwise)."""
    for columns, widest in (("200", 200), ("60", 60), ("", 120)):
        env = dict(os.environ, NO_COLOR="1", COLUMNS=columns)
        out = subprocess.run([sys.executable, "-m", "attntrace", "run", str(CONFIGS / "seed004_batch_multihead.yaml"),
                              "--steps", "weights"], capture_output=True, text=True, cwd=ROOT, env=env).stdout
        rules = [line for line in out.splitlines() if line and set(line) == {"─"}]
        assert rules and len(rules[0]) == widest, (columns, len(rules[0]))


@pytest.mark.parametrize("how", ["max", "mean"])
def test_coarsened_overview_equals_pooling_the_full_array_at_the_merged_ranges(how):
    """Merging every k adjacent columns of a pooled grid equals pooling the array itself over the
    merged key ranges (a plain loop over the ranges is the reference)."""
    from attntrace.core.stats import coarsen_columns, pool
    rng = np.random.default_rng(1)
    array = rng.random((2, 3, 50, 97))
    pooled = pool(array, 48)
    grid = pooled.max if how == "max" else pooled.mean
    coarse, edges = coarsen_columns(grid, pooled.col_edges, how, 10)
    assert coarse.shape[-1] <= 10 and edges[0] == 0 and edges[-1] == 97
    rows = pooled.row_edges
    for r in range(len(rows) - 1):
        for c in range(len(edges) - 1):
            block = array[..., rows[r]:rows[r + 1], edges[c]:edges[c + 1]]
            want = block.max(axis=(-2, -1)) if how == "max" else block.mean(axis=(-2, -1))
            np.testing.assert_allclose(coarse[..., r, c], want, rtol=1e-12)
