"""The bug catalogue: every bug does what it says, and is caught wherever it can show."""
import json
from pathlib import Path

import numpy as np
import pytest

from attntrace.analysis.bugs import CATALOGUE, EXPENSIVE_CODES, inject
from attntrace.core.plan import plan_from_spec
from attntrace.inputs.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
REQUIRED = ("forgot-transpose-k", "softmax-wrong-axis", "scale-by-d-model", "no-scale",
            "split-heads-without-transpose", "merge-heads-without-transpose", "mask-after-softmax",
            "inverted-mask", "mask-wrong-axis", "additive-mask-zero-one", "fully-masked-row-neg-inf",
            "wrong-d-head-reshape")
MAX_SEQ = 256          # bigger example specs (benchmarks) are left out to keep this file fast


def _example_specs():
    """Every example spec that runs (not the shape-error bug_* ones), loaded once."""
    specs = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        if path.name.startswith("bug_") and not path.name.startswith("bug_inject_"):
            continue
        spec = load_spec(path)
        if plan_from_spec(spec).size("seq_q") <= MAX_SEQ:
            specs.append((path.name, spec))
    return specs


EXAMPLES = _example_specs()


def test_catalogue_has_the_required_bugs():
    assert set(REQUIRED) <= set(CATALOGUE)
    for bug in CATALOGUE.values():
        assert bug.description and "\n" not in bug.description and bug.needs and bug.caught_by and bug.steps


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_every_bug_is_caught_where_it_can_show(name):
    bug = CATALOGUE[name]
    shown = 0
    for label, spec in EXAMPLES:
        verdict = inject(spec, name, check="all")
        if verdict.cannot_show:
            # the claim "cannot show" is honest: the numbers are exactly the clean run's
            assert not verdict.changed, f"{name} changed the output of {label}"
            if verdict.status == "caught":      # a named-axis note saw the wrong code all the same
                assert "the numbers are unchanged on this spec" in verdict.summary()
            else:
                assert verdict.status == "cannot show"
                assert verdict.summary().startswith("cannot show on this spec: " + verdict.cannot_show)
        else:
            shown += 1
            assert verdict.status == "caught", f"{name} not caught on {label}: {verdict.summary()}"
            assert set(verdict.codes) & set(bug.caught_by), (label, verdict.codes)
    assert shown, f"no example spec can show {name}"


def _arrays(spec, name=None):
    from attntrace.analysis.run import run
    overrides = CATALOGUE[name].overrides() if name else None
    return run(spec, overrides=overrides, keep="all", check=False).arrays


def test_bugs_compute_what_they_say():
    """Independent numpy on the clean run's arrays reproduces each buggy step."""
    spec = load_spec(CONFIGS / "bug_inject_wide_heads.yaml")        # causal, 2 heads, d_model 6, d_head 4
    clean = _arrays(spec)
    qk, keep = clean["attn.hook_qk"], clean["attn.hook_mask"]
    assert np.allclose(_arrays(spec, "no-scale")["attn.hook_scaled"], qk)
    assert np.allclose(_arrays(spec, "scale-by-d-model")["attn.hook_scaled"], qk / np.sqrt(6))
    masked = clean["attn.hook_attn_scores"]
    e = np.exp(masked - masked.max(axis=-2, keepdims=True))
    assert np.allclose(_arrays(spec, "softmax-wrong-axis")["attn.hook_pattern"], e / e.sum(axis=-2, keepdims=True))
    scaled = clean["attn.hook_scaled"]
    e = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    after = np.where(keep, e / e.sum(axis=-1, keepdims=True), 0.0)
    assert np.allclose(_arrays(spec, "mask-after-softmax")["attn.hook_pattern"], after)
    plus = scaled + keep
    assert np.allclose(_arrays(spec, "additive-mask-zero-one")["attn.hook_attn_scores"], plus)
    inverted = _arrays(spec, "inverted-mask")["attn.hook_attn_scores"]
    assert np.all(np.isneginf(inverted[np.broadcast_to(keep, inverted.shape)]))
    z = clean["attn.hook_z"]                                       # (b, seq, h, d_v)
    b, s, h, dv = z.shape
    wrong = np.transpose(z, (0, 2, 1, 3)).reshape(b, s, h * dv)    # the forgotten transpose back
    assert np.allclose(_arrays(spec, "merge-heads-without-transpose")["attn.hook_z_concat"], wrong)


def test_split_heads_mixes_tokens_like_the_classic_bug():
    spec = load_spec(CONFIGS / "bug_inject_wide_heads.yaml")
    x = spec.source.embeddings.data
    flat = x @ spec.attention.W_q.data                             # (4 tokens, 2·4)
    classic = flat.reshape(2, 4, 4).transpose(1, 0, 2)             # view(h, s, d) then back to (s, h, d)
    assert np.allclose(_arrays(spec, "split-heads-without-transpose")["attn.hook_q"][0], classic)


