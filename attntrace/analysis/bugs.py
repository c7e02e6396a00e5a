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

Two kinds of bugs: the textbook mistakes of hand-written attention (seeds 000–004),
and "bugs from the field" -- the subtler mistakes real projects shipped, each with
the public report where it was seen (``seen_in``).  Every bug carries its ``fix``;
``fixed`` builds the fixed code's steps (by default the engine's own), and
:func:`inject` re-runs them to verify that the fix gives the clean output.  The
detectors of the field bugs live in :mod:`attntrace.analysis.field_checks` and
:mod:`attntrace.analysis.crosscheck`; none of them knows which bug was injected.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from attntrace.analysis.checks import expensive_checks
from attntrace.analysis.diagnose import Operands, check_broadcast, check_matmul, check_reshape
from attntrace.analysis.field_checks import input_precision, padding_keep
from attntrace.analysis.run import prepare, rerun, rerun_with, run
from attntrace.core import engine, masks, ops, positional
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
    "ATT-W240": "RoPE must rotate each pair by its position's angle",
    "ATT-W241": "positions count from each sequence's first real token",
    "ATT-W242": "a causal mask must let each query see its own position, not later ones",
    "ATT-W243": "a sliding window keeps exactly its size in keys",
    "ATT-W244": "ALiBi slopes must be the paper's geometric sequence",
    "ATT-W246": "NaN at a masked position must not reach the output",
    "ATT-W247": "an independent recomputation must agree within the dtype's rounding (--check all)",
    "ATT-W248": "masked scores must be −inf, not a large negative number",
}
EXPENSIVE_CODES = ("ATT-W224", "ATT-W225", "ATT-W247")


@dataclass(frozen=True)
class Bug:
    name: str
    description: str                         # one line
    steps: Tuple[str, ...]                   # engine steps it replaces
    caught_by: Tuple[str, ...]               # codes that catch it
    needs: str                               # when it can show at all
    build: Callable[[Notes], Dict[str, StepFn]]
    blocker: Callable[..., Optional[str]]    # (spec, plan) -> why it cannot show, or None
    fix: str = ""                            # how the code should read (PyTorch)
    seen_in: Tuple[str, ...] = ()            # public reports: "transformers#25199" (owner/repo#n on GitHub)
    explanation: str = ""                    # what goes wrong and why, in a sentence or two
    fixed: Optional[Callable[[Notes], Dict[str, StepFn]]] = None   # the fixed code's steps (None: the engine's)
    fixed_precision: Optional[str] = None    # the fixed code still stores numbers in this dtype (float16 ...)

    def overrides(self, notes: Optional[Notes] = None) -> Dict[str, StepFn]:
        """Step key -> buggy step function; warnings go to `notes`."""
        return self.build(notes if notes is not None else [])

    def fixed_overrides(self) -> Dict[str, StepFn]:
        """The steps of the fixed code (what the fix changes, with the bug's surroundings kept)."""
        return self.fixed([]) if self.fixed is not None else {}

    def cannot_show(self, spec, plan) -> Optional[str]:
        return self.blocker(spec, plan)

    def to_json(self) -> Dict:
        return {"name": self.name, "description": self.description, "steps": list(self.steps),
                "caught_by": list(self.caught_by), "needs": self.needs, "fix": self.fix,
                "seen_in": [{"report": r, "url": report_url(r)} for r in self.seen_in],
                "explanation": self.explanation}


# the projects behind the short report names (owner/repo on GitHub)
REPOSITORIES = {"transformers": "huggingface/transformers", "nanotron": "huggingface/nanotron",
                "gpt-neox": "EleutherAI/gpt-neox", "TransformerLens": "TransformerLensOrg/TransformerLens",
                "pytorch": "pytorch/pytorch", "mlx": "ml-explore/mlx", "vllm": "vllm-project/vllm"}


def report_url(report: str) -> Optional[str]:
    """github.com address of a report written `project#number` or `owner/repo#number` (GitHub sends
    /issues/N to the pull request when N is one); None for other references (a seed, "(classic)")."""
    project, _, number = report.partition("#")
    repository = REPOSITORIES.get(project, project if project.count("/") == 1 else None)
    if not number.isdigit() or repository is None:
        return None
    return f"https://github.com/{repository}/issues/{number}"


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


