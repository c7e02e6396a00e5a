"""Invariant checks for the attention mistakes real projects shipped (issue 15: "Bugs from the field").

Like :mod:`attntrace.analysis.checks`, every check here runs right after its step
and sees the live arrays of the block through a ``CheckContext`` (duck-typed: this
module does not import :mod:`~attntrace.analysis.checks`, which registers these
checks in its tables).  None of them knows whether a bug was injected: each one
compares a step with its *definition*, recomputed here independently of the
engine's code, or reads an invariant off the arrays:

* RoPE (``rot_q``/``rot_k``): every pair of features is the input pair rotated by
  position · base^(-2i/d_head), recomputed with complex numbers in float64 at each
  token's position counted from its item's first real token (ATT-W240; ATT-W241
  when the rotation is right for positions counted from the pads);
* position rows (``pos``): X + PE[position] row by row (ATT-W241);
* the mask (``mask``): a causal mask lets every query see its own position and
  nothing later, the queries being the last seq_q positions (ATT-W242); the width of
  a sliding window counted from the mask equals its size (ATT-W243);
* ALiBi (``scaled``): the slope of each head, read off scaled − scale·Q·Kᵀ, is the
  paper's geometric sequence (ATT-W244);
* masked scores (``attn_scores``): −inf exactly (ATT-W248 for a finite stand-in such
  as −1e9), and no NaN at a masked position (ATT-W246);
* z: NaN in a row whose weights are finite came from V at a key with weight 0 --
  0 × NaN (ATT-W246);
* rows with no visible key whose query is itself padding (left padding under a
  causal mask, a sliding window over trailing pads) are information, said once
  (ATT-I240), not ATT-W203.

Tolerances are relative to the magnitude of the array's input and depend on the
run's dtype (:data:`RELATIVE_TOLERANCE`).  :func:`input_precision` says in which
precision a spec's numbers were stored (a capture from a float16 model holds
float16 numbers); the catalogue's half-precision bugs use it.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, List, Optional, Tuple

import numpy as np

from attntrace.core.masks import from_matrix
from attntrace.core.ops import holds_exactly
from attntrace.errors import Diagnosis

RELATIVE_TOLERANCE = {"float64": 1e-9, "float32": 2e-5}
PRECISIONS = ("float16", "bfloat16", "float32", "float64")
HALF_EPS = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def describes(text: str):
    """Name what a check verifies, for the ✓ lines of a clean run (as analysis.checks does)."""
    def mark(fn):
        fn.describes = text
        return fn
    return mark


def _tolerance(array: np.ndarray) -> float:
    return RELATIVE_TOLERANCE.get(str(array.dtype), 1e-3)


def _magnitude(array: np.ndarray) -> float:
    finite = np.abs(array[np.isfinite(array)])
    return float(finite.max()) if finite.size else 0.0


def _info(ctx, code: str, key: str, message: str, **extra) -> Diagnosis:
    step = ctx.step(key)
    return Diagnosis(code=code, severity="info", step=step.label, hook=step.hook, message=message, **extra)


# =========================================================================== what the spec says

def padding_keep(spec, layer: Optional[int], width: int) -> Optional[np.ndarray]:
    """(batch, width) True = a real token, from the mask's padding (any convention); None without padding
    or when the padding does not cover `width` tokens."""
    mask = spec.attention_of(layer).mask
    if mask.padding is None:
        return None
    keep = np.asarray(from_matrix(mask.padding.data, mask.convention), dtype=bool)
    keep = keep[None] if keep.ndim == 1 else keep
    return keep if keep.shape[-1] == width else None


def expected_positions(spec, plan, layer: Optional[int], *, from_pads: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Query and key positions, (batch or 1, seq_q) and (batch or 1, seq_k): the queries are the last
    seq_q tokens, and each item counts from its first real token (unless `from_pads`)."""
    seq_q, seq_k = plan.size("seq_q"), plan.size("seq_k")
    keys = np.arange(seq_k)[None]
    queries = keys[:, seq_k - seq_q:] if seq_k >= seq_q else np.arange(seq_q)[None] - (seq_q - seq_k)
    keep = None if from_pads else padding_keep(spec, layer, seq_k)
    if keep is None:
        return queries, keys
    first_real = np.where(keep.any(axis=-1), keep.argmax(axis=-1), 0)[:, None]
    return queries - first_real, keys - first_real


