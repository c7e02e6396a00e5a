"""The same trace computed a second, independent way (an opt-in check: ``--check all``).

:func:`crosscheck` takes, for every block, the trace's own input to the attention
(ln1 or the residual stream, the encoder's embeddings for cross-attention) and
recomputes the attention from the spec in float64 with code written apart from
:mod:`attntrace.core` (einsum products, RoPE with complex numbers, the mask from
positions, its own safe softmax), then compares the trace hook by hook.  For an
imported model, when torch is installed, torch's ``scaled_dot_product_attention``
(math backend, in the trace's dtype) recomputes z from the trace's rotated Q, K and V
as well: a second backend.

A difference is reported with its size (largest absolute difference, and relative
to the hook's magnitude) and the dtype whose rounding explains it
(:func:`explaining_dtype`): within the run's own dtype it is agreement (a ✓ line
that says how close); larger, it is ATT-W247 naming the first hook that differs --
"the size of float16 rounding: part of the computation ran in half precision", or
"beyond rounding: a different computation".  Rows whose query sees no key are left
out of the torch comparison (backends disagree on them by design: NaN or 0).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from attntrace.analysis.field_checks import (
    expected_positions,
    paper_slopes,
    position_table,
    rope_reference,
    token_type_rows,
)
from attntrace.core.masks import from_matrix
from attntrace.errors import Diagnosis

# relative difference -> the least precise dtype whose rounding still explains it
ROUNDING_BANDS: Tuple[Tuple[str, float], ...] = (
    ("float64", 1e-12), ("float32", 5e-5), ("float16", 4e-3), ("bfloat16", 3e-2))
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
COMPARED = ("q", "k", "v", "rot_q", "rot_k", "scaled", "mask", "pattern", "z", "out")


def explaining_dtype(relative: float) -> Optional[str]:
    """The most precise dtype whose rounding accounts for a relative difference; None beyond them all."""
    for dtype, bound in ROUNDING_BANDS:
        if relative <= bound:
            return dtype
    return None


def _band_index(dtype: Optional[str]) -> int:
    names = [name for name, _ in ROUNDING_BANDS]
    return names.index(dtype) if dtype in names else len(names)


# =========================================================================== the independent recomputation

def _array(value) -> Optional[np.ndarray]:
    return None if value is None else np.asarray(value.data, dtype=np.float64)


def _project(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], layout: str, heads: int) -> np.ndarray:
    y = np.einsum("bsi,io->bso", x, weight) if layout == "x_at_w" else np.einsum("bsi,oi->bso", x, weight)
    if bias is not None:
        y = y + bias
    return y.reshape(y.shape[0], y.shape[1], heads, -1)


def keep_mask(mask_spec, seq_q: int, seq_k: int) -> Optional[np.ndarray]:
    """(batch or 1, 1, seq_q, seq_k) True = may attend, built from positions: the queries are the last
    seq_q positions; a window looks back when the mask is causal (or a prefix-LM), both ways otherwise."""
    if mask_spec.is_empty:
        return None
    q = np.arange(seq_q)[:, None] + (seq_k - seq_q)
    k = np.arange(seq_k)[None, :]
    keep = np.ones((seq_q, seq_k), dtype=bool)
    if mask_spec.prefix:
        keep &= (k <= q) | (k < mask_spec.prefix)
    elif mask_spec.causal:
        keep &= k <= q
    if mask_spec.window:
        distance = q - k
        looks_back = bool(mask_spec.causal or mask_spec.prefix)
        keep &= ((distance >= 0) & (distance < mask_spec.window)) if looks_back else \
            (np.abs(distance) < mask_spec.window)
    keep = keep[None, None]
    if mask_spec.padding is not None:
        pad = np.asarray(from_matrix(mask_spec.padding.data, mask_spec.convention), dtype=bool)
        keep = keep & (pad[None] if pad.ndim == 1 else pad)[:, None, None, :]
    if mask_spec.matrix is not None:
        matrix = np.asarray(from_matrix(mask_spec.matrix.data, mask_spec.convention), dtype=bool)
        keep = keep & (matrix[None, None] if matrix.ndim == 2 else matrix[:, None])
    return np.ascontiguousarray(keep)


def _safe_softmax(scores: np.ndarray) -> np.ndarray:
    top = np.max(scores, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(scores - top)
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total == 0, 1.0, total)


def _scale(att, d_head: int) -> float:
    if att.scale == "auto":
        return 1.0 / math.sqrt(d_head)
    if att.scale == "none":
        return 1.0
    return float(att.scale)


def recompute_attention(spec, plan, layer: Optional[int], x: np.ndarray, x_kv: np.ndarray) -> Dict[str, np.ndarray]:
    """Block `layer`'s attention from its input x (and x_kv), in float64: step key -> array, in the
    trace's layouts (Q (batch, seq, heads, d), scores (batch, heads, seq_q, seq_k) ...)."""
    att = spec.attention_of(layer)
    heads, kv_heads = plan.size("n_heads"), plan.size("n_kv_heads")
    out: Dict[str, np.ndarray] = {}
    for key, weight, bias, count, source in (("q", "W_q", "b_q", heads, x), ("k", "W_k", "b_k", kv_heads, x_kv),
                                             ("v", "W_v", "b_v", kv_heads, x_kv)):
        out[key] = _project(source, _array(getattr(att, weight)), _array(getattr(att, bias)), att.layout, count)
    q, k = out["q"], out["k"]
    if plan.positional == "rope":
        q_pos, k_pos = expected_positions(spec, plan, layer)
        q_pos, k_pos = np.maximum(q_pos, 0), np.maximum(k_pos, 0)      # pads before the first real token: 0
        pos = spec.positional
        q = out["rot_q"] = rope_reference(q, q_pos, pos.base, pos.pairing)
        k = out["rot_k"] = rope_reference(k, k_pos, pos.base, pos.pairing)
    group = heads // kv_heads
    k_all, v_all = np.repeat(k, group, axis=2), np.repeat(out["v"], group, axis=2)      # query head h: kv h // group
    scores = np.einsum("bqhd,bkhd->bhqk", q, k_all) * _scale(att, q.shape[-1])
    seq_q, seq_k = scores.shape[-2], scores.shape[-1]
    if plan.positional == "alibi":
        distance = np.abs((np.arange(seq_q)[:, None] + seq_k - seq_q) - np.arange(seq_k)[None, :])
        scores = scores - paper_slopes(heads)[:, None, None] * distance[None]
    out["scaled"] = scores
    keep = keep_mask(att.mask, seq_q, seq_k)
    if keep is not None:
        out["mask"] = keep
        scores = np.where(keep, scores, -np.inf)
    out["pattern"] = _safe_softmax(scores)
    out["z"] = np.einsum("bhqk,bkhd->bqhd", out["pattern"], v_all)
    concat = out["z"].reshape(out["z"].shape[0], seq_q, -1)
    w_o = _array(att.W_o)
    if w_o is None:
        out["out"] = concat
    else:
        out["out"] = np.einsum("bsi,io->bso", concat, w_o) if att.layout == "x_at_w" else \
            np.einsum("bsi,oi->bso", concat, w_o)
        if att.b_o is not None:
            out["out"] = out["out"] + _array(att.b_o)
    return out