def _textbook_softmax(state) -> np.ndarray:
    """softmax as F.softmax computes it: subtract the row max, exp, divide (an all -inf row is NaN)."""
    scores = state.take("attn_scores")
    with np.errstate(invalid="ignore"):                       # -inf - (-inf) = NaN
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _fully_masked_row_neg_inf(notes: Notes) -> Dict[str, StepFn]:
    return {"pattern": _textbook_softmax}


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


# =========================================================================== bugs from the field

def _rotated(state, which: str, *, positions=None, pairing: Optional[str] = None, cos_sin=None) -> np.ndarray:
    """RoPE on Q or K as the engine does it, with one thing changed (positions, pairing or the cos/sin table)."""
    x = state[which]
    if x.shape[-1] % 2:
        return engine.STEP_FUNCTIONS["rot_" + which](state)      # the engine's own diagnosis (ATT-E140)
    pos = state.spec.positional
    if positions is None:
        q_pos, k_pos = engine.token_positions(state.spec, state.plan, state.layer)
        positions = q_pos if which == "q" else k_pos
    if cos_sin is not None:
        cos, sin = cos_sin(positions, x.shape[-1], pos.base)
        return positional.rotate_pairs(x, cos[:, :, None, :], sin[:, :, None, :], pairing or pos.pairing)
    return positional.rope(x, positions, pos.base, pairing or pos.pairing)


def _rotation_steps(change: Callable[[engine.State, str], Dict]) -> Dict[str, StepFn]:
    """rot_q and rot_k as the engine computes them, with the keywords `change(state, 'q' or 'k')` changes."""
    return {f"rot_{w}": (lambda state, w=w: _rotated(state, w, **change(state, w))) for w in "qk"}


def _rope_pairing_mismatch(notes: Notes) -> Dict[str, StepFn]:
    return _rotation_steps(lambda state, w: {
        "pairing": "interleaved" if state.spec.positional.pairing == "half" else "half"})


def _half_angles(precision: str = "float16", tables: str = "float16"):
    """gpt-neox#1003's cos/sin cache: inv_freq and the positions in `precision`, their product
    rounded to it, cos and sin of the rounded angle (computed in float32, as torch computes half
    precision math) rounded to `tables`."""
    def cos_sin(positions, d_head: int, base: float):
        inv_freq = ops.round_to(1.0 / base ** (np.arange(0, d_head, 2) / d_head), precision)
        t = ops.round_to(np.asarray(positions, dtype=np.float64), precision)
        angles = ops.round_to(t[..., None] * inv_freq, precision).astype(np.float32)
        return ops.round_to(np.cos(angles), tables), ops.round_to(np.sin(angles), tables)
    return cos_sin


def _rope_low_precision(notes: Notes) -> Dict[str, StepFn]:
    return _rotation_steps(lambda state, w: {"cos_sin": _half_angles()})


def _rope_float32_angles(notes: Notes) -> Dict[str, StepFn]:
    """The fix of rope-low-precision: angles in float32, only the cos/sin tables stored in float16."""
    return _rotation_steps(lambda state, w: {"cos_sin": _half_angles("float32", "float16")})


def _positions_from_the_pads(state, which: str) -> Dict:
    q_pos, k_pos = positional.rope_positions(state.plan.size("seq_q"), state.plan.size("seq_k"))
    return {"positions": (q_pos if which == "q" else k_pos)[None]}


def _left_padding_positions(notes: Notes) -> Dict[str, StepFn]:
    def pos(state):
        return engine.add_positions(state, np.arange(state["embed"].shape[1])[None])    # 0, 1, ... from the pads
    return {"pos": pos, **_rotation_steps(_positions_from_the_pads)}