def _real_rows(spec, plan, layer: Optional[int], key: str) -> Optional[np.ndarray]:
    """(batch, seq) the rows of Q (key 'q') or K ('k') that are real tokens; None: all of them."""
    seq_q, seq_k = plan.size("seq_q"), plan.size("seq_k")
    keep = padding_keep(spec, layer, seq_k)
    if keep is None:
        return None
    if key == "k":
        return keep
    return keep[:, seq_k - seq_q:] if not spec.is_cross and seq_q <= seq_k else None


def input_precision(spec) -> str:
    """The precision the spec's numbers were stored in: float16 when every embedding and attention
    weight is a float16 number that bfloat16 cannot hold (a capture from a float16 module), bfloat16
    or float32 when they are numbers of those, else float64 (hand-written or float64 data)."""
    arrays = [spec.source.embeddings.data] + [
        getattr(spec.attention_of(0), name).data for name in ("W_q", "W_k", "W_v")
        if getattr(spec.attention_of(0), name) is not None]
    holds = {p: all(holds_exactly(a, p) for a in arrays) for p in PRECISIONS[:3]}
    if holds["float16"] and not holds["bfloat16"]:
        return "float16"
    return next((p for p in ("bfloat16", "float32") if holds[p]), "float64")


# =========================================================================== RoPE and positions

