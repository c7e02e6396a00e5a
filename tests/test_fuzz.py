"""Fuzzing attntrace (issue 10): property-based and mutational.

* Property (hypothesis): every generated *valid* spec -- any batch, heads, grouped kv
  heads, layout, biases, W_o, scale, causal/padding/explicit masks, cross-attention --
  gives finite weights whose unmasked rows sum to 1, blocked keys weight 0, and
  weights and output equal to the float64 loop reference in tests/reference.py.
* Mutational (tests/fuzzing.py): generated specs with their YAML text mutated, sidecar
  .npy/.npz/.safetensors files (valid and broken), hook strings and CLI flags, run
  through the CLI in-process and through the API.  No ATT-E999, no traceback, no hang
  beyond 5 s, every exit code in {0, 1, 2, 3}, one JSON document under --format json,
  no numpy RuntimeWarning, no input written over, no check passing on NaN/inf.

Budgets: the normal suite runs a short fuzz (SHORT_BUDGET cases, a few seconds).
``ATTNTRACE_FUZZ_CASES=10000 pytest tests/test_fuzz.py`` or ``pytest -m fuzz`` runs
10,000 cases (``ATTNTRACE_FUZZ_SEED`` picks another seed; ``ATTNTRACE_FUZZ_REPORT=file.json``
writes the counts).
"""
from __future__ import annotations

import json
import os
import random

import fuzzing
import numpy as np
import pytest
import reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attntrace

SHORT_BUDGET = 25
LONG_BUDGET = 10_000


# --------------------------------------------------------------------------- property: valid specs

