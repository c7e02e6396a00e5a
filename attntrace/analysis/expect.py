"""Checking a hand calculation: a spec's `expect:` against the true trace.

Under ``expect:`` each key is a hook name or an alias (Q, K, V, scores, scaled,
weights, output ...), written in one of these forms::

    scores: [[10, 58, 106], [58, 234, 410], [106, 410, 714]]   # the whole matrix, as written
    weights: {row: 机票, values: [0.05, 0.08, ...]}              # one row (index or token)
    weights: {col: C, values: [1, 1, 1]}                         # one column
    output: {cell: [B, 1], value: 20}                            # one cell: [row, column]
    Q: {head: 1, values: [[...]]}                                # one head (and `batch:`)
    weights:                                                     # several partial checks
      - {row: 0, values: [0, 0, 1]}
      - {cell: [2, 2], value: 1, decimals: 3}                    # with its own tolerance
    atol: 0.01          # |written - true| <= atol + rtol·|true|  (for every entry)
    rtol: 0.001
    decimals: 2         # written values are the true ones rounded: atol = 0.5·10⁻²

Matrices are written the way people write them by hand: batch and head axes
are left out when there is only one.  The comparison names the first step
where the hand calculation diverges; then it re-runs attention with the hand's
values patched in at that step, so later differences that merely carry the
error forward are told apart from new mistakes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from attntrace.analysis.cells import axis_label, cell_label
from attntrace.errors import Diagnosis, Location, ShapeError, input_error
from attntrace.hookpoints import point_of
from attntrace.inputs.expectations import Coordinate, Expectation
from attntrace.text import did_you_mean

ROUNDING_SLACK = 1e-9          # 0.05 written for a true 0.045 is "2 decimals" despite float error


# =========================================================================== comparing

@dataclass
class Mismatch:
    index: Tuple[int, ...]              # in the hook's full array
    label: str                          # "[B, C]", "head 1 [机票, 订了]"
    written: float
    true: float
    carried_from: Optional[str] = None  # an earlier divergence that explains this cell

    @property
    def abs_diff(self) -> float:
        return abs(self.written - self.true)

    def to_json(self) -> Dict[str, Any]:
        return {"index": list(self.index), "cell": self.label, "written": self.written, "true": self.true,
                "abs_diff": self.abs_diff, "carried_from": self.carried_from}


@dataclass
class Grid:
    """A 2-D slice of a comparison, ready to draw: written vs true with labels."""

    title: str
    written: np.ndarray
    true: np.ndarray
    close: np.ndarray
    carried: np.ndarray                 # True where a mismatch follows from an earlier one
    row_labels: List[str]
    col_labels: List[str]


@dataclass
class Comparison:
    expectation: Expectation
    step: Any                           # plan.Step
    region: Tuple                       # index into the full array: ints and slice(None)
    axes: Tuple[str, ...]               # axis names of the compared region
    written: np.ndarray                 # shaped like the region
    true: np.ndarray
    close: np.ndarray
    tolerance: Dict[str, float]
    mismatches: List[Mismatch] = field(default_factory=list)
    labels: List[List[str]] = field(default_factory=list)     # per region axis
    fixed: str = ""                     # the fixed coordinates: "row 机票", "head 1"

    @property
    def name(self) -> str:
        return self.expectation.written_as

    @property
    def hook(self) -> str:
        return self.expectation.hook

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def new_mismatches(self) -> List[Mismatch]:
        return [m for m in self.mismatches if m.carried_from is None]

    @property
    def what(self) -> str:
        return f"{self.name} {self.fixed}".strip()

    def grids(self) -> Iterator[Grid]:
        """2-D views: a cell is 1×1, a row 1×n, a matrix itself; more axes become one grid each."""
        carried = np.zeros(self.written.shape, dtype=bool)
        for m in self.mismatches:
            if m.carried_from is not None:
                carried[self._position(m.index)] = True
        arrays = [self.written, self.true, self.close, carried]
        labels = list(self.labels)
        if self.written.ndim == 0:
            arrays = [a.reshape(1, 1) for a in arrays]
            labels = [[self.fixed or self.name], [""]]
        elif self.written.ndim == 1:
            arrays = [a.reshape(1, -1) for a in arrays]
            labels = [[self.fixed or self.name]] + labels
        lead = arrays[0].shape[:-2]
        for outer in np.ndindex(*lead):
            title = " · ".join(labels[i][j] for i, j in enumerate(outer))
            yield Grid(title, *(a[outer] for a in arrays), row_labels=labels[-2], col_labels=labels[-1])

    def row_sum_notes(self) -> List[str]:
        """Written weight rows that cannot be softmax outputs because they do not sum to 1."""
        if self.hook != "attn.hook_pattern" or not self.axes or self.axes[-1] != "seq_k":
            return []
        sums = self.written.sum(axis=-1)
        width = self.written.shape[-1]
        slack = self.tolerance.get("atol", 0.0) * width + self.tolerance.get("rtol", 0.0) + 1e-9
        notes = []
        for position in np.ndindex(*sums.shape):
            if abs(sums[position] - 1.0) > slack:
                names = [self.labels[i][j] for i, j in enumerate(position)]
                names = [f"row {names[-1]}"] + names[:-1] if names else [self.fixed]
                notes.append(f"written {self.name} {' '.join(names)} sums to {sums[position]:.4g}, "
                             "not 1: softmax weights always sum to 1")
        return notes

    def _position(self, index: Tuple[int, ...]) -> Tuple[int, ...]:
        return tuple(i for i, r in zip(index, self.region) if isinstance(r, slice))

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "hook": self.hook, "step": self.step.label, "select": self.fixed,
                "axes": list(self.axes), "tolerance": self.tolerance, "cells": int(self.written.size),
                "mismatched": len(self.mismatches), "ok": self.ok, "written": self.written, "true": self.true,
                "mismatches": [m.to_json() for m in self.mismatches]}


def cells_close(written: np.ndarray, true: np.ndarray, tolerance: Dict[str, float]) -> np.ndarray:
    """|written - true| <= atol + rtol·|true|; equal infinities match, NaN never does."""
    written = np.asarray(written, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    atol = tolerance.get("atol", 0.0) * (1 + ROUNDING_SLACK)
    rtol = tolerance.get("rtol", 0.0)
    with np.errstate(invalid="ignore"):
        near = np.isfinite(true) & (np.abs(written - true) <= atol + rtol * np.abs(true))
    return near | (written == true)


def tolerance_text(tolerance: Dict[str, float]) -> str:
    if tolerance.get("decimals") is not None:
        text = f"{int(tolerance['decimals'])} decimals"
        return text + (f", rtol {tolerance['rtol']:g}" if tolerance.get("rtol") else "")
    parts = [f"{key} {tolerance[key]:g}" for key in ("atol", "rtol") if tolerance.get(key)]
    return ", ".join(parts) or "exact"


def entry_tolerance(spec_tolerance: Dict[str, float], own: Optional[Dict[str, float]]) -> Dict[str, float]:
    merged = dict(spec_tolerance)
    if own:
        if "atol" in own and "decimals" not in own:
            merged.pop("decimals", None)
        merged.update(own)
    return merged


def compare(expectation: Expectation, trace, spec_tolerance: Dict[str, float]) -> Comparison:
    """Compare one expectation with the trace (which must keep the hook's array)."""
    plan, spec = trace.plan, trace.spec
    if expectation.hook not in plan.hooks:
        raise input_error("ATT-E066", f"expect.{expectation.written_as}: this run has no step "
                                      f"{expectation.hook}", expectation.expected.location,
                          hint="`attntrace hooks SPEC` lists the steps of a spec")
    step = plan.step_for_hook(expectation.hook)
    full = trace.arrays[expectation.hook]
    region = _region(expectation, step, full.shape, spec)
    true = full[region]
    kept = [i for i, r in enumerate(region) if isinstance(r, slice)]
    axes = tuple(step.axes[i] for i in kept)
    written = _fit(expectation, true.shape, axes)
    tolerance = entry_tolerance(spec_tolerance, expectation.tolerance)
    close = cells_close(written, true, tolerance)
    labels = [[axis_label(step.axes[i], j, spec.tokens, spec.key_tokens) if step.axes[i] not in
               ("batch", "n_heads", "n_kv_heads") else f"{'batch' if i == 0 else 'head'} {j}"
               for j in range(full.shape[i])] for i in kept]
    comparison = Comparison(expectation, step, region, axes, written, np.asarray(true), close, tolerance,
                            labels=labels, fixed=_fixed_text(expectation, region, step, spec))
    for position in (p for p in np.ndindex(*close.shape) if not close[p]):
        index = _full_index(region, position)
        comparison.mismatches.append(Mismatch(
            index, cell_label(expectation.hook, index, full.shape, spec.tokens, spec.key_tokens),
            float(written[position]), float(true[position])))
    return comparison


def _region(expectation: Expectation, step, shape: Sequence[int], spec) -> Tuple:
    row_axis, col_axis, head_axis = point_of(step.hook).display
    region: List[Any] = [slice(None)] * len(shape)
    for i, axis in enumerate(step.axes):
        if axis == "1":
            region[i] = 0
    for key, axis in (("batch", 0), ("head", head_axis), ("row", row_axis), ("col", col_axis)):
        coord = expectation.select.get(key)
        if coord is None:
            if key in ("batch", "head") and axis is not None and shape[axis] == 1:
                region[axis] = 0                    # written by hand without a size-1 axis
            continue
        if axis is None or (key == "head" and step.axes[axis] == "1"):
            raise input_error("ATT-E066", f"expect.{expectation.written_as}: {step.hook} has no head axis",
                              coord.location)
        region[axis] = _index(coord, step.axes[axis], shape[axis], spec, key, expectation.written_as)
    return tuple(region)


def _index(coord: Coordinate, axis: str, size: int, spec, key: str, name: str) -> int:
    value = coord.value
    if isinstance(value, str):
        tokens = spec.tokens if axis == "seq_q" else spec.key_tokens if axis == "seq_k" else None
        if tokens is not None and value in tokens:
            found = [i for i, t in enumerate(tokens) if t == value]
            if len(found) > 1:
                raise input_error("ATT-E066", f"expect.{name}: token '{value}' appears at positions "
                                              f"{', '.join(map(str, found))}", coord.location,
                                  hint=f"write the position instead, e.g. {key}: {found[-1]}")
            return found[0]
        number = re.fullmatch(r"[dc]?(\d+)", value.strip())
        if number is None:
            hint = did_you_mean(value, tokens or [], otherwise=f"the tokens are: {' '.join(tokens)}" if tokens
                                else f"{axis} is indexed by numbers from 0")
            raise input_error("ATT-E066", f"expect.{name}: no {key} '{value}' on the {axis} axis",
                              coord.location, hint=hint)
        value = int(number.group(1))
    if value >= size:
        raise input_error("ATT-E066", f"expect.{name}: {key} {value} is out of range; {axis} has {size} "
                                      f"position(s), 0–{size - 1}", coord.location)
    return int(value)


def _fit(expectation: Expectation, shape: Tuple[int, ...], axes: Tuple[str, ...]) -> np.ndarray:
    written = expectation.expected.data.astype(np.float64)
    if written.shape == shape:
        return written
    if written.size == int(np.prod(shape)) and tuple(s for s in written.shape if s != 1) == \
            tuple(s for s in shape if s != 1):
        return written.reshape(shape)
    named = "(" + ", ".join(f"{a}={s}" for a, s in zip(axes, shape)) + ")"
    raise ShapeError(Diagnosis(
        "ATT-E160", f"expect.{expectation.written_as}: the written values have shape {tuple(written.shape)}, "
                    f"but {'the selected part of ' if expectation.select else ''}{expectation.hook} is {named}",
        hook=expectation.hook, locations=[expectation.expected.location],
        hint="write the matrix as the trace shows it (batch and head axes left out when there is one), "
             "or check one row with {row: N, values: [...]}"))


def _full_index(region: Tuple, position: Tuple[int, ...]) -> Tuple[int, ...]:
    it = iter(position)
    return tuple(int(next(it)) if isinstance(r, slice) else int(r) for r in region)


def _fixed_text(expectation: Expectation, region: Tuple, step, spec) -> str:
    parts = []
    for key in ("batch", "head", "row", "col"):
        coord = expectation.select.get(key)
        if coord is not None:
            parts.append(f"{'column' if key == 'col' else key} {coord.value}")
    return ", ".join(parts)


# =========================================================================== the report

@dataclass
class ExpectReport:
    comparisons: List[Comparison]                      # in step order
    origins: List[Comparison] = field(default_factory=list)   # where new mistakes start
    spec: Any = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    @property
    def first(self) -> Optional[Tuple[Comparison, Mismatch]]:
        for comparison in self.origins:
            if comparison.new_mismatches:
                return comparison, comparison.new_mismatches[0]
        return None

    def diagnosis(self) -> Optional[Diagnosis]:
        first = self.first
        if first is None:
            return None
        origin, cell = first
        details = []
        for c in self.comparisons:
            if c.ok:
                continue
            new, carried = len(c.new_mismatches), len(c.mismatches) - len(c.new_mismatches)
            text = f"{c.what} (step {c.step.number}): {len(c.mismatches)} of {c.written.size} cell(s) differ"
            if carried:
                sources = sorted({m.carried_from for m in c.mismatches if m.carried_from})
                text += f"; {carried} carried over from {', '.join(sources)}"
                if new:
                    text += f", {new} new"
            details.append(text)
            details.extend(c.row_sum_notes())
        carried_total = sum(len(c.mismatches) - len(c.new_mismatches) for c in self.comparisons)
        hint = f"tolerance: {tolerance_text(origin.tolerance)}"
        if carried_total:
            hint = (f"{carried_total} later difference(s) only carry an earlier one forward: fix the first; "
                    + hint)
        location = self._cell_location(origin, cell)
        return Diagnosis(
            "ATT-E067", f"the hand calculation first diverges at step {origin.step.label} ({origin.name}), "
                        f"cell {cell.label}: written {number(cell.written)}, true {number(cell.true)}",
            step=origin.step.label, hook=origin.hook, locations=[location] if location else [],
            details=details, hint=hint)

    def _cell_location(self, comparison: Comparison, cell: Mismatch) -> Optional[Location]:
        """The line of the written cell itself (the values' line for arrays loaded from files)."""
        expectation = comparison.expectation
        if self.spec is None or not expectation.path:
            return expectation.expected.location
        flat = int(np.ravel_multi_index(comparison._position(cell.index), comparison.written.shape)) \
            if comparison.written.ndim else 0
        as_written = np.unravel_index(flat, expectation.expected.data.shape) if expectation.expected.data.ndim else ()
        return self.spec.locate(list(expectation.path) + [int(i) for i in as_written])

    def to_json(self) -> Dict[str, Any]:
        first = self.first
        diagnosis = self.diagnosis()
        return {"ok": self.ok, "diagnosis": diagnosis.to_json() if diagnosis else None,
                "first_divergence": None if first is None else {
                    "step": first[0].step.label, "hook": first[0].hook, "name": first[0].name, **first[1].to_json()},
                "expectations": [c.to_json() for c in self.comparisons]}


def number(value: float) -> str:
    return f"{value:.6g}" if np.isfinite(value) else ("-inf" if value < 0 else "inf" if value > 0 else "nan")


def check_expectations(spec, trace=None, *, hooks: Sequence = (), dtype: str = "float64") -> ExpectReport:
    """Compare every expectation of `spec` with the true trace and find where the hand diverges.

    trace: a trace already run (its kept arrays are used); otherwise attention is run here.
    hooks: the run's extra hooks (so the expectations see the same activations).
    """
    from attntrace.analysis.run import run
    needed = {e.hook for e in spec.expect}
    if trace is None:
        trace = run(spec, hooks=hooks, keep=needed, dtype=dtype, check=False)
    elif not needed <= set(trace.arrays):
        trace = run(spec, hooks=_quiet_hooks(spec, hooks), spec_hooks=False, keep=needed,
                    dtype=trace.dtype, check=False)
    comparisons = sorted((compare(e, trace, spec.tolerance) for e in spec.expect),
                         key=lambda c: c.step.number)
    report = ExpectReport(comparisons, spec=spec)
    _trace_divergences(spec, report, hooks, trace.dtype)
    return report


def _quiet_hooks(spec, hooks: Sequence) -> List:
    """The run's hooks without print/save: for re-runs nobody should see."""
    from attntrace.analysis.actions import hooks_from_spec, without_side_effects
    return without_side_effects(hooks_from_spec(spec)) + without_side_effects(hooks)


def _trace_divergences(spec, report: ExpectReport, hooks: Sequence, dtype: str) -> None:
    """Mark which mismatches are new mistakes and which only carry an earlier one forward.

    The earliest step with a mismatch is an origin.  Attention is re-run with the
    hand's values patched in at that step; a later mismatch whose written value
    agrees with the patched run follows from the origin.  What remains starts
    the next origin, until every mismatch is explained.
    """
    from attntrace.analysis.run import run
    pending = [c for c in report.comparisons if not c.ok]
    patches: List = []
    base = None
    while pending:
        step_number = pending[0].step.number
        at_origin = [c for c in pending if c.step.number == step_number]
        report.origins.extend(at_origin)
        patches += [(c.hook, _patch(c)) for c in report.comparisons if c.step.number == step_number]
        later = [c for c in pending if c.step.number > step_number]
        if not later:
            return
        base = _quiet_hooks(spec, hooks) if base is None else base
        patched = run(spec, hooks=base + patches, spec_hooks=False, keep={c.hook for c in later},
                      dtype=dtype, check=False)
        for c in later:
            follows = patched.arrays[c.hook]
            for m in c.new_mismatches:
                if cells_close(np.array(m.written), np.array(follows[m.index]), c.tolerance):
                    m.carried_from = at_origin[0].name
        pending = [c for c in later if c.new_mismatches]


def _patch(comparison: Comparison):
    region, written = comparison.region, comparison.written

    def hand_values(array, *, hook):
        out = array.copy()
        out[region] = written.astype(bool) if array.dtype == bool else written
        return out
    return hand_values
