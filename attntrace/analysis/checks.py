"""Invariant checks that run with every trace (cheap: one pass over an array).

Each check returns a list of diagnoses (empty when clean) or None when it
does not apply (no mask, say).  It sees the live arrays of the run through a :class:`CheckContext`
right after its step, so it works even when the engine does not keep the
array.  A violation is a warning :class:`~attntrace.errors.Diagnosis`
(``ATT-W2xx``); ``--strict`` turns warnings into a failure.

Numeric honesty: a check can only pass on finite values.  A comparison with
NaN is false, so "no row is off by more than tol" would hold for a row of NaN;
every check therefore declines (returns None: no ✓, no verdict) when the
values it reads are not all finite, and ATT-W204 reports them instead -- once,
at the first step where they appear, with the reason (an overflowing scale, a
dot product beyond the largest float, a hook) and the later steps they reach.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from attntrace.analysis import crosscheck, field_checks
from attntrace.core import masks
from attntrace.core.masks import empty_rows, looks_like_ignore, positions
from attntrace.core.positional import alibi_slopes
from attntrace.core.stats import PREVIEW_EDGE, edge_indices, preview
from attntrace.errors import Diagnosis
from attntrace.hookpoints import point_of

ROW_SUM_TOLERANCE = {"float64": 1e-9, "float32": 1e-5}
FLOAT_MAX = {"float64": float(np.finfo(np.float64).max), "float32": float(np.finfo(np.float32).max)}


class CheckContext:
    """What a check sees: the plan, the live arrays of one block, and the trace so far."""

    def __init__(self, plan, values: Dict[str, np.ndarray], trace, spec=None, layer: Optional[int] = None):
        self.plan = plan
        self.values = values          # step key -> live array of this block (may be reused in place later)
        self.trace = trace            # stats, previews and kept arrays of the steps so far
        self.spec = spec
        self.layer = layer            # the block checked (None: a single attention layer's only block)

    @property
    def block(self):
        return self.plan.block(self.layer)

    def step(self, key: str):
        return self.plan.step(key, self.layer)

    def stats(self, key: str):
        return self.trace.stats[self.step(key).hook]

    def corner(self, key: str, array: Optional[np.ndarray] = None) -> np.ndarray:
        """The preview corner of a step's result, as it was when the step finished."""
        hook = self.step(key).hook
        if array is None:
            if hook in self.trace.previews:
                return self.trace.previews[hook].values
            array = self.trace.arrays[hook]
        rows, cols, _ = point_of(hook).display
        return preview(array, rows, cols, PREVIEW_EDGE).values

    def warn(self, code: str, key: str, message: str, **extra) -> Diagnosis:
        step = self.step(key)
        return Diagnosis(code=code, severity="warning", step=step.label, hook=step.hook,
                         message=message, **extra)

    def engine_computed(self, *keys: str) -> bool:
        """True when every one of these steps is the engine's own computation (no hook, no injected
        bug): then the invariants its step functions guarantee hold by construction (tested in
        tests/test_perf_fused.py and the reference tests), and a pass over score-sized arrays is saved."""
        return all(self.step(key).hook in self.trace.engine_computed for key in keys)

    def finite(self, key: str) -> bool:
        """True when the step's result holds no NaN and no ±inf (masked scores may hold -inf)."""
        stats = self.stats(key)
        return not (stats.nan or stats.posinf or (stats.neginf and key != "attn_scores"))

    def token_q(self, i: int) -> str:
        tokens = self.spec.tokens if self.spec else []
        return f"{i} '{tokens[i]}'" if i < len(tokens) else str(i)


def describes(text: str, values: bool = True):
    """Name what a check verifies, for the ✓ lines of a clean run.  `values`: the check reads the
    values of steps (so it cannot vouch for anything once NaN/inf have appeared); False for checks
    of the mask alone."""
    def mark(fn):
        fn.describes = text
        fn.reads_values = values
        return fn
    return mark


def _where(index) -> str:
    b, h, q = (int(i) for i in index)
    return f"batch {b}, head {h}, query {q}" if b else f"head {h}, query {q}"


