"""The Python hook API: attntrace.run(spec, hooks=[(name, fn)]), its errors and scoping,
the spec's `hooks:` list, engine.run's on_step, and `attntrace hooks`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import attntrace
from attntrace.core.hooks import HookSet
from attntrace.errors import InputError

# seed 002's A, B, C (see test_seed_values.py): V rows A [2, 4], B [10, 12], C [18, 20]
X = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
W_Q = [[1, 0], [1, 0], [0, 1], [0, 1]]
W_K = [[0, 1], [0, 1], [1, 0], [1, 0]]
W_V = [[1, 0], [0, 1], [1, 0], [0, 1]]
V = [[2, 4], [10, 12], [18, 20]]


def spec(**extra):
    return dict({"version": 1, "tokens": ["A", "B", "C"], "embeddings": X,
                 "attention": {"heads": 1, "W_q": W_Q, "W_k": W_K, "W_v": W_V}}, **extra)


def uniform(array, *, hook):
    return np.full_like(array, 1.0 / array.shape[-1])


def test_returned_array_replaces_the_activation_downstream():
    trace = attntrace.run(spec(), hooks=[("attn.hook_pattern", uniform)], keep="all")
    # uniform weights: every output row is the mean of V's rows
    mean_v = [sum(row[j] for row in V) / 3 for j in range(2)]          # [10, 12]
    np.testing.assert_allclose(trace.hand_view("output"), [mean_v] * 3)
    np.testing.assert_allclose(trace.hand_view("weights"), np.full((3, 3), 1 / 3))


def test_none_leaves_the_activation_and_hook_sees_the_point():
    seen = []

    def record(array, *, hook):
        seen.append((hook.name, array.shape))
    trace = attntrace.run(spec(), hooks=[("attn.hook_*", record)])
    plan_hooks = [s.hook for s in trace.plan.steps if s.hook.startswith("attn.")]
    assert [name for name, _ in seen] == plan_hooks         # a pattern fires at every matching point
    assert dict(seen)["attn.hook_qk"] == (1, 1, 3, 3)
    # B·C = 9·21 + 13·17 = 410, untouched by a hook that returns None
    assert trace.hand_view("scores")[1, 2] == 410


def test_aliases_and_blocks_prefix_are_hook_names():
    calls = []
    attntrace.run(spec(), hooks=[("weights", lambda a, *, hook: calls.append(hook.name)),
                                 ("blocks.0.attn.hook_qk", lambda a, *, hook: calls.append(hook.name))])
    assert calls == ["attn.hook_qk", "attn.hook_pattern"]


def test_wrong_shape_names_the_hook():
    with pytest.raises(InputError) as caught:
        attntrace.run(spec(), hooks=[("attn.hook_pattern", lambda a, *, hook: a[..., :2])])
    d = caught.value.diagnosis
    assert d.code == "ATT-E016"
    assert "attn.hook_pattern" in d.message and "(1, 1, 3, 2)" in d.message and "(1, 1, 3, 3)" in d.message


def test_wrong_dtype_names_the_hook():
    with pytest.raises(InputError) as caught:
        attntrace.run(spec(), hooks=[("attn.hook_qk", lambda a, *, hook: a.astype(np.complex128))])
    assert caught.value.diagnosis.code == "ATT-E016"
    assert "attn.hook_qk" in caught.value.diagnosis.message and "complex128" in caught.value.diagnosis.message


def test_compatible_dtype_is_cast_back():
    trace = attntrace.run(spec(), hooks=[("attn.hook_qk", lambda a, *, hook: a.astype(np.float32))], keep="all")
    assert trace["scores"].dtype == np.float64


def test_unknown_hook_gets_did_you_mean():
    with pytest.raises(InputError) as caught:
        attntrace.run(spec(), hooks=[("attn.hook_patern", uniform)])
    d = caught.value.diagnosis
    assert d.code == "ATT-E015" and "attn.hook_pattern" in d.hint and d.hint.startswith("did you mean")


def test_hook_point_missing_from_this_run_says_so():
    with pytest.raises(InputError) as caught:
        attntrace.run(spec(), hooks=[("attn.hook_rot_q", uniform)])
    assert "not part of this run" in caught.value.diagnosis.message


def test_not_callable_is_refused():
    with pytest.raises(InputError):
        HookSet([("attn.hook_q", 3)], ["attn.hook_q"])


def test_hooks_are_scoped_to_one_run():
    calls = []

    def count(array, *, hook):
        calls.append(hook.name)
        return uniform(array, hook=hook)
    hooks = [("attn.hook_pattern", count)]
    hooked = attntrace.run(spec(), hooks=hooks, keep="all")
    hooks.append(("attn.hook_q", count))          # mutating the list afterwards changes nothing
    clean = attntrace.run(spec(), keep="all")
    assert calls == ["attn.hook_pattern"]
    # the clean run's row A puts its weight on C (scores 10, 58, 106 scaled by 1/√2)
    row_a = [10 / math.sqrt(2), 58 / math.sqrt(2), 106 / math.sqrt(2)]
    expected = [math.exp(s - max(row_a)) for s in row_a]
    np.testing.assert_allclose(clean.hand_view("weights")[0], [e / sum(expected) for e in expected])
    assert not np.allclose(hooked.hand_view("weights"), clean.hand_view("weights"))


def test_spec_hooks_list_is_applied_by_run_and_can_be_skipped():
    with_hooks = spec(hooks=["attn.hook_z:scale=0.5", {"hook": "output", "scale": 2}])
    trace = attntrace.run(with_hooks, keep="all")
    clean = attntrace.run(spec(), keep="all")
    np.testing.assert_allclose(trace.hand_view("z"), 0.5 * clean.hand_view("z"))
    np.testing.assert_allclose(trace.hand_view("output"), clean.hand_view("output"))   # ×0.5 then ×2
    skipped = attntrace.run(with_hooks, keep="all", spec_hooks=False)
    np.testing.assert_allclose(skipped.hand_view("z"), clean.hand_view("z"))


def test_spec_hooks_errors_point_at_the_yaml(write_spec):
    path = write_spec("version: 1\ntokens: [A]\nembeddings: [[1, 0]]\nattention:\n  W_q: [[1], [0]]\n"
                      "  W_k: [[1], [0]]\n  W_v: [[1], [0]]\nhooks:\n  - attn.hook_q:scael=2\n")
    with pytest.raises(InputError) as caught:
        attntrace.run(path)
    d = caught.value.diagnosis
    assert "hooks[0]" in d.message and d.locations[0].line == 9 and d.hint == "did you mean 'scale'?"


def test_on_step_sees_every_step_in_order():
    seen = []
    trace = attntrace.run(spec(), on_step=lambda step, array, tr: seen.append((step.number, step.hook,
                                                                             array.shape)))
    assert [n for n, _, _ in seen] == list(range(1, len(trace.plan.steps) + 1))
    assert seen[4] == (5, "attn.hook_qk", (1, 1, 3, 3))


# --------------------------------------------------------------------------- attntrace hooks

def test_hooks_command_lists_every_point(invoke):
    from attntrace.hookpoints import HOOK_POINTS
    code, out = invoke("hooks", "--width", "200")
    assert code == 0
    for point in HOOK_POINTS:
        assert point.name in out
    assert "ablate-head" in out and "clamp" in out


def test_hooks_command_with_a_spec_gives_shapes(invoke, write_spec):
    import yaml
    path = write_spec(yaml.safe_dump(spec(), allow_unicode=True))
    code, out = invoke("hooks", path, "--format", "json")
    assert code == 0
    rows = {row["hook"]: row for row in json.loads(out)["hooks"]}
    assert rows["attn.hook_q"]["shape"] == [1, 3, 1, 2]          # (batch, seq, heads, d_head = 2)
    assert rows["attn.hook_pattern"]["shape"] == [1, 1, 3, 3]
    assert rows["attn.hook_rot_q"]["in_run"] is False
    assert rows["attn.hook_qk"]["step"] == 5


def test_hooks_command_bad_spec_exit_2(invoke, write_spec):
    code, out = invoke("hooks", write_spec("version: 1\ntokens: [A\n"))
    assert code == 2


def test_the_output_is_always_kept_even_when_it_is_big():
    """keep="auto" keeps arrays up to 1M values, but trace["output"] must work at any size."""
    rng = np.random.default_rng(0)
    seq, d_model = 1500, 700                                  # the output holds 1.05M values
    x = rng.normal(size=(seq, d_model))
    w_q, w_k, w_v = (rng.normal(size=(d_model, 4)) for _ in range(3))
    trace = attntrace.run({"version": 1, "embeddings": x,
                           "attention": {"heads": 1, "W_q": w_q, "W_k": w_k, "W_v": w_v, "W_o": np.eye(4, d_model)}})
    scores = (x @ w_q) @ (x @ w_k).T / 2.0
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(trace["output"][0], weights @ (x @ w_v) @ np.eye(4, d_model), rtol=1e-9, atol=1e-12)
    assert "attn.hook_pattern" not in trace                  # 2.25M values: summarised, not kept


@pytest.mark.parametrize("seq", [6, 300])        # 300: the engine's banded (fused) score steps
def test_checks_the_engine_vouches_for_still_run_on_hooked_steps(seq):
    """Blocked scores are -inf and blocked weights 0 by construction of the engine's own steps, so
    those checks skip the scan; a hook that changes the steps must still be caught."""
    rng = np.random.default_rng(1)
    spec = {"version": 1, "embeddings": rng.normal(size=(seq, 8)),
            "attention": {"heads": 2, "mask": "causal",
                          **{w: rng.normal(size=(8, 8)) for w in ("W_q", "W_k", "W_v")}}}
    clean = attntrace.run(spec)
    assert {"masked positions get exactly zero weight",
            "masked scores are −inf exactly, and no NaN sits at a masked position"} <= set(clean.checks_passed)

    def finite_mask(scores, hook):
        return np.where(np.isneginf(scores), -1e4, scores)
    caught = attntrace.run(spec, hooks=[("attn.hook_attn_scores", finite_mask)])
    assert "ATT-W248" in [d.code for d in caught.diagnoses]

    def leak(pattern, hook):
        return pattern + 1e-3
    caught = attntrace.run(spec, hooks=[("attn.hook_pattern", leak)])
    assert "ATT-W202" in [d.code for d in caught.diagnoses]
