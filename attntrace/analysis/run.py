"""The one run(): spec → plan → pre-flight diagnosis → engine → invariant checks → Trace.

Every path that traces attention goes through :func:`run` (the Python API,
``attntrace run``, ``--inject``, expectations, diffs), so a trace always
carries the same diagnoses.  The engine only executes; :func:`rerun` is the
bare execution the re-running checks and bug replays use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from attntrace.analysis import checks as checks_mod
from attntrace.analysis.diagnose import preflight
from attntrace.analysis.fixes import attach_verified_fixes
from attntrace.core import memory
from attntrace.core.engine import Keep, State, StepFn, execute, keep_set
from attntrace.core.hooks import HookFn, HookSet
from attntrace.core.plan import Plan, Step, plan_from_spec
from attntrace.core.trace import Trace
from attntrace.errors import Diagnosis, ShapeError, input_error
from attntrace.inputs.spec import Spec, load_spec

CHECK_LEVELS = ("none", "default", "all")
Check = Union[bool, str]


def load(spec: Union[Spec, str, Path, dict]) -> Spec:
    """A spec from a path, a dict or a Spec, with its `model:` (a real checkpoint) resolved into blocks."""
    spec = load_spec(spec)
    if spec.model is None:
        return spec                 # models/ (50 ms of imports) only for a spec that names a checkpoint
    from attntrace.models.build import resolve as resolve_model
    return resolve_model(spec)


def prepare(spec: Union[Spec, str, Path, dict], chunk: Optional[int] = None,
            chunk_row: Optional[int] = None) -> Tuple[Spec, Plan, List[Diagnosis]]:
    """Load the spec, plan it and run the pre-flight shape diagnosis.

    Raises ShapeError (exit 3) with verified fixes attached; returns the warnings
    sizes alone cannot settle (and what loading a checkpoint noticed)."""
    spec = load(spec)
    sizes = plan_from_spec(spec, chunk=0)           # the diagnosis reads every step of plain attention
    try:
        warnings = preflight(spec, sizes)
    except ShapeError as error:
        attach_verified_fixes(spec, error.diagnoses)
        raise
    plan = plan_from_spec(spec, chunk, chunk_row)
    return spec, plan, list(spec.notes) + warnings


def _check_level(check: Check) -> str:
    if check is True:
        return "default"
    if check is False or check is None:
        return "none"
    if check not in CHECK_LEVELS:
        raise input_error("ATT-E003", f"check must be one of {', '.join(CHECK_LEVELS)}, got {check!r}")
    return check


def run(spec: Union[Spec, str, dict], *, hooks: Sequence[Tuple[str, HookFn]] = (), keep: Keep = "auto",
        dtype: Optional[str] = None, overrides: Optional[Dict[str, StepFn]] = None, check: Check = True,
        on_step: Optional[Callable] = None, spec_hooks: bool = True, chunk: Optional[int] = None,
        chunk_row: Optional[int] = None, force: bool = False) -> Trace:
    """Trace attention on a spec (a Spec, a YAML path or a dict) and return its Trace.

    hooks: (name or pattern, fn) pairs, fn(array, *, hook) -> array | None.
    spec_hooks: also apply the spec's own `hooks:` list (first, before `hooks`).
    keep: which arrays the trace keeps: "auto" (arrays up to 1M values), "all", or hook names/patterns.
    dtype: "float64" or "float32"; by default float64, and for a `model:` its own (float32 unless it says).
    check: True / "default" (the invariant checks of every step), "all" (also the checks
    that re-run attention on perturbed inputs), False / "none".
    on_step: called as on_step(step, array, trace) after each step (`run --step`).
    overrides: step key -> replacement function (how bugs are injected).
    chunk: compute attention by online softmax over blocks of this many keys (the weights are never
    materialised; their stats and pooled overview are kept); chunk_row: the query row whose running
    max, sum and output are traced (default the last).
    force: run even when the memory estimate exceeds what is available (ATT-E020 otherwise).
    """
    level = _check_level(check)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise input_error("ATT-E003", f"chunk must be a whole number of keys ≥ 1, got {chunk!r}",
                          hint="e.g. chunk=512: online softmax over blocks of 512 keys")
    spec, plan, warnings = prepare(spec, chunk, chunk_row)
    dtype = dtype or default_dtype(spec)
    if not force:
        check_memory(spec, plan, dtype, keep_set(keep, plan), chunk_row)
    if spec_hooks and spec.hooks:
        from attntrace.analysis.actions import hooks_from_spec  # loaded only by runs with hooks
        hooks = hooks_from_spec(spec) + list(hooks)
    hookset = HookSet(hooks, plan.hooks)
    trace = Trace(spec=spec, plan=plan, dtype=np.dtype(dtype).name)
    if level != "none":
        trace.diagnoses.extend(warnings)
    after_step = _step_checker(spec, plan, level) if level != "none" else None
    if on_step is not None:
        after_step = _then(after_step, on_step)
    execute(spec, plan, hookset=hookset, keep=keep, dtype=dtype, overrides=overrides, after_step=after_step,
            trace=trace)
    if level != "none" and not any(d.code == "ATT-W204" for d in trace.diagnoses):
        trace.checks_passed.append("no NaN or inf in any step")
    if level == "all":
        found, passed = checks_mod.expensive_checks(spec, trace, rerun_with(overrides, dtype))
        trace.diagnoses.extend(found)
        trace.checks_passed.extend(passed)
    return trace


@dataclass
class MemoryOutlook:
    """A run's estimated peak, the memory free now, and — when it does not fit — what would."""
    estimate: memory.MemoryEstimate
    available: Optional[int]
    options: List[str]

    @property
    def fits(self) -> bool:
        return self.available is None or self.estimate.peak * memory.SAFETY <= self.available

    def summary(self) -> str:
        guess = self.estimate
        return (f"about {memory.human(guess.peak)} (inputs {memory.human(guess.inputs)}, kept arrays "
                f"{memory.human(guess.retained)}, working buffers {memory.human(guess.working)}, {guess.dtype})")

    def to_json(self) -> Dict:
        return dict(self.estimate.to_json(), available=self.available, fits=self.fits, options=list(self.options))