@st.composite
def valid_specs(draw):
    """(spec dict, keep mask for the reference or None, reference keyword arguments)."""
    batch = draw(st.integers(1, 2))
    seq_q = draw(st.integers(1, 5))
    cross = draw(st.booleans())
    seq_k = draw(st.integers(1, 5)) if cross else seq_q
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, heads) if heads % h == 0]))
    d_head = draw(st.integers(1, 3))
    d_model = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(["x_at_w", "linear"]))
    magnitude = draw(st.sampled_from([0.1, 1.0, 4.0]))          # 4.0: peaked softmax, near one-hot rows
    values = st.floats(-magnitude, magnitude, allow_nan=False, allow_infinity=False, width=64)

    def array(*shape):
        return np.array(draw(st.lists(values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
                        ).reshape(shape)

    def weight(d_in, d_out):
        w = array(d_in, d_out)
        return w if layout == "x_at_w" else w.T.copy()
    x = array(batch, seq_q, d_model)
    x_enc = array(batch, seq_k, d_model) if cross else None
    attention = {"heads": heads, "layout": layout, "W_q": weight(d_model, heads * d_head),
                 "W_k": weight(d_model, kv_heads * d_head), "W_v": weight(d_model, kv_heads * d_head)}
    if kv_heads != heads:
        attention["kv_heads"] = kv_heads
    if draw(st.booleans()):
        attention.update(b_q=array(heads * d_head), b_k=array(kv_heads * d_head), b_v=array(kv_heads * d_head))
    if draw(st.booleans()):
        attention["W_o"] = weight(heads * d_head, d_model)
        if draw(st.booleans()):
            attention["b_o"] = array(d_model)
    scale = draw(st.sampled_from(["auto", "none", 0.3, 2.0]))
    attention["scale"] = scale
    mask_kind = draw(st.sampled_from(["none", "padding", "matrix"] + ([] if cross else ["causal"])))
    keep = None
    if mask_kind == "causal":
        attention["mask"] = "causal"
        keep = reference.causal_keep(seq_q, seq_k)
    elif mask_kind == "padding":
        rows = [[draw(st.integers(0, 1)) for _ in range(seq_k)] for _ in range(batch)]
        attention["mask"] = {"padding": rows}
        keep = reference.padding_keep(rows, seq_q)
    elif mask_kind == "matrix":
        matrix = [[draw(st.integers(0, 1)) for _ in range(seq_k)] for _ in range(seq_q)]
        attention["mask"] = {"matrix": matrix}
        keep = matrix
    spec = {"version": 1, "embeddings": x, "attention": attention}
    if cross:
        spec["encoder"] = {"embeddings": x_enc}
    kwargs = dict(X_enc=x_enc, heads=heads, kv_heads=kv_heads, layout=layout,
                  scale={"auto": None, "none": 1.0}.get(scale, scale), keep=keep,
                  **{k: attention.get(k) for k in ("W_o", "b_q", "b_k", "b_v", "b_o")})
    return spec, x, kwargs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(valid_specs())
def test_valid_specs_give_finite_normalised_weights_equal_to_the_reference(case):
    spec, x, kwargs = case
    attention = spec["attention"]
    trace = attntrace.run(spec, keep="all")
    pattern = trace.arrays["attn.hook_pattern"]
    assert np.isfinite(pattern).all()
    expected = reference.attention(x, attention["W_q"], attention["W_k"], attention["W_v"], **kwargs)
    np.testing.assert_allclose(pattern, expected["pattern"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(trace.arrays["hook_attn_out"], expected["out"], rtol=1e-9, atol=1e-10)
    sums = pattern.sum(axis=-1)
    if kwargs["keep"] is None:
        np.testing.assert_allclose(sums, 1.0, rtol=0, atol=1e-12)
    else:
        visible = np.broadcast_to(np.asarray(expected["mask"]), pattern.shape)
        live = visible.any(axis=-1)
        np.testing.assert_allclose(sums[live], 1.0, rtol=0, atol=1e-12)
        assert np.all(pattern[~visible] == 0.0)                    # blocked keys get exactly 0
    assert not [d for d in trace.diagnoses if d.code in ("ATT-W201", "ATT-W204", "ATT-W205")]
    assert "every row of weights sums to 1" in trace.checks_passed


# --------------------------------------------------------------------------- the fuzzer itself

def test_the_generators_make_valid_specs():
    """Every registered generator (but the shipped configs, some of which hold deliberate bugs) runs clean."""
    for name, generate in fuzzing.SPECS.items():
        if name == "config":
            continue
        for seed in range(15):
            text = fuzzing.dump(generate(random.Random(seed)))
            trace = attntrace.run(attntrace.load_spec_text(text))
            assert np.isfinite(trace.stats[trace.plan.steps[-1].hook].max), (name, seed)


def test_the_judge_catches_what_it_must(tmp_path):
    """The fuzzer's checks can fail: an internal error, two JSON documents and a false ✓ are flagged."""
    outcome = fuzzing.Outcome("run", ["run", "--format", "json"], 70, 0.1, output="ATT-E999 boom", stdout="{} {}")
    fuzzing._judge_common(outcome, wants_json=True)
    assert any(p.startswith("internal error") for p in outcome.problems)
    assert any(p.startswith("exit code") for p in outcome.problems)
    outcome = fuzzing.Outcome("run", ["run"], 0, 0.1, stdout='{"exit_code": 0} {"exit_code": 0}')
    fuzzing._judge_common(outcome, wants_json=True)
    assert any("2 documents" in p for p in outcome.problems)
    document = {"exit_code": 0, "hooks": {"attn.hook_pattern": {"stats": {"nan": 3}}},
                "checks_passed": ["every row of weights sums to 1"]}
    outcome = fuzzing.Outcome("run", ["run"], 0, 0.1, stdout=json.dumps(document))
    fuzzing._judge_common(outcome, wants_json=True)
    assert any(p.startswith("false check") for p in outcome.problems)
    slow = fuzzing.Outcome("run", ["run"], 0, fuzzing.HANG_SECONDS + 1)
    fuzzing._judge_common(slow, wants_json=False)
    assert any(p.startswith("hang") for p in slow.problems)


def test_an_interrupting_alarm_is_a_hang_not_an_internal_error():
    import time
    with pytest.raises(fuzzing.Hang):
        with fuzzing.deadline(1):
            time.sleep(5)


def _write_report(report, seed: int) -> None:
    path = os.environ.get("ATTNTRACE_FUZZ_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(dict(report.summary(), seed=seed, problems=report.problems, failures=report.failures),
                      handle, indent=2)


def _fuzz(tmp_path, cases: int, seed: int):
    fuzzer = fuzzing.Fuzzer(seed=seed)
    report = fuzzer.run(cases, tmp_path, on_case=lambda i: i % 500 == 499 and _write_report(fuzzer.report, seed))
    _write_report(report, seed)
    summary = report.summary()
    print(json.dumps(summary, indent=1))
    assert report.clean, "\n\n".join(report.failures[:5])
    assert summary["cases"] == cases and summary["invocations"] >= 2 * cases
    return summary


def _seed() -> int:
    value = os.environ.get("ATTNTRACE_FUZZ_SEED", "")
    return int(value) if value.isdigit() else 20240610


def test_mutational_fuzz(tmp_path):
    """A short run in the normal suite; ATTNTRACE_FUZZ_CASES=10000 makes it the long one."""
    _fuzz(tmp_path, fuzzing.budget(SHORT_BUDGET), _seed())


@pytest.mark.fuzz
def test_mutational_fuzz_long(tmp_path):
    """`pytest -m fuzz`: 10,000 cases (or ATTNTRACE_FUZZ_CASES); deselected otherwise (conftest.py)."""
    _fuzz(tmp_path, fuzzing.budget(LONG_BUDGET), _seed() + 1)