def _top_left_mask(state) -> np.ndarray:
    """The spec's mask with its causal (window, prefix) part aligned top-left: query i at position i."""
    mask, plan = state.attention.mask, state.plan
    b, seq_q, seq_k = plan.size("batch"), plan.size("seq_q"), plan.size("seq_k")
    q, k = np.arange(seq_q)[:, None], np.arange(seq_k)[None, :]
    if not (mask.causal or mask.prefix):
        return engine.step_mask(state)
    keep = (k <= q) | (k < mask.prefix) if mask.prefix else (k <= q)
    if mask.window:
        keep = keep & (q - k < mask.window)
    others = masks.build(dataclasses.replace(mask, causal=False, window=None, prefix=None), b, seq_q, seq_k)
    return np.ascontiguousarray(keep[None, None] & (others if others is not None else True))


def _kv_cache_causal_alignment(notes: Notes) -> Dict[str, StepFn]:
    return {"mask": _top_left_mask}


def _weak_mask_value(notes: Notes) -> Dict[str, StepFn]:
    precision: Dict[int, str] = {}

    def attn_scores(state):
        scores = state.take("scaled")
        blocked = ~state["mask"]
        where = precision.setdefault(id(state.spec), input_precision(state.spec))
        with np.errstate(over="ignore", invalid="ignore"):     # scores + mask * -1e9, in the inputs' precision
            weak = ops.round_to(scores + ops.round_to(np.array(-1e9), where), where)
        np.copyto(scores, weak, where=blocked)
        return scores
    return {"attn_scores": _with_mask("attn_scores", attn_scores),
            "pattern": _with_mask("pattern", _textbook_softmax)}


def _nan_in_padded_slots(key: str) -> StepFn:
    """K or V as the engine computes it, with NaN in the padded positions (torch.empty slots)."""
    def step(state):
        values = engine.STEP_FUNCTIONS[key](state)
        keep = padding_keep(state.spec, state.layer, values.shape[1])
        if keep is not None:
            values = values.copy()
            values[np.broadcast_to(~keep, values.shape[:2])] = np.nan
        return values
    return step


def _nan_leak_through_mask(notes: Notes) -> Dict[str, StepFn]:
    def attn_scores(state):
        scores = state.take("scaled")
        scores += masks.additive(state["mask"])                   # + (-inf): NaN + -inf = NaN
        return scores
    return {"k": _nan_in_padded_slots("k"), "v": _nan_in_padded_slots("v"),
            "attn_scores": _with_mask("attn_scores", attn_scores)}


def _nan_safe_masking(notes: Notes) -> Dict[str, StepFn]:
    """The fix of nan-leak-through-mask, with the NaN still in the padded slots: masked_fill the
    scores (the engine's step) and zero the values of padded keys before weights·V."""
    def z(state):
        v = state["v"]
        keep = padding_keep(state.spec, state.layer, v.shape[1])
        safe = v if keep is None else np.where(np.broadcast_to(keep, v.shape[:2])[:, :, None, None], v, 0.0)
        return ops.grouped_mix(state["pattern"], safe)
    return {"k": _nan_in_padded_slots("k"), "v": _nan_in_padded_slots("v"), "z": z}


def _sliding_window_off_by_one(notes: Notes) -> Dict[str, StepFn]:
    def mask(state):
        if not state.attention.mask.window:
            return engine.step_mask(state)
        wider = dataclasses.replace(state.attention.mask, window=state.attention.mask.window + 1)
        plan = state.plan
        return masks.build(wider, plan.size("batch"), plan.size("seq_q"), plan.size("seq_k"))
    return {"mask": mask}


def _power_of_two_slopes(n_heads: int) -> np.ndarray:
    """mlx#343: the geometric sequence 2^(-8(h+1)/n) for any n (right only when n is a power of two)."""
    return 2.0 ** (-8.0 * np.arange(1, n_heads + 1) / n_heads)


def _alibi_slopes_non_power_of_two(notes: Notes) -> Dict[str, StepFn]:
    def scaled(state):
        scores = state.take("qk")
        scores *= state.dtype.type(state.block.scale)
        _, h, seq_q, seq_k = scores.shape
        if state.plan.positional == "alibi":
            q, k = masks.positions(seq_q, seq_k)
            scores -= state.cast(_power_of_two_slopes(h)[:, None, None] * np.abs(q - k)[None])
        return scores
    return {"scaled": scaled}


