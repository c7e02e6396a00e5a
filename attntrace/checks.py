"""Invariant checks that run with every trace (cheap: one pass over an array).

Each check returns a list of diagnoses (empty when clean) or None when it
does not apply (no mask, say).  It sees the live arrays of the run through a :class:`CheckContext`
right after its step, so it works even when the engine does not keep the
array.  A violation is a warning :class:`~attntrace.errors.Diagnosis`
(``ATT-W2xx``); ``--strict`` turns warnings into a failure.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import Diagnosis

ROW_SUM_TOLERANCE = {"float64": 1e-9, "float32": 1e-5}


class CheckContext:
    def __init__(self, plan, values: Dict[str, np.ndarray], trace, spec=None):
        self.plan = plan
        self.values = values          # step key -> live array (may be reused in place later)
        self.trace = trace            # stats, previews and kept arrays of the steps so far
        self.spec = spec

    def stats(self, key: str):
        return self.trace.stats[self.plan.step(key).hook]

    def corner(self, key: str, array: Optional[np.ndarray] = None) -> np.ndarray:
        """The preview corner of a step's result, as it was when the step finished."""
        from .engine import PREVIEW_EDGE
        from .stats import preview
        from .trace import DISPLAY_AXES
        hook = self.plan.step(key).hook
        if array is None:
            if hook in self.trace.previews:
                return self.trace.previews[hook].values
            array = self.trace.arrays[hook]
        rows, cols, _ = DISPLAY_AXES[hook]
        return preview(array, rows, cols, PREVIEW_EDGE).values

    def warn(self, code: str, key: str, message: str, **extra) -> Diagnosis:
        step = self.plan.step(key)
        return Diagnosis(code=code, severity="warning", step=step.label, hook=step.hook,
                         message=message, **extra)

    def token_q(self, i: int) -> str:
        tokens = self.spec.tokens if self.spec else []
        return f"{i} '{tokens[i]}'" if i < len(tokens) else str(i)


def describes(text: str):
    """Name what a check verifies, for the ✓ lines of a clean run."""
    def mark(fn):
        fn.describes = text
        return fn
    return mark


def _where(index) -> str:
    b, h, q = (int(i) for i in index)
    return f"batch {b}, head {h}, query {q}" if b else f"head {h}, query {q}"


@describes("every row of weights sums to 1")
def pattern_rows_sum_to_one(ctx: CheckContext) -> List[Diagnosis]:
    pattern = ctx.values["pattern"]
    sums = pattern.sum(axis=-1, dtype=np.float64)
    live = sums > 0 if "mask" in ctx.values else np.ones_like(sums, dtype=bool)  # fully masked rows are 0
    error = np.where(live, np.abs(sums - 1.0), 0.0)
    tol = ROW_SUM_TOLERANCE.get(str(pattern.dtype), 1e-5)
    if not (error > tol).any():
        return []
    worst = np.unravel_index(int(np.nanargmax(error)), error.shape)
    bad = int((error > tol).sum())
    col_sums = pattern.sum(axis=-2, dtype=np.float64)
    detail = ["each column sums to 1 instead: softmax ran over seq_q, not seq_k"] \
        if np.allclose(col_sums, 1.0, atol=tol * 10) else []
    return [ctx.warn("ATT-W201", "pattern", f"{bad} row(s) of weights do not sum to 1 "
                     f"(worst: {sums[worst]:.6g} at {_where(worst)})", details=detail,
                     hint="softmax must normalise over the key axis (axis=-1)")]


@describes("masked positions get exactly zero weight")
def masked_weights_are_zero(ctx: CheckContext) -> List[Diagnosis]:
    keep = ctx.values.get("mask")
    if keep is None:
        return None
    pattern = ctx.values["pattern"]
    blocked = ~keep
    # no copy of the weights: the largest (and, if any weight is negative, the
    # smallest) blocked weight must be 0
    clean = np.max(pattern, where=blocked, initial=0.0) == 0 and (
        ctx.stats("pattern").min >= 0 or np.min(pattern, where=blocked, initial=0.0) == 0)
    if clean:
        return []
    leak = np.where(keep, 0.0, np.abs(pattern))
    worst = np.unravel_index(int(leak.argmax()), leak.shape)
    return [ctx.warn("ATT-W202", "pattern", f"{int((leak > 0).sum())} masked position(s) got weight; "
                     f"largest {leak[worst]:.4g} at {_where(worst[:3])}, key {int(worst[3])}",
                     hint="apply the mask to the scores before softmax, with -inf (or a large "
                          "negative number) where attending is blocked")]


