"""Verify a backward pass by central finite differences, in float64.

For each gradient, cells of the thing it is the gradient of are nudged by ±h
and the *engine* is re-run (not the backward's own formulas): activations are
nudged through a forward hook at their hook point, parameters by re-running a
copy of the spec with the nudged weight.  The numeric derivative of cell i is

    D(h) = (L(x + h·e_i) − L(x − h·e_i)) / 2h

with h = STEP · max(1, |x_i|) to start with, and chosen per cell from there on:
D(h) = L' + c·h² + …, a peaked softmax has a large c, and one step can miss the
analytic value by more than the tolerance although the gradient is right
(ATT-W230 crying wolf).  So the verdict rests on convergence:
a cell whose D(h) disagrees is refined -- D(h/2), D(h/4) … and their Richardson
extrapolation R = (4·D(h/2) − D(h)) / 3, whose h² error cancels -- until the
estimate agrees with the analytic value or has converged to another value
(successive estimates agree with each other but not with it: a real
disagreement) or rounding noise takes over.  The gradient's error is

    max_i |analytic_i − numeric_i| / max(max|analytic|, max|numeric|, FLOOR · loss scale)

i.e. relative to the gradient's largest entry.  The floor stands for what
finite differences can resolve at all: L is a sum of many terms, so
rounding makes L(x ± h) uncertain by about 1e-16·Σ|terms|, which divided
by 2h is noise ~1e-11·Σ|terms| in every numeric entry.  A gradient that is
zero in exact arithmetic (dL/db_k: softmax ignores a per-row shift) would
otherwise measure noise against noise.

Long checks report progress through a callback (``attntrace grad`` draws a bar
on a terminal's stderr).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np

from attntrace.analysis.run import rerun
from attntrace.core.backward import GradPoint, GradTrace, loss_value, upstream_gradient
from attntrace.errors import Diagnosis

STEP = 1e-5            # relative finite-difference step
FLOOR = 1e-4           # gradients below FLOOR · loss scale are compared as absolute errors
DEFAULT_TOLERANCE = 1e-6
DEFAULT_CELLS = 64     # cells checked per gradient; bigger gradients are sampled
REFINEMENTS = 6        # halvings of h tried for a cell whose first estimate disagrees
Progress = Callable[[int, int, str], None]       # (cells done, cells in all, gradient being checked)


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
    refined: int = 0                     # cells whose first step disagreed and were refined (Richardson)
    finite: bool = True                  # False: the gradient or the loss holds NaN/inf -- nothing to compare

    @property
    def passed(self) -> bool:
        return bool(self.finite and self.max_rel_error <= self.tolerance)

    def to_json(self):
        return {"gradient": self.name, "max_rel_error": self.max_rel_error, "max_abs_error": self.max_abs_error,
                "worst_cell": list(self.worst) if self.worst is not None else None, "cells_checked": self.checked,
                "cells": self.total, "tolerance": self.tolerance, "passed": self.passed,
                "cells_refined": self.refined, "finite": self.finite}


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
        # the bare execution (no re-diagnosis of the unchanged shapes, no checks); keeping every array
        # (references, dropped at once) spares the previews of arrays not kept
        return self.of_output(rerun(spec, keep="all", dtype="float64", hooks=hooks)["hook_attn_out"])

    def central(self, point: GradPoint, flat: int, h: float) -> float:
        """D(h) for one cell: the central difference of L."""
        nudge = self.with_parameter if point.is_parameter else self.with_activation
        return (nudge(point.of, flat, h) - nudge(point.of, flat, -h)) / (2 * h)

    def base_values(self, point: GradPoint) -> np.ndarray:
        if point.is_parameter:
            return np.asarray(getattr(self.spec.attention, point.of).data, dtype=np.float64)
        return np.asarray(self.trace.arrays[point.of])


def loss_scale(grads: GradTrace) -> float:
    """Σ|dL/dout ⊙ out| (+|L|): how big the terms are that rounding blurs in L."""
    out = np.asarray(grads.forward.arrays["hook_attn_out"], dtype=np.float64)
    dout = grads.grads["hook_attn_out_grad"]
    return float(np.sum(np.abs(dout * out)) + abs(grads.loss))


@dataclass
class Estimate:
    """A numeric derivative of one cell, and how it was reached."""

    value: float
    uncertainty: float          # |D(h/2) − D(h)| / 3: what is left of the h² error (inf after one step)
    refined: bool = False


def derivative(loss: _Loss, point: GradPoint, flat: int, h: float, target: float, allowed: float) -> Estimate:
    """The cell's derivative by central differences, refined while it disagrees with `target`.

    One step when D(h) is within `allowed` of the analytic value.  Otherwise h is halved and
    D(h/2) extrapolated with D(h) (Richardson: the h² terms cancel); this repeats until the
    estimate agrees, or has converged elsewhere (successive estimates closer to each other than
    to the target: a real disagreement), or stops improving (rounding noise)."""
    previous = loss.central(point, flat, h)
    if abs(previous - target) <= allowed:
        return Estimate(previous, float("inf"))
    best = Estimate(previous, float("inf"), refined=True)
    for _ in range(REFINEMENTS):
        h /= 2
        current = loss.central(point, flat, h)
        extrapolated = (4 * current - previous) / 3
        uncertainty = abs(current - previous) / 3
        if uncertainty >= best.uncertainty and np.isfinite(best.uncertainty):
            break                                # halving h no longer helps: rounding noise dominates
        best = Estimate(extrapolated, uncertainty, refined=True)
        if abs(extrapolated - target) <= allowed or uncertainty <= allowed / 100:
            break                                # agrees, or converged to something else
        previous = current
    return best


def check_gradient(grads: GradTrace, point: GradPoint, loss: _Loss, *, cells: int = DEFAULT_CELLS,
                   tolerance: float = DEFAULT_TOLERANCE, seed: int = 0,
                   progress: Optional[Callable[[int], None]] = None) -> GradCheck:
    analytic = np.asarray(grads.grads[point.name], dtype=np.float64)
    base = loss.base_values(point)
    chosen = pick_cells(analytic, cells, seed)
    if not (np.isfinite(analytic).all() and np.isfinite(grads.loss)):
        # a check can only pass on finite values: an overflowed forward pass leaves nothing to compare
        if progress is not None:
            progress(len(chosen))
        return GradCheck(point.name, float("nan"), float("nan"), None, 0, analytic.size, tolerance, finite=False)
    flat_base = base.reshape(-1)
    flat_analytic = analytic.reshape(-1)
    floor = FLOOR * max(loss_scale(grads), 1e-300)
    scale = max(float(np.abs(analytic).max(initial=0.0)), floor)
    numeric = np.zeros(len(chosen))
    refined = 0
    for n, flat in enumerate(chosen):
        x = float(flat_base[flat])
        if np.isfinite(x):              # a blocked score (−inf) stays blocked when nudged: no gradient
            h = STEP * max(1.0, abs(x))           # the first step; refinement halves it where needed
            estimate = derivative(loss, point, int(flat), h, float(flat_analytic[flat]), tolerance * scale)
            numeric[n] = estimate.value
            refined += estimate.refined
        if progress is not None:
            progress(1)
    picked = flat_analytic[chosen]
    error = np.abs(picked - numeric)
    scale = max(scale, float(np.abs(numeric).max(initial=0.0)))
    worst = int(np.argmax(error)) if error.size else None
    return GradCheck(point.name, float(error.max(initial=0.0) / scale), float(error.max(initial=0.0)),
                     tuple(int(i) for i in np.unravel_index(int(chosen[worst]), analytic.shape))
                     if worst is not None else None,
                     len(chosen), analytic.size, tolerance, refined)


def cells_to_check(grads: GradTrace, names: Optional[Iterable[str]] = None, cells: int = DEFAULT_CELLS) -> int:
    """How many cells a check will nudge (each costs two or more runs of the engine)."""
    wanted = set(names) if names is not None else None
    return sum(len(pick_cells(np.asarray(grads.grads[p.name]), cells)) for p in grads.points
               if wanted is None or p.name in wanted)


def check_gradients(grads: GradTrace, *, names: Optional[Iterable[str]] = None, cells: int = DEFAULT_CELLS,
                    tolerance: float = DEFAULT_TOLERANCE, seed: int = 0,
                    progress: Optional[Progress] = None) -> List[GradCheck]:
    """The finite-difference check of every gradient (or of `names`), in backward order.

    progress(done, total, gradient) is called after every cell (for a progress bar)."""
    wanted = set(names) if names is not None else None
    loss = _Loss(grads)
    points = [point for point in grads.points if wanted is None or point.name in wanted]
    total = cells_to_check(grads, [p.name for p in points], cells)
    done = 0
    results = []
    for point in points:
        def advance(count: int, name: str = point.name) -> None:
            nonlocal done
            done += count
            progress(done, total, name)
        with np.errstate(all="ignore"):          # nudged runs near the float limit may overflow: no warnings
            results.append(check_gradient(grads, point, loss, cells=cells, tolerance=tolerance, seed=seed,
                                          progress=advance if progress is not None else None))
    return results


def failures(checks: Iterable[GradCheck]) -> List[Diagnosis]:
    """A diagnosis for every gradient the finite differences disagree with."""
    found = []
    for check in checks:
        if check.passed:
            continue
        if not check.finite:
            found.append(Diagnosis(
                code="ATT-W204", severity="warning", hook=check.name,
                message=f"{check.name} holds NaN/inf (or the loss does): finite differences cannot check it",
                hint="the forward pass overflowed or produced NaN (see its ATT-W204); gradients of a "
                     "non-finite loss say nothing"))
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