@describes("every row of weights sums to 1")
def pattern_rows_sum_to_one(ctx: CheckContext) -> List[Diagnosis]:
    if not ctx.finite("pattern"):
        return None                 # NaN rows would "pass" (NaN > tol is false): ATT-W204 reports them
    pattern = ctx.values["pattern"]
    sums = ctx.trace.row_sums.get(ctx.step("pattern").hook)
    if sums is None:
        sums = pattern.sum(axis=-1, dtype=np.float64)
    keep = ctx.values.get("mask")
    # a row whose mask blocks every key is all 0 (safe softmax); every other row must sum to 1,
    # including rows that came out 0 although the mask lets them see a key
    live = np.broadcast_to(keep.any(axis=-1), sums.shape) if keep is not None else np.ones_like(sums, dtype=bool)
    error = np.where(live, np.abs(sums - 1.0), 0.0)
    tol = ROW_SUM_TOLERANCE.get(str(pattern.dtype), 1e-5)
    if not (error > tol).any():
        return []
    worst = np.unravel_index(int(np.nanargmax(error)), error.shape)
    bad = int((error > tol).sum())
    col_sums = pattern.sum(axis=-2, dtype=np.float64)
    detail = ["each column sums to 1 instead: softmax ran over seq_q, not seq_k"] \
        if np.allclose(col_sums, 1.0, atol=tol * 10) else []
    hint = "softmax must normalise over the key axis (axis=-1)"
    if not detail and keep is not None and np.all(sums[live] <= 1.0 + tol):
        hint = ("rows sum to less than 1 where keys are blocked: were the weights zeroed after softmax? "
                "Mask the scores (-inf) before softmax instead")
    return [ctx.warn("ATT-W201", "pattern", f"{bad} row(s) of weights do not sum to 1 "
                     f"(worst: {sums[worst]:.6g} at {_where(worst)})", details=detail, hint=hint)]


@describes("masked positions get exactly zero weight")
def masked_weights_are_zero(ctx: CheckContext) -> List[Diagnosis]:
    keep = ctx.values.get("mask")
    if keep is None or not ctx.finite("pattern"):
        return None
    if ctx.engine_computed("attn_scores", "pattern"):
        return []                   # the engine's masking writes -inf and its softmax makes exp(-inf) = 0
    pattern = ctx.values["pattern"]
    blocked = ~keep
    # no copy of the weights: the largest (and, if any weight is negative, the
    # smallest) blocked weight must be 0
    clean = np.max(pattern, where=blocked, initial=0.0) == 0 and (
        ctx.stats("pattern").min >= 0 or np.min(pattern, where=blocked, initial=0.0) == 0)
    if clean:
        return []
    leak = np.where(keep, 0.0, np.abs(np.nan_to_num(pattern, nan=0.0)))   # NaN is ATT-W204's to report
    if not (leak > 0).any():
        return []
    worst = np.unravel_index(int(leak.argmax()), leak.shape)
    return [ctx.warn("ATT-W202", "pattern", f"{int((leak > 0).sum())} masked position(s) got weight; "
                     f"largest {leak[worst]:.4g} at {_where(worst[:3])}, key {int(worst[3])}",
                     hint="apply the mask to the scores before softmax, with -inf (or a large "
                          "negative number) where attending is blocked")]


@describes("every query may attend to at least one key", values=False)
def fully_masked_rows(ctx: CheckContext) -> List[Diagnosis]:
    keep = ctx.values.get("mask")
    if keep is None:
        return None
    empty = ~keep.any(axis=-1)              # (batch or 1, 1, seq_q)
    if not empty.any():
        return []
    pairs = empty_rows(keep)
    rows = sorted({q for _, q in pairs})
    names = ", ".join(ctx.token_q(q) for q in rows[:8]) + (" ..." if len(rows) > 8 else "")
    if keep.shape[0] > 1:                   # per-batch masks: say which items
        names += " of batch item(s) " + ", ".join(str(b) for b in sorted({b for b, _ in pairs}))
    hint = "check the mask: every query usually needs at least one visible key"
    if keep.shape[0] == 1 and looks_like_ignore(keep[0, 0]):
        hint = ("this mask is the exact opposite of a causal mask: it was written with 1 = blocked "
                "(the ignore convention, e.g. np.triu(ones, k=1)); write `mask: {matrix: [...], convention: ignore}` "
                "or simply `mask: causal`")
    return [ctx.warn("ATT-W203", "pattern", f"query row(s) {names} may attend to no key; "
                     "their weights are all 0 (as PyTorch's safe softmax), not NaN", hint=hint)]