# =========================================================================== comparing

def difference(traced: np.ndarray, reference: np.ndarray) -> Tuple[float, float, Tuple[int, ...]]:
    """(largest absolute difference, relative to the reference's magnitude, where); NaN or inf
    where the reference is finite counts as an infinite difference."""
    traced = np.asarray(traced, dtype=np.float64)
    reference = np.broadcast_to(np.asarray(reference, dtype=np.float64), traced.shape)
    same = (traced == reference) | (np.isnan(traced) & np.isnan(reference))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(traced - reference))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite = np.abs(reference[np.isfinite(reference)])
    magnitude = float(finite.max()) if finite.size else 1.0
    where = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size else ()
    largest = float(diff.max()) if diff.size else 0.0
    return largest, largest / max(magnitude, 1e-300), tuple(int(i) for i in where)


def recompute_positions(spec, plan, embed: np.ndarray) -> np.ndarray:
    """X + PE[position] (+ token types) from the trace's embeddings, positions counted from each
    item's first real token (pads before it: 0; cross-attention: from 0)."""
    seq = embed.shape[1]
    positions = np.arange(seq)[None] if spec.is_cross else np.maximum(expected_positions(spec, plan, None)[0], 0)
    table = position_table(spec, seq, embed.shape[2])
    return np.asarray(embed, dtype=np.float64) + token_type_rows(spec) + table[positions]


