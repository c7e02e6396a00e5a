"""Pre-flight shape diagnosis, verified fixes, runtime named-axis checks, invariant checks."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from attntrace.errors import Operand, ShapeError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _json(invoke, *args):
    code, out = invoke(*args, "--format", "json")
    return code, json.loads(out)


def _line_of(path: Path, text: str) -> int:
    """1-based line of the first line containing `text`, found independently of attntrace."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(text)


def _spec_dict(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _runs_clean(data: dict, base: Path) -> bool:
    """True when the spec, as a dict, passes pre-flight and runs."""
    from attntrace.analysis.run import run
    from attntrace.inputs.spec import load_spec_text
    try:
        run(load_spec_text(yaml.safe_dump(data, allow_unicode=True), base_dir=base), check=False)
    except ShapeError:
        return False
    return True


# --------------------------------------------------------------------------- the cases

def test_qk_disagree_on_d_head_is_diagnosed_at_the_scores_step(invoke):
    code, doc = _json(invoke, "run", CONFIGS / "bug_qk_d_head.yaml")
    assert code == 3 and doc["exit_code"] == 3
    d = doc["diagnoses"][0]
    assert d["code"] == "ATT-E101" and d["hook"] == "attn.hook_qk" and d["head"] == 0
    assert "disagree on d_head" in d["message"]
    assert d["message"].startswith("shape mismatch in step 5/11 'scores = Q·Kᵀ'")
    q, kt = d["operands"]
    # W_q (6×6) over 2 heads: d_head 3; W_k (6×4) over 2 heads: d_head 2; 4 tokens
    assert (q["shape"], q["axes"], q["conflict_axis"]) == ([4, 3], ["seq_q", "d_head"], 1)
    assert (kt["shape"], kt["axes"], kt["conflict_axis"]) == ([2, 4], ["d_head", "seq_k"], 0)
    assert q["origin"] == "X(4×6) @ W_q(6×6) → split heads → head 0"
    path = CONFIGS / "bug_qk_d_head.yaml"
    assert q["location"]["line"] == _line_of(path, "W_q:") and q["location"]["path"] == "attention.W_q"
    assert kt["location"]["line"] == _line_of(path, "W_k:")
    assert any(loc["path"] == "embeddings" for loc in d["locations"])
    assert d["rule"] == "(seq_q×d_head)·(d_head×seq_k) → (seq_q×seq_k)"
    assert any(b.startswith("d_head=3 from W_q columns / heads") for b in d["bindings"])


def test_rich_panel_headline_and_no_traceback(invoke):
    code, out = invoke("run", CONFIGS / "bug_qk_d_head.yaml")
    assert code == 3
    assert "ATT-E101 shape mismatch in step 5/11 'scores = Q·Kᵀ', head 0" in out
    assert "(4×⟨3⟩)" in out                   # the conflicting axis is marked without colour too
    assert "X(4×6) @ W_q(6×6) → split heads → head 0" in out


def test_reshape_arithmetic_and_verified_fix(invoke, tmp_path):
    code, doc = _json(invoke, "run", CONFIGS / "bug_d_head_reshape.yaml")
    assert code == 3
    first = doc["diagnoses"][0]
    assert first["code"] == "ATT-E103" and first["hook"] == "attn.hook_q"
    # 4 tokens × 6 columns = 24 values; (4 tokens, 2 heads, d_head 4) = 32
    assert "24 = 4×6 cannot become (4, 2, 4) = 32" in first["details"]
    assert any(f.startswith("remove `d_head: 4`") and "all shapes then agree" in f for f in first["fixes"])
    data = _spec_dict(CONFIGS / "bug_d_head_reshape.yaml")
    del data["attention"]["d_head"]
    assert _runs_clean(data, CONFIGS)


def test_heads_not_dividing_offers_only_fixes_that_work(invoke):
    code, doc = _json(invoke, "run", CONFIGS / "bug_heads_not_dividing.yaml")
    assert code == 3
    q = doc["diagnoses"][0]
    assert q["code"] == "ATT-E103"
    assert "18 = 3×6 cannot become (3, 4, 6/4)" in q["details"][0]
    offered = sorted(int(f.split("`heads: ")[1].split("`")[0]) for f in q["fixes"] if "`heads:" in f)
    assert offered and 4 not in offered
    data = _spec_dict(CONFIGS / "bug_heads_not_dividing.yaml")
    for heads in range(1, 8):                 # every offered value works, every other nearby one fails
        data["attention"]["heads"] = heads
        assert _runs_clean(data, CONFIGS) == (6 % heads == 0)
    assert all(6 % h == 0 for h in offered)


def test_nn_linear_weights_fix_layout(invoke):
    code, doc = _json(invoke, "run", CONFIGS / "bug_linear_weights.yaml")
    assert code == 3
    codes = [(d["code"], d["hook"]) for d in doc["diagnoses"]]
    assert codes == [("ATT-E101", "attn.hook_q"), ("ATT-E101", "attn.hook_k"), ("ATT-E101", "attn.hook_v")]
    w_q = doc["diagnoses"][0]["operands"][1]
    assert w_q["shape"] == [4, 6] and w_q["conflict_axis"] == 0
    fixes = doc["diagnoses"][0]["fixes"]
    assert any("`layout: linear`" in f and "all shapes then agree" in f for f in fixes)
    data = _spec_dict(CONFIGS / "bug_linear_weights.yaml")
    data["attention"]["layout"] = "linear"
    assert _runs_clean(data, CONFIGS)


def test_one_transposed_projection(write_spec, invoke):
    path = write_spec("""version: 1
tokens: [a, b, c, d]
embeddings: {random: {shape: [4, 6], seed: 0}}
attention:
  heads: 2
  W_q: {random: {shape: [6, 4], seed: 1}}
  W_k: {random: {shape: [6, 4], seed: 2}}
  W_v: {random: {shape: [4, 6], seed: 3}}
""")
    code, doc = _json(invoke, "run", path)
    assert code == 3
    (d,) = doc["diagnoses"]
    assert (d["code"], d["hook"]) == ("ATT-E101", "attn.hook_v")
    assert "X has d_model=6 columns but W_v has 4 rows" in d["message"]
    assert any(f.startswith("transpose W_v: write it as 6×4") and "all shapes then agree" in f for f in d["fixes"])
    assert not any("layout" in f for f in d["fixes"])     # switching the layout breaks W_q and W_k


def test_embeddings_transposed(invoke):
    code, doc = _json(invoke, "run", CONFIGS / "bug_embeddings_transposed.yaml")
    assert code == 3
    first = doc["diagnoses"][0]
    assert first["code"] == "ATT-E102" and "4 tokens but 6 embedding rows" in first["message"]
    assert "transposed" in first["hint"]
    assert any(f.startswith("transpose embeddings") and "all shapes then agree" in f for f in first["fixes"])


def test_mask_wrong_size_alignment_table(invoke):
    code, doc = _json(invoke, "run", CONFIGS / "bug_mask_size.yaml")
    assert code == 3
    (d,) = doc["diagnoses"]
    assert d["code"] == "ATT-E108" and d["operands"][0]["shape"] == [3, 4]
    rows = {line.split()[0]: line for line in d["details"][2:]}
    assert "CONFLICT: 3 ≠ 4" in rows["seq_q"] and rows["seq_k"].rstrip().endswith("ok")


def test_mask_wrong_rank(write_spec, invoke):
    path = write_spec("""version: 1
tokens: [a, b]
embeddings: [[1, 0], [0, 1]]
attention:
  W_q: [[1, 0], [0, 1]]
  W_k: [[1, 0], [0, 1]]
  W_v: [[1, 0], [0, 1]]
  mask: [1, 1]
""")
    code, doc = _json(invoke, "run", path)
    assert code == 3 and doc["diagnoses"][0]["code"] == "ATT-E108"


def test_kv_heads_must_divide_heads(invoke):
    code, doc = _json(invoke, "run", CONFIGS / "bug_kv_heads.yaml")
    assert code == 3
    (d,) = doc["diagnoses"]
    assert d["code"] == "ATT-E104" and "4 query heads cannot share 3 kv heads" in d["message"]
    assert d["fixes"] == []                    # no single edit makes W_k (8×6) fit: none is offered
    assert [o["shape"] for o in d["operands"]] == [[3, 4, 2], [3, 3, 2]]


def test_batch_mismatch_and_bias_and_w_o(invoke):
    code, doc = _json(invoke, "run", CONFIGS / "bug_batch_padding.yaml")
    assert code == 3 and doc["diagnoses"][0]["code"] == "ATT-E106"
    assert any("CONFLICT: 3 ≠ 2" in line for line in doc["diagnoses"][0]["details"])
    code, doc = _json(invoke, "run", CONFIGS / "bug_bias_length.yaml")
    assert code == 3 and doc["diagnoses"][0]["code"] == "ATT-E107"
    assert "needs 6 numbers" in doc["diagnoses"][0]["message"]
    code, doc = _json(invoke, "run", CONFIGS / "bug_w_o.yaml")
    d = doc["diagnoses"][0]
    assert code == 3 and (d["code"], d["hook"]) == ("ATT-E101", "hook_attn_out")
    assert any(f.startswith("transpose W_o") for f in d["fixes"])


def test_w_v_must_read_d_model(write_spec, invoke):
    path = write_spec("""version: 1
tokens: [a, b]
embeddings: [[1, 0, 0], [0, 1, 0]]
attention:
  W_q: [[1, 0], [0, 1], [0, 0]]
  W_k: [[1, 0], [0, 1], [0, 0]]
  W_v: [[1, 0], [0, 1]]
""")
    code, doc = _json(invoke, "run", path)
    assert code == 3
    (d,) = doc["diagnoses"]
    assert (d["code"], d["hook"]) == ("ATT-E101", "attn.hook_v") and "W_v has 2 rows" in d["message"]
    assert d["fixes"] == []                     # a 2×2 matrix cannot be turned into 3 rows


def test_square_nn_linear_weight_hint(tmp_path, write_spec, invoke):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "w.npz", **{"q_proj.weight": rng.normal(size=(4, 4)), "c_attn.weight": rng.normal(size=(4, 4))})
    path = write_spec("""version: 1
tokens: [a, b, c]
embeddings: {random: {shape: [3, 4], seed: 0}}
attention:
  W_q: {npz: w.npz, key: q_proj.weight}
  W_k: {npz: w.npz, key: c_attn.weight}
  W_v: {identity: 4}
""")
    code, doc = _json(invoke, "run", path)
    assert code == 0
    hints = [d for d in doc["diagnoses"] if d["code"] == "ATT-W222"]
    assert len(hints) == 1 and "q_proj.weight" in hints[0]["message"]     # GPT-2's Conv1D is (in, out)
    text = path.read_text().replace("W_v: {identity: 4}", "W_v: {identity: 4}\n  layout: linear")
    path.write_text(text)
    code, doc = _json(invoke, "run", path)
    assert not [d for d in doc["diagnoses"] if d["code"] == "ATT-W222"]


