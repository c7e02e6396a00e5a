"""Gradient checks that do not cry wolf: refinement by Richardson extrapolation, a verdict on
convergence, and progress for long checks (issue 10)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CONFIGS, ROOT

from attntrace.analysis import gradcheck
from attntrace.analysis.gradcheck import Estimate, check_gradients, derivative, failures
from attntrace.analysis.run import run
from attntrace.core.backward import backward


def integer_spec(seed: int):
    """Hand-written style: small integers make peaked softmaxes (rows near one-hot)."""
    rng = np.random.default_rng(seed)
    weight = lambda: rng.integers(-3, 4, size=(3, 2)).astype(float)  # noqa: E731
    return {"version": 1, "embeddings": rng.integers(-9, 10, size=(3, 3)).astype(float),
            "attention": {"heads": 1, "W_q": weight(), "W_k": weight(), "W_v": weight()}}


def grads_of(spec, hooks=()):
    return backward(run(spec, keep="all", dtype="float64", spec_hooks=False), hooks=hooks)


class Exponential:
    """A stand-in for the engine: L(x + δ) = exp(k·(x + δ)), whose third derivative is huge for big k."""

    def __init__(self, x: float, k: float):
        self.x, self.k, self.calls = x, k, 0

    def central(self, point, flat, h):
        self.calls += 2
        return (math.exp(self.k * (self.x + h)) - math.exp(self.k * (self.x - h))) / (2 * h)


@pytest.mark.parametrize("k", [1.0, 50.0, 400.0])
def test_refinement_converges_to_the_true_derivative(k):
    x = 0.01
    exact = k * math.exp(k * x)
    loss = Exponential(x, k)
    estimate = derivative(loss, None, 0, 1e-3, exact, 1e-8 * abs(exact))
    assert abs(estimate.value - exact) <= 1e-8 * abs(exact)
    one_step = loss.central(None, 0, 1e-3)
    assert (abs(one_step - exact) > 1e-8 * abs(exact)) == estimate.refined      # refined only when needed


def test_refinement_does_not_converge_to_a_wrong_value():
    k, x = 50.0, 0.01
    exact = k * math.exp(k * x)
    wrong = exact * (1 + 1e-5)                  # an analytic gradient off by 1e-5: must stay a disagreement
    estimate = derivative(Exponential(x, k), None, 0, 1e-3, wrong, 1e-7 * abs(exact))
    assert estimate.refined and abs(estimate.value - wrong) > 1e-7 * abs(exact)
    assert abs(estimate.value - exact) < 1e-8 * abs(exact)
    assert isinstance(estimate, Estimate)


@pytest.mark.parametrize("seed", [3, 9])
def test_peaked_softmax_is_no_false_alarm(seed, monkeypatch):
    """These specs cried wolf with one step of h = 1e-5·max(1, |x|); the gradients are right."""
    grads = grads_of(integer_spec(seed))
    checks = check_gradients(grads, cells=8)
    assert failures(checks) == [] and sum(c.refined for c in checks) > 0
    monkeypatch.setattr(gradcheck, "REFINEMENTS", 0)          # one step only: the old verdict
    assert failures(check_gradients(grads, cells=8)) != []


def test_a_gradient_wrong_by_one_part_in_ten_thousand_is_still_caught():
    spec = integer_spec(3)
    nudged = grads_of(spec, hooks=[("attn.hook_v_grad", lambda grad, *, hook: grad * (1 + 1e-4))])
    by_name = {c.name: c for c in check_gradients(nudged, cells=8)}
    assert not by_name["attn.hook_v_grad"].passed
    assert by_name["attn.hook_pattern_grad"].passed          # upstream of the hook: untouched


def test_progress_reports_every_cell():
    grads = grads_of(integer_spec(9))
    calls = []
    check_gradients(grads, cells=4, progress=lambda done, total, what: calls.append((done, total, what)))
    total = gradcheck.cells_to_check(grads, cells=4)
    assert [c[0] for c in calls] == list(range(1, total + 1)) and {c[1] for c in calls} == {total}
    assert calls[-1][2] == grads.points[-1].name


def test_grad_draws_progress_on_a_terminal_and_nothing_when_piped(tmp_path):
    import pty
    spec = CONFIGS / "grad_seed000_value_gradient.yaml"
    command = [sys.executable, "-m", "attntrace", "grad", str(spec), "--format", "json"]
    piped = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=terminal, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, TERM="xterm", COLUMNS="100"))
    os.close(terminal)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:           # the terminal closed: the process is done
                break
            if not chunk:
                break
            seen += chunk
        process.wait(timeout=120)
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert b"finite differences" in seen


@pytest.mark.skipif(not (CONFIGS / "seed004_batch_multihead.yaml").exists(), reason="no seed 004 config")
def test_seed004_cells_are_counted_before_the_check():
    """`grad --cells 0` on seed 004 nudges every cell: the count a progress bar shows up front."""
    grads = grads_of(str(CONFIGS / "seed004_batch_multihead.yaml"))
    assert gradcheck.cells_to_check(grads, cells=0) == sum(grads.grads[p.name].size for p in grads.points)
