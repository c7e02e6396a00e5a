"""Deliberate bugs: the classic mistakes of hand-written attention, as replaceable steps.

Seed 000's homework: put a bug in on purpose, then follow the message to it.
Each :class:`Bug` replaces one or more step functions of the engine
(``run(spec, overrides=...)``), says in one line what it does, which diagnoses
or invariants catch it, and when it can show at all (a mask bug cannot show on a
spec without a mask).  :func:`inject` runs a spec with a bug in place and
returns a :class:`Verdict`: what caught it, or plainly that nothing did.

Bug code works with *named* operands (:mod:`attntrace.diagnose`): a size
conflict is diagnosed as a shape error before numpy raises, and sizes that agree
by coincidence while the axis names do not give a warning.  Those warnings are
collected in the ``notes`` list the steps are built with.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from attntrace.analysis.checks import expensive_checks
from attntrace.analysis.diagnose import Operands, check_broadcast, check_matmul, check_reshape
from attntrace.analysis.run import prepare, rerun_with, run
from attntrace.core import engine, masks, ops
from attntrace.errors import Diagnosis, Operand, ShapeError, input_error
from attntrace.hookpoints import PROJECTIONS
from attntrace.text import did_you_mean

StepFn = Callable[[engine.State], np.ndarray]
Notes = List[Diagnosis]

# What each code says, for "caught by" lines.
CHECK_NAMES = {
    "ATT-E101": "shape error: contracted axes differ",
    "ATT-E103": "shape error: impossible reshape into heads",
    "ATT-E108": "shape error: mask does not broadcast to the scores",
    "ATT-W201": "rows of weights must sum to 1",
    "ATT-W202": "masked positions must get zero weight",
    "ATT-W203": "every query must see a key",
    "ATT-W204": "no NaN or inf",
    "ATT-W205": "scale must be the planned 1/√d_head",
    "ATT-W220": "axes swapped where sizes coincide",
    "ATT-W221": "a reshape moved an axis",
    "ATT-W224": "causal: outputs must not depend on later tokens (--check all)",
    "ATT-W225": "heads must be independent (--check all)",
}
EXPENSIVE_CODES = ("ATT-W224", "ATT-W225")


@dataclass(frozen=True)
class Bug:
    name: str
    description: str                         # one line
    steps: Tuple[str, ...]                   # engine steps it replaces
    caught_by: Tuple[str, ...]               # codes that catch it
    needs: str                               # when it can show at all
    build: Callable[[Notes], Dict[str, StepFn]]
    blocker: Callable[..., Optional[str]]    # (spec, plan) -> why it cannot show, or None

    def overrides(self, notes: Optional[Notes] = None) -> Dict[str, StepFn]:
        """Step key -> buggy step function; warnings go to `notes`."""
        return self.build(notes if notes is not None else [])

    def cannot_show(self, spec, plan) -> Optional[str]:
        return self.blocker(spec, plan)

    def to_json(self) -> Dict:
        return {"name": self.name, "description": self.description, "steps": list(self.steps),
                "caught_by": list(self.caught_by), "needs": self.needs}


# =========================================================================== shared pieces

def _named(shape, axes, target=None):
    """Shape and axes (and reshape target) without a batch axis of 1: as the spec is written by hand."""
    if shape[0] == 1 and axes[0] == "batch":
        return tuple(shape[1:]), tuple(axes[1:]), (target[1:] if target else target)
    return tuple(shape), tuple(axes), target


def _spec_mask(spec, plan) -> Optional[np.ndarray]:
    """The first block's mask (every block of a model shares the spec's mask)."""
    return masks.build(spec.attention_of(0).mask, plan.size("batch"), plan.size("seq_q"), plan.size("seq_k"))


def _with_mask(key: str, step: StepFn) -> StepFn:
    """A mask bug needs a mask: without one, the engine's own step `key` runs."""
    def guarded(state):
        return step(state) if "mask" in state else engine.STEP_FUNCTIONS[key](state)
    return guarded