def test_clean_configs_raise_no_diagnosis():
    """Every example spec (not bug_*) runs with no diagnosis at all, including the opt-in checks."""
    from attntrace.analysis.run import run as run_checked
    from attntrace.core.plan import plan_from_spec
    from attntrace.inputs.spec import load_spec
    paths = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("bug_"))
    paths += [CONFIGS / "bug_inject_wide_heads.yaml"]          # a clean inject target
    assert len(paths) >= 5
    for path in paths:
        spec = load_spec(path)
        if plan_from_spec(spec).size("seq_q") > 256:
            continue                                            # benchmarks: too slow for --check all here
        trace = run_checked(spec, check="all")
        assert [d.code for d in trace.diagnoses] == [], path.name


# --------------------------------------------------------------------------- runtime named checks

def _plan():
    from attntrace.core.plan import plan_from_sizes
    return plan_from_sizes(seq=4, d_model=8, heads=2)


def test_check_matmul_sizes_and_names():
    from attntrace.analysis.diagnose import check_matmul
    plan = _plan()
    q = Operand("Q", (4, 4), ("seq_q", "d_head"))
    k = Operand("K", (3, 4), ("seq_k", "d_head"))
    with pytest.raises(ShapeError) as info:
        check_matmul(plan, "qk", q, k)
    d = info.value.diagnosis
    assert d.code == "ATT-E101" and "Q's d_head=4 with K's seq_k=3" in d.message
    same = Operand("K", (4, 4), ("seq_k", "d_head"))
    warning = check_matmul(plan, "qk", q, same)
    assert warning.code == "ATT-W220" and warning.severity == "warning" and "both are 4" in warning.message
    assert check_matmul(plan, "qk", q, Operand("Kᵀ", (4, 4), ("d_head", "seq_k"))) is None