@describes("every query may attend to at least one key")
def fully_masked_rows(ctx: CheckContext) -> List[Diagnosis]:
    keep = ctx.values.get("mask")
    if keep is None:
        return None
    empty = ~keep.any(axis=-1)              # (batch or 1, 1, seq_q)
    if not empty.any():
        return []
    rows = sorted({int(q) for q in np.argwhere(empty)[:, -1]})
    names = ", ".join(ctx.token_q(q) for q in rows[:8]) + (" ..." if len(rows) > 8 else "")
    return [ctx.warn("ATT-W203", "pattern", f"query row(s) {names} may attend to no key; "
                     "their weights are all 0 (as PyTorch's safe softmax), not NaN",
                     hint="check the mask: every query usually needs at least one visible key")]


@describes("scores are scaled by the planned factor")
def scale_matches_plan(ctx: CheckContext) -> List[Diagnosis]:
    # qk's buffer may already hold the scaled values (in place): compare corners
    qk, scaled = ctx.corner("qk"), ctx.corner("scaled", ctx.values["scaled"])
    expected = ctx.plan.scale
    if ctx.plan.positional == "alibi":
        return None
    nonzero = np.abs(qk) > 1e-12
    if not nonzero.any():
        return []
    ratio = scaled[nonzero] / qk[nonzero]
    actual = float(np.median(ratio))
    if abs(actual - expected) <= 1e-6 * max(abs(expected), 1.0):
        return []
    d_head = ctx.plan.size("d_head")
    return [ctx.warn("ATT-W205", "scaled", f"scores were scaled by {actual:.6g}, the plan says "
                     f"{expected:.6g} ({ctx.plan.scale_text}, d_head={d_head})",
                     hint=f"the standard scale is 1/√d_head = {d_head ** -0.5:.6g}, not 1/√d_model")]


def no_nonfinite(key: str) -> Callable[[CheckContext], List[Diagnosis]]:
    @describes(f"no NaN or inf in {key}")
    def check(ctx: CheckContext) -> List[Diagnosis]:
        stats = ctx.stats(key)
        # -inf is how blocked positions look before softmax: allowed in masked scores
        allowed_neginf = key == "attn_scores"
        if not (stats.nan or stats.posinf or (stats.neginf and not allowed_neginf)):
            return []
        array = ctx.values[key]
        bad = np.isnan(array) | np.isposinf(array)
        if not allowed_neginf:
            bad |= np.isneginf(array)
        index = [int(i) for i in np.argwhere(bad)[0]]
        return [ctx.warn("ATT-W204", key, f"{int(bad.sum())} NaN/inf value(s) in {ctx.plan.step(key).hook}, "
                         f"first at index {index}",
                         hint="an earlier step overflowed, or a fully masked row was softmaxed without care")]
    return check


STEP_CHECKS: Dict[str, List[Callable[[CheckContext], List[Diagnosis]]]] = {
    "scaled": [scale_matches_plan],
    "pattern": [pattern_rows_sum_to_one, masked_weights_are_zero, fully_masked_rows],
}
FINITE_CHECKED = ("q", "k", "v", "qk", "scaled", "attn_scores", "pattern", "z", "out")


def checks_for(key: str) -> List[Callable[[CheckContext], List[Diagnosis]]]:
    found = list(STEP_CHECKS.get(key, ()))
    if key in FINITE_CHECKED:
        found.append(no_nonfinite(key))
    return found


def run_step_checks(key: str, ctx: CheckContext) -> Tuple[List[Diagnosis], List[str]]:
    """The diagnoses of the checks after step `key`, and what the clean ones verified."""
    found: List[Diagnosis] = []
    passed: List[str] = []
    for check in checks_for(key):
        result = check(ctx)        # None: the check does not apply to this run
        if result is None:
            continue
        found.extend(result)
        if not result and check.describes and not check.describes.startswith("no NaN"):
            passed.append(check.describes)
    return found, passed


def first_warning(diagnoses: List[Diagnosis]) -> Optional[Diagnosis]:
    return next((d for d in diagnoses if d.severity == "warning"), None)
