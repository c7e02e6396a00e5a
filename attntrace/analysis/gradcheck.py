"""Verify a backward pass by central finite differences, in float64.

For each gradient, cells of the thing it is the gradient of are nudged by ±h
and the *engine* is re-run (not the backward's own formulas): activations are
nudged through a forward hook at their hook point, parameters by re-running a
copy of the spec with the nudged weight.  The numeric derivative of cell i is

    (L(x + h·e_i) − L(x − h·e_i)) / 2h,    h = STEP · max(1, |x_i|)

and the gradient's error is

    max_i |analytic_i − numeric_i| / max(max|analytic|, max|numeric|, FLOOR · loss scale)

i.e. relative to the gradient's largest entry.  The floor stands for what
finite differences can resolve at all: L is a sum of many terms, so
rounding makes L(x ± h) uncertain by about 1e-16·Σ|terms|, which divided
by 2h is noise ~1e-11·Σ|terms| in every numeric entry.  A gradient that is
zero in exact arithmetic (dL/db_k: softmax ignores a per-row shift) would
otherwise measure noise against noise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import numpy as np

from attntrace.analysis.run import run as run_engine
from attntrace.core.backward import GradPoint, GradTrace, loss_value, upstream_gradient
from attntrace.errors import Diagnosis

STEP = 1e-5            # relative finite-difference step
FLOOR = 1e-4           # gradients below FLOOR · loss scale are compared as absolute errors
DEFAULT_TOLERANCE = 1e-6
DEFAULT_CELLS = 64     # cells checked per gradient; bigger gradients are sampled


@dataclass
class GradCheck:
    """The finite-difference verdict on one gradient."""

    name: str
    max_rel_error: float
    max_abs_error: float
    worst: Optional[Tuple[int, ...]]     # index of the cell with the largest error
    checked: int                         # cells compared
    total: int                           # cells in the gradient
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.max_rel_error <= self.tolerance)

    def to_json(self):
        return {"gradient": self.name, "max_rel_error": self.max_rel_error, "max_abs_error": self.max_abs_error,
                "worst_cell": list(self.worst) if self.worst is not None else None, "cells_checked": self.checked,
                "cells": self.total, "tolerance": self.tolerance, "passed": self.passed}


def pick_cells(analytic: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Flat indices to check: every cell when few (limit 0 = all), else a seeded sample that
    always includes the largest entry of the analytic gradient."""
    n = analytic.size
    if limit <= 0 or n <= limit:
        return np.arange(n)
    largest = int(np.argmax(np.abs(analytic)))
    rest = np.random.default_rng(seed).choice(n, size=limit, replace=False)
    return np.unique(np.concatenate([[largest], rest[rest != largest][: limit - 1]]))


class _Loss:
    """L as a function of one nudged activation or parameter, computed by re-running the engine."""

    def __init__(self, grads: GradTrace):
        self.trace = grads.forward
        self.spec = self.trace.spec
        self.kind = grads.loss_kind
        self.upstream = upstream_gradient(self.spec, self.trace.plan) if self.kind == "upstream" else None

    def of_output(self, out: np.ndarray) -> float:
        return loss_value(out, self.kind, self.upstream)

    def with_activation(self, hook: str, flat: int, delta: float) -> float:
        def nudge(array, *, hook):
            array = array.copy()
            array.reshape(-1)[flat] += delta
            return array
        return self._run(self.spec, [(hook, nudge)])

    def with_parameter(self, name: str, flat: int, delta: float) -> float:
        att = self.spec.attention
        original = getattr(att, name)
        data = np.array(original.data, dtype=np.float64)
        data.reshape(-1)[flat] += delta
        nudged = dataclasses.replace(original, data=data)
        spec = dataclasses.replace(self.spec, attention=dataclasses.replace(att, **{name: nudged}))
        return self._run(spec, [])

    def _run(self, spec, hooks) -> float:
        trace = run_engine(spec, hooks=hooks, keep=["hook_attn_out"], dtype="float64", check=False,
                           spec_hooks=False)
        return self.of_output(trace.arrays["hook_attn_out"])

    def base_values(self, point: GradPoint) -> np.ndarray:
        if point.is_parameter:
            return np.asarray(getattr(self.spec.attention, point.of).data, dtype=np.float64)
        return np.asarray(self.trace.arrays[point.of])


def loss_scale(grads: GradTrace) -> float:
    """Σ|dL/dout ⊙ out| (+|L|): how big the terms are that rounding blurs in L."""
    out = np.asarray(grads.forward.arrays["hook_attn_out"], dtype=np.float64)
    dout = grads.grads["hook_attn_out_grad"]
    return float(np.sum(np.abs(dout * out)) + abs(grads.loss))


def check_gradient(grads: GradTrace, point: GradPoint, loss: _Loss, *, cells: int = DEFAULT_CELLS,
                   tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> GradCheck:
    analytic = np.asarray(grads.grads[point.name], dtype=np.float64)
    base = loss.base_values(point)
    chosen = pick_cells(analytic, cells, seed)
    numeric = np.zeros(len(chosen))
    flat_base = base.reshape(-1)
    for n, flat in enumerate(chosen):
        x = float(flat_base[flat])
        if not np.isfinite(x):          # a blocked score (−inf) stays blocked when nudged: no gradient
            continue
        h = STEP * max(1.0, abs(x))
        if point.is_parameter:
            up, down = loss.with_parameter(point.of, int(flat), h), loss.with_parameter(point.of, int(flat), -h)
        else:
            up, down = loss.with_activation(point.of, int(flat), h), loss.with_activation(point.of, int(flat), -h)
        numeric[n] = (up - down) / (2 * h)
    picked = analytic.reshape(-1)[chosen]
    error = np.abs(picked - numeric)
    scale = max(float(np.abs(analytic).max(initial=0.0)), float(np.abs(numeric).max(initial=0.0)),
                FLOOR * max(loss_scale(grads), 1e-300))
    worst = int(np.argmax(error)) if error.size else None
    return GradCheck(point.name, float(error.max(initial=0.0) / scale), float(error.max(initial=0.0)),
                     tuple(int(i) for i in np.unravel_index(int(chosen[worst]), analytic.shape))
                     if worst is not None else None,
                     len(chosen), analytic.size, tolerance)


def check_gradients(grads: GradTrace, *, names: Optional[Iterable[str]] = None, cells: int = DEFAULT_CELLS,
                    tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> List[GradCheck]:
    """The finite-difference check of every gradient (or of `names`), in backward order."""
    wanted = set(names) if names is not None else None
    loss = _Loss(grads)
    return [check_gradient(grads, point, loss, cells=cells, tolerance=tolerance, seed=seed)
            for point in grads.points if wanted is None or point.name in wanted]


def failures(checks: Iterable[GradCheck]) -> List[Diagnosis]:
    """A diagnosis for every gradient the finite differences disagree with."""
    found = []
    for check in checks:
        if check.passed:
            continue
        cell = ", ".join(str(i) for i in check.worst) if check.worst is not None else "-"
        found.append(Diagnosis(
            code="ATT-W230", severity="warning", hook=check.name,
            message=f"{check.name} differs from central finite differences: max relative error "
                    f"{check.max_rel_error:.2e} > tolerance {check.tolerance:g} (worst cell [{cell}], "
                    f"absolute error {check.max_abs_error:.2e})",
            hint="a backward hook that replaces a gradient also makes it disagree; otherwise this is a "
                 "bug in attntrace's backward pass"))
    return found