def test_check_reshape_arithmetic_and_order():
    from attntrace.analysis.diagnose import check_reshape
    plan = _plan()
    flat = Operand("Q", (4, 8), ("seq_q", "n_heads·d_head"))
    with pytest.raises(ShapeError) as info:
        check_reshape(plan, "q", flat, [("seq_q", 4), ("n_heads", 2), ("d_head", 3)])
    assert "32 = 4×8 cannot become (4, 2, 3) = 24" in info.value.diagnosis.details
    assert check_reshape(plan, "q", flat, [("seq_q", 4), ("n_heads", 2), ("d_head", 4)]) is None
    moved = check_reshape(plan, "q", flat, [("n_heads", 2), ("seq_q", 4), ("d_head", 4)])
    assert moved.code == "ATT-W221"
    one_token = Operand("Q", (1, 8), ("seq_q", "n_heads·d_head"))     # moving a size-1 axis changes nothing
    assert check_reshape(plan, "q", one_token, [("n_heads", 2), ("seq_q", 1), ("d_head", 4)]) is None


def test_check_broadcast_table_and_swapped_names():
    from attntrace.analysis.diagnose import check_broadcast
    plan = _plan()
    scores = Operand("scores", (1, 2, 4, 4), ("batch", "n_heads", "seq_q", "seq_k"))
    with pytest.raises(ShapeError) as info:
        check_broadcast(plan, "attn_scores", scores, Operand("mask", (1, 1, 3, 4), ("batch", "1", "seq_q", "seq_k")))
    assert info.value.diagnosis.code == "ATT-E108"
    assert any("CONFLICT: 3 ≠ 4" in line for line in info.value.diagnosis.details)
    swapped_mask = Operand("mask", (1, 1, 4, 4), ("batch", "1", "seq_k", "seq_q"))
    swapped = check_broadcast(plan, "attn_scores", scores, swapped_mask)
    assert swapped.code == "ATT-W220"
    fine = Operand("mask", (1, 1, 4, 4), ("batch", "1", "seq_q", "seq_k"))
    assert check_broadcast(plan, "attn_scores", scores, fine) is None