def _block_input(plan, arrays: Dict[str, np.ndarray], layer: Optional[int]) -> Tuple[str, str]:
    """The hooks holding block `layer`'s attention input X and its keys' input (as State.x / x_kv)."""
    keys = {s.key: s.hook for s in plan.steps if s.layer == layer}
    model = {s.key: s.hook for s in plan.steps if s.layer is None}
    if "ln1" in keys and plan.block(layer).placement == "pre":
        x = keys["ln1"]
    elif "resid_pre" in keys:
        x = keys["resid_pre"]
    else:
        x = next(model[k] for k in ("embed_norm", "pos", "embed") if k in model)
    return x, model.get("encoder_embed", x)


def _layers(plan) -> List[Optional[int]]:
    return sorted({s.layer for s in plan.steps if s.layer is not None})


def crosscheck(spec, trace, rerun) -> Optional[List[Diagnosis]]:
    """The opt-in check: every block recomputed in float64 (and by torch's SDPA for a model); agreement
    is a ✓ line with its size (added to the trace here, so it can say how close), a difference ATT-W247."""
    plan = trace.plan
    needed = set()
    for layer in _layers(plan):
        needed.update(_block_input(plan, trace.arrays, layer))
        needed.update(s.hook for s in plan.steps if s.layer == layer and s.key in COMPARED)
    arrays = dict(trace.arrays)
    missing = sorted(h for h in needed if h not in arrays)
    if missing:
        arrays.update(rerun(spec, keep=missing))
    run_band = _band_index(trace.dtype)
    found: List[Diagnosis] = []
    worst: Tuple[float, str] = (0.0, "")
    if any(s.key == "pos" for s in plan.steps):
        embed, pos = plan.step("embed").hook, plan.step("pos").hook
        more = [h for h in (embed, pos) if h not in arrays]
        if more:
            arrays.update(rerun(spec, keep=more))
        reference = {"pos": recompute_positions(spec, plan, arrays[embed])}
        diverged = _first_divergence(plan, None, arrays, reference, run_band)
        if diverged is not None:
            return [diverged]
        worst = (difference(arrays[pos], reference["pos"])[1], pos)
    for layer in _layers(plan):
        x_hook, kv_hook = _block_input(plan, arrays, layer)
        reference = recompute_attention(spec, plan, layer, np.asarray(arrays[x_hook], dtype=np.float64),
                                        np.asarray(arrays[kv_hook], dtype=np.float64))
        diverged = _first_divergence(plan, layer, arrays, reference, run_band)
        if diverged is not None:
            found.append(diverged)
            break                                  # later blocks read this one's output: consequences
        for step in (s for s in plan.steps if s.layer == layer and s.key in reference):
            _, relative, _ = difference(arrays[step.hook], reference[step.key])
            worst = max(worst, (relative, step.hook))
    if found:
        return found
    size = f"to {worst[0]:.1e}" if worst[0] else "exactly"
    trace.checks_passed.append(f"an independent float64 recomputation agrees {size}"
                               f"{' (largest at ' + worst[1] + ')' if worst[0] else ''}: "
                               f"{explaining_dtype(worst[0])} rounding")
    if spec.model is not None:
        found += torch_sdpa_crosscheck(spec, trace, arrays)
    return found or None


