"""The engine: executes a plan with vectorised numpy and returns a Trace.

Each step of the plan is a small function of the run's state.  Bugs
(:mod:`attntrace.bugs`) are alternative step functions, so ``--inject`` runs
the same loop with one step swapped.  After every step the hooks fire, the
stats and cheap invariant checks run on the live array, and the array is
kept only when it is asked for, hooked, or small; score-sized steps work in
place when their input is not kept, so a 4k-token, 12-head run needs one
(heads × seq × seq) buffer, not five.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Set, Tuple, Union

import numpy as np

from attntrace.analysis import checks as checks_mod
from attntrace.core import masks
from attntrace.core import positional
from attntrace.core.hooks import HookFn, HookSet
from attntrace.core.plan import Plan, plan_from_spec
from attntrace.inputs.spec import Spec, load_spec
from attntrace.core.stats import array_stats, preview, row_winners, scaled_stats
from attntrace.core.trace import Trace
from attntrace.hookpoints import point_of

AUTO_KEEP_ELEMENTS = 1 << 20     # keep arrays up to 1M values (8 MB) when keep="auto"
PREVIEW_EDGE = 4                 # rows/columns kept at each end of a big array


class State:
    """Arrays of the steps run so far, with copy-on-write for kept ones."""

    def __init__(self, spec: Spec, plan: Plan, dtype: np.dtype):
        self.spec, self.plan, self.dtype = spec, plan, dtype
        self.values: Dict[str, np.ndarray] = {}
        self.protected: Set[str] = set()     # kept or hooked: never modified in place

    def __getitem__(self, key: str) -> np.ndarray:
        return self.values[key]

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def take(self, key: str) -> np.ndarray:
        """The array of `key` for in-place use (a copy when someone holds on to it)."""
        array = self.values[key]
        return array.copy() if key in self.protected else array

    def x(self) -> np.ndarray:
        return self.values["pos"] if "pos" in self.values else self.values["embed"]

    def x_kv(self) -> np.ndarray:
        return self.values["encoder_embed"] if "encoder_embed" in self.values else self.x()

    def cast(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array, dtype=self.dtype)


# --------------------------------------------------------------------------- steps

def _batched(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else array


def project(state: State, x: np.ndarray, weight: str, bias: str, heads: int) -> np.ndarray:
    """x (batch, seq, d_model) -> (batch, seq, heads, width/heads)."""
    att = state.spec.attention
    w = state.cast(getattr(att, weight).data)
    y = x @ (w if att.layout == "x_at_w" else w.T)
    b = getattr(att, bias)
    if b is not None:
        y += state.cast(b.data)
    batch, seq, width = y.shape
    return y.reshape(batch, seq, heads, width // heads)


def step_embed(state: State) -> np.ndarray:
    return state.cast(_batched(state.spec.source.embeddings.data))


def step_encoder_embed(state: State) -> np.ndarray:
    return state.cast(_batched(state.spec.encoder.embeddings.data))


def step_pos(state: State) -> np.ndarray:
    pos = state.spec.positional
    x = state["embed"]
    seq, d_model = x.shape[1], x.shape[2]
    table = positional.sinusoidal(seq, d_model, pos.base) if pos.kind == "sinusoidal" else \
        positional.learned(pos.table.data, seq)
    return x + state.cast(table)


def step_q(state: State) -> np.ndarray:
    return project(state, state.x(), "W_q", "b_q", state.plan.size("n_heads"))


def step_k(state: State) -> np.ndarray:
    return project(state, state.x_kv(), "W_k", "b_k", state.plan.size("n_kv_heads"))


def step_v(state: State) -> np.ndarray:
    return project(state, state.x_kv(), "W_v", "b_v", state.plan.size("n_kv_heads"))


def grouped_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Q (b, sq, h, d) · K (b, sk, kv, d)ᵀ -> (b, h, sq, sk); query head i uses kv head i // (h/kv)."""
    b, sq, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, sq, kv, h // kv, d).transpose(0, 2, 3, 1, 4)      # (b, kv, g, sq, d)
    kt = k.transpose(0, 2, 3, 1)[:, :, None]                            # (b, kv, 1, d, sk)
    return (qg @ kt).reshape(b, h, sq, k.shape[1])