def _blocked_scores(state: engine.State, blocked: np.ndarray) -> np.ndarray:
    scores = state.take("scaled")
    np.copyto(scores, state.dtype.type(-np.inf), where=blocked)
    return scores


# step key -> (weight, bias, heads axis, width axis, sequence axis), from the one projection table
_PROJECTION = {step: (weight, bias, heads, width, seq)
               for weight, (bias, step, heads, width, seq) in PROJECTIONS.items()}


def _projected(state: engine.State, key: str) -> Tuple[np.ndarray, Operand]:
    """X·W (+ b) before the split into heads, (batch, seq, width), with its named operand."""
    weight, bias, heads_dim, width_dim, seq_axis = _PROJECTION[key]
    x = state.x() if key == "q" else state.x_kv()
    flat = engine.project(state, x, weight, bias, 1)[:, :, 0, :]
    named = Operands(state.spec, state.plan, state.layer)
    shape, axes, _ = _named(flat.shape, ("batch", seq_axis, f"{heads_dim}·{width_dim}"))
    operand = Operand(weight.replace("W_", "").upper(), shape, axes,
                      named.projection_origin(weight, then="", head=None), getattr(state.attention, weight).location)
    return flat, operand


# =========================================================================== the bugs

def _forgot_transpose_k(notes: Notes) -> Dict[str, StepFn]:
    def qk(state):
        q, k = engine.rotated_q_k(state)
        b, sq, h, d = q.shape
        named = Operands(state.spec, state.plan, state.layer)
        left, right = named.head_of("W_q", d), named.head_of("W_k", k.shape[-1])
        right.origin += " (not transposed)"
        warning = check_matmul(state.plan, "qk", left, right, head=0, locations=[named.x_location("W_q")],
                               hint="scores = Q·Kᵀ: transpose K so that Q's d_head meets K's d_head")
        if warning:
            notes.append(warning)
        kh = np.repeat(k.transpose(0, 2, 1, 3), h // k.shape[2], axis=1)      # (b, h, seq_k, d_head)
        return q.transpose(0, 2, 1, 3) @ kh                                    # Q @ K, not Q @ Kᵀ
    return {"qk": qk}


def _softmax_wrong_axis(notes: Notes) -> Dict[str, StepFn]:
    return {"pattern": lambda state: ops.softmax(state.take("attn_scores"), axis=-2)}


def _scaled_by(factor: Callable) -> Callable[[Notes], Dict[str, StepFn]]:
    def build(notes: Notes) -> Dict[str, StepFn]:
        def scaled(state):
            wrong = copy.copy(state)            # the engine's own step, with another scale
            wrong.plan = dataclasses.replace(state.plan, blocks=[
                dataclasses.replace(block, scale=factor(state.plan)) for block in state.plan.blocks])
            return engine.step_scaled(wrong)
        return {"scaled": scaled}
    return build


def _split_heads_without_transpose(notes: Notes) -> Dict[str, StepFn]:
    def make(key: str) -> StepFn:
        _, _, heads_dim, width_dim, seq_axis = _PROJECTION[key]

        def step(state):
            flat, operand = _projected(state, key)
            b, s, width = flat.shape
            heads = state.plan.size(heads_dim)
            target = [("batch", b), (heads_dim, heads), (seq_axis, s), (width_dim, width // heads)]
            warning = check_reshape(state.plan, key, operand, target[1:] if b == 1 else target,
                                    hint="reshape to (batch, seq, heads, d_head) first, then transpose(0, 2, 1, 3)")
            if warning:
                notes.append(warning)
            return flat.reshape(b, heads, s, width // heads).transpose(0, 2, 1, 3)
        return step
    return {key: make(key) for key in ("q", "k", "v")}


def _merge_heads_without_transpose(notes: Notes) -> Dict[str, StepFn]:
    def z_concat(state):
        head_major = state["z"].transpose(0, 2, 1, 3)          # (b, h, seq_q, d_v), as attention code holds it
        b, h, sq, dv = head_major.shape
        shape, axes, target = _named(head_major.shape, ("batch", "n_heads", "seq_q", "d_v"),
                                     [("batch", b), ("seq_q", sq), ("n_heads·d_v", h * dv)])
        operand = Operand("z", shape, axes, f"weights·V per head, held as ({', '.join(axes)})")
        warning = check_reshape(state.plan, "z_concat", operand, target,
                                hint="transpose back to (batch, seq, heads, d_v) first, then reshape")
        if warning:
            notes.append(warning)
        return head_major.reshape(b, sq, h * dv)
    return {"z_concat": z_concat}


def _mask_after_softmax(notes: Notes) -> Dict[str, StepFn]:
    def pattern(state):
        weights = ops.softmax(state.take("attn_scores"))
        np.copyto(weights, 0.0, where=~state["mask"])         # zeroed after the fact: rows no longer sum to 1
        return weights
    def attn_scores(state):
        return state.take("scaled")
    return {"attn_scores": _with_mask("attn_scores", attn_scores), "pattern": _with_mask("pattern", pattern)}


def _inverted_mask(notes: Notes) -> Dict[str, StepFn]:
    def attn_scores(state):
        return _blocked_scores(state, state["mask"])
    return {"attn_scores": _with_mask("attn_scores", attn_scores)}


def _mask_wrong_axis(notes: Notes) -> Dict[str, StepFn]:
    def attn_scores(state):
        swapped = state["mask"].swapaxes(-1, -2)
        plan = state.plan
        scores = Operand("scores", (plan.size("batch"), plan.size("n_heads"), plan.size("seq_q"), plan.size("seq_k")),
                         ("batch", "n_heads", "seq_q", "seq_k"), "Q·Kᵀ · scale")
        mask = Operand("mask", swapped.shape, ("batch", "1", "seq_k", "seq_q"),
                       "the mask with its query and key axes swapped", state.attention.mask.location)
        warning = check_broadcast(plan, "attn_scores", scores, mask,
                                  hint="rows of the mask are queries, columns keys: (…, seq_q, seq_k)")
        if warning:
            notes.append(warning)
        return _blocked_scores(state, ~swapped)
    return {"attn_scores": _with_mask("attn_scores", attn_scores)}


def _additive_mask_zero_one(notes: Notes) -> Dict[str, StepFn]:
    def attn_scores(state):
        scores = state.take("scaled")
        scores += state["mask"]                               # +1 / +0 instead of 0 / -inf
        return scores
    return {"attn_scores": _with_mask("attn_scores", attn_scores)}


def _fully_masked_row_neg_inf(notes: Notes) -> Dict[str, StepFn]:
    def pattern(state):
        scores = state.take("attn_scores")
        with np.errstate(invalid="ignore"):                   # the textbook softmax: -inf - (-inf) = NaN
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
        return scores
    return {"pattern": pattern}


def _wrong_d_head_reshape(notes: Notes) -> Dict[str, StepFn]:
    def make(key: str) -> StepFn:
        _, _, heads_dim, width_dim, seq_axis = _PROJECTION[key]

        def step(state):
            flat, operand = _projected(state, key)
            b, s, _ = flat.shape
            heads, wrong = state.plan.size(heads_dim), state.plan.size("d_model") // state.plan.size("n_heads")
            target = [("batch", b), (seq_axis, s), (heads_dim, heads), (width_dim, wrong)]
            check_reshape(state.plan, key, operand, target[1:] if b == 1 else target,
                          hint=f"{width_dim} is the projection's width / heads, not d_model / n_heads")
            return flat.reshape(b, s, heads, wrong)
        return step
    return {key: make(key) for key in ("q", "k", "v")}


def _kv_heads_tiled(notes: Notes) -> Dict[str, StepFn]:
    def shared(kv_array: np.ndarray, h: int) -> np.ndarray:
        kv = kv_array.shape[2]
        return kv_array.transpose(0, 2, 1, 3)[:, np.arange(h) % kv]     # kv heads 0,1,0,1 (not 0,0,1,1)

    def qk(state):
        q, k = engine.rotated_q_k(state)
        return q.transpose(0, 2, 1, 3) @ shared(k, q.shape[2]).swapaxes(-1, -2)

    def z(state):
        pattern = state["pattern"]
        return (pattern @ shared(state["v"], pattern.shape[1])).transpose(0, 2, 1, 3)
    return {"qk": qk, "z": z}


# =========================================================================== when a bug can show

def _mask_condition(why_not: Callable[[np.ndarray], Optional[str]]):
    """A precondition on the spec's mask: None when the bug can show, else the reason it cannot."""
    def needs(spec, plan) -> Optional[str]:
        keep = _spec_mask(spec, plan)
        return "the spec has no mask" if keep is None else why_not(keep)
    return needs


_needs_mask = _mask_condition(lambda keep: None)
_blocks_nothing = _mask_condition(lambda keep: "the mask blocks nothing" if keep.all() else None)
_needs_partial_row = _mask_condition(
    lambda keep: None if ((~keep).any(axis=-1) & keep.any(axis=-1)).any()
    else "no query row has both a visible and a blocked key")
_needs_asymmetric_mask = _mask_condition(
    lambda keep: "the mask is symmetric: swapping its axes changes nothing"
    if keep.shape[-1] == keep.shape[-2] and np.array_equal(keep, keep.swapaxes(-1, -2)) else None)
_needs_empty_row = _mask_condition(
    lambda keep: None if not keep.any(axis=-1).all()
    else "every query may attend to some key (no fully masked row)")


def _needs_two_values(spec, plan) -> Optional[str]:
    if plan.size("seq_q") == 1 and plan.size("seq_k") == 1:
        return "one query and one key: both axes have size 1"
    return None


def _needs_scale_not(value: Callable, what: str) -> Callable:
    def blocker(spec, plan) -> Optional[str]:
        if abs(plan.scale - value(plan)) <= 1e-12 * max(1.0, abs(plan.scale)):
            return f"the planned scale {plan.scale:g} already equals {what}"
        return None
    return blocker


def _needs_heads_and_tokens(which: str) -> Callable:
    def blocker(spec, plan) -> Optional[str]:
        h, kv, sq, sk = (plan.size(n) for n in ("n_heads", "n_kv_heads", "seq_q", "seq_k"))
        shows = (h > 1 and sq > 1) or (which == "split" and kv > 1 and sk > 1)
        return None if shows else f"needs more than one head and more than one token (heads={h}, seq={sq})"
    return blocker


def _needs_width_not_d_model(spec, plan) -> Optional[str]:
    wrong = plan.size("d_model") // plan.size("n_heads")
    if wrong == plan.size("d_head") and wrong == plan.size("d_v"):
        return f"d_head = d_model / n_heads = {wrong} here, so the wrong formula gives the right size"
    return None


def _needs_inner_sizes(spec, plan) -> Optional[str]:
    if plan.size("d_head") == 1 and plan.size("seq_k") == 1:
        return "d_head = seq_k = 1: K and Kᵀ are the same"
    return None


def _needs_grouped_heads(spec, plan) -> Optional[str]:
    h, kv = plan.size("n_heads"), plan.size("n_kv_heads")
    return None if 1 < kv < h else f"needs grouped-query attention with 1 < kv_heads < heads (here {kv} and {h})"


# =========================================================================== the catalogue

CATALOGUE: Dict[str, Bug] = {bug.name: bug for bug in (
    Bug("forgot-transpose-k", "scores = Q @ K instead of Q @ Kᵀ (contracts d_head with seq_k)", ("qk",),
        ("ATT-E101", "ATT-W220"), "always (a shape error unless d_head == seq_k)",
        _forgot_transpose_k, _needs_inner_sizes),
    Bug("softmax-wrong-axis", "softmax over the queries (axis=-2) instead of the keys (axis=-1)", ("pattern",),
        ("ATT-W201",), "more than one query or key", _softmax_wrong_axis, _needs_two_values),
    Bug("scale-by-d-model", "scores scaled by 1/√d_model instead of 1/√d_head", ("scaled",), ("ATT-W205",),
        "d_head ≠ d_model (more than one head, or a narrower projection)",
        _scaled_by(lambda plan: plan.size("d_model") ** -0.5),
        _needs_scale_not(lambda plan: plan.size("d_model") ** -0.5, "1/√d_model")),
    Bug("no-scale", "scores not scaled at all (softmax of raw Q·Kᵀ)", ("scaled",), ("ATT-W205",),
        "a planned scale ≠ 1", _scaled_by(lambda plan: 1.0), _needs_scale_not(lambda plan: 1.0, "1")),
    Bug("split-heads-without-transpose", "(seq, heads·d_head) reshaped straight to (heads, seq, d_head): "
        "tokens and heads mixed", ("q", "k", "v"), ("ATT-W221", "ATT-W225", "ATT-W224"),
        "heads > 1 and seq > 1", _split_heads_without_transpose, _needs_heads_and_tokens("split")),
    Bug("merge-heads-without-transpose", "z (heads, seq, d_v) reshaped straight to (seq, heads·d_v): "
        "tokens and heads mixed", ("z_concat",), ("ATT-W221", "ATT-W225", "ATT-W224"),
        "heads > 1 and seq > 1", _merge_heads_without_transpose, _needs_heads_and_tokens("merge")),
    Bug("mask-after-softmax", "softmax first, then blocked weights set to 0 (rows no longer sum to 1)",
        ("attn_scores", "pattern"), ("ATT-W201",), "a mask with a query row that has both visible and blocked keys",
        _mask_after_softmax, _needs_partial_row),
    Bug("inverted-mask", "masked_fill where the mask is True (True = may attend): blocks exactly the allowed keys",
        ("attn_scores",), ("ATT-W202", "ATT-W201"), "a mask", _inverted_mask, _needs_mask),
    Bug("mask-wrong-axis", "the mask applied with its query and key axes swapped", ("attn_scores",),
        ("ATT-W202", "ATT-W220", "ATT-E108"), "a mask that is not symmetric (causal, padding ...)",
        _mask_wrong_axis, _needs_asymmetric_mask),
    Bug("additive-mask-zero-one", "the 0/1 keep-mask added to the scores instead of 0/-inf: nothing is blocked",
        ("attn_scores",), ("ATT-W202",), "a mask that blocks something", _additive_mask_zero_one, _blocks_nothing),
    Bug("fully-masked-row-neg-inf", "textbook softmax on a row that is all -inf: -inf - (-inf) = NaN",
        ("pattern",), ("ATT-W204",), "a query that may attend to no key (e.g. left padding + causal)",
        _fully_masked_row_neg_inf, _needs_empty_row),
    Bug("wrong-d-head-reshape", "heads split with d_head = d_model // n_heads instead of width // heads",
        ("q", "k", "v"), ("ATT-E103",), "n_heads·d_head ≠ d_model (projections narrower or wider than d_model)",
        _wrong_d_head_reshape, _needs_width_not_d_model),
    Bug("kv-heads-tiled", "grouped-query: kv heads tiled 0,1,0,1 (torch .repeat) instead of 0,0,1,1 "
        "(.repeat_interleave)", ("qk", "z"), ("ATT-W225",), "1 < kv_heads < heads",
        _kv_heads_tiled, _needs_grouped_heads),
)}


def get_bug(name: str) -> Bug:
    if name in CATALOGUE:
        return CATALOGUE[name]
    raise input_error("ATT-E034", f"--inject: there is no bug named '{name}'",
                      hint=did_you_mean(name, CATALOGUE, cutoff=0.5, otherwise="`attntrace bugs` lists them"))


# =========================================================================== running with a bug

@dataclass
class Verdict:
    """What happened when a spec ran with a bug in place."""

    bug: Bug
    check: str
    trace: Optional[object] = None                    # None when the bug made a shape error
    shape_error: List[Diagnosis] = field(default_factory=list)
    caught: List[Diagnosis] = field(default_factory=list)   # diagnoses the clean run does not have
    cannot_show: Optional[str] = None                 # why the bug cannot change anything here
    changed: bool = True                              # the output differs from the clean run's

    @property
    def status(self) -> str:
        if self.shape_error or self.caught:
            return "caught"
        return "cannot show" if self.cannot_show else "not caught"

    @property
    def codes(self) -> List[str]:
        return sorted({d.code for d in self.shape_error + self.caught})

    @property
    def missed_expensive(self) -> List[str]:
        """Opt-in checks that catch this bug but did not run."""
        return [c for c in self.bug.caught_by if c in EXPENSIVE_CODES] if self.check != "all" else []

    def summary(self) -> str:
        names = "; ".join(f"{c} ({CHECK_NAMES.get(c, 'diagnosis')})" for c in self.codes)
        if self.shape_error:
            return f"caught by {names}, before numpy raised"
        if self.caught:
            text = f"caught by {names}"
            if self.cannot_show:
                text += f" — the numbers are unchanged on this spec ({self.cannot_show}), but the code is wrong"
            return text
        if self.cannot_show:
            return f"cannot show on this spec: {self.cannot_show} (it needs {self.bug.needs})"
        text = "nothing caught it: the output changed, and no diagnosis or invariant check noticed"
        if self.missed_expensive:
            text += f"; rerun with --check all ({', '.join(self.missed_expensive)} catch it)"
        return text

    def to_json(self) -> Dict:
        return {"bug": self.bug.to_json(), "status": self.status, "summary": self.summary(),
                "caught_by": self.codes, "cannot_show": self.cannot_show, "output_changed": self.changed,
                "check": self.check}


def _merge_notes(trace, notes: Notes) -> None:
    order = {s.hook: s.number for s in trace.plan.steps}
    trace.diagnoses.extend(notes)
    trace.diagnoses.sort(key=lambda d: order.get(d.hook, 0))


def inject(spec, name: str, *, check: str = "default", dtype: str = "float64", **run_options) -> Verdict:
    """Run `spec` with bug `name` in place and with a clean copy; say what caught the bug.

    A shape error of the *spec* (before the bug) propagates as usual; a shape error the
    bug causes becomes part of the verdict.
    """
    bug = get_bug(name)
    spec, plan, _ = prepare(spec)
    quiet = {k: v for k, v in run_options.items() if k != "on_step"}     # step through the buggy run only
    clean = run(spec, check=check, dtype=dtype, **quiet)
    verdict = Verdict(bug, check, cannot_show=bug.cannot_show(spec, plan))
    notes: Notes = []
    try:
        trace = run(spec, overrides=bug.overrides(notes), dtype=dtype, **run_options)
    except ShapeError as error:
        verdict.shape_error = error.diagnoses
        return verdict
    if check == "all":      # re-runs build fresh bug steps: their notes are not this run's
        found, passed = expensive_checks(spec, trace, rerun_with(bug.overrides(), dtype))
        trace.diagnoses.extend(found)
        trace.checks_passed.extend(passed)
    _merge_notes(trace, notes)
    before = {(d.code, d.hook) for d in clean.diagnoses}
    verdict.trace = trace
    verdict.caught = [d for d in trace.diagnoses if (d.code, d.hook) not in before]
    verdict.changed = _output_changed(clean, trace)
    return verdict


def _output_changed(clean, trace) -> bool:
    """Whether any hook both runs kept differs (NaN in the same place counts as equal)."""
    for hook, array in clean.arrays.items():
        other = trace.arrays.get(hook)
        if other is not None and (other.shape != array.shape or
                                  not np.allclose(array, other, rtol=1e-9, atol=1e-12, equal_nan=True)):
            return True
    return False
