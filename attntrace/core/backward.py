"""The backward pass of attention: every gradient of a scalar loss, vectorised numpy.

It differentiates exactly the forward :mod:`attntrace.engine` computes --
projections in either layout with optional biases, heads and grouped kv heads,
RoPE and ALiBi, the scale, the mask, the safe softmax and W_o -- reading the activations of a
forward trace run with ``keep="all"``.  The loss is the sum (or mean, or
½·Σ out²) of the output, or ``L = Σ upstream ⊙ out`` for an upstream gradient
given in the spec's ``grad:`` block.

Names: a gradient is named after what it is the gradient of, with the ``_grad``
suffix TransformerLens's ActivationCache gives the values of its backward
hooks: ``attn.hook_pattern_grad`` is dL/dpattern, ``hook_embed_grad`` is dL/dX,
and parameters are ``attn.W_q_grad``, ``attn.b_q_grad`` ...  Backward hooks
use these names (``fn(grad, *, hook) -> array | None``, as forward hooks) and
fire in backward order, so a replaced gradient flows on to the earlier steps.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from attntrace.core import positional
from attntrace.core.hooks import HookFn, HookSet
from attntrace.core.stats import Stats, array_stats
from attntrace.errors import Diagnosis, Operand, ShapeError, input_error
from attntrace.hookpoints import resolve_hook_name
from attntrace.text import did_you_mean

GRAD_SUFFIX = "_grad"
DOUT_FORMULAS = {"sum": "dout = 1 everywhere", "mean": "dout = 1 / out.size everywhere",
                 "sum_squares": "dout = out", "upstream": "dout = grad.upstream"}
LOSS_FORMULAS = {
    "sum": "L = Σ out",
    "mean": "L = mean(out)",
    "sum_squares": "L = ½·Σ out²",
    "upstream": "L = Σ upstream ⊙ out",
}
PARAMETERS = ("W_o", "b_o", "W_q", "b_q", "W_k", "b_k", "W_v", "b_v")
# what a parameter's rows and columns are, for x_at_w (linear weights are transposed)
PARAMETER_AXES = {
    "W_q": ("d_model", "n_heads·d_head"), "W_k": ("d_model", "n_kv_heads·d_head"),
    "W_v": ("d_model", "n_kv_heads·d_v"), "W_o": ("n_heads·d_v", "d_out"),
}


@dataclass(frozen=True)
class GradPoint:
    """One gradient: what it is the gradient of, and how it is computed."""

    name: str                   # "attn.hook_pattern_grad"; a backward hook point
    of: str                     # the forward hook ("attn.hook_pattern") or parameter ("W_q")
    title: str                  # "dL/dweights"
    formula: str                # "dweights = dz · Vᵀ"
    axes: Tuple[str, ...]       # as the forward hook's, or the parameter's

    @property
    def is_parameter(self) -> bool:
        return self.of in PARAMETERS

    @property
    def what(self) -> str:      # HookPoint compatibility: hook error messages print it
        return self.title


def parameter_grad_name(param: str) -> str:
    return f"attn.{param}{GRAD_SUFFIX}"


@dataclass
class GradTrace:
    """The result of a backward pass: gradients by name, in backward order."""

    forward: object                                   # the forward Trace
    loss: float
    loss_kind: str
    points: List[GradPoint]
    grads: Dict[str, np.ndarray] = field(default_factory=dict)
    stats: Dict[str, Stats] = field(default_factory=dict)            # gradient name -> value range

    @property
    def loss_formula(self) -> str:
        return LOSS_FORMULAS[self.loss_kind]

    def point(self, name: str) -> GradPoint:
        name = resolve_grad_name(name, self.points)
        return next(p for p in self.points if p.name == name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.grads[resolve_grad_name(name, self.points)]

    def keys(self) -> List[str]:
        return [p.name for p in self.points]


# --------------------------------------------------------------------------- the points

def grad_points(spec, plan, loss_kind: str = "sum") -> List[GradPoint]:
    """The gradients of a spec's loss, in the order the backward pass computes them."""
    att = spec.attention
    linear = plan.layout == "linear"
    t = "" if linear else "ᵀ"          # x_at_w: dX = dY·Wᵀ, dW = Xᵀ·dY; linear: dX = dY·W, dW = dYᵀ·X
    src_k = "X_enc" if plan.cross else "X"
    gqa = plan.size("n_kv_heads") != plan.size("n_heads")
    group_note = ", summed over the query heads sharing each kv head" if gqa else ""

    def hook(of: str, title: str, formula: str) -> GradPoint:
        return GradPoint(of + GRAD_SUFFIX, of, title, formula, plan.step_for_hook(of).axes)

    def param(name: str, x: str, dy: str) -> List[GradPoint]:
        """A weight's gradient and its bias's; the bias runs along the weight's output axis."""
        axes = tuple(a if gqa else a.replace("n_kv_heads", "n_heads") for a in PARAMETER_AXES[name])
        points = []
        if getattr(att, name) is not None:
            formula = f"d{name} = d{dy}ᵀ·{x}" if linear else f"d{name} = {x}ᵀ·d{dy}"
            points.append(GradPoint(parameter_grad_name(name), name, f"dL/d{name}", formula,
                                    axes[::-1] if linear else axes))
        bias = "b_" + name[2:]
        if getattr(att, bias) is not None:
            points.append(GradPoint(parameter_grad_name(bias), bias, f"dL/d{bias}",
                                    f"d{bias} = Σ over batch and rows of d{dy}", axes[1:]))
        return points

    points = [hook("hook_attn_out", "dL/dout", DOUT_FORMULAS[loss_kind])]
    points += param("W_o", "concat", "out")
    points += [
        hook("attn.hook_z_concat", "dL/dconcat", f"dconcat = dout·W_o{t}" if plan.has_w_o else "dconcat = dout"),
        hook("attn.hook_z", "dL/dz", "dz = dconcat split into heads"),
        hook("attn.hook_v", "dL/dV", f"dV = weightsᵀ·dz{group_note}"),
        hook("attn.hook_pattern", "dL/dweights", "dweights = dz·Vᵀ"),
        hook("attn.hook_attn_scores", "dL/dmasked",
             "dmasked = weights ⊙ (dweights − rowsum(dweights ⊙ weights))  (softmax Jacobian)"),
        hook("attn.hook_scaled", "dL/dscaled",
             "dscaled = where(mask, dmasked, 0)" if plan.masked else "dscaled = dmasked"),
        hook("attn.hook_qk", "dL/dscores", f"dscores = dscaled · scale  (scale = {plan.scale:.6g}"
             + ("; the ALiBi bias is a constant)" if plan.positional == "alibi" else ")")),
    ]
    if plan.positional == "rope":
        points += [hook("attn.hook_rot_q", "dL/dQ_rot", "dQ_rot = dscores·K_rot"),
                   hook("attn.hook_rot_k", "dL/dK_rot", f"dK_rot = dscoresᵀ·Q_rot{group_note}"),
                   hook("attn.hook_q", "dL/dQ", "dQ = RoPE(dQ_rot, −position): the rotation's transpose"),
                   hook("attn.hook_k", "dL/dK", "dK = RoPE(dK_rot, −position): the rotation's transpose")]
    else:
        points += [hook("attn.hook_q", "dL/dQ", "dQ = dscores·K"),
                   hook("attn.hook_k", "dL/dK", f"dK = dscoresᵀ·Q{group_note}")]
    points += param("W_q", "X", "Q") + param("W_k", src_k, "K") + param("W_v", src_k, "V")
    if plan.cross:
        points.append(hook("hook_encoder_embed", "dL/dX_enc", f"dX_enc = dK·W_k{t} + dV·W_v{t}"))
        dx = f"dX = dQ·W_q{t}"
    else:
        dx = f"dX = dQ·W_q{t} + dK·W_k{t} + dV·W_v{t}  (X feeds Q, K and V)"
    if plan.positional in ("sinusoidal", "learned"):
        points.append(hook("hook_pos_embed", "dL/d(X + PE)", dx))
        points.append(hook("hook_embed", "dL/dX", "dX = dL/d(X + PE)  (PE is a constant)"))
    else:
        points.append(hook("hook_embed", "dL/dX", dx))
    return points