def _fused_qkv_split_in_thirds(notes: Notes) -> Dict[str, StepFn]:
    def make(key: str) -> StepFn:
        weight, bias, heads_dim, width_dim, seq_axis = _PROJECTION[key]

        def step(state):
            att, plan = state.attention, state.plan
            if state.spec.is_cross or plan.size("n_kv_heads") == plan.size("n_heads"):
                return engine.STEP_FUNCTIONS[key](state)          # no fused [Q|K|V], or thirds are right
            axis = 1 if att.layout == "x_at_w" else 0
            fused = np.concatenate([state.cast(getattr(att, w).data) for w in ("W_q", "W_k", "W_v")], axis=axis)
            biases = [getattr(att, b) for b in ("b_q", "b_k", "b_v")]
            fused_bias = None if all(b is None for b in biases) else np.concatenate(
                [state.cast(b.data) if b is not None else np.zeros(getattr(att, w).data.shape[1 - axis])
                 for b, w in zip(biases, ("W_q", "W_k", "W_v"))])
            flat = ops.linear(state.x(), fused, fused_bias, att.layout)           # [Q | K | V]
            width = flat.shape[-1]
            third = -(-width // 3)                                                 # torch.chunk(3)'s size
            index = "qkv".index(key)
            part = flat[..., index * third:(index + 1) * third]
            b, s, got = part.shape
            shape, axes, _ = _named(part.shape, ("batch", seq_axis, "third of [Q|K|V]"))
            origin = (f"X @ [W_q|W_k|W_v] ({width} columns: {plan.size('n_heads')}+2·{plan.size('n_kv_heads')} "
                      f"heads of {plan.size('d_head')}) → chunk(3): part {index + 1}, {got} columns")
            operand = Operand(key.upper(), shape, axes, origin, getattr(att, weight).location)
            target = [("batch", b), (seq_axis, s), (heads_dim, plan.size(heads_dim)),
                      (width_dim, plan.size(width_dim))]
            check_reshape(plan, key, operand, target[1:] if b == 1 else target,
                          hint="split a fused projection by sizes: qkv.split([n_heads·d_head, n_kv_heads·d_head, "
                               "n_kv_heads·d_head], dim=-1); equal thirds are right only when n_kv_heads = n_heads")
            return part.reshape(b, s, plan.size(heads_dim), -1)
        return step
    return {key: make(key) for key in ("q", "k", "v")}


def _softmax_half(notes: Notes) -> Dict[str, StepFn]:
    def pattern(state):
        scores = state.take("attn_scores").astype(np.float16)
        with np.errstate(over="ignore", invalid="ignore"):     # exp(x) / Σ exp(x), no max subtracted, float16
            e = np.exp(scores)
            weights = e / e.sum(axis=-1, keepdims=True, dtype=np.float16)
        return weights.astype(state.dtype)
    return {"pattern": pattern}


def _softmax_float32_max_subtracted(notes: Notes) -> Dict[str, StepFn]:
    """The fix: the max subtracted, exp and sum in float32; the weights stored in float16 again."""
    def pattern(state):
        scores = state.take("attn_scores").astype(np.float32)
        return ops.round_to(ops.softmax(scores), "float16").astype(state.dtype)
    return {"pattern": pattern}


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


def _needs_rope(extra: Callable = lambda spec, plan: None) -> Callable:
    def blocker(spec, plan) -> Optional[str]:
        if plan.positional != "rope":
            return f"no RoPE here (positional: {plan.positional})"
        if plan.size("seq_k") == 1 and plan.size("seq_q") == 1:
            return "one token at position 0: every rotation angle is 0"
        return extra(spec, plan)
    return blocker


def _pairs_differ(spec, plan) -> Optional[str]:
    if plan.size("d_head") == 2:
        return "d_head = 2: one pair, the same in both conventions"
    return None


def _needs_left_padding(spec, plan) -> Optional[str]:
    kind = plan.positional
    if kind not in ("rope", "learned", "sinusoidal"):
        return f"positions enter only through {kind}" + (" (relative distances: a shift changes nothing)"
                                                         if kind == "alibi" else "")
    width = plan.size("seq_k") if kind == "rope" else plan.size("seq_q")
    keep = None if (spec.is_cross and kind != "rope") else padding_keep(spec, None, width)
    if keep is None or not (keep.any(axis=-1) & ~keep[:, 0]).any():
        return "no item starts with padding (no left padding)"
    return None


def _needs_misaligned_causal(spec, plan) -> Optional[str]:
    mask = spec.attention_of(0).mask
    if not (mask.causal or mask.prefix):
        return "the mask is not causal"
    if plan.size("seq_q") == plan.size("seq_k"):
        return "seq_q = seq_k: the top-left and bottom-right causal masks are the same"
    return None


def _needs_weak_value_to_differ(spec, plan) -> Optional[str]:
    why_not = _blocks_nothing(spec, plan)
    if why_not is None and input_precision(spec) == "float16" and _needs_empty_row(spec, plan) is not None:
        return "in float16 −1e9 is −inf, and no query row is fully masked: nothing changes"
    return why_not


def _needs_padding(spec, plan) -> Optional[str]:
    keep = padding_keep(spec, None, plan.size("seq_k"))
    if keep is None or keep.all():
        return "no padded key (the mask has no padding) to hold the NaN"
    return None


def _needs_window_short_of_the_sequence(spec, plan) -> Optional[str]:
    window = spec.attention_of(0).mask.window
    if not window:
        return "no sliding window"
    if plan.size("seq_k") <= window:
        return f"the window ({window}) already spans the {plan.size('seq_k')} keys: one more changes nothing"
    return None


def _needs_alibi_heads_not_power_of_two(spec, plan) -> Optional[str]:
    if plan.positional != "alibi":
        return f"no ALiBi here (positional: {plan.positional})"
    h = plan.size("n_heads")
    if h & (h - 1) == 0:
        return f"n_heads = {h} is a power of two: the simple formula is the paper's"
    if plan.size("seq_q") == 1 and plan.size("seq_k") == 1:
        return "one token: every distance is 0"
    return None


def _needs_gqa_self_attention(spec, plan) -> Optional[str]:
    if spec.is_cross:
        return "cross-attention: K and V project another sequence, so there is no fused [Q|K|V]"
    h, kv = plan.size("n_heads"), plan.size("n_kv_heads")
    if kv == h:
        return f"n_kv_heads = n_heads = {h}: the three parts are equal, so thirds are right"
    return None


def _needs_two_keys(spec, plan) -> Optional[str]:
    if plan.size("seq_k") == 1:
        return "one key per query: its weight is 1 in any precision (while exp(score) stays finite)"
    return None


# =========================================================================== the catalogue

# The textbook bugs' fixes (PyTorch) and public reports where each was seen (owner/repo#n on GitHub).
_TEXTBOOK: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "forgot-transpose-k": ("scores = Q @ K.transpose(-2, -1)", ("seed 000 (homework)",)),
    "softmax-wrong-axis": ("normalise over the keys: F.softmax(scores, dim=-1)",
                           ("PetrochukM/PyTorch-NLP#2", "labmlai/annotated_deep_learning_paper_implementations#146")),
    "scale-by-d-model": ("divide by math.sqrt(d_head) (= d_model // heads), not math.sqrt(d_model)",
                         ("chelsea0x3b/dfdx#171", "Graylab/DL4Proteins-notebooks#12")),
    "no-scale": ("scale the scores before softmax: scores / math.sqrt(d_head)",
                 ("delzac/cntkx#10", "PAIR-code/tiny-transformers#71")),
    "split-heads-without-transpose": ("x.view(batch, seq, heads, d_head).transpose(1, 2), not "
                                      "x.view(batch, heads, seq, d_head)", ("reczoo/FuxiCTR#30",)),
    "merge-heads-without-transpose": ("z.transpose(1, 2).contiguous().view(batch, seq, heads * d_head)",
                                      ("jsbaan/transformer-from-scratch#4",)),
    "mask-after-softmax": ("mask the scores before softmax: scores.masked_fill(mask == 0, float('-inf')), then "
                           "softmax", ("huggingface/pytorch-image-models#2236",)),
    "inverted-mask": ("block where the mask says blocked: masked_fill(mask == 0, ...) when 1 = may attend "
                      "(or build the mask the other way round)", ("lucidrains/halonet-pytorch#4",)),
    "mask-wrong-axis": ("rows of a mask are queries, columns keys: (…, seq_q, seq_k); a padding mask broadcasts "
                        "as (batch, 1, 1, seq_k)", ("hyunwoongko/transformer#40",)),
    "additive-mask-zero-one": ("turn a 0/1 mask into 0/-inf before adding it: scores.masked_fill(mask == 0, "
                               "float('-inf'))", ("transformers#542",)),
    "fully-masked-row-neg-inf": ("give rows with no visible key zeros, not NaN: torch.nan_to_num(F.softmax(...)), "
                                 "or F.scaled_dot_product_attention", ("pytorch#103749",)),
    "wrong-d-head-reshape": ("d_head = projection width // heads (config.head_dim), not d_model // heads",
                             ("vllm#2622",)),
    "kv-heads-tiled": ("share kv heads with repeat_interleave(groups, dim=1), not repeat", ("onnx/onnx#7274",)),
}