def test_forgot_transpose_k_when_d_head_equals_seq_is_flagged_by_axis_names():
    spec = load_spec(CONFIGS / "bug_inject_wide_heads.yaml")       # seq 4 == d_head 4: numpy does not raise
    verdict = inject(spec, "forgot-transpose-k")
    assert verdict.trace is not None and verdict.codes == ["ATT-W220"]
    q, k = verdict.trace.arrays["attn.hook_q"][0], verdict.trace.arrays["attn.hook_k"][0]
    assert np.allclose(verdict.trace.arrays["attn.hook_qk"][0, 0], q[:, 0] @ k[:, 0])    # Q @ K, not Q @ Kᵀ


def test_expensive_checks_alone_catch_head_mixing():
    """Without the named-axis notes, head independence (and causality) still catch the reshape bugs."""
    from attntrace.analysis.checks import expensive_checks
    from attntrace.analysis.run import rerun_with, run
    spec = load_spec(CONFIGS / "bug_inject_wide_heads.yaml")
    for name in ("split-heads-without-transpose", "merge-heads-without-transpose"):
        overrides = CATALOGUE[name].overrides()
        trace = run(spec, overrides=overrides)
        found, _ = expensive_checks(spec, trace, rerun_with(overrides))
        assert {"ATT-W224", "ATT-W225"} <= {d.code for d in found}, name
    clean = run(spec)
    found, passed = expensive_checks(spec, clean, rerun_with())
    assert found == [] and len(passed) == 2


def test_not_caught_without_check_all_says_so(invoke):
    verdict = inject(load_spec(CONFIGS / "gqa_8x2.yaml"), "kv-heads-tiled")
    assert verdict.status == "not caught" and verdict.changed
    assert "nothing caught it" in verdict.summary() and "--check all" in verdict.summary()
    code, out = invoke("bugs", CONFIGS / "gqa_8x2.yaml")
    assert code == 1 and "not caught" in out
    code, doc = invoke("bugs", CONFIGS / "gqa_8x2.yaml", "--check", "all", "--format", "json")
    doc = json.loads(doc)
    assert code == 0 and all(b["status"] != "not caught" for b in doc["bugs"])


# --------------------------------------------------------------------------- CLI

def test_bugs_command_lists_the_catalogue(invoke):
    code, out = invoke("bugs")
    assert code == 0
    for name in REQUIRED:
        assert name in out
    code, doc = invoke("bugs", "--format", "json")
    names = [b["name"] for b in json.loads(doc)["bugs"]]
    assert code == 0 and set(REQUIRED) <= set(names)


def test_run_inject_reports_what_caught_it(invoke):
    code, out = invoke("run", CONFIGS / "causal_gpt.yaml", "--inject", "softmax-wrong-axis")
    assert code == 0
    assert "softmax over the queries (axis=-2)" in out and "caught by ATT-W201" in out
    code, _ = invoke("run", CONFIGS / "causal_gpt.yaml", "--inject", "softmax-wrong-axis", "--strict")
    assert code == 1


def test_run_inject_shape_error_is_diagnosed_before_numpy(invoke):
    code, out = invoke("run", CONFIGS / "seed000_cat_mouse.yaml", "--inject", "forgot-transpose-k")
    assert code == 3 and "matmul" not in out
    assert "ATT-E101 shape mismatch in step 5/11 'scores = Q·Kᵀ'" in out
    assert "Q @ K contracts Q's d_head=8 with K's seq_k=4" in out
    assert "forgot-transpose-k" in out and "before numpy raised" in out
    code, doc = invoke("run", CONFIGS / "seed000_cat_mouse.yaml", "--inject", "forgot-transpose-k", "--format", "json")
    doc = json.loads(doc)
    assert code == 3 and doc["exit_code"] == 3
    assert doc["diagnoses"][0]["code"] == "ATT-E101" and doc["injected"]["caught_by"] == ["ATT-E101"]


def test_run_inject_cannot_show_says_so(invoke):
    code, out = invoke("run", CONFIGS / "seed000_cat_mouse.yaml", "--inject", "inverted-mask")
    assert code == 0 and "cannot show on this spec: the spec has no mask" in out
    code, doc = invoke("run", CONFIGS / "seed000_cat_mouse.yaml", "--inject", "inverted-mask", "--format", "json")
    doc = json.loads(doc)
    assert doc["injected"]["status"] == "cannot show" and doc["injected"]["output_changed"] is False


def test_unknown_bug_is_bad_input(invoke):
    code, out = invoke("run", CONFIGS / "causal_gpt.yaml", "--inject", "softmax-wrong-axes")
    assert code == 2
    assert "ATT-E034" in out and "softmax-wrong-axis" in out


def test_expensive_codes_are_documented_as_opt_in():
    for bug in CATALOGUE.values():
        cheap = [c for c in bug.caught_by if c not in EXPENSIVE_CODES]
        assert cheap or bug.name == "kv-heads-tiled", bug.name