def resolve_grad_name(name: str, points: Sequence[GradPoint]) -> str:
    """A gradient name from what people write: `attn.hook_v_grad`, `V`, `dV`, `dL/dV`, `W_q`, `dW_q`."""
    names = [p.name for p in points]
    if name in names:
        return name
    bare = name[len("blocks.0."):] if name.startswith("blocks.0.") else name
    bare = bare[:-len(GRAD_SUFFIX)] if bare.endswith(GRAD_SUFFIX) else bare
    for prefix in ("dL/d", "d", ""):
        if not bare.startswith(prefix) or len(bare) == len(prefix):
            continue
        of = bare[len(prefix):]
        of = of[len("attn."):] if of.startswith("attn.") and of[len("attn."):] in PARAMETERS else of
        found = _grad_of(of, points)
        if found:
            return found
    hint = did_you_mean(name, names, n=2, cutoff=0.5, otherwise="gradients: " + ", ".join(names))
    raise input_error("ATT-E015", f"unknown gradient '{name}'", hint=hint)


def _grad_of(of: str, points: Sequence[GradPoint]) -> Optional[str]:
    by_of = {p.of: p.name for p in points}
    if of in by_of:
        return by_of[of]
    try:
        return by_of.get(resolve_hook_name(of, available=[p.of for p in points if not p.is_parameter]))
    except Exception:      # not a hook name either: the caller reports the original name
        return None