def _with_textbook_texts(bug: Bug) -> Bug:
    if bug.name not in _TEXTBOOK:
        return bug
    fix, reports = _TEXTBOOK[bug.name]
    return dataclasses.replace(bug, fix=fix, seen_in=reports)


CATALOGUE: Dict[str, Bug] = {bug.name: _with_textbook_texts(bug) for bug in (
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
    # ------------------------------------------------------------------ bugs from the field
    Bug("rope-pairing-mismatch", "RoPE rotates interleaved pairs (2i, 2i+1) where the weights expect halves "
        "(i, i+d/2), or the reverse", ("rot_q", "rot_k"), ("ATT-W240", "ATT-W247"),
        "RoPE with d_head > 2", _rope_pairing_mismatch, _needs_rope(_pairs_differ),
        fix="rotate the pairs the checkpoint was trained with (Hugging Face Llama/NeoX: rotate_half; GPT-J/Meta: "
            "interleaved); converting between them permutes the rows of W_q and W_k, the rotation stays",
        seen_in=("transformers#25199", "nanotron#427"),
        explanation="both conventions are valid RoPE (scores still depend on m − n only), so nothing looks wrong "
                    "but every head mixes the wrong features"),
    Bug("rope-low-precision", "RoPE angles position · inv_freq computed (and cos/sin cached) in float16: "
        "positions past a few thousand rotate wrongly", ("rot_q", "rot_k"), ("ATT-W240", "ATT-W247"),
        "RoPE and a position > 0", _rope_low_precision, _needs_rope(),
        fix="compute inv_freq, the positions and their product in float32 (torch.autocast(enabled=False)), "
            "then cast cos and sin to the model's dtype",
        seen_in=("gpt-neox#1003",),
        explanation="float16 has 11 significant bits: an angle of 1044.27 rad is stored as 1045, and cos/sin of "
                    "an angle off by 0.7 rad is a different rotation",
        fixed=_rope_float32_angles, fixed_precision="float16"),
    Bug("left-padding-positions", "with left padding, positions counted from the pads instead of from each "
        "sequence's first real token", ("pos", "rot_q", "rot_k"), ("ATT-W241", "ATT-W247"),
        "left padding and absolute positions (learned, sinusoidal) or RoPE", _left_padding_positions,
        _needs_left_padding,
        fix="position_ids = attention_mask.cumsum(-1) - 1 (pads: any position), passed to the model, as "
            "generate() does",
        seen_in=("transformers#22161", "TransformerLens#1609"),
        explanation="a left-padded prompt's first word gets position 2 instead of 0: learned positions shift "
                    "every row; RoPE's rotations shift (its scores survive only because they depend on m − n)"),
    Bug("kv-cache-causal-alignment", "causal mask aligned top-left when there are fewer queries than keys: "
        "new tokens cannot see the cache", ("mask",), ("ATT-W242", "ATT-W247"),
        "a causal mask with seq_q ≠ seq_k (KV-cache decoding)", _kv_cache_causal_alignment,
        _needs_misaligned_causal,
        fix="align the causal mask bottom-right: torch.nn.attention.bias.causal_lower_right(seq_q, seq_k), or "
            "torch.ones(seq_k, seq_k).tril()[-seq_q:] as attn_mask, not is_causal=True",
        seen_in=("pytorch#103082",),
        explanation="with is_causal=True and seq_q < seq_k, torch's SDPA lets query i see keys 0..i: the newest "
                    "token of a decoding step sees only the first cached key"),
    Bug("weak-mask-value", "-1e9 used as minus infinity (scores + mask · -1e9): a fully masked row attends "
        "uniformly to what it must not see, and in float16 -1e9 overflows to -inf (NaN rows)",
        ("attn_scores", "pattern"), ("ATT-W248", "ATT-W202", "ATT-W204", "ATT-W247"),
        "a mask that blocks something (the weights change where a query row is fully masked)", _weak_mask_value,
        _needs_weak_value_to_differ,
        fix="scores.masked_fill(~keep, float('-inf')) and a softmax that gives fully masked rows 0 "
            "(F.scaled_dot_product_attention), or torch.finfo(scores.dtype).min applied once with masked_fill",
        seen_in=("transformers#10484", "transformers#14859", "TransformerLens#318"),
        explanation="-1e9 is computed in the model's dtype: finite in float32 (the row keeps weight), -inf in "
                    "float16 (softmax of an all -inf row is NaN); -1e4 is not even small enough for large scores"),
    Bug("nan-leak-through-mask", "NaN in a masked (padded) position still reaches the output: NaN + -inf = NaN "
        "in the scores, 0 × NaN = NaN in weights·V", ("k", "v", "attn_scores"), ("ATT-W246", "ATT-W204", "ATT-W247"),
        "a padding mask with a padded key", _nan_leak_through_mask, _needs_padding,
        fix="mask with masked_fill / torch.where (replacing the score) instead of adding -inf, and zero the "
            "values of masked keys: torch.where(key_keep[..., None], v, 0)",
        seen_in=("pytorch#101967",),
        explanation="padded slots of a batch or KV cache are often uninitialised (torch.empty); trusting the "
                    "mask to hide them fails because the mask multiplies or adds, and NaN survives both",
        fixed=_nan_safe_masking),
    Bug("sliding-window-off-by-one", "a sliding window of w keeps w + 1 keys (distance ≤ w instead of < w)",
        ("mask",), ("ATT-W243", "ATT-W247"), "a sliding window shorter than the sequence",
        _sliding_window_off_by_one, _needs_window_short_of_the_sequence,
        fix="keep key j for query i when 0 ≤ i − j < w (Mistral's sliding_window counts the query itself); "
            "flash-attn's window_size=(w − 1, 0)",
        seen_in=("transformers#39408",),
        explanation="window conventions differ by one (keys before the query, or keys including it): passing one "
                    "where the other is expected widens or narrows every window"),
    Bug("alibi-slopes-non-power-of-two", "ALiBi slopes for a head count that is not a power of two "
        "computed as 2^(-8(h+1)/n), the power-of-two formula", ("scaled",), ("ATT-W244", "ATT-W247"),
        "ALiBi with n_heads not a power of two", _alibi_slopes_non_power_of_two,
        _needs_alibi_heads_not_power_of_two,
        fix="the paper's get_slopes(n): for n not a power of two, the slopes of the nearest lower power of two, "
            "then every other slope of the next power of two",
        seen_in=("mlx#343",),
        explanation="for 12 heads the paper uses the 8-head slopes 2^-1..2^-8 plus every other 16-head slope; "
                    "2^(-8(h+1)/12) gives other biases to every head but the last"),
    Bug("fused-qkv-split-under-gqa", "a fused [Q|K|V] projection split in equal thirds when key/value heads "
        "are fewer than query heads", ("q", "k", "v"), ("ATT-E103",),
        "grouped-query self-attention (n_kv_heads < n_heads)", _fused_qkv_split_in_thirds,
        _needs_gqa_self_attention,
        fix="qkv.split([n_heads * d_head, n_kv_heads * d_head, n_kv_heads * d_head], dim=-1), not qkv.chunk(3)",
        seen_in=("vllm#13686",),
        explanation="the fused width is (n_heads + 2·n_kv_heads)·d_head: thirds are right only for n_kv_heads = "
                    "n_heads, and under GQA no third has Q's n_heads·d_head columns"),
    Bug("softmax-in-half-precision", "softmax as exp(x) / Σ exp(x) in float16, without subtracting the row max: "
        "exp overflows past 11.09 (inf/inf = NaN), and every weight carries float16 rounding",
        ("pattern",), ("ATT-W201", "ATT-W204", "ATT-W247"), "more than one key", _softmax_half, _needs_two_keys,
        fix="F.softmax(scores.float(), dim=-1).to(scores.dtype): subtract the max and accumulate in float32",
        seen_in=("transformers#17437", "NVIDIA/FasterTransformer#43"),
        explanation="float16's largest number is 65504 = e^11.09: a score of 12 overflows, and rows that do not "
                    "overflow still sum to 1 only to about 1e-3",
        fixed=_softmax_float32_max_subtracted, fixed_precision="float16"),
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
    fix_check: Optional[Dict] = None                  # the fix re-run: {"verified", "difference", "hook"}

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

    def fix_summary(self) -> str:
        """The catalogue's fix, and whether re-running the fixed code gave the clean output."""
        if not self.bug.fix:
            return ""
        check = self.fix_check
        if check is None:
            return self.bug.fix
        if check["verified"]:
            size = f"to {check['difference']:.1e}, {check['precision']} rounding" if check["difference"] else "exactly"
            return f"{self.bug.fix} (verified: re-run with the fix, {check['hook']} equals the clean run's {size})"
        return f"{self.bug.fix} (NOT verified: re-run with the fix, {check['hook']} still differs by " \
               f"{check['difference']:.2g})"

    def to_json(self) -> Dict:
        return {"bug": self.bug.to_json(), "status": self.status, "summary": self.summary(),
                "caught_by": self.codes, "cannot_show": self.cannot_show, "output_changed": self.changed,
                "check": self.check, "fix": {"text": self.bug.fix, **(self.fix_check or {})}}


def _merge_notes(trace, notes: Notes) -> None:
    order = {s.hook: s.number for s in trace.plan.steps}
    trace.diagnoses.extend(notes)
    trace.diagnoses.sort(key=lambda d: order.get(d.hook, 0))


def inject(spec, name: str, *, check: str = "default", dtype: str = "float64", verify_fix: bool = True,
           **run_options) -> Verdict:
    """Run `spec` with bug `name` in place and with a clean copy; say what caught the bug.

    A shape error of the *spec* (before the bug) propagates as usual; a shape error the
    bug causes becomes part of the verdict.  With `verify_fix`, when the bug changed the
    output, the fixed code is re-run and compared with the clean output (Verdict.fix_check).
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
    if verify_fix and verdict.changed:
        verdict.fix_check = check_fix(spec, bug, clean, dtype)
    return verdict


def check_fix(spec, bug: Bug, clean, dtype: str) -> Dict:
    """Re-run `spec` with the bug's fixed steps: the output must equal the clean run's within the rounding
    of the fixed code's own precision (the run's dtype, or float16 when the fix keeps half storage)."""
    from attntrace.analysis.crosscheck import ROUNDING_BANDS, difference
    final = clean.plan.steps[-1].hook
    fixed = rerun(spec, keep=[final], overrides=bug.fixed_overrides(), dtype=dtype)[final]
    reference = clean.arrays.get(final)
    if reference is None:
        reference = rerun(spec, keep=[final], dtype=dtype)[final]
    _, relative, _ = difference(fixed, reference)
    precision = bug.fixed_precision or np.dtype(dtype).name
    return {"verified": bool(relative <= dict(ROUNDING_BANDS)[precision]), "difference": relative, "hook": final,
            "precision": precision}


def _output_changed(clean, trace) -> bool:
    """Whether any hook both runs kept differs (NaN in the same place counts as equal)."""
    for hook, array in clean.arrays.items():
        other = trace.arrays.get(hook)
        if other is not None and (other.shape != array.shape or
                                  not np.allclose(array, other, rtol=1e-9, atol=1e-12, equal_nan=True)):
            return True
    return False