def _first_divergence(plan, layer, arrays, reference, run_band: int) -> Optional[Diagnosis]:
    rows = []
    for step in (s for s in plan.steps if s.layer == layer and s.key in reference):
        traced = arrays[step.hook]
        if np.shape(traced) != np.broadcast_shapes(np.shape(traced), np.shape(reference[step.key])):
            rows.append((step, math.inf, math.inf, (), "shape"))
            continue
        largest, relative, where = difference(traced, reference[step.key])
        if _band_index(explaining_dtype(relative)) > run_band:
            rows.append((step, largest, relative, where, explaining_dtype(relative)))
    if not rows:
        return None
    step, largest, relative, where, dtype = rows[0]
    if dtype == "shape":
        why = "its shape differs from the recomputation's"
    elif dtype is None:
        why = f"{largest:.3g} ({relative:.2g} relative) at index {list(where)}: beyond any rounding, a different " \
              f"computation"
    else:
        why = f"{largest:.3g} ({relative:.2g} relative) at index {list(where)}: the size of {dtype} rounding " \
              f"(unit roundoff {UNIT_ROUNDOFF[dtype]:.1e}), more than this {_run_dtype(plan, arrays, step)} run's " \
              f"-- part of the computation ran in {dtype}"
    details = [f"then {s.hook}: {r:.2g} relative" for s, _, r, _, _ in rows[1:6]]
    return Diagnosis(code="ATT-W247", severity="warning", step=step.label, hook=step.hook,
                     message=f"{step.hook} differs from an independent float64 recomputation of the same attention "
                             f"(from the trace's own block input): {why}",
                     details=["the first hook that differs is shown; later hooks follow from it"] + details,
                     hint="compare this step with its definition: `attntrace explain` shows each step's formula")


def _run_dtype(plan, arrays, step) -> str:
    return str(np.asarray(arrays[step.hook]).dtype)


# =========================================================================== torch's SDPA as a second backend

def torch_sdpa_crosscheck(spec, trace, arrays: Dict[str, np.ndarray]) -> List[Diagnosis]:
    """z of every block by torch.nn.functional.scaled_dot_product_attention (math backend, the trace's dtype)
    from the trace's (rotated) Q, K, V and mask; nothing when torch is not installed."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return []
    plan = trace.plan
    worst = (0.0, "")
    for layer in _layers(plan):
        hooks = {s.key: s.hook for s in plan.steps if s.layer == layer}
        q = arrays[hooks.get("rot_q", hooks["q"])]
        k = arrays[hooks.get("rot_k", hooks["k"])]
        v, z = arrays[hooks["v"]], arrays[hooks["z"]]
        group = q.shape[2] // k.shape[2]
        att = spec.attention_of(layer)
        keep = keep_mask(att.mask, q.shape[1], k.shape[1])

        def heads_first(a, repeat=1):
            return torch.from_numpy(np.ascontiguousarray(np.repeat(a, repeat, axis=2).transpose(0, 2, 1, 3)))
        mask = None if keep is None else torch.from_numpy(np.ascontiguousarray(keep))
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            z_torch = torch.nn.functional.scaled_dot_product_attention(
                heads_first(q), heads_first(k, group), heads_first(v, group), attn_mask=mask,
                scale=_scale(att, q.shape[-1])).transpose(1, 2).numpy()
        live = np.ones(z.shape[:3], dtype=bool) if keep is None else \
            np.broadcast_to(keep.any(axis=-1)[:, 0][:, :, None], z.shape[:3])
        largest, relative, where = difference(z[live], z_torch[live])
        dtype = explaining_dtype(relative)
        if _band_index(dtype) > _band_index(str(z.dtype)):
            size = f"the size of {dtype} rounding" if dtype else "beyond any rounding"
            return [Diagnosis(code="ATT-W247", severity="warning", step=plan.step("z", layer).label,
                              hook=hooks["z"], message=f"{hooks['z']} differs from torch's "
                              f"scaled_dot_product_attention (math backend, {z.dtype}) on the same Q, K, V and mask "
                              f"by {largest:.3g} ({relative:.2g} relative): {size}",
                              hint="the weights or their mixing differ from what every backend computes")]
        worst = max(worst, (relative, hooks["z"]))
    trace.checks_passed.append(f"torch's scaled_dot_product_attention (math backend, {trace.dtype}) agrees with z "
                               f"{'to ' + format(worst[0], '.1e') if worst[0] else 'exactly'}: "
                               f"{explaining_dtype(worst[0])} rounding")
    return []


crosscheck.describes = "an independent float64 recomputation agrees within the dtype's rounding"