def match_grads(pattern: str, points: Sequence[GradPoint]) -> List[str]:
    """Gradient names matching a name, an alias or a glob such as `attn.hook_*_grad`."""
    if any(ch in pattern for ch in "*?["):
        matched = [p.name for p in points if fnmatch.fnmatchcase(p.name, pattern)]
        if not matched:
            raise input_error("ATT-E015", f"pattern '{pattern}' matches no gradient of this spec",
                              hint="gradients: " + ", ".join(p.name for p in points))
        return matched
    return [resolve_grad_name(pattern, points)]


# --------------------------------------------------------------------------- the loss

def loss_kind_of(spec, override: Optional[str] = None) -> str:
    if override:
        return override
    grad = getattr(spec, "grad", None)
    return grad.loss if grad is not None else "sum"


def upstream_gradient(spec, plan) -> np.ndarray:
    """grad.upstream as (batch, seq_q, d_out): a (seq_q, d_out) array is shared by every
    batch item, and a flat (seq_q,) list is read as a column when d_out is 1 (as seed 000 writes it)."""
    given = spec.grad.upstream
    data = np.asarray(given.data, dtype=np.float64)
    batch, seq_q, d_out = plan.size("batch"), plan.size("seq_q"), plan.size("d_out")
    if data.ndim == 1 and d_out == 1:
        data = data[:, None]
    if data.ndim == 2:
        data = data[None]
    if data.ndim == 3 and data.shape[1:] == (seq_q, d_out) and data.shape[0] in (1, batch):
        return np.broadcast_to(data, (batch, seq_q, d_out))
    raise ShapeError(Diagnosis(
        code="ATT-E130", step="backward 'dL/dout = grad.upstream'", hook="hook_attn_out_grad",
        message=f"grad.upstream has shape {tuple(given.shape)}; the output it is the gradient of "
                f"has shape (seq_q={seq_q}, d_out={d_out})"
                + (f" for each of {batch} batch items" if batch > 1 else ""),
        rule="dL/dout has the shape of out: (seq_q×d_out) or (batch×seq_q×d_out)",
        operands=[Operand("grad.upstream", given.shape, location=given.location),
                  Operand("out", (batch, seq_q, d_out), ("batch", "seq_q", "d_out"), "hook_attn_out")],
        bindings=[plan.dims[n].describe() for n in ("seq_q", "d_out")],
        locations=[given.location] if given.location else [],
        hint=f"write {seq_q} rows of {d_out} number(s), one row per query token"))