# --------------------------------------------------------------------------- invariant checks

def test_rows_that_should_see_a_key_but_sum_to_zero_warn():
    """A row the mask lets see keys must sum to 1, even when it came out all zeros."""
    from attntrace.analysis.run import run
    spec = {"tokens": ["a", "b"], "embeddings": [[1.0, 0.0], [0.0, 1.0]],
            "attention": {"W_q": [[1, 0], [0, 1]], "W_k": [[1, 0], [0, 1]], "W_v": [[1, 0], [0, 1]],
                          "mask": {"padding": [1, 1]}}}

    def zero_weights(state):
        return np.zeros((1, 1, 2, 2))
    trace = run(spec, overrides={"pattern": zero_weights})
    assert "ATT-W201" in [d.code for d in trace.diagnoses]


def test_check_all_adds_the_expensive_checks(invoke):
    code, doc = _json(invoke, "run", CONFIGS / "bug_inject_wide_heads.yaml", "--check", "all")
    assert code == 0 and doc["diagnoses"] == []
    assert any("later tokens" in c for c in doc["checks_passed"])
    assert any("each head depends only on its own weights" in c for c in doc["checks_passed"])
    code, doc = _json(invoke, "run", CONFIGS / "bug_inject_wide_heads.yaml")
    assert not any("later tokens" in c for c in doc["checks_passed"])


def test_strict_turns_warnings_into_exit_1(invoke, write_spec):
    spec = write_spec("version: 1\ntokens: [A, B]\nembeddings: [[1, 0], [0, 1]]\n"      # ATT-W203: query A sees
                      "attention: {heads: 1, W_q: {identity: 2}, W_k: {identity: 2}, W_v: {identity: 2},\n"
                      "            mask: [[0, 0], [1, 1]]}\n")                          # no key (not padding)
    code, _ = invoke("run", spec)
    assert code == 0
    code, _ = invoke("run", spec, "--strict")
    assert code == 1
    # padding rows under a causal mask see no key by design: information (ATT-I240), never a failure
    code, out = invoke("run", CONFIGS / "bug_inject_left_padding.yaml", "--strict")
    assert code == 0 and "ATT-I240" in out