def memory_outlook(spec: Optional[Spec], plan: Plan, dtype: str, kept=None,
                   chunk_row: Optional[int] = None) -> MemoryOutlook:
    """Estimate a run's peak and compare it with the free memory (spec None: sizes only, no advice)."""
    guess = memory.estimate(spec, plan, dtype, kept)
    outlook = MemoryOutlook(guess, memory.available_bytes(), [])
    if not outlook.fits and spec is not None:
        outlook.options = memory.advice(
            spec, lambda chunk: plan_from_spec(spec, chunk, chunk_row) if chunk else plan, dtype, kept,
            outlook.available)
    return outlook


def check_memory(spec: Spec, plan: Plan, dtype: str, kept, chunk_row: Optional[int] = None) -> None:
    """Refuse, before anything is allocated, a run whose estimated peak exceeds the free memory."""
    outlook = memory_outlook(spec, plan, dtype, kept, chunk_row)
    if outlook.fits:
        return
    raise input_error("ATT-E020", f"this run needs {outlook.summary()}; {memory.human(outlook.available)} is "
                                  f"available", hint="what fits: " + "; ".join(outlook.options))


def default_dtype(spec: Spec) -> str:
    """float64 for hand-written specs (exact); a model computes as it runs, in float32, unless it says."""
    if spec.model is not None:
        return spec.model.dtype or "float32"
    return "float64"


def _step_checker(spec: Spec, plan: Plan, level: str):
    def after_step(step: Step, array: np.ndarray, state: State, trace: Trace) -> None:
        ctx = checks_mod.CheckContext(plan, state.values, trace, spec, step.layer)
        found, passed = checks_mod.run_step_checks(step.key, ctx)
        trace.diagnoses.extend(found)
        trace.checks_passed.extend(p for p in passed if p not in trace.checks_passed)
    return after_step


def _then(first, on_step: Callable):
    def after_step(step: Step, array: np.ndarray, state: State, trace: Trace) -> None:
        if first is not None:
            first(step, array, state, trace)
        on_step(step, array, trace)
    return after_step


def rerun(spec: Spec, *, keep: Keep, overrides: Optional[Dict[str, StepFn]] = None,
          dtype: str = "float64", hooks: Sequence[Tuple[str, HookFn]] = ()) -> Dict[str, np.ndarray]:
    """Execute `spec` again, without diagnosis or checks, and return the kept arrays.

    For re-running checks and bug replays: the spec was diagnosed already, and a
    perturbed copy has the same shapes."""
    plan = plan_from_spec(spec)
    trace = execute(spec, plan, hookset=HookSet(hooks, plan.hooks), keep=keep, dtype=dtype, overrides=overrides)
    return trace.arrays


def rerun_with(overrides: Optional[Dict[str, StepFn]] = None, dtype: str = "float64"):
    """A rerun function for the re-running checks, with the given step functions."""
    def again(spec: Spec, keep: Keep) -> Dict[str, np.ndarray]:
        return rerun(spec, keep=keep, overrides=overrides, dtype=dtype)
    return again