def loss_value(out: np.ndarray, kind: str, upstream: Optional[np.ndarray] = None) -> float:
    if kind == "sum":
        return float(out.sum())
    if kind == "mean":
        return float(out.mean())
    if kind == "sum_squares":
        return float(0.5 * np.sum(out * out))
    return float(np.sum(upstream * out))


def loss_gradient(out: np.ndarray, kind: str, upstream: Optional[np.ndarray] = None) -> np.ndarray:
    """dL/dout for each loss."""
    if kind == "sum":
        return np.ones_like(out)
    if kind == "mean":
        return np.full_like(out, 1.0 / out.size)
    if kind == "sum_squares":
        return out.copy()
    return np.array(upstream, dtype=np.float64)


# --------------------------------------------------------------------------- the math

def linear_backward(x: np.ndarray, w: np.ndarray, dy: np.ndarray, layout: str) -> Tuple[np.ndarray, np.ndarray]:
    """y = x·w (x_at_w, w is (in, out)) or y = x·wᵀ (linear, w is (out, in)); x, dy are (batch, seq, ·).
    Returns dx and dw (dw summed over batch and rows)."""
    if layout == "x_at_w":
        return dy @ w.T, np.tensordot(x, dy, axes=([0, 1], [0, 1]))
    return dy @ w, np.tensordot(dy, x, axes=([0, 1], [0, 1]))


