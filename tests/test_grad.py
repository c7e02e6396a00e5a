"""`attntrace grad`: the backward pass against hand arithmetic, finite differences of the
plain loop reference, PyTorch's autograd, structural identities, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import reference
from conftest import CONFIGS

import attntrace
from attntrace.analysis.gradcheck import check_gradients
from attntrace.core.backward import (
    backward,
    grouped_mix_backward,
    grouped_scores_backward,
    linear_backward,
    softmax_backward,
)

SEED_WEIGHTS = [[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7]]
SEED_D_OUTPUT = [1.0, 2.0, 3.0]
SEED_CONFIG = CONFIGS / "grad_seed000_value_gradient.yaml"


def random_spec(seed=0, *, batch=2, seq=4, d_model=6, heads=2, kv_heads=None, d_head=3, layout="x_at_w",
                biases=True, w_o=True, mask=None, cross=False, positional=None, grad=None):
    """A spec dict with random arrays; weights in `layout` (x_at_w: (in, out), linear: (out, in))."""
    rng = np.random.default_rng(seed)
    kv = kv_heads or heads

    def weight(d_in, d_out):
        w = rng.normal(scale=0.7, size=(d_in, d_out))
        return w if layout == "x_at_w" else w.T.copy()

    attention = {"heads": heads, "layout": layout, "W_q": weight(d_model, heads * d_head),
                 "W_k": weight(d_model, kv * d_head), "W_v": weight(d_model, kv * d_head)}
    if kv_heads:
        attention["kv_heads"] = kv_heads
    if w_o:
        attention["W_o"] = weight(heads * d_head, 5)
    if biases:
        attention.update(b_q=rng.normal(size=heads * d_head), b_k=rng.normal(size=kv * d_head),
                         b_v=rng.normal(size=kv * d_head))
        if w_o:
            attention["b_o"] = rng.normal(size=5)
    if mask is not None:
        attention["mask"] = mask
    spec = {"version": 1, "embeddings": rng.normal(size=(batch, seq, d_model)), "attention": attention}
    if cross:
        spec["encoder"] = {"embeddings": rng.normal(size=(batch, seq + 1, d_model))}
    if positional:
        spec["positional"] = positional
    if grad:
        spec["grad"] = grad
    return spec


def grads_of(spec, **kw):
    return backward(attntrace.run(spec, keep="all"), **kw)


# --------------------------------------------------------------------------- seed 000 §5.5 by hand

def test_seed000_value_gradient_by_hand():
    # d_V[j] = Σ_i weights[i][j] · d_output[i], written out
    expected = [sum(SEED_WEIGHTS[i][j] * SEED_D_OUTPUT[i] for i in range(3)) for j in range(3)]
    assert expected == pytest.approx([1.2, 2.1, 2.7])
    pattern = np.array(SEED_WEIGHTS).reshape(1, 1, 3, 3)           # (batch, heads, seq_q, seq_k)
    v = np.zeros((1, 3, 1, 1))                                      # d_v = 1
    dz = np.array(SEED_D_OUTPUT).reshape(1, 3, 1, 1)               # (batch, seq_q, heads, d_v)
    _, dv = grouped_mix_backward(pattern, v, dz)
    np.testing.assert_allclose(dv.reshape(3), expected, rtol=1e-15)
    # the largest gradient goes to V[2]: row C's upstream 3 times its weight 0.7 is most of it
    assert int(np.argmax(dv.reshape(3))) == 2
    # with a uniform upstream gradient the column sums 0.8, 1.1, 1.1 tie V[1] and V[2]
    _, dv_uniform = grouped_mix_backward(pattern, v, np.ones((1, 3, 1, 1)))
    np.testing.assert_allclose(dv_uniform.reshape(3), [0.8, 1.1, 1.1], rtol=1e-12)


def test_seed000_config_reproduces_the_weights_and_the_value_gradient():
    grads = grads_of(str(SEED_CONFIG))
    np.testing.assert_allclose(grads.forward.hand_view("weights"), SEED_WEIGHTS, atol=1e-15)
    expected = np.array(SEED_WEIGHTS).T @ np.array(SEED_D_OUTPUT)
    np.testing.assert_allclose(grads["V"].reshape(3), expected, atol=1e-14)
    np.testing.assert_allclose(grads["dL/dout"].reshape(3), SEED_D_OUTPUT)
    # dL/dweights[i][j] = d_output[i] · V[j] (V = 10, 20, 30)
    np.testing.assert_allclose(grads["pattern"].reshape(3, 3), np.outer(SEED_D_OUTPUT, [10, 20, 30]), atol=1e-12)


# --------------------------------------------------------------------------- the pieces

def test_softmax_backward_is_the_jacobian():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=5)
    p = np.exp(scores - scores.max())
    p /= p.sum()
    jacobian = np.diag(p) - np.outer(p, p)                          # dp_i/ds_j
    dp = rng.normal(size=5)
    np.testing.assert_allclose(softmax_backward(p[None], dp[None])[0], jacobian.T @ dp, rtol=1e-12, atol=1e-15)


def test_linear_backward_both_layouts():
    rng = np.random.default_rng(4)
    x, dy = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 5))
    w = rng.normal(size=(4, 5))
    dx, dw = linear_backward(x, w, dy, "x_at_w")
    np.testing.assert_allclose(dx, np.einsum("bso,io->bsi", dy, w))
    np.testing.assert_allclose(dw, sum(x[b].T @ dy[b] for b in range(2)))
    dx_lin, dw_lin = linear_backward(x, w.T.copy(), dy, "linear")
    np.testing.assert_allclose(dx_lin, dx)
    np.testing.assert_allclose(dw_lin, dw.T)


def test_grouped_scores_backward_sums_over_the_group():
    rng = np.random.default_rng(5)
    q, k = rng.normal(size=(1, 3, 4, 2)), rng.normal(size=(1, 3, 2, 2))    # 4 query heads, 2 kv heads
    dscores = rng.normal(size=(1, 4, 3, 3))
    dq, dk = grouped_scores_backward(q, k, dscores)
    for h in range(4):
        np.testing.assert_allclose(dq[0, :, h], dscores[0, h] @ k[0, :, h // 2])
    for g in range(2):
        expected = sum(dscores[0, h].T @ q[0, :, h] for h in (2 * g, 2 * g + 1))
        np.testing.assert_allclose(dk[0, :, g], expected)


# --------------------------------------------------------------------------- independent references

def loop_reference_loss(spec, upstream):
    att = spec["attention"]
    out = reference.attention(spec["embeddings"], att["W_q"], att["W_k"], att["W_v"], att.get("W_o"),
                              b_q=att.get("b_q"), b_k=att.get("b_k"), b_v=att.get("b_v"), b_o=att.get("b_o"),
                              heads=att["heads"], kv_heads=att.get("kv_heads"), layout=att["layout"],
                              keep=reference.causal_keep(spec["embeddings"].shape[1], spec["embeddings"].shape[1])
                              if att.get("mask") == "causal" else None)["out"]
    return float(np.sum(np.asarray(out) * upstream))


def test_parameter_gradients_match_finite_differences_of_the_loop_reference():
    """Central differences of tests/reference.py (plain loops, no attntrace) for every weight and X."""
    spec = random_spec(11, batch=1, seq=3, d_model=4, heads=2, kv_heads=1, d_head=2, layout="linear",
                       mask="causal")
    upstream = np.random.default_rng(12).normal(size=(1, 3, 5))
    spec["grad"] = {"upstream": upstream}
    grads = grads_of(spec)
    step = 1e-6
    for name, where, key in [("W_q", "attention", "W_q"), ("W_k", "attention", "W_k"), ("b_v", "attention", "b_v"),
                             ("W_o", "attention", "W_o"), ("X", None, "embeddings")]:
        holder = spec["attention"] if where else spec
        base = holder[key]
        numeric = np.zeros(base.size)
        for i in range(base.size):
            for sign in (1, -1):
                nudged = base.copy()
                nudged.reshape(-1)[i] += sign * step
                holder[key] = nudged
                numeric[i] += sign * loop_reference_loss(spec, upstream) / (2 * step)
            holder[key] = base
        analytic = grads[name].reshape(-1)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-6 * np.abs(numeric).max())


@pytest.mark.parametrize("case", [
    dict(heads=2),
    dict(heads=4, kv_heads=2, mask="causal"),
    dict(heads=2, mask={"padding": [[1, 1, 1, 0], [1, 1, 0, 0]]}, layout="linear"),
    dict(heads=2, cross=True, biases=False, w_o=False),
])
def test_every_gradient_matches_torch_autograd(case):
    torch = pytest.importorskip("torch")
    spec = random_spec(21, **case)
    upstream = np.random.default_rng(22).normal(size=(2, 4, 5 if case.get("w_o", True) else 2 * 3))
    spec["grad"] = {"upstream": upstream}
    grads = grads_of(spec)
    att, heads, kv = spec["attention"], case["heads"], case.get("kv_heads", case["heads"])
    T = {k: torch.tensor(v, requires_grad=True) for k, v in att.items() if isinstance(v, np.ndarray)}
    X = torch.tensor(spec["embeddings"], requires_grad=True)
    X_enc = torch.tensor(spec["encoder"]["embeddings"], requires_grad=True) if case.get("cross") else X

    def project(x, name, n):
        w = T["W_" + name]
        y = x @ (w if case.get("layout", "x_at_w") == "x_at_w" else w.T)
        if "b_" + name in T:
            y = y + T["b_" + name]
        return y.reshape(x.shape[0], x.shape[1], n, -1)

    q, k, v = project(X, "q", heads), project(X_enc, "k", kv), project(X_enc, "v", kv)
    for t in (q, k, v):
        t.retain_grad()
    k_all = k.repeat_interleave(heads // kv, dim=2).transpose(1, 2)
    v_all = v.repeat_interleave(heads // kv, dim=2).transpose(1, 2)
    scores = q.transpose(1, 2) @ k_all.transpose(-1, -2) / 3 ** 0.5
    if case.get("mask") == "causal":
        scores = scores.masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), float("-inf"))
    elif isinstance(case.get("mask"), dict):
        pad = torch.tensor(case["mask"]["padding"], dtype=torch.bool)[:, None, None, :]
        scores = scores.masked_fill(~pad, float("-inf"))
    scores.retain_grad()
    pattern = torch.softmax(scores, dim=-1)
    pattern.retain_grad()
    concat = (pattern @ v_all).transpose(1, 2).reshape(2, 4, -1)
    out = concat
    if "W_o" in T:
        out = concat @ (T["W_o"] if case.get("layout", "x_at_w") == "x_at_w" else T["W_o"].T) + T["b_o"]
    (out * torch.tensor(upstream)).sum().backward()

    def same(ours, theirs):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)

    same(grads["Q"], q.grad)
    same(grads["K"], k.grad)                     # summed over each kv head's query heads by autograd
    same(grads["V"], v.grad)
    same(grads["weights"], pattern.grad)
    same(grads["masked"], torch.nan_to_num(scores.grad))
    for name in T:
        same(grads[name], T[name].grad)
    same(grads["X"], X.grad)
    if case.get("cross"):
        same(grads["hook_encoder_embed"], X_enc.grad)


# --------------------------------------------------------------------------- finite differences

@pytest.mark.parametrize("case", [
    dict(heads=3),
    dict(heads=4, kv_heads=2, mask="causal"),
    dict(heads=4, kv_heads=1, d_head=2, mask={"padding": [[1, 1, 1, 0], [0, 1, 1, 1]]}),
    dict(heads=2, cross=True, layout="linear"),
    dict(heads=2, biases=False, w_o=False, mask={"window": 2}),
    dict(heads=2, positional="sinusoidal", grad={"loss": "sum_squares"}),
    dict(heads=2, d_head=4, positional="rope", mask="causal"),
    dict(heads=2, positional="alibi", mask="causal", grad={"loss": "mean"}),
])
def test_backward_matches_central_finite_differences(case):
    grads = grads_of(random_spec(31, **case))
    checks = check_gradients(grads, cells=10)
    assert [c.name for c in checks] == grads.keys()
    worst = max(checks, key=lambda c: c.max_rel_error)
    assert worst.max_rel_error < 1e-6, worst


def test_finite_differences_catch_a_wrong_softmax_backward(monkeypatch):
    from attntrace.core import backward as backward_module
    # a classic mistake: the softmax gradient without the rowsum term
    monkeypatch.setattr(backward_module, "softmax_backward", lambda p, dp: p * dp)
    grads = grads_of(random_spec(41, heads=2))
    by_name = {c.name: c for c in check_gradients(grads, cells=8)}
    assert by_name["attn.hook_pattern_grad"].passed and by_name["attn.hook_v_grad"].passed
    assert not by_name["attn.hook_attn_scores_grad"].passed
    assert not by_name["attn.W_q_grad"].passed


# --------------------------------------------------------------------------- structure

def test_blocked_positions_get_zero_gradient():
    spec = random_spec(51, batch=2, heads=2, mask={"causal": True, "padding": [[1, 1, 1, 1], [0, 1, 1, 1]]})
    grads = grads_of(spec)
    keep = grads.forward["mask"]                                     # (batch, 1, q, k), True = may attend
    for name in ("masked", "scaled", "scores"):
        blocked = np.broadcast_to(~keep, grads[name].shape)
        assert np.all(grads[name][blocked] == 0.0), name
    # batch 1 query 0 sees only key 0, which is padding: a fully blocked row, zero gradient, no NaN
    assert np.all(grads["Q"][1, 0] == 0.0)
    assert all(np.isfinite(g).all() for g in grads.grads.values())


def test_gqa_kv_gradients_equal_the_summed_gradients_of_duplicated_heads():
    """GQA with W_k, W_v of 1 kv head == MHA whose 2 heads have identical copies of them."""
    gqa = random_spec(61, batch=1, heads=2, kv_heads=1, biases=False)
    mha = random_spec(61, batch=1, heads=2, kv_heads=1, biases=False)
    del mha["attention"]["kv_heads"]
    for key in ("W_k", "W_v"):
        mha["attention"][key] = np.concatenate([gqa["attention"][key]] * 2, axis=1)
    g, m = grads_of(gqa), grads_of(mha)
    np.testing.assert_allclose(g["out"], m["out"])
    np.testing.assert_allclose(g["K"][:, :, 0], m["K"].sum(axis=2), atol=1e-12)
    np.testing.assert_allclose(g["V"][:, :, 0], m["V"].sum(axis=2), atol=1e-12)
    np.testing.assert_allclose(g["W_k"], m["W_k"][:, :3] + m["W_k"][:, 3:], atol=1e-12)
    np.testing.assert_allclose(g["X"], m["X"], atol=1e-12)


def test_self_attention_dx_sums_the_query_key_and_value_paths():
    spec = random_spec(71, heads=2)
    cross = random_spec(71, heads=2)
    cross["encoder"] = {"embeddings": cross["embeddings"].copy()}        # same X, but K and V read a copy
    s, c = grads_of(spec), grads_of(cross)
    np.testing.assert_allclose(s["X"], c["X"] + c["hook_encoder_embed"], atol=1e-12)
    # and the query path alone is dQ·W_qᵀ
    dq = c["Q"].reshape(2, 4, -1)
    np.testing.assert_allclose(c["X"], dq @ spec["attention"]["W_q"].T, atol=1e-12)


def test_positional_encoding_passes_the_gradient_through():
    grads = grads_of(random_spec(81, positional="sinusoidal"))
    np.testing.assert_array_equal(grads["hook_pos_embed"], grads["X"])


def test_losses():
    spec = random_spec(91, heads=2)
    out = attntrace.run(spec)["out"]
    assert grads_of(spec).loss == pytest.approx(out.sum())
    mean = grads_of(spec, loss="mean")
    assert mean.loss == pytest.approx(out.mean())
    np.testing.assert_allclose(mean["out"], np.full(out.shape, 1 / out.size))
    squares = grads_of(spec, loss="sum_squares")
    assert squares.loss == pytest.approx(0.5 * (out ** 2).sum())
    np.testing.assert_allclose(squares["out"], out)
    # one (seq, d_out) upstream gradient is shared by every batch item
    upstream = np.arange(20.0).reshape(4, 5)
    shared = grads_of(dict(spec, grad={"upstream": upstream}))
    assert shared.loss == pytest.approx(float((out * upstream).sum()))
    np.testing.assert_allclose(shared["out"][1], upstream)


def test_backward_hooks_replace_gradients_and_flow_on():
    spec = random_spec(95, heads=2)
    seen = []

    def zero(grad, *, hook):
        seen.append(hook.name)
        return np.zeros_like(grad)

    grads = grads_of(spec, hooks=[("dL/dweights", zero)])
    plain = grads_of(spec)
    assert seen == ["attn.hook_pattern_grad"]
    np.testing.assert_array_equal(grads["V"], plain["V"])           # computed before the hook point
    assert not grads["Q"].any() and not grads["W_k"].any()            # everything upstream of it is zero
    # only the value path is left: dX = dV·W_vᵀ
    np.testing.assert_allclose(grads["X"], grads["V"].reshape(2, 4, -1) @ spec["attention"]["W_v"].T, atol=1e-12)
    with pytest.raises(attntrace.AttnTraceError) as bad_shape:
        grads_of(spec, hooks=[("attn.hook_v_grad", lambda g, hook: g[:, :1])])
    assert bad_shape.value.diagnosis.code == "ATT-E016"
    with pytest.raises(attntrace.AttnTraceError) as unknown:
        grads_of(spec, hooks=[("attn.hook_patern_grad", lambda g, hook: None)])
    assert unknown.value.diagnosis.code == "ATT-E015" and "attn.hook_pattern_grad" in unknown.value.diagnosis.hint


def test_keep_all_is_required():
    with pytest.raises(attntrace.AttnTraceError) as err:
        backward(attntrace.run(random_spec(1), keep=["out"]))
    assert err.value.diagnosis.code == "ATT-E080" and 'keep="all"' in err.value.diagnosis.hint


# --------------------------------------------------------------------------- the command

def test_cli_seed000_config(invoke):
    code, out = invoke("grad", SEED_CONFIG, "--grads", "V,out")
    assert code == 0, out
    assert "dL/dV" in out and "attn.hook_v_grad" in out and "dV = weightsᵀ·dz" in out
    for value in ("1.2000", "2.1000", "2.7000"):
        assert value in out
    assert "all 14 gradients match central finite differences" in out


def test_cli_json(invoke):
    code, out = invoke("grad", SEED_CONFIG, "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["command"] == "grad" and doc["exit_code"] == 0 and doc["verified"] is True
    assert doc["loss"]["kind"] == "upstream"
    by_name = {g["name"]: g for g in doc["gradients"]}
    assert by_name["hook_attn_out_grad"]["number"] == 1 and doc["gradients"][-1]["name"] == "hook_embed_grad"
    expected = np.array(SEED_WEIGHTS).T @ np.array(SEED_D_OUTPUT)
    np.testing.assert_allclose(np.array(by_name["attn.hook_v_grad"]["values"]).reshape(3), expected, atol=1e-12)
    check = by_name["attn.W_q_grad"]["check"]
    assert check["passed"] and check["max_rel_error"] < 1e-6 and check["cells_checked"] == 9


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("grad_*.yaml")), ids=lambda p: p.name)
def test_cli_every_grad_config_verifies(invoke, config):
    code, out = invoke("grad", config, "--format", "json", "--cells", "16")
    assert code == 0, out
    assert json.loads(out)["verified"] is True


def test_cli_exit_1_when_a_gradient_fails(invoke, monkeypatch):
    code, out = invoke("grad", SEED_CONFIG, "--tolerance", "0", "--format", "json")
    assert code == 1 and json.loads(out)["verified"] is False
    from attntrace.core import backward as backward_module
    monkeypatch.setattr(backward_module, "softmax_backward", lambda p, dp: p * dp)
    code, out = invoke("grad", CONFIGS / "grad_cross_attention.yaml")
    assert code == 1
    assert "ATT-W230" in out and "✗" in out and "attn.hook_attn_scores_grad" in out


def test_cli_no_verify_and_selection(invoke):
    code, out = invoke("grad", "--no-verify", "--grads", "attn.W_*", "--loss", "sum_squares")
    assert code == 0
    assert "attn.W_q_grad" in out and "hook_embed_grad" not in out and "not verified" in out
    assert "L = ½·Σ out²" in out


def test_cli_bad_input(invoke, write_spec):
    code, out = invoke("grad", SEED_CONFIG, "--grads", "dL/dVV")
    assert code == 2 and "ATT-E015" in out
    code, out = invoke("grad", CONFIGS / "grad_gqa_causal_padding.yaml", "--loss", "upstream")
    assert code == 2 and "grad: {upstream" in out
    code, out = invoke("grad", CONFIGS / "grad_gqa_causal_padding.yaml", "--head", "4")
    assert code == 2 and "ATT-E017" in out
    base = "version: 1\nembeddings: [[1, 0], [0, 1]]\nattention: {W_q: [[1, 0], [0, 1]], W_k: [[1, 0], [0, 1]], " \
           "W_v: [[1, 0], [0, 1]]}\n"
    code, out = invoke("grad", write_spec(base + "grad: {loss: summ}\n"))
    assert code == 2 and "ATT-E003" in out and "did you mean 'sum'" in out and ":4" in out
    code, out = invoke("grad", write_spec(base + "grad: {lost: sum}\n"))
    assert code == 2 and "ATT-E002" in out and "did you mean 'loss'" in out
    code, out = invoke("grad", write_spec(base + "grad: {loss: sum, upstream: [[1, 0], [0, 1]]}\n"))
    assert code == 2 and "either" in out
    bad_upstream = write_spec(base + "grad:\n  upstream: [[1, 2, 3], [4, 5, 6]]\n")
    code, out = invoke("grad", bad_upstream)
    assert code == 3 and "ATT-E130" in out and "(seq_q=2, d_out=2)" in out
    code, out = invoke("grad", bad_upstream, "--format", "json")
    diagnosis = json.loads(out)["diagnoses"][0]
    assert code == 3 and diagnosis["code"] == "ATT-E130" and diagnosis["locations"][0]["line"] == 5


def test_cli_leaves_the_spec_hooks_out(invoke, write_spec):
    spec = write_spec("version: 1\nembeddings: [[1, 0], [0, 1], [1, 1]]\nattention:\n  heads: 2\n"
                      "  W_q: [[1, 0], [0, 1]]\n  W_k: [[1, 0], [0, 1]]\n  W_v: [[1, 2], [3, 4]]\n"
                      "hooks: ['attn.hook_pattern:ablate-head=1']\n")
    code, out = invoke("grad", spec, "--grads", "V")
    assert code == 0, out
    assert "hooks: list is not applied" in out