def rope_reference(x: np.ndarray, pos: np.ndarray, base: float, pairing: str) -> np.ndarray:
    """RoPE of x (batch, seq, heads, d) at pos (batch or 1, seq), in float64 with complex numbers:
    each pair (a, b) is a + ib multiplied by e^(i·pos·θ_j), θ_j = base^(-2j/d)."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    first, second = _pair_slices(d, pairing)
    theta = base ** (-2.0 * np.arange(d // 2) / d)
    turn = np.exp(1j * np.asarray(pos, dtype=np.float64)[..., None, None] * theta)       # (b, seq, 1, d/2)
    rotated = (x[..., first] + 1j * x[..., second]) * turn
    out = np.empty_like(x)
    out[..., first], out[..., second] = rotated.real, rotated.imag
    return out


def _pair_slices(d: int, pairing: str):
    return (slice(0, d // 2), slice(d // 2, d)) if pairing == "half" else (slice(0, d, 2), slice(1, d, 2))


def _rotation_error(rotated: np.ndarray, expected: np.ndarray, rows: Optional[np.ndarray], scale: float) -> float:
    diff = np.abs(rotated - expected)
    if rows is not None:
        diff = diff[np.broadcast_to(rows[:, :, None, None], diff.shape)]
    return float(np.nanmax(diff)) / scale if diff.size else 0.0


def _angle_report(x, rotated, pos, base: float, pairing: str, rows) -> str:
    """Where the rotation angle is furthest off, and whether float16 angles explain it."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    first, second = _pair_slices(d, pairing)
    theta = base ** (-2.0 * np.arange(d // 2) / d)
    before = x[..., first] + 1j * x[..., second]
    after = np.asarray(rotated, dtype=np.float64)[..., first] + 1j * np.asarray(rotated, dtype=np.float64)[..., second]
    angle = np.broadcast_to(np.asarray(pos, dtype=np.float64)[..., None, None] * theta, before.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        off = np.angle(after / before) - angle
    off = np.abs((off + np.pi) % (2 * np.pi) - np.pi)
    off[~np.isfinite(off) | (np.abs(before) < 1e-12)] = 0.0
    if rows is not None:
        off = np.where(rows[:, :, None, None], off, 0.0)
    b, s, h, j = np.unravel_index(int(off.argmax()), off.shape)
    worst, worst_angle = float(off[b, s, h, j]), float(angle[b, s, h, j])
    worst_pos = float(np.broadcast_to(pos, off.shape[:2])[b, s])
    text = f"largest angle error {worst:.3g} rad at position {worst_pos:g}, pair {j} (angle {worst_angle:.6g} rad)"
    half = float(np.float16(np.float16(worst_pos) * np.float16(theta[j])))     # gpt-neox#1003's recipe
    if abs(abs(half - worst_angle) - worst) <= 0.2 * worst + 2e-3:
        text += f"; in float16 that angle is {half:g}: the angles were computed in half precision"
    return text


def rope_rotation(which: str) -> Callable:
    """The check after step rot_q or rot_k."""
    @describes(f"RoPE rotates every pair of {which.upper()} by its position's angle (recomputed in float64)")
    def check(ctx) -> Optional[List[Diagnosis]]:
        spec, plan = ctx.spec, ctx.plan
        x, rotated = ctx.values.get(which), ctx.values.get("rot_" + which)
        if spec is None or x is None or rotated is None or x.shape != rotated.shape or x.shape[-1] % 2:
            return None
        pos_kind = spec.positional
        queries, keys = expected_positions(spec, plan, ctx.layer)
        pos = queries if which == "q" else keys
        rows = _real_rows(spec, plan, ctx.layer, which)
        scale = max(_magnitude(np.asarray(x, dtype=np.float64)), 1e-30)
        tol = _tolerance(rotated)
        expected = rope_reference(x, pos, pos_kind.base, pos_kind.pairing)
        error = _rotation_error(rotated, expected, rows, scale)
        if error <= tol:
            return []
        key = "rot_" + which
        hook = ctx.step(key).hook
        pad_q, pad_k = expected_positions(spec, plan, ctx.layer, from_pads=True)
        from_pads = pad_q if which == "q" else pad_k
        counted_from_pads = rope_reference(x, from_pads, pos_kind.base, pos_kind.pairing)
        if not np.array_equal(*np.broadcast_arrays(from_pads, pos)) and \
                _rotation_error(rotated, counted_from_pads, rows, scale) <= tol:
            return [_positions_warning(ctx, key, f"{hook} is rotated at positions counted from the start of the "
                                                 f"padded row, not from each item's first real token")]
        other = "interleaved" if pos_kind.pairing == "half" else "half"
        if x.shape[-1] > 2 and _rotation_error(rotated, rope_reference(x, pos, pos_kind.base, other), rows,
                                               scale) <= tol:
            pairs = {"half": "i with i + d_head/2 (GPT-NeoX, Llama, rotate_half)",
                     "interleaved": "2i with 2i+1 (GPT-J, RoFormer, Meta's complex-number code)"}
            return [ctx.warn("ATT-W240", key, f"{hook} rotates the pairs {pairs[other]}, but the spec pairs "
                             f"{pairs[pos_kind.pairing]} (pairing: {pos_kind.pairing}): every head's scores change",
                             details=[f"largest difference from the {pos_kind.pairing} rotation: {error:.3g} "
                                      f"(relative to max |{which.upper()}|)"],
                             hint="rotate the pairs the weights were trained with: a checkpoint converted from the "
                                  "other convention needs its W_q/W_k rows permuted, not a different rotation")]
        return [ctx.warn("ATT-W240", key, f"{hook} differs from {which.upper()} rotated by position · "
                         f"base^(-2i/d_head) by {error:.3g} (relative; {tol:g} allowed in {rotated.dtype})",
                         details=[_angle_report(x, rotated, pos, pos_kind.base, pos_kind.pairing, rows)],
                         hint="compute the angles position · inv_freq in float32 or better: at position p an "
                              "angle rounded to float16 is off by up to p/2048 rad")]
    return check


def _positions_warning(ctx, key: str, message: str) -> Diagnosis:
    return ctx.warn("ATT-W241", key, message + ": a left-padded item's first real token must be position 0, "
                    "as the same text alone", details=["positions = cumsum(attention_mask) − 1 for real tokens "
                                                       "(what transformers' generate() passes as position_ids)"],
                    hint="derive position_ids from the attention mask: mask.cumsum(-1) - 1 (pads: any position)")


@describes("each token gets the position row of its place, counted from its item's first real token")
def position_rows(ctx) -> Optional[List[Diagnosis]]:
    """After step pos: X + PE[position] (+ token types), compared on the real tokens."""
    spec = ctx.spec
    hooks = {key: ctx.step(key).hook for key in ("embed", "pos")}
    embed, added = (ctx.trace.arrays.get(hooks[key]) for key in ("embed", "pos"))
    if spec is None or embed is None or added is None:
        return None                     # not kept (a huge input): nothing to compare with
    seq, d_model = embed.shape[1], embed.shape[2]
    table = position_table(spec, seq, d_model)
    rows = None if spec.is_cross else padding_keep(spec, None, seq)
    base = np.asarray(embed, dtype=np.float64) + token_type_rows(spec)
    scale = max(_magnitude(base), 1e-30)
    tol = _tolerance(added)

    def error(positions):
        diff = np.abs(np.asarray(added, dtype=np.float64) - (base + table[np.clip(positions, 0, seq - 1)]))
        if rows is not None:
            diff = diff[np.broadcast_to(rows[:, :, None], diff.shape)]
        return float(diff.max()) / scale if diff.size else 0.0

    counted = np.arange(seq)[None]
    if rows is not None:
        counted = counted - np.where(rows.any(axis=-1), rows.argmax(axis=-1), 0)[:, None]
    if error(counted) <= tol:
        return []
    if rows is not None and error(np.arange(seq)[None]) <= tol:
        return [_positions_warning(ctx, "pos", f"{hooks['pos']} adds the position rows of the padded row's "
                                               f"places, not of each token's place in its own text")]
    return [ctx.warn("ATT-W241", "pos", f"{hooks['pos']} is not X + PE[position] for each token "
                     f"({error(counted):.3g} relative difference)",
                     hint="add the row of each token's position (counted from its first real token)")]


def position_table(spec, seq: int, d_model: int) -> np.ndarray:
    """The first `seq` rows of the spec's learned table, or the sinusoidal table written out here."""
    pos = spec.positional
    if pos.kind == "learned":
        return np.asarray(pos.table.data, dtype=np.float64)[:seq]
    position = np.arange(seq)[:, None]
    angle = position / pos.base ** (np.arange(0, d_model, 2) / d_model)
    table = np.zeros((seq, d_model))
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle)[:, : d_model // 2]
    return table


def token_type_rows(spec) -> np.ndarray:
    """BERT's token-type (segment) row of every token, or 0."""
    pos = spec.positional
    if pos.type_table is None:
        return np.zeros(1)
    return np.asarray(pos.type_table.data, dtype=np.float64)[np.asarray(pos.type_ids.data, dtype=np.int64)]


# =========================================================================== the mask against the positions

@describes("the mask agrees with the positions: causal alignment and window width")
def mask_matches_positions(ctx) -> Optional[List[Diagnosis]]:
    keep = ctx.values.get("mask")
    spec = ctx.spec
    if keep is None or spec is None:
        return None
    mask_spec = spec.attention_of(ctx.layer).mask
    if not (mask_spec.causal or mask_spec.prefix or mask_spec.window):
        return None
    if ctx.engine_computed("mask"):
        return []       # masks.build draws the diagonal and the window from these positions (tests/test_masks.py)
    seq_q, seq_k = keep.shape[-2], keep.shape[-1]
    q_pos = np.arange(seq_q)[:, None] + (seq_k - seq_q)
    k_pos = np.arange(seq_k)[None, :]
    others = _other_blockers(mask_spec, keep.shape)
    found = []
    if mask_spec.causal or mask_spec.prefix:
        found += _causal_alignment(ctx, keep, others, q_pos, k_pos, mask_spec.prefix or 0)
    if mask_spec.window:
        found += _window_width(ctx, keep, others, q_pos, k_pos, mask_spec.window,
                               looks_back=bool(mask_spec.causal or mask_spec.prefix))
    return found


def _other_blockers(mask_spec, shape) -> np.ndarray:
    """What padding and an explicit matrix allow, (batch or 1, 1, seq_q, seq_k): the window and the
    causal rule are judged only where these let a key through."""
    allowed = np.ones(shape[-2:], dtype=bool)[None, None]
    if mask_spec.padding is not None:
        pad = np.asarray(from_matrix(mask_spec.padding.data, mask_spec.convention), dtype=bool)
        pad = pad[None] if pad.ndim == 1 else pad
        if pad.shape[-1] == shape[-1]:
            allowed = allowed & pad[:, None, None, :]
    if mask_spec.matrix is not None:
        matrix = np.asarray(from_matrix(mask_spec.matrix.data, mask_spec.convention), dtype=bool)
        allowed = allowed & (matrix[None, None] if matrix.ndim == 2 else matrix[:, None])
    return allowed


def _first(cells: np.ndarray) -> Tuple[int, int, int]:
    b, _, q, k = (int(i) for i in np.argwhere(cells)[0])
    return b, q, k


def _causal_alignment(ctx, keep, others, q_pos, k_pos, prefix: int) -> List[Diagnosis]:
    future = keep & (k_pos > q_pos) & ~(k_pos < prefix)
    own = (k_pos == q_pos) & others                     # a query's own position, where nothing else blocks it
    blind = own & ~keep
    if not (future.any() or blind.any()):
        return []
    seq_q, seq_k = keep.shape[-2], keep.shape[-1]
    hook = ctx.step("mask").hook
    if blind.any():
        b, q, k = _first(blind)
        visible = np.flatnonzero(keep[b, 0, q])
        sees = "no key" if not visible.size else f"key {visible[0]}" if visible.size == 1 else \
            f"keys {visible[0]}–{visible[-1]}"
        message = (f"{hook}: query {q} sits at position {k} (the queries are the last {seq_q} of {seq_k} "
                   f"positions) but may not attend to key {k}, its own position ({sees} visible)")
        details = ["the mask is aligned top-left (query i sees keys 0..i), as torch's is_causal does when "
                   "seq_q < seq_k; with a KV cache the new queries are the LAST positions (bottom-right)"] \
            if seq_q < seq_k and np.array_equal(keep & others, np.tril(np.ones((seq_q, seq_k), bool)) & others) \
            else []
    else:
        b, q, k = _first(future)
        message = f"{hook}: query {q} (position {int(q_pos[q, 0])}) may attend to key {k}, a later position"
        details = []
    return [ctx.warn("ATT-W242", "mask", message, details=details,
                     hint="build the causal mask from positions: key j is visible to query i when "
                          "j ≤ i + seq_k − seq_q (torch.nn.attention.bias.causal_lower_right)")]


def _window_width(ctx, keep, others, q_pos, k_pos, size: int, looks_back: bool) -> List[Diagnosis]:
    distance = q_pos - k_pos if looks_back else np.abs(q_pos - k_pos)
    inside = (distance >= 0) & (distance < size)
    visible_far = keep & (distance >= size) & (distance >= 0)      # wider than the window
    missing = inside & others & ~keep                                # narrower
    if not (visible_far.any() or missing.any()):
        return []
    counted = int(np.where(keep & (distance >= 0), distance, -1).max()) + 1
    hook = ctx.step("mask").hook
    if visible_far.any():
        b, q, k = _first(visible_far)
        what = f"query {q} may attend to key {k}, {int(distance[q, k])} positions away"
    else:
        b, q, k = _first(missing)
        what = f"query {q} may not attend to key {k}, {int(distance[q, k])} positions away"
    side = "itself and the keys before it" if looks_back else "the keys on both sides"
    return [ctx.warn("ATT-W243", "mask", f"{hook}: the window counted from the mask is {counted} keys wide, the "
                     f"spec says window: {size}; {what}",
                     details=[f"window: {size} keeps keys at distance 0..{size - 1}: {side} ({size} keys when "
                              f"looking back)"],
                     hint=f"keep key j when 0 ≤ i − j < {size} (i − j ≤ {size - 1}); `<=` instead of `<`, "
                          f"or passing the size where a kernel expects the size − 1, keeps one key more")]


# =========================================================================== ALiBi

def paper_slopes(n_heads: int) -> np.ndarray:
    """The ALiBi slopes of Press et al.'s reference code: for a power of two n, the geometric sequence
    starting at 2^(-8/n) with that ratio; otherwise those of the largest power of two below n, then
    every other slope of twice that power."""
    def geometric(n: int) -> List[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n_heads).is_integer():
        return np.array(geometric(n_heads))
    lower = 2 ** math.floor(math.log2(n_heads))
    return np.array(geometric(lower) + list(paper_slopes(2 * lower)[0::2][: n_heads - lower]))


@describes("ALiBi: every head's slope is the paper's geometric sequence")
def alibi_slopes_check(ctx) -> Optional[List[Diagnosis]]:
    if ctx.plan.positional != "alibi" or "scaled" not in ctx.values:
        return None
    qk = ctx.corner("qk")
    scaled = ctx.corner("scaled", ctx.values["scaled"])
    seq_q, seq_k = ctx.plan.size("seq_q"), ctx.plan.size("seq_k")
    preview = ctx.trace.previews.get(ctx.step("qk").hook)
    rows, cols = _corner_indices(preview, seq_q, seq_k)
    distance = np.abs((rows[:, None] + seq_k - seq_q) - cols[None, :]).astype(np.float64)
    if not (distance > 0).any():
        return None
    bias = np.asarray(scaled, dtype=np.float64) - ctx.block.scale * np.asarray(qk, dtype=np.float64)
    far = np.broadcast_to(distance > 0, bias.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        slopes = np.where(far, -bias / distance, np.nan)
    measured = np.nanmedian(slopes.transpose(1, 0, 2, 3).reshape(slopes.shape[1], -1), axis=1)
    heads = len(measured)
    expected = paper_slopes(heads)
    tol = 1e-6 if str(ctx.values["scaled"].dtype) == "float64" else 1e-3
    wrong = np.flatnonzero(~(np.abs(measured - expected) <= tol * expected + 1e-12))
    if not wrong.size:
        return []
    naive = 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)
    shown = ", ".join(f"head {h}: {measured[h]:.6g} (paper {expected[h]:.6g})" for h in wrong[:4])
    details = [f"measured slopes {np.array2string(measured, precision=5)}"]
    if np.allclose(measured, naive, rtol=tol * 10):
        details.append(f"they are 2^(-8(h+1)/{heads}), the power-of-two formula; for {heads} heads (not a power "
                       f"of two) the paper takes the {2 ** math.floor(math.log2(heads))}-head slopes, then every "
                       f"other slope of the {2 ** (math.floor(math.log2(heads)) + 1)}-head sequence")
    return [ctx.warn("ATT-W244", "scaled", f"{ctx.step('scaled').hook}: ALiBi slopes differ from the paper's for "
                     f"{len(wrong)} of {heads} heads: {shown}", details=details,
                     hint="use the reference get_slopes(n): for n not a power of two, "
                          "get_slopes(2^⌊log2 n⌋) + get_slopes(2^(⌊log2 n⌋+1))[0::2][:n − 2^⌊log2 n⌋]")]


def _corner_indices(preview, seq_q: int, seq_k: int) -> Tuple[np.ndarray, np.ndarray]:
    if preview is not None:
        return np.asarray(preview.rows), np.asarray(preview.cols)
    from attntrace.core.stats import PREVIEW_EDGE, edge_indices
    return edge_indices(seq_q, PREVIEW_EDGE), edge_indices(seq_k, PREVIEW_EDGE)


# =========================================================================== masked scores, NaN provenance

@describes("masked scores are −inf exactly, and no NaN sits at a masked position")
def masked_scores(ctx) -> Optional[List[Diagnosis]]:
    keep = ctx.values.get("mask")
    scores = ctx.values.get("attn_scores")
    if keep is None or scores is None:
        return None
    if ctx.engine_computed("attn_scores"):
        return []                   # the engine's masking replaces blocked scores by -inf (NaN included)
    blocked = ~keep
    if not blocked.any():
        return []
    hook = ctx.step("attn_scores").hook
    with np.errstate(invalid="ignore"):
        top = np.max(scores, where=blocked, initial=-np.inf)                  # NaN when a NaN is masked
        finite_top = np.fmax.reduce(scores, axis=None, where=blocked, initial=-np.inf)
    found = []
    if np.isnan(top):
        cells = np.isnan(scores) & blocked
        b, h, q, k = (int(i) for i in np.argwhere(cells)[0])
        found.append(ctx.warn("ATT-W246", "attn_scores", f"{hook}: NaN at {int(cells.sum())} masked position(s) "
                              f"(first: batch {b}, head {h}, query {q}, key {k}) survived the mask",
                              details=["NaN + (−inf) = NaN: adding −inf keeps a NaN score, and one NaN makes the "
                                       "whole row of weights NaN"],
                              hint="mask with masked_fill / torch.where (which replaces the score), and zero the "
                                   "values of masked keys before weights·V"))
    if np.isfinite(finite_top):
        cells = np.isfinite(scores) & blocked
        b, h, q, k = (int(i) for i in np.argwhere(cells)[0])
        found.append(ctx.warn("ATT-W248", "attn_scores", f"{hook}: {int(cells.sum())} masked score(s) are finite "
                              f"instead of −inf (largest {finite_top:.4g}; first: batch {b}, head {h}, query {q}, "
                              f"key {k})",
                              details=["a finite stand-in such as −1e9 or −1e4 gives a masked key weight "
                                       "exp(−1e9 − max) = 0 only while a visible key is in the row: a fully masked "
                                       "row attends uniformly to what it should not see, and in float16 −1e9 "
                                       "overflows to −inf (a NaN row)"],
                              hint="masked_fill(~keep, float('-inf')) with a safe softmax (or "
                                   "F.scaled_dot_product_attention), or torch.finfo(dtype).min applied once, "
                                   "by masked_fill, never added twice"))
    return found


@describes("no NaN reaches z from a key whose weight is 0")
def nan_through_zero_weights(ctx) -> Optional[List[Diagnosis]]:
    z, pattern, v = (ctx.values.get(key) for key in ("z", "pattern", "v"))
    if z is None or pattern is None or v is None or not ctx.stats("z").nan:
        return None
    z_nan = np.isnan(z).any(axis=-1)                                  # (b, sq, h)
    weights_nan = np.isnan(pattern).any(axis=-1).transpose(0, 2, 1)    # (b, sq, h)
    leaked = z_nan & ~weights_nan
    if not leaked.any():
        return []
    b, q, h = (int(i) for i in np.argwhere(leaked)[0])
    group = pattern.shape[1] // v.shape[2]
    nan_keys = np.flatnonzero(np.isnan(v[min(b, v.shape[0] - 1), :, h // group]).any(axis=-1))
    weights = pattern[b, h, q, nan_keys]
    hook = ctx.step("z").hook
    return [ctx.warn("ATT-W246", "z", f"{hook}: NaN in {int(leaked.sum())} row(s) whose weights are finite "
                     f"(first: batch {b}, query {q}, head {h}): V holds NaN at key(s) "
                     f"{', '.join(map(str, nan_keys[:8]))} with weight {', '.join(f'{w:g}' for w in weights[:8])}",
                     details=["0 × NaN = NaN: a masked key's weight is 0, but multiplying its NaN value by 0 "
                              "still gives NaN (pytorch#101967)"],
                     hint="zero the values of masked keys (torch.where(key_keep, v, 0)) or never let NaN into "
                          "padded slots")]


# =========================================================================== rows with no key

def padding_rows_are_information(check: Callable) -> Callable:
    """Wrap the ATT-W203 check: rows with no visible key whose query is itself padding (in an item
    with a real token) are said once, as information (ATT-I240); the others stay ATT-W203."""
    def wrapped(ctx) -> Optional[List[Diagnosis]]:
        keep = ctx.values.get("mask")
        rows = _padding_query_rows(ctx, keep) if keep is not None and ctx.spec is not None else None
        if rows is None or not rows.any():
            return check(ctx)
        quiet = copy.copy(ctx)
        quiet.values = dict(ctx.values, mask=keep | rows[:, None, :, None])      # W203 judges the others
        found = list(check(quiet) or [])
        if not any(d.code == "ATT-I240" for d in ctx.trace.diagnoses):
            items = sorted({int(b) for b, _ in np.argwhere(rows)})
            queries = sorted({int(q) for _, q in np.argwhere(rows)})
            names = ", ".join(ctx.token_q(q) for q in queries[:8]) + (" ..." if len(queries) > 8 else "")
            found.append(_info(ctx, "ATT-I240", "pattern",
                               f"query row(s) {names} of batch item(s) {', '.join(map(str, items))} are padding "
                               f"and may attend to no key (left padding under a causal mask, or a window over "
                               f"pads): their weights are 0 by design (said once for every layer)",
                               hint="nothing to fix; their outputs are not meaningful and nothing reads them"))
        return found
    wrapped.describes = getattr(check, "describes", None)
    return wrapped


def _padding_query_rows(ctx, keep: np.ndarray) -> Optional[np.ndarray]:
    """(batch, seq_q) rows that see no key and are themselves padding, in an item that has a real token."""
    spec = ctx.spec
    seq_q, seq_k = keep.shape[-2], keep.shape[-1]
    pad = padding_keep(spec, ctx.layer, seq_k)
    if pad is None or spec.is_cross or seq_q > seq_k:
        return None
    own = pad[:, seq_k - seq_q:]                                      # (batch, seq_q): the query's own token
    empty = ~keep.any(axis=-1)[:, 0]                                  # (batch or 1, seq_q)
    return empty & ~own & pad.any(axis=-1)[:, None]


# step key -> the checks of this module that run after it (analysis.checks merges them into its tables)
STEP_CHECKS = {
    "pos": [position_rows],
    "rot_q": [rope_rotation("q")],
    "rot_k": [rope_rotation("k")],
    "mask": [mask_matches_positions],
    "scaled": [alibi_slopes_check],
    "attn_scores": [masked_scores],
    "z": [nan_through_zero_weights],
}