def grouped_mix_backward(pattern: np.ndarray, v: np.ndarray, dz: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Backward of z = pattern·V with grouped kv heads (engine.grouped_mix).

    pattern (b, h, sq, sk), v (b, sk, kv, dv), dz (b, sq, h, dv) -> dpattern (b, h, sq, sk),
    dv (b, sk, kv, dv).  Query head i reads kv head i // (h/kv), so a kv head's gradient
    is the sum over the query heads of its group.
    """
    b, h, sq, sk = pattern.shape
    kv, dv_width = v.shape[2], v.shape[3]
    group = h // kv
    dzg = dz.transpose(0, 2, 1, 3).reshape(b, kv, group, sq, dv_width)    # (b, kv, g, sq, dv)
    vt = v.transpose(0, 2, 1, 3)[:, :, None]                              # (b, kv, 1, sk, dv)
    dpattern = (dzg @ vt.swapaxes(-1, -2)).reshape(b, h, sq, sk)
    pg = pattern.reshape(b, kv, group, sq, sk)
    dv = (pg.swapaxes(-1, -2) @ dzg).sum(axis=2)                          # (b, kv, sk, dv)
    return dpattern, dv.transpose(0, 2, 1, 3)


def softmax_backward(pattern: np.ndarray, dpattern: np.ndarray) -> np.ndarray:
    """dS = P ⊙ (dP − rowsum(dP ⊙ P)): the softmax Jacobian applied row by row.
    A fully blocked row (all-zero weights from the safe softmax) gets zero gradient."""
    return pattern * (dpattern - (dpattern * pattern).sum(axis=-1, keepdims=True))


def grouped_scores_backward(q: np.ndarray, k: np.ndarray, dscores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Backward of scores = Q·Kᵀ with grouped kv heads (engine.grouped_scores).

    q (b, sq, h, d), k (b, sk, kv, d), dscores (b, h, sq, sk) -> dq (b, sq, h, d), dk (b, sk, kv, d).
    """
    b, sq, h, d = q.shape
    sk, kv = k.shape[1], k.shape[2]
    group = h // kv
    dg = dscores.reshape(b, kv, group, sq, sk)
    kt = k.transpose(0, 2, 1, 3)[:, :, None]                              # (b, kv, 1, sk, d)
    dq = (dg @ kt).reshape(b, h, sq, d).transpose(0, 2, 1, 3)
    qg = q.reshape(b, sq, kv, group, d).transpose(0, 2, 3, 1, 4)          # (b, kv, g, sq, d)
    dk = (dg.swapaxes(-1, -2) @ qg).sum(axis=2)                           # (b, kv, sk, d)
    return dq, dk.transpose(0, 2, 1, 3)


# --------------------------------------------------------------------------- the pass

NEEDED = ("hook_embed", "hook_pos_embed", "hook_encoder_embed", "attn.hook_q", "attn.hook_k", "attn.hook_v",
          "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_mask", "attn.hook_pattern", "attn.hook_z_concat",
          "hook_attn_out")


def rope_backward(d_rotated: np.ndarray, pos: np.ndarray, base: float, pairing: str) -> np.ndarray:
    """RoPE rotates each feature pair by pos·theta: its transpose rotates by −pos·theta."""
    return positional.rope(d_rotated, -np.asarray(pos, dtype=np.float64), base, pairing)


def require_one_layer(plan) -> None:
    """The backward pass differentiates one attention layer (ATT-E081 for transformer blocks)."""
    if plan.named_blocks:
        raise input_error("ATT-E081", "attntrace grad differentiates one attention layer; this spec has "
                                      "transformer blocks (norms, MLP, residual), which it does not differentiate",
                          hint="write the layer as a single `attention:` spec, or use torch.autograd on the model")


def backward(trace, *, loss: Optional[str] = None, hooks: Sequence[Tuple[str, HookFn]] = ()) -> GradTrace:
    """Every gradient of the loss, from a forward trace run with keep="all".

    Activations a forward hook replaced are taken as they are: the backward does not
    differentiate through hook functions (`attntrace grad` runs without the spec's hooks).

    loss: "sum" | "mean" | "sum_squares" | "upstream" (default: the spec's `grad:` block, else "sum").
    hooks: (gradient name or pattern, fn) pairs; fn(grad, *, hook) -> array | None.
    """
    require_one_layer(trace.plan)
    spec, plan = trace.spec, trace.plan
    missing = [h for h in NEEDED if h in plan.hooks and h not in trace.arrays]
    if missing:
        raise input_error("ATT-E080", f"the forward trace did not keep {', '.join(missing)}",
                          hint='run the forward with attntrace.run(spec, keep="all")')
    kind = loss_kind_of(spec, loss)
    if kind not in LOSS_FORMULAS:
        raise input_error("ATT-E003", f"unknown loss '{kind}'", hint="losses: " + ", ".join(LOSS_FORMULAS))
    if kind == "upstream" and getattr(getattr(spec, "grad", None), "upstream", None) is None:
        raise input_error("ATT-E003", "loss 'upstream' needs `grad: {upstream: [[...]]}` in the spec")
    points = grad_points(spec, plan, kind)
    by_of = {p.of: p for p in points}
    hookset = HookSet(_resolve_hooks(hooks, points), [p.name for p in points])
    grads: Dict[str, np.ndarray] = {}

    def emit(of: str, array: np.ndarray) -> np.ndarray:
        point = by_of[of]
        array = hookset.fire(point.name, array, point)
        grads[point.name] = array
        return array

    def get(hook: str) -> np.ndarray:
        return np.asarray(trace.arrays[hook], dtype=np.float64)

    att, layout = spec.attention, plan.layout
    weight = {name: np.asarray(getattr(att, name).data, dtype=np.float64)
              for name in PARAMETERS if getattr(att, name) is not None}
    out = get("hook_attn_out")
    upstream = upstream_gradient(spec, plan) if kind == "upstream" else None
    dout = emit("hook_attn_out", loss_gradient(out, kind, upstream))

    concat = get("attn.hook_z_concat")
    if "W_o" in weight:
        dconcat, dw_o = linear_backward(concat, weight["W_o"], dout, layout)
        emit("W_o", dw_o)
        if "b_o" in weight:
            emit("b_o", dout.sum(axis=(0, 1)))
    else:
        dconcat = dout.copy()
    dconcat = emit("attn.hook_z_concat", dconcat)
    b, sq, h, dv_width = plan.size("batch"), plan.size("seq_q"), plan.size("n_heads"), plan.size("d_v")
    dz = emit("attn.hook_z", dconcat.reshape(b, sq, h, dv_width))

    pattern, v = get("attn.hook_pattern"), get("attn.hook_v")
    dpattern, dv = grouped_mix_backward(pattern, v, dz)
    dv = emit("attn.hook_v", dv)
    dpattern = emit("attn.hook_pattern", dpattern)
    dmasked = emit("attn.hook_attn_scores", softmax_backward(pattern, dpattern))
    dscaled = np.where(trace.arrays["attn.hook_mask"], dmasked, 0.0) if plan.masked else dmasked.copy()
    dscaled = emit("attn.hook_scaled", dscaled)
    dscores = emit("attn.hook_qk", dscaled * plan.scale)
    if plan.positional == "rope":
        dq_rot, dk_rot = grouped_scores_backward(get("attn.hook_rot_q"), get("attn.hook_rot_k"), dscores)
        dq_rot, dk_rot = emit("attn.hook_rot_q", dq_rot), emit("attn.hook_rot_k", dk_rot)
        q_pos, k_pos = positional.rope_positions(plan.size("seq_q"), plan.size("seq_k"))
        pos = spec.positional
        dq = rope_backward(dq_rot, q_pos, pos.base, pos.pairing)
        dk = rope_backward(dk_rot, k_pos, pos.base, pos.pairing)
    else:
        dq, dk = grouped_scores_backward(get("attn.hook_q"), get("attn.hook_k"), dscores)
    dq, dk = emit("attn.hook_q", dq), emit("attn.hook_k", dk)

    x = get("hook_pos_embed") if "hook_pos_embed" in plan.hooks else get("hook_embed")
    x_kv = get("hook_encoder_embed") if plan.cross else x
    dx_parts = []
    for name, source, dy in (("q", x, dq), ("k", x_kv, dk), ("v", x_kv, dv)):
        flat = dy.reshape(dy.shape[0], dy.shape[1], -1)
        dx_part, dw = linear_backward(source, weight["W_" + name], flat, layout)
        emit("W_" + name, dw)
        if "b_" + name in weight:
            emit("b_" + name, flat.sum(axis=(0, 1)))
        dx_parts.append(dx_part)
    dx_q, dx_k, dx_v = dx_parts
    if plan.cross:
        emit("hook_encoder_embed", dx_k + dx_v)
        dx = dx_q
    else:
        dx = dx_q + dx_k + dx_v
    if "hook_pos_embed" in plan.hooks:
        dx = emit("hook_pos_embed", dx).copy()     # X + PE with PE constant: the same gradient
    emit("hook_embed", dx)
    return GradTrace(forward=trace, loss=loss_value(out, kind, upstream), loss_kind=kind, points=points,
                     grads=grads, stats={name: array_stats(array) for name, array in grads.items()})


def _resolve_hooks(hooks: Sequence[Tuple[str, HookFn]], points: Sequence[GradPoint]):
    """Backward hooks may be named like gradients are (`V`, `dV`, `attn.hook_v_grad`, globs)."""
    return [(name, fn) for pattern, fn in hooks for name in match_grads(pattern, points)]