@describes("scores are scaled by the planned factor")
def scale_matches_plan(ctx: CheckContext) -> List[Diagnosis]:
    # qk's buffer may already hold the scaled values (in place): compare corners
    qk, scaled = ctx.corner("qk"), ctx.corner("scaled", ctx.values["scaled"])
    expected = ctx.block.scale
    if ctx.plan.positional == "alibi":          # scaled = Q·Kᵀ·scale + the ALiBi bias: take the bias off
        scaled = scaled - _alibi_corner(ctx.plan)
    # only cells where both are finite say what the factor was (an overflowing scale makes inf)
    with np.errstate(all="ignore"):
        usable = (np.abs(qk) > 1e-12) & np.isfinite(qk) & np.isfinite(scaled)
        ratio = scaled[usable] / qk[usable]
    ratio = ratio[np.isfinite(ratio)]
    if not ratio.size:
        return None                 # nothing finite to compare: no verdict (ATT-W204 reports NaN/inf)
    actual = float(np.sort(ratio)[ratio.size // 2])      # a median without averaging: 1e308 + 1e308 overflows
    if abs(actual - expected) <= 1e-6 * max(abs(expected), 1.0):
        return [] if ctx.finite("qk") and ctx.finite("scaled") else None     # ✓ only on finite scores
    d_head, d_model = ctx.plan.size("d_head"), ctx.plan.size("d_model")
    if d_model != d_head and abs(actual - d_model ** -0.5) <= 1e-6 * d_model ** -0.5:
        hint = f"the standard scale is 1/√d_head = {d_head ** -0.5:.6g}, not 1/√d_model = {d_model ** -0.5:.6g}"
    else:
        hint = (f"the planned factor is {ctx.block.scale_text} = {expected:.6g}; a hook, an injected bug or a "
                "step that scales twice (or not at all) changes it")
    return [ctx.warn("ATT-W205", "scaled", f"scores were scaled by {actual:.6g}, the plan says "
                     f"{expected:.6g} ({ctx.block.scale_text}, d_head={d_head})", hint=hint)]


def _alibi_corner(plan) -> np.ndarray:
    """The ALiBi bias at the preview corner of the scores: −slope_h · |i − j| (heads, rows, cols)."""
    seq_q, seq_k = plan.size("seq_q"), plan.size("seq_k")
    q, k = positions(seq_q, seq_k)
    rows, cols = edge_indices(seq_q, PREVIEW_EDGE), edge_indices(seq_k, PREVIEW_EDGE)
    distance = np.abs(q[rows, 0][:, None] - k[0, cols][None, :]).astype(np.float64)
    return -alibi_slopes(plan.size("n_heads"))[:, None, None] * distance[None]


def no_nonfinite(key: str) -> Callable[[CheckContext], List[Diagnosis]]:
    @describes(f"no NaN or inf in {key}")
    def check(ctx: CheckContext) -> List[Diagnosis]:
        hook = ctx.step(key).hook
        _honest_stats(ctx, key)
        if ctx.finite(key):
            return []
        array = ctx.values[key]
        with np.errstate(all="ignore"):
            bad = np.isnan(array) | np.isposinf(array)
            if key != "attn_scores":        # -inf is how blocked positions look before softmax
                bad |= np.isneginf(array)
        count = int(bad.sum())
        first = _first_nonfinite(ctx)
        if first is not None:               # reported where it appeared; here it only spreads
            first.details.append(f"also in {hook}: {count} value(s)")
            return []
        index = [int(i) for i in np.argwhere(bad)[0]]
        return [ctx.warn("ATT-W204", key, f"NaN/inf first appear in {hook}: {count} value(s), first at index "
                         f"{index}; {nonfinite_cause(ctx, key)}",
                         hint="every input was finite: the arithmetic of this step is where they came from; "
                              "later steps inherit them")]
    return check


def _honest_stats(ctx: CheckContext, key: str) -> None:
    """The engine derives the stats of the scaled scores from Q·Kᵀ's (no pass over them), which
    misses an overflowing scale: infinite min/max say so, and then the real counts are taken."""
    from attntrace.core.stats import array_stats
    stats = ctx.stats(key)
    if any(v is not None and not np.isfinite(v) for v in (stats.min, stats.max, stats.mean)):
        with np.errstate(all="ignore"):
            ctx.trace.stats[ctx.step(key).hook] = array_stats(ctx.values[key])


def _first_nonfinite(ctx: CheckContext) -> Optional[Diagnosis]:
    return next((d for d in ctx.trace.diagnoses if d.code == "ATT-W204"), None)


def _magnitude(ctx: CheckContext, key: str) -> Optional[float]:
    """The largest |value| of an earlier step of this block (finite values), or None."""
    try:
        stats = ctx.stats(key)
    except (KeyError, ValueError):
        return None
    if stats is None or stats.min is None or stats.max is None:
        return None
    return max(abs(stats.min), abs(stats.max))


def nonfinite_cause(ctx: CheckContext, key: str) -> str:
    """Why NaN/inf appeared in step `key` although everything before it was finite."""
    dtype = ctx.trace.dtype
    largest = FLOAT_MAX.get(dtype, FLOAT_MAX["float64"])
    steps = ctx.plan.steps
    step = ctx.step(key)
    keys = {s.key for s in steps if s.layer == step.layer}
    if key == "qk":
        q = _magnitude(ctx, "rot_q" if "rot_q" in keys else "q")
        k = _magnitude(ctx, "rot_k" if "rot_k" in keys else "k")
        if q is not None and k is not None:
            bound = q * k * ctx.plan.size("d_head")
            if bound > largest:
                return (f"the dot products overflow {dtype}: |Q| up to {q:.3g} and |K| up to {k:.3g} over "
                        f"d_head={ctx.plan.size('d_head')} features reach {bound:.3g} > {largest:.3g}")
            return (f"Q and K are finite and small (|Q·Kᵀ| ≤ {bound:.3g}), so the dot products cannot overflow: "
                    "a hook or an injected bug on this step produced them")
    if key == "scaled":
        qk, scale = _magnitude(ctx, "qk"), ctx.block.scale
        if qk is not None and qk * scale > largest:
            return (f"the scale overflows: |Q·Kᵀ| up to {qk:.3g} times the scale {scale:.3g} exceeds the largest "
                    f"{dtype} ({largest:.3g}); softmax then computes inf − inf = NaN")
    if key == "pattern":
        return ("softmax of finite scores is finite: a hook or an injected bug on this step produced them "
                "(a softmax over a row whose keys are all blocked gives 0/0 = NaN)")
    before = [s for s in steps if s.number < step.number and s.hook in ctx.trace.stats]
    sizes = [m for m in (_stats_magnitude(ctx.trace.stats[s.hook]) for s in before) if m is not None]
    if sizes:
        return (f"the steps before it were finite (largest |value| {max(sizes):.3g}); this step's arithmetic "
                f"overflowed {dtype} (largest {largest:.3g}), or a hook or injected bug on it produced them")
    return f"this step's arithmetic overflowed {dtype} (largest {largest:.3g}), or a hook on it produced them"


def _stats_magnitude(stats) -> Optional[float]:
    if stats is None or stats.min is None or stats.max is None or stats.true is not None:
        return None
    return max(abs(stats.min), abs(stats.max))


STEP_CHECKS: Dict[str, List[Callable[[CheckContext], List[Diagnosis]]]] = {
    "scaled": [scale_matches_plan],
    "pattern": [pattern_rows_sum_to_one, masked_weights_are_zero,
                field_checks.padding_rows_are_information(fully_masked_rows)],
}
NOT_FINITE_CHECKED = ("mask",)      # a True/False mask has no NaN


def checks_for(key: str) -> List[Callable[[CheckContext], List[Diagnosis]]]:
    """Every step is checked for NaN/inf first (so the value checks after it know), then its own checks
    and the checks for mistakes from the field."""
    found = [] if key in NOT_FINITE_CHECKED else [no_nonfinite(key)]
    return found + list(STEP_CHECKS.get(key, ())) + list(field_checks.STEP_CHECKS.get(key, ()))


def run_step_checks(key: str, ctx: CheckContext) -> Tuple[List[Diagnosis], List[str]]:
    """The diagnoses of the checks after step `key`, and what the clean ones verified."""
    found: List[Diagnosis] = []
    passed: List[str] = []
    for check in checks_for(key):
        result = check(ctx)        # None: the check does not apply to this run
        text, reads_values = getattr(check, "describes", None), getattr(check, "reads_values", True)
        nonfinite = any(d.code == "ATT-W204" for d in found + ctx.trace.diagnoses)
        if nonfinite and reads_values and text in ctx.trace.checks_passed:
            # a ✓ is a claim about every block: once NaN/inf have appeared, a later block may not vouch
            ctx.trace.checks_passed.remove(text)
        if result is None:
            continue
        found.extend(result)
        if not result and text and not text.startswith("no NaN") and not (nonfinite and reads_values):
            passed.append(text)
    return found, passed


# --------------------------------------------------------------------------- opt-in checks (--check all)
#
# These re-run attention on perturbed copies of the spec, so they cost a few runs
# each: `--check all` turns them on.  They hold for *any* correct attention, so they
# catch bugs no single array shows (heads or tokens mixed by a wrong reshape).

CHECK_LEVELS = ("default", "all")
RERUN_TOLERANCE = {"float64": 1e-9, "float32": 1e-4}


def _changed(base: np.ndarray, other: np.ndarray, dtype: str) -> np.ndarray:
    """Where two runs differ by more than rounding (relative to the run's magnitude); NaN counts."""
    scale = 1.0 + float(np.nanmax(np.abs(base))) if base.size and np.isfinite(base).any() else 1.0
    with np.errstate(invalid="ignore"):
        diff = np.abs(other - base)
    return ~(diff <= RERUN_TOLERANCE.get(dtype, 1e-4) * scale) & ~(np.isnan(base) & np.isnan(other))


def _overflowed(base: np.ndarray, out: np.ndarray) -> bool:
    """A perturbed re-run whose output holds NaN/inf where the base run's is finite says nothing."""
    return bool((np.isfinite(base) & ~np.isfinite(out)).any())


def _perturbed(array, rows=None, cols=None, seed: int = 0):
    """A copy of a spec Array with noise (of the array's own size) added to the given rows/columns."""
    import dataclasses
    data = np.array(array.data, dtype=np.float64)
    index = (..., rows if rows is not None else slice(None), cols if cols is not None else slice(None))
    spread = float(np.std(data)) or 1.0
    noise = np.random.default_rng(seed).normal(0.0, spread, size=data[index].shape)
    data[index] = data[index] + noise
    return dataclasses.replace(array, data=data)


def causal_mask_applies(spec, plan) -> Optional[str]:
    """None when every block's mask blocks every later key (so outputs must not depend on later
    tokens); otherwise why the check does not apply."""
    if spec.is_cross:
        return "cross-attention: keys come from the encoder, not from later tokens"
    if plan.size("seq_q") < 2:
        return "a single token has no later tokens"
    q, k = masks.positions(plan.size("seq_q"), plan.size("seq_k"))
    for block in spec.blocks:
        keep = masks.build(block.attention.mask, plan.size("batch"), plan.size("seq_q"), plan.size("seq_k"))
        if keep is None:
            return "no mask"
        if (keep & (k > q)).any():
            return "the mask lets some query see a later key (not causal)"
    return None


Rerun = Callable[..., Dict[str, np.ndarray]]     # rerun(spec, keep=[hooks]) -> hook -> array


def causal_independence(spec, trace, rerun: Rerun) -> List[Diagnosis]:
    """Change the embeddings of later tokens; the outputs of earlier tokens must not move."""
    import dataclasses
    plan = trace.plan
    if causal_mask_applies(spec, plan) is not None:
        return None
    seq = plan.size("seq_q")
    final = plan.steps[-1]
    base = rerun(spec, keep=[final.hook])[final.hook]
    for cut in sorted({max(1, seq // 2), seq - 1}):
        x = _perturbed(spec.source.embeddings, rows=slice(cut, None), seed=cut)
        changed_spec = dataclasses.replace(spec, source=dataclasses.replace(spec.source, embeddings=x))
        out = rerun(changed_spec, keep=[final.hook])[final.hook]
        if _overflowed(base, out):
            return None                     # the perturbed run overflowed: no verdict either way
        moved = _changed(base[:, :cut], out[:, :cut], trace.dtype).any(axis=(0, 2))
        if moved.any():
            rows = [int(i) for i in np.flatnonzero(moved)]
            ctx = CheckContext(plan, {}, trace, spec, final.layer)
            names = ", ".join(ctx.token_q(i) for i in rows[:8]) + (" ..." if len(rows) > 8 else "")
            return [ctx.warn("ATT-W224", final.key, f"under a causal mask, output row(s) {names} changed when "
                             f"only later tokens (positions {cut}–{seq - 1}) were changed: earlier tokens "
                             f"see the future", details=[f"re-ran with the embeddings of positions {cut}–{seq - 1} "
                                                         f"perturbed; rows 0–{cut - 1} must stay identical"],
                             hint="the mask must block every key after the query, before softmax, in every "
                                  "head; a reshape that mixes tokens (split/merge heads) leaks them too")]
    return []


def head_independence(spec, trace, rerun: Rerun) -> List[Diagnosis]:
    """Change one head's columns of W_q (then of W_v) in the first block; only that head's output may move."""
    plan = trace.plan
    h, kv = plan.size("n_heads"), plan.size("n_kv_heads")
    if h < 2:
        return None
    layer = plan.steps[-1].layer if not plan.named_blocks else 0
    att = spec.attention_of(layer)
    d_head, d_v, group = plan.size("d_head"), plan.size("d_v"), h // kv
    linear = att.layout == "linear"
    concat = plan.step("z_concat", layer).hook
    base = rerun(spec, keep=[concat])[concat]
    ctx = CheckContext(plan, {}, trace, spec, layer)
    for head in sorted({0, h - 1}):
        trials = [("W_q", head * d_head, d_head, {head}, f"head {head}'s columns of W_q")]
        if kv > 1:
            g = head // group
            trials.append(("W_v", g * d_v, d_v, set(range(g * group, (g + 1) * group)),
                           f"kv head {g}'s columns of W_v"))
        for weight, start, width, allowed, what in trials:
            span = slice(start, start + width)
            w = _perturbed(getattr(att, weight), rows=span if linear else None, cols=None if linear else span,
                           seed=7 + head)
            import dataclasses
            out = rerun(spec.with_attention(layer, dataclasses.replace(att, **{weight: w})), keep=[concat])
            if _overflowed(base, out[concat]):
                return None
            moved = _changed(base, out[concat], trace.dtype)
            heads_moved = {i for i in range(h) if moved[..., i * d_v:(i + 1) * d_v].any()}
            leaked = sorted(heads_moved - allowed)
            if leaked:
                return [ctx.warn("ATT-W225", "z_concat", f"head(s) {', '.join(map(str, leaked))} changed when "
                                 f"only {what} changed: heads must be independent of each other's weights",
                                 details=[f"re-ran with {what} perturbed; the other heads' columns of "
                                          f"{concat} must stay identical"],
                                 hint="split heads as reshape (seq, n_heads·d_head) → (seq, n_heads, d_head), "
                                      "then transpose; merge them back in the reverse order")]
    return []


causal_independence.describes = "outputs do not depend on later tokens (re-run with later tokens changed)"
head_independence.describes = "each head depends only on its own weights (re-run with one head's W_q, W_v changed)"
EXPENSIVE_CHECKS = (causal_independence, head_independence, crosscheck.crosscheck)
# a finite float64 recomputation still shows *where* a trace with NaN/inf went wrong (a masked NaN that
# leaked, a softmax that overflowed): it runs on such traces, but only to report the divergence
DIVERGENCE_CHECKS = (crosscheck.crosscheck,)


def expensive_checks(spec, trace, rerun: Rerun) -> Tuple[List[Diagnosis], List[str]]:
    """The opt-in checks (`--check all`); `rerun(spec, keep=hooks)` runs the same step functions
    without checks and returns the kept arrays."""
    found: List[Diagnosis] = []
    passed: List[str] = []
    nonfinite = any(d.code == "ATT-W204" for d in trace.diagnoses)
    for check in EXPENSIVE_CHECKS:
        if nonfinite and check not in DIVERGENCE_CHECKS:
            continue                        # NaN/inf in the trace: comparing two re-runs of it proves nothing
        vouched = len(trace.checks_passed)
        with np.errstate(all="ignore"):     # perturbing values near the float limit may overflow
            result = check(spec, trace, rerun)
        if nonfinite:                       # it may name where the trace differs, never vouch for it
            del trace.checks_passed[vouched:]
        if result is None:
            continue
        found.extend(result)
        if not result and not nonfinite:
            passed.append(check.describes)
    return found, passed
