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

from attntrace.analysis import crosscheck, field_checks
from attntrace.core import masks
from attntrace.core.masks import empty_rows, looks_like_ignore, positions
from attntrace.core.positional import alibi_slopes
from attntrace.core.stats import PREVIEW_EDGE, edge_indices, preview
from attntrace.errors import Diagnosis
from attntrace.hookpoints import point_of

ROW_SUM_TOLERANCE = {"float64": 1e-9, "float32": 1e-5}


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
    leak = np.where(keep, 0.0, np.abs(np.nan_to_num(pattern, nan=0.0)))   # NaN is ATT-W204's to report
    if not (leak > 0).any():
        return []
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
    nonzero = np.abs(qk) > 1e-12
    if not nonzero.any():
        return []
    ratio = scaled[nonzero] / qk[nonzero]
    actual = float(np.median(ratio))
    if abs(actual - expected) <= 1e-6 * max(abs(expected), 1.0):
        return []
    d_head = ctx.plan.size("d_head")
    return [ctx.warn("ATT-W205", "scaled", f"scores were scaled by {actual:.6g}, the plan says "
                     f"{expected:.6g} ({ctx.block.scale_text}, d_head={d_head})",
                     hint=f"the standard scale is 1/√d_head = {d_head ** -0.5:.6g}, not 1/√d_model")]


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
        return [ctx.warn("ATT-W204", key, f"{int(bad.sum())} NaN/inf value(s) in {ctx.step(key).hook}, "
                         f"first at index {index}",
                         hint="an earlier step overflowed, or a fully masked row was softmaxed without care")]
    return check


STEP_CHECKS: Dict[str, List[Callable[[CheckContext], List[Diagnosis]]]] = {
    "scaled": [scale_matches_plan],
    "pattern": [pattern_rows_sum_to_one, masked_weights_are_zero,
                field_checks.padding_rows_are_information(fully_masked_rows)],
}
FINITE_CHECKED = ("q", "k", "v", "qk", "scaled", "attn_scores", "pattern", "z", "out")


def checks_for(key: str) -> List[Callable[[CheckContext], List[Diagnosis]]]:
    found = list(STEP_CHECKS.get(key, ())) + list(field_checks.STEP_CHECKS.get(key, ()))
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


def expensive_checks(spec, trace, rerun: Rerun) -> Tuple[List[Diagnosis], List[str]]:
    """The opt-in checks (`--check all`); `rerun(spec, keep=hooks)` runs the same step functions
    without checks and returns the kept arrays."""
    found: List[Diagnosis] = []
    passed: List[str] = []
    for check in EXPENSIVE_CHECKS:
        result = check(spec, trace, rerun)
        if result is None:
            continue
        found.extend(result)
        if not result:
            passed.append(check.describes)
    return found, passed