def grouped_mix(pattern: np.ndarray, v: np.ndarray) -> np.ndarray:
    """pattern (b, h, sq, sk) · V (b, sk, kv, dv) -> z (b, sq, h, dv)."""
    b, h, sq, sk = pattern.shape
    kv, dv = v.shape[2], v.shape[3]
    pg = pattern.reshape(b, kv, h // kv, sq, sk)
    vt = v.transpose(0, 2, 1, 3)[:, :, None]                            # (b, kv, 1, sk, dv)
    return (pg @ vt).reshape(b, h, sq, dv).transpose(0, 2, 1, 3)


def _rotate(state: State, key: str) -> np.ndarray:
    """RoPE on Q or K (batch, seq, heads, d_head); positions with the KV-cache offset of the masks."""
    x = state[key]
    if x.shape[-1] % 2:
        from attntrace.errors import Diagnosis, ShapeError
        step, plan = state.plan.step("rot_" + key), state.plan
        raise ShapeError(Diagnosis(
            code="ATT-E140", step=step.label, hook=step.hook, rule=step.rule,
            message=f"shape mismatch in step {step.label}: RoPE rotates pairs of features, "
                    f"but d_head={x.shape[-1]} is odd", bindings=[plan.dims["d_head"].describe()],
            locations=[loc for loc in (state.spec.positional.location,) if loc is not None],
            hint="use an even d_head (every RoPE model does), or another positional encoding"))
    pos = state.spec.positional
    q_pos, k_pos = positional.rope_positions(state.plan.size("seq_q"), state.plan.size("seq_k"))
    return positional.rope(x, q_pos if key == "q" else k_pos, pos.base, pos.pairing)


def step_rot_q(state: State) -> np.ndarray:
    return _rotate(state, "q")


def step_rot_k(state: State) -> np.ndarray:
    return _rotate(state, "k")


def step_qk(state: State) -> np.ndarray:
    q = state["rot_q"] if "rot_q" in state else state["q"]
    k = state["rot_k"] if "rot_k" in state else state["k"]
    return grouped_scores(q, k)


def step_scaled(state: State) -> np.ndarray:
    scores = state.take("qk")
    scores *= state.dtype.type(state.plan.scale)
    if state.plan.positional == "alibi":      # ALiBi: a per-head linear bias on the scaled scores
        _, h, sq, sk = scores.shape
        scores += state.cast(positional.alibi_bias(h, sq, sk))
    return scores


def step_mask(state: State) -> np.ndarray:
    plan = state.plan
    keep = masks.build(state.spec.attention.mask, plan.size("batch"), plan.size("seq_q"), plan.size("seq_k"))
    return keep


def step_attn_scores(state: State) -> np.ndarray:
    scores = state.take("scaled")
    if "mask" in state:
        np.copyto(scores, state.dtype.type(-np.inf), where=~state["mask"])
    return scores


def softmax(scores: np.ndarray, axis: int = -1, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Stable softmax; a row whose entries are all -inf gives zeros, not NaN (safe softmax)."""
    out = scores if out is None else out
    top = scores.max(axis=axis, keepdims=True)
    top[~np.isfinite(top)] = 0                    # all-blocked rows: exp(-inf - 0) = 0
    np.subtract(scores, top, out=out)
    np.exp(out, out=out)
    total = out.sum(axis=axis, keepdims=True)
    total[total == 0] = 1
    out /= total
    return out


def step_pattern(state: State) -> np.ndarray:
    return softmax(state.take("attn_scores"))


def step_z(state: State) -> np.ndarray:
    return grouped_mix(state["pattern"], state["v"])


def step_z_concat(state: State) -> np.ndarray:
    z = state["z"]
    b, sq, h, dv = z.shape
    return z.reshape(b, sq, h * dv)


def step_out(state: State) -> np.ndarray:
    att = state.spec.attention
    concat = state["z_concat"]
    if att.W_o is None:
        return concat.copy()
    w = state.cast(att.W_o.data)
    out = concat @ (w if att.layout == "x_at_w" else w.T)
    if att.b_o is not None:
        out += state.cast(att.b_o.data)
    return out


StepFn = Callable[[State], np.ndarray]
STEP_FUNCTIONS: Dict[str, StepFn] = {
    "embed": step_embed, "pos": step_pos, "encoder_embed": step_encoder_embed,
    "q": step_q, "k": step_k, "v": step_v, "rot_q": step_rot_q, "rot_k": step_rot_k,
    "qk": step_qk, "scaled": step_scaled, "mask": step_mask, "attn_scores": step_attn_scores,
    "pattern": step_pattern, "z": step_z, "z_concat": step_z_concat, "out": step_out,
}


# --------------------------------------------------------------------------- run

Keep = Union[str, Iterable[str], None]


def _keep_set(keep: Keep, plan: Plan) -> Optional[Set[str]]:
    """None means 'auto' (small arrays); otherwise the hook names to keep."""
    if keep is None or keep == "auto":
        return None
    if keep == "all":
        return set(plan.hooks)
    from attntrace.hookpoints import match_hooks
    names: Set[str] = set()
    for pattern in ([keep] if isinstance(keep, str) else keep):
        names.update(match_hooks(pattern, plan.hooks))
    return names


def run(spec: Union[Spec, str, dict], *, hooks: Sequence[Tuple[str, HookFn]] = (), keep: Keep = "auto",
        dtype: str = "float64", overrides: Optional[Dict[str, StepFn]] = None,
        check: bool = True, on_step: Optional[Callable] = None, spec_hooks: bool = True) -> Trace:
    """Run attention on a spec (a Spec, a YAML path or a dict) and return its Trace.

    hooks: (name or pattern, fn) pairs, fn(array, *, hook) -> array | None.
    spec_hooks: also apply the spec's own `hooks:` list (first, before `hooks`).
    on_step: called as on_step(step, array, trace) after each step (`run --step`).
    keep: "auto" (arrays up to 1M values), "all", or hook names/patterns to keep.
    dtype: "float64" (default) or "float32".
    overrides: step key -> replacement function (how bugs are injected).
    """
    from attntrace.analysis.diagnose import preflight
    spec = load_spec(spec)
    plan = plan_from_spec(spec)
    shape_warnings = preflight(spec, plan)      # raises ShapeError; returns what sizes cannot settle
    np_dtype = np.dtype(dtype)
    state = State(spec, plan, np_dtype)
    if spec_hooks and spec.hooks:
        from attntrace.analysis.actions import hooks_from_spec
        hooks = hooks_from_spec(spec) + list(hooks)
    hookset = HookSet(hooks, plan.hooks)
    wanted = _keep_set(keep, plan)
    trace = Trace(spec=spec, plan=plan, dtype=np_dtype.name)
    trace.diagnoses.extend(shape_warnings if check else [])
    ctx = checks_mod.CheckContext(plan, state.values, trace, spec)
    functions = dict(STEP_FUNCTIONS, **(overrides or {}))
    for step in plan.steps:
        array = functions[step.key](state)
        array = hookset.fire(step.hook, array)
        state.values[step.key] = array
        keep_it = step.hook in hookset.hooked or (
            array.size <= AUTO_KEEP_ELEMENTS if wanted is None else step.hook in wanted)
        if keep_it:
            state.protected.add(step.key)
            trace.arrays[step.hook] = array
        else:
            rows, cols, _ = point_of(step.hook).display
            trace.previews[step.hook] = preview(array, rows, cols, PREVIEW_EDGE)
        trace.stats[step.hook] = _step_stats(step, array, state, trace,
                                             standard=step.key not in (overrides or {}) and
                                             step.hook not in hookset.hooked)
        if step.key == "pattern":
            trace.winners = row_winners(array)
            trace.row_sums = array.sum(axis=-1, dtype=np.float64)
        if check:
            found, passed = checks_mod.run_step_checks(step.key, ctx)
            trace.diagnoses.extend(found)
            trace.checks_passed.extend(passed)
        _release(state, step.key)
        if on_step is not None:
            on_step(step, array, trace)
    if check and not any(d.code == "ATT-W204" for d in trace.diagnoses):
        trace.checks_passed.append("no NaN or inf in any step")
    return trace


def _step_stats(step, array: np.ndarray, state: State, trace: Trace, standard: bool):
    """Stats of a step's result, skipping passes over score-sized arrays where the
    engine knows the answer: the standard scale step multiplies by a positive
    factor, and masked scores hold -inf exactly where the mask blocks."""
    if step.key == "scaled" and standard and state.plan.positional != "alibi" and state.plan.scale > 0:
        return scaled_stats(trace.stats["attn.hook_qk"], state.plan.scale)
    if step.key == "attn_scores" and "mask" in state:
        return array_stats(array, valid=state["mask"], trusted=standard)
    return array_stats(array)


# Arrays no later step reads can go as soon as their step is done (unless kept).
_LAST_READER = {"qk": "scaled", "scaled": "attn_scores", "attn_scores": "pattern"}


def _release(state: State, finished: str) -> None:
    for key, last in _LAST_READER.items():
        if last == finished and key in state.values and key not in state.protected:
            # checks of the finished step have run; the buffer was reused in place
            del state.values[key]
