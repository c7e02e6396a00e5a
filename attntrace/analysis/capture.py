"""Check a capture: rebuild the attention as a spec, compare hook by hook, name the bug.

A capture (:mod:`attntrace.models.capture`) holds what a user's PyTorch module
computed in one forward pass.  :func:`check_capture`

1. reads the file lazily (:mod:`attntrace.inputs.capture_file`: header first,
   then one tensor at a time; float16 and bfloat16 are widened to float64 only
   when compared) and validates it;
2. rebuilds the same attention as an attntrace spec from the captured inputs,
   weights and configuration (:mod:`attntrace.analysis.capture_spec`);
3. runs attntrace's reference trace in float64 and compares every captured hook,
   after mapping its layout (PyTorch's (batch, heads, seq, d_head), averaged
   nn.MultiheadAttention weights, (seq, batch, d) inputs ...) to attntrace's axes;
4. marks the first diverging hook, and for each later one says whether it is a
   consequence (it matches once the captured earlier hooks are fed into the
   reference) or diverges on its own;
5. when the numbers differ, replays every catalogue bug that can show on this
   configuration, and every pair of them, on the same inputs, and names those
   that reproduce the captured numbers within the tolerance.

Tolerances depend on the least precise floating dtype among the part's captured
tensors.  A cell matches when ``|captured − reference| ≤ atol + rtol · M``,
where M is the largest finite |reference| of that hook (errors are measured
relative to the hook's magnitude, not cell by cell, so a weight of 1e-9 next to
weights of 0.5 is held to the same absolute standard as they are):

    float64  rtol 1e-9   atol 1e-12
    float32  rtol 1e-5   atol 1e-8
    float16  rtol 1e-2   atol 1e-5
    bfloat16 rtol 4e-2   atol 1e-4

Blocked scores compare equal when the reference holds −inf and the capture a
large negative (≤ −1e4, e.g. masked_fill(mask == 0, -1e9)); NaN equals NaN and
±inf equals the same inf.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from attntrace.analysis import bugs
from attntrace.analysis.capture_spec import BLOCK_KINDS, BLOCKED_AT, TOLERANCES, CapturePart, rebuild
from attntrace.analysis.run import run
from attntrace.core.plan import plan_from_spec
from attntrace.errors import Diagnosis, InputError, ShapeError, input_error
from attntrace.hookpoints import HOOK_POINTS, resolve_hook_name
from attntrace.inputs.capture_file import CaptureFile, load_capture
from attntrace.inputs.spec import load_spec

_HOOK_AXES = {point.name: point.axes for point in HOOK_POINTS}


# =========================================================================== tolerances

ROW_PREVIEW = 16            # values of the first diverging row shown

_AXIS_LABELS = {"batch": "batch", "n_heads": "head", "n_kv_heads": "kv head", "seq_q": "query", "seq_k": "key",
                "d_head": "d_head", "d_v": "d_v", "d_model": "d_model", "d_out": "d_out",
                "n_heads·d_v": "feature", "1": "mask"}


def spec_from_capture(capture: Union[CaptureFile, str, Path], part: Optional[str] = None) -> Dict[str, Any]:
    """The attntrace spec (a dict, today's single-attention format, arrays as numpy) that computes
    what the captured module computed.  `part` names an attention inside a block
    ("self_attn", "multihead_attn"); by default the captured module itself."""
    capture = capture if isinstance(capture, CaptureFile) else load_capture(capture)
    record = capture.root if part is None else capture.component(part)
    view = CapturePart(capture, record)
    return rebuild(view, _resolved_hooks(view)[0]).spec


# =========================================================================== hooks and layouts

_HEADS_FOR = {"attn.hook_k": "n_kv_heads", "attn.hook_v": "n_kv_heads", "attn.hook_rot_k": "n_kv_heads"}
_KEY_SIDE = ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k", "hook_encoder_embed")
_SCORES = ("batch", "n_heads", "seq_q", "seq_k")


def _per_head_layouts(heads: str, seq: str, width: str) -> List[Tuple[str, ...]]:
    """(batch, heads, seq, d) as PyTorch code holds it, attntrace's (batch, seq, heads, d), the
    flat projection (batch, seq, heads·d), and heads folded into the batch (nn.MultiheadAttention)."""
    return [("batch", heads, seq, width), ("batch", seq, heads, width), ("batch", seq, f"{heads}·{width}"),
            (f"batch·{heads}", seq, width)]


def _candidates(hook: str) -> List[Tuple[str, ...]]:
    """Layouts a tapped tensor may have, in order of preference: PyTorch's head-major first."""
    if hook in ("attn.hook_q", "attn.hook_rot_q", "attn.hook_k", "attn.hook_rot_k", "attn.hook_v"):
        return _per_head_layouts(_HEADS_FOR.get(hook, "n_heads"), "seq_k" if hook in _KEY_SIDE else "seq_q",
                                 "d_v" if hook == "attn.hook_v" else "d_head")
    if hook in ("attn.hook_qk", "attn.hook_scaled", "attn.hook_attn_scores", "attn.hook_pattern"):
        return [_SCORES, ("batch·n_heads", "seq_q", "seq_k")]
    if hook == "attn.hook_z":
        return _per_head_layouts("n_heads", "seq_q", "d_v")
    return [tuple(_HOOK_AXES[hook])]


_AXIS_ALIASES = {"heads": "n_heads", "head": "n_heads", "h": "n_heads", "b": "batch", "query": "seq_q",
                 "queries": "seq_q", "key": "seq_k", "keys": "seq_k", "d_k": "d_head", "head_dim": "d_head",
                 "dk": "d_head", "hidden": "d_model", "embed": "d_model", "kv_heads": "n_kv_heads"}


def _canonical_axes(axes: Sequence[str], hook: str) -> Tuple[str, ...]:
    out = []
    for axis in axes:
        parts = []
        for name in str(axis).replace("*", "·").split("·"):
            name = _AXIS_ALIASES.get(name, name)
            if name == "seq":
                name = "seq_k" if hook in _KEY_SIDE else "seq_q"
            if name == "n_heads" and hook in _HEADS_FOR:
                name = "n_kv_heads"
            parts.append(name)
        out.append("·".join(parts))
    return tuple(out)


def _size(axis: str, sizes: Dict[str, int]) -> Optional[int]:
    total = 1
    for name in axis.split("·"):
        if name not in sizes:
            return None
        total *= sizes[name]
    return total


def _variants(layout: Tuple[str, ...], sizes: Dict[str, int]) -> List[Tuple[str, ...]]:
    """The layout with any size-1 batch/head axis left out (unbatched or single-head code)."""
    droppable = [a for a in layout if a in ("batch", "n_heads", "n_kv_heads") and sizes.get(a) == 1]
    found = []
    for r in range(len(droppable) + 1):
        for dropped in itertools.combinations(droppable, r):
            variant = tuple(a for a in layout if a not in dropped)
            if variant not in found:
                found.append(variant)
    return found


def _fits(shape: Tuple[int, ...], layout: Tuple[str, ...], sizes: Dict[str, int]) -> bool:
    return len(shape) == len(layout) and all(_size(a, sizes) == s for a, s in zip(layout, shape))


def _to_hook_layout(array: np.ndarray, layout: Tuple[str, ...], target: Tuple[str, ...],
                    sizes: Dict[str, int]) -> np.ndarray:
    """Reshape composite axes into their parts, add the missing size-1 axes, order as `target`."""
    names: List[str] = []
    shape: List[int] = []
    for axis in layout:
        for name in axis.split("·"):
            names.append(name)
            shape.append(sizes[name])
    array = array.reshape(shape)
    flat_target = [name for axis in target for name in axis.split("·")]
    for axis in flat_target:
        if axis not in names:                   # a size-1 axis the user's code does not have
            names.append(axis)
            array = array[..., None]
    array = array.transpose([names.index(a) for a in flat_target])
    return array.reshape([_size(axis, sizes) for axis in target])      # composite target axes, e.g. n_heads·d_v


def _given_layout(hook: str, shape: Tuple[int, ...], entry: Dict[str, Any],
                  sizes: Dict[str, int]) -> Optional[Tuple[str, ...]]:
    """The axes the capture recorded: a tap's must fit (else it is the user's mistake in naming
    them); a module output that does not fit has the wrong shape (None: compared as such)."""
    layout = _canonical_axes(entry["axes"], hook)
    if _fits(shape, layout, sizes):
        return layout
    if entry.get("source") == "tap":
        raise input_error("ATT-E353", f"tap '{entry.get('written_as', hook)}' says axes {tuple(entry['axes'])}, "
                                      f"but its shape {shape} does not fit them "
                                      f"({', '.join(f'{a}={_size(a, sizes)}' for a in layout)})",
                          hint="axes: batch, n_heads, n_kv_heads, seq_q, seq_k, d_head, d_v, d_model, d_out")
    return None


def _infer_layout(hook: str, shape: Tuple[int, ...], entry: Dict[str, Any], sizes: Dict[str, int],
                  target: Tuple[str, ...], notes: List[Diagnosis]) -> Optional[Tuple[str, ...]]:
    """The first candidate layout that fits the shape; a warning when another one fits too
    and would read the numbers differently."""
    matches = [v for c in _candidates(hook) for v in _variants(c, sizes) if _fits(shape, v, sizes)]
    if not matches:
        return None
    probe = np.arange(int(np.prod(shape))).reshape(shape)
    mapped = [_to_hook_layout(probe, m, target, sizes) for m in matches]
    if any(not np.array_equal(mapped[0], other) for other in mapped[1:]):
        notes.append(Diagnosis(
            code="ATT-W344", severity="warning", hook=hook,
            message=f"the axes of tapped '{entry.get('written_as', hook)}' {shape} are ambiguous (sizes coincide); "
                    f"read as ({', '.join(matches[0])})",
            hint=f"tap('{entry.get('written_as', hook)}', t, axes=(...)) names them"))
    return matches[0]


@dataclass
class _Captured:
    """A captured hook mapped to attntrace's layout."""

    hook: str
    entry: Dict[str, Any]
    shape: Tuple[int, ...]
    layout: Optional[Tuple[str, ...]]
    array: Optional[np.ndarray]          # in the hook's axes (heads axis of size 1 when averaged)
    averaged: bool = False

    @property
    def patchable(self) -> bool:
        return self.array is not None and not self.averaged


def _resolved_hooks(part: CapturePart):
    """Captured hooks by canonical name (aliases resolved) and those that are not attention hooks."""
    resolved: Dict[str, Dict[str, Any]] = {}
    skipped: List[Tuple[str, Dict[str, Any], str]] = []
    for written, entry in part.record["hooks"].items():
        try:
            name = resolve_hook_name(written)
        except InputError as error:
            if written.startswith("blocks."):
                skipped.append((written, entry, "a block hook: compared once blocks are rebuilt"))
                continue
            raise input_error("ATT-E352", f"{part.capture.path}: tapped hook '{written}' is not a hook point",
                              hint=error.diagnosis.hint) from None
        if name in resolved:
            skipped.append((written, entry, f"a second tensor for {name}"))
            continue
        resolved[name] = dict(entry, written_as=written)
    return resolved, skipped


def _map_hooks(part: CapturePart, resolved: Dict[str, Dict[str, Any]], plan, notes: List[Diagnosis]):
    sizes = {name: plan.size(name) for name in plan.dims}
    sizes["1"] = 1
    captured: List[_Captured] = []
    skipped: List[Tuple[str, Dict[str, Any], str]] = []
    for hook, entry in resolved.items():
        if hook in ("hook_embed", "hook_encoder_embed"):
            skipped.append((hook, entry, "an input: the rebuilt spec starts from it"))
            continue
        if hook not in plan.hooks:
            skipped.append((hook, entry, "not a step of the rebuilt attention"))
            continue
        if hook == "attn.hook_mask":
            skipped.append((hook, entry, "masks are compared through their effect on attn_scores and pattern"))
            continue
        array = part.tensor(entry["tensor"])
        if entry.get("slice"):
            axis, start, stop = entry["slice"]
            array = np.take(array, np.arange(start, stop), axis=axis)
        averaged = entry.get("reduce") == "mean_heads"
        target = tuple(_HOOK_AXES[hook])
        local = dict(sizes, n_heads=1) if averaged else sizes
        layout = _given_layout(hook, array.shape, entry, local) if entry.get("axes") else \
            _infer_layout(hook, array.shape, entry, local, target, notes)
        mapped = None if layout is None else _to_hook_layout(array, layout, target, local)
        captured.append(_Captured(hook, entry, tuple(array.shape), layout, mapped, averaged))
    order = {h: i for i, h in enumerate(plan.hooks)}
    captured.sort(key=lambda c: order[c.hook])
    return captured, skipped


# =========================================================================== comparing

@dataclass
class HookCheck:
    """One captured hook against the reference."""

    hook: str
    written_as: str
    source: str                          # tap | output | module
    step: Optional[str]                  # "8/11 'weights = softmax(masked) over seq_k'"
    shape: Tuple[int, ...]               # as captured
    axes: Optional[Tuple[str, ...]]      # as read
    dtype: str
    status: str                          # match | first divergence | consequence | diverges | shape differs
    #                                      | not compared
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    cells: int = 0
    differing: int = 0
    first: Optional[Dict[str, Any]] = None   # {"index": {"batch": 0, "head": 1, ...}, "captured", "expected"}
    reason: str = ""

    @property
    def compared(self) -> bool:
        return self.status != "not compared"

    @property
    def ok(self) -> bool:
        return self.status in ("match", "not compared")

    def to_json(self) -> Dict[str, Any]:
        return {"hook": self.hook, "written_as": self.written_as, "source": self.source, "step": self.step,
                "shape": list(self.shape), "axes": list(self.axes) if self.axes else None, "dtype": self.dtype,
                "status": self.status, "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel),
                "cells": self.cells, "differing": self.differing,
                "first": None if self.first is None else {
                    **self.first, **{k: _num(self.first[k]) for k in ("captured", "expected")},
                    **{k: [_num(v) for v in self.first[k]] for k in ("row_captured", "row_expected")}},
                "reason": self.reason}


def _num(x: Any) -> Any:
    """JSON-safe number: NaN and infinities as strings, as attntrace's JSON does."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


@dataclass
class _Diff:
    max_abs: float
    max_rel: float
    bad: np.ndarray

    @property
    def ok(self) -> bool:
        return not self.bad.any()


def _difference(captured: np.ndarray, expected: np.ndarray, rtol: float, atol: float, hook: str) -> _Diff:
    """Cell-wise comparison relative to the hook's magnitude (see the module docstring)."""
    finite_ref = np.isfinite(expected)
    magnitude = float(np.abs(expected[finite_ref]).max()) if finite_ref.any() else 0.0
    both_finite = finite_ref & np.isfinite(captured)
    diff = np.where(both_finite, np.abs(np.where(both_finite, captured, 0) - np.where(both_finite, expected, 0)),
                    np.inf)
    same_special = (np.isnan(captured) & np.isnan(expected)) | (np.isinf(captured) & (captured == expected))
    if hook == "attn.hook_attn_scores":          # -1e9 in the capture where attntrace writes -inf
        same_special |= np.isneginf(expected) & (captured <= BLOCKED_AT)
    diff = np.where(same_special, 0.0, diff)
    floor = max(magnitude, atol / rtol)
    bad = diff > atol + rtol * magnitude
    return _Diff(float(diff.max()) if diff.size else 0.0, float(diff.max() / floor) if diff.size else 0.0, bad)


def _reference(trace, item: _Captured) -> np.ndarray:
    array = trace.arrays[item.hook]
    return array.mean(axis=1, keepdims=True) if item.averaged else array


def _first_index(item: _Captured, bad: np.ndarray, expected: np.ndarray) -> Dict[str, Any]:
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    axes = _HOOK_AXES[item.hook]
    named = {}
    for axis, i in zip(axes, index):
        label = _AXIS_LABELS.get(axis, axis)
        named[label] = "mean" if (item.averaged and axis == "n_heads") else i
    row = index[:-1]                             # the cell's row along the last axis (a query's weights ...)
    return {"index": named, "captured": float(item.array[index]), "expected": float(expected[index]),
            "row_axis": _AXIS_LABELS.get(axes[-1], axes[-1]),
            "row_captured": [float(v) for v in item.array[row][:ROW_PREVIEW]],
            "row_expected": [float(v) for v in expected[row][:ROW_PREVIEW]]}


def _run(spec, *, keep="all", overrides=None, hooks=()):
    return run(spec, keep=keep, dtype="float64", overrides=overrides, hooks=list(hooks), check=False,
                            spec_hooks=False)


def _kept(captured: List[_Captured]) -> List[str]:
    """Keep only the hooks that are compared: a long-context replay holds a few score-sized arrays, not all."""
    return [c.hook for c in captured] or ["hook_attn_out"]


def _compare_all(trace, captured: List[_Captured], rtol: float, atol: float) -> Dict[str, _Diff]:
    return {c.hook: _difference(c.array, _reference(trace, c), rtol, atol, c.hook)
            for c in captured if c.array is not None}


# =========================================================================== naming the bug

# How to fix each catalogue bug in PyTorch code, used when the catalogue entry has no `fix` of its own.
PYTORCH_FIXES = {
    "forgot-transpose-k": "scores = Q @ K.transpose(-2, -1)",
    "softmax-wrong-axis": "normalise over the keys: F.softmax(scores, dim=-1)",
    "scale-by-d-model": "divide by math.sqrt(d_head) (= d_model // heads), not math.sqrt(d_model)",
    "no-scale": "scale the scores before softmax: scores / math.sqrt(d_head)",
    "split-heads-without-transpose": "x.view(batch, seq, heads, d_head).transpose(1, 2), not "
                                     "x.view(batch, heads, seq, d_head)",
    "merge-heads-without-transpose": "z.transpose(1, 2).contiguous().view(batch, seq, heads * d_head)",
    "mask-after-softmax": "mask the scores before softmax: scores.masked_fill(mask == 0, float('-inf')), then "
                          "softmax",
    "inverted-mask": "block where the mask says blocked: masked_fill(mask == 0, ...) when 1 = may attend "
                     "(or build the mask the other way round)",
    "mask-wrong-axis": "rows of a mask are queries, columns keys: (…, seq_q, seq_k); a padding mask broadcasts "
                       "as (batch, 1, 1, seq_k)",
    "additive-mask-zero-one": "turn a 0/1 mask into 0/-inf before adding it: scores.masked_fill(mask == 0, "
                              "float('-inf'))",
    "fully-masked-row-neg-inf": "give rows with no visible key zeros, not NaN: torch.nan_to_num(F.softmax(...)), "
                                "or F.scaled_dot_product_attention",
    "wrong-d-head-reshape": "d_head = projection width // heads, not d_model // heads",
    "kv-heads-tiled": "share kv heads with repeat_interleave(groups, dim=1), not repeat",
}


@dataclass
class BugMatch:
    """Catalogue bugs that, replayed on the captured inputs, give the captured numbers."""

    bugs: Tuple[str, ...]
    max_rel: float                        # the largest error over the hooks it reproduces
    reproduced: List[str]                 # hooks it reproduces within the tolerance
    missed: List[str]                     # hooks it does not (empty for a full match)
    descriptions: List[str]
    fixes: List[str]
    seen_in: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " + ".join(self.bugs)

    @property
    def full(self) -> bool:
        return not self.missed

    def sentence(self, first_hook: Optional[str]) -> str:
        what = "; ".join(self.descriptions)
        if self.full:
            where = f"your {first_hook}" if first_hook else "your numbers"
            return (f"{where} equals attntrace's with `{self.name}` (max error {self.max_rel:.1e}, "
                    f"on all {len(self.reproduced)} compared hooks): {what}")
        return (f"closest: `{self.name}` reproduces {', '.join(self.reproduced)} but not {', '.join(self.missed)} — "
                f"{what}")

    def to_json(self) -> Dict[str, Any]:
        return {"bugs": list(self.bugs), "max_rel": _num(self.max_rel), "reproduced": self.reproduced,
                "missed": self.missed, "full": self.full, "descriptions": self.descriptions, "fixes": self.fixes,
                "seen_in": self.seen_in}


def _bug_texts(names: Sequence[str]) -> Tuple[List[str], List[str], List[str]]:
    catalogue = bugs.CATALOGUE
    descriptions, fixes, seen = [], [], []
    for name in names:
        bug = catalogue[name]
        descriptions.append(getattr(bug, "explanation", None) or bug.description)
        fixes.append(getattr(bug, "fix", None) or PYTORCH_FIXES.get(name, f"see `attntrace bugs` ({name})"))
        report = getattr(bug, "seen_in", None)
        if report:
            seen.append(report if isinstance(report, str) else ", ".join(report))
    return descriptions, fixes, seen


def _replay(spec, names: Sequence[str], captured: List[_Captured], rtol: float, atol: float) -> Optional[BugMatch]:
    catalogue = bugs.CATALOGUE
    overrides: Dict[str, Any] = {}
    for name in names:
        overrides.update(catalogue[name].overrides([]))
    try:
        trace = _run(spec, keep=_kept(captured), overrides=overrides)
    except (ShapeError, InputError):
        return None                              # the bug breaks the shapes: it cannot give these numbers
    except Exception:                            # noqa: BLE001 -- a replay must never break the check itself
        return None
    diffs = _compare_all(trace, captured, rtol, atol)
    reproduced = [h for h, d in diffs.items() if d.ok]
    missed = [c.hook for c in captured if c.hook not in diffs or not diffs[c.hook].ok]
    worst = max((diffs[h].max_rel for h in reproduced), default=float("nan"))
    descriptions, fixes, seen = _bug_texts(names)
    return BugMatch(tuple(names), worst, reproduced, missed, descriptions, fixes, seen)


def _applicable_bugs(spec, plan) -> List[str]:
    return [name for name, bug in bugs.CATALOGUE.items() if bug.cannot_show(spec, plan) is None]


def name_the_bug(spec, plan, captured: List[_Captured], rtol: float, atol: float, first_hook: str):
    """Replay single bugs, then pairs (disjoint steps); full matches sorted by error, and the
    closest partial one (it must at least reproduce the first diverging hook)."""
    catalogue = bugs.CATALOGUE
    names = _applicable_bugs(spec, plan)
    singles = [m for m in (_replay(spec, [n], captured, rtol, atol) for n in names) if m is not None]
    full = sorted((m for m in singles if m.full), key=lambda m: m.max_rel)
    tried = {"bugs": len(names), "pairs": 0}
    pairs: List[BugMatch] = []
    if not full:
        combos = [(a, b) for a, b in itertools.combinations(names, 2)
                  if not set(catalogue[a].steps) & set(catalogue[b].steps)]
        tried["pairs"] = len(combos)
        pairs = [m for m in (_replay(spec, list(c), captured, rtol, atol) for c in combos) if m is not None]
        full = sorted((m for m in pairs if m.full), key=lambda m: m.max_rel)
    closest = None
    if not full:
        partial = [m for m in singles + pairs if first_hook in m.reproduced]
        closest = max(partial, key=lambda m: (len(m.reproduced), -len(m.bugs)), default=None)
    return full, closest, tried


# =========================================================================== the report

@dataclass
class PartCheck:
    """One attention of the capture, rebuilt and compared."""

    part: str
    kind: str
    description: str
    dtype: str
    rtol: float
    atol: float
    hooks: List[HookCheck]
    bugs: List[BugMatch] = field(default_factory=list)
    closest: Optional[BugMatch] = None
    tried: Dict[str, int] = field(default_factory=dict)
    spec: Optional[Dict[str, Any]] = None         # the rebuilt spec (arrays as numpy)
    notes: List[Diagnosis] = field(default_factory=list)

    @property
    def compared(self) -> List[HookCheck]:
        return [h for h in self.hooks if h.compared]

    @property
    def matches(self) -> bool:
        return bool(self.compared) and all(h.ok for h in self.compared)

    @property
    def verdict(self) -> str:
        return "matches" if self.matches else "differs"

    @property
    def first_divergence(self) -> Optional[HookCheck]:
        return next((h for h in self.hooks if h.status in ("first divergence", "shape differs")), None)

    def summary(self) -> str:
        if self.matches:
            worst = max(h.max_rel for h in self.compared)
            return (f"matches: {len(self.compared)} hooks within {self.dtype} tolerance "
                    f"(max error {worst:.1e} ≤ {self.rtol:g} × magnitude)")
        first = self.first_divergence
        where = f"first divergence at {first.hook}" if first else "differs"
        if self.bugs:
            return f"differs ({where}); {self.bugs[0].sentence(first.hook if first else None)}"
        return (f"differs ({where}); no catalogue bug reproduces it (tried {self.tried.get('bugs', 0)} bugs and "
                f"{self.tried.get('pairs', 0)} pairs)")

    def to_json(self) -> Dict[str, Any]:
        first = self.first_divergence
        return {"part": self.part, "kind": self.kind, "description": self.description, "verdict": self.verdict,
                "summary": self.summary(), "dtype": self.dtype, "tolerance": {"rtol": self.rtol, "atol": self.atol},
                "first_divergence": first.hook if first else None, "hooks": [h.to_json() for h in self.hooks],
                "bugs": [b.to_json() for b in self.bugs],
                "closest": self.closest.to_json() if self.closest else None, "tried": dict(self.tried)}


@dataclass
class CaptureReport:
    path: str
    name: str
    module: str
    kind: str
    producer: Dict[str, Any]
    parts: List[PartCheck]
    not_comparable: List[Dict[str, str]] = field(default_factory=list)
    notes: List[Diagnosis] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.matches for p in self.parts)

    @property
    def verdict(self) -> str:
        return "matches" if self.ok else "differs"

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @property
    def bug_names(self) -> List[str]:
        return [b.name for p in self.parts for b in p.bugs]

    def to_json(self) -> Dict[str, Any]:
        return {"attntrace": 1, "command": "check", "capture": self.path, "name": self.name, "module": self.module,
                "kind": self.kind, "producer": self.producer, "verdict": self.verdict, "exit_code": self.exit_code,
                "tolerances": {k: {"rtol": r, "atol": a} for k, (r, a) in TOLERANCES.items()},
                "parts": [p.to_json() for p in self.parts], "not_comparable": self.not_comparable,
                "diagnoses": [d.to_json() for d in self.notes]}


def _check_part(capture: CaptureFile, record: Dict[str, Any], rtol: Optional[float], atol: Optional[float],
                name_bugs: bool) -> PartCheck:
    part = CapturePart(capture, record)
    resolved, skipped = _resolved_hooks(part)
    rebuilt = rebuild(part, resolved)
    try:
        spec = load_spec(rebuilt.spec)
        plan = plan_from_spec(spec)
        reference = _run(spec, keep=[h for h in resolved if h in plan.hooks] or "auto")
    except ShapeError as error:
        raise input_error("ATT-E354", f"{capture.path}: the captured weights and inputs of {part.label} do not fit "
                                      f"together: {error.diagnosis.message}",
                          hint="check heads= and the weights given to capture()") from None
    dtype = part.dtype()
    default_rtol, default_atol = TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    captured, not_mapped = _map_hooks(part, resolved, plan, part.notes)

    def dtype_of(entry: Dict[str, Any]) -> str:
        info = capture.tensors.get(entry.get("tensor"))
        return info.dtype if info is not None else ""
    checks = _hook_checks(spec, plan, reference, captured, skipped + not_mapped, rtol, atol, dtype_of)
    result = PartCheck(part.name, part.kind, rebuilt.description, dtype, rtol, atol, checks, spec=rebuilt.spec,
                       notes=part.notes)
    if not result.compared:
        raise input_error("ATT-E350", f"{capture.path}: nothing to compare in {part.label}: no captured hook is a "
                                      "step of the rebuilt attention",
                          hint="tap('attn.hook_pattern', weights) and tap('hook_attn_out', out) in your forward")
    first = result.first_divergence
    if name_bugs and first is not None:
        result.bugs, result.closest, result.tried = name_the_bug(spec, plan, captured, rtol, atol, first.hook)
    return result


def _hook_checks(spec, plan, reference, captured: List[_Captured], skipped, rtol: float, atol: float,
                 dtype_of: Callable[[Dict[str, Any]], str]) -> List[HookCheck]:
    labels = {s.hook: s.label for s in plan.steps}
    checks: List[HookCheck] = []
    patches: List[Tuple[str, np.ndarray]] = []      # captured hooks before the current one
    first: Optional[str] = None
    for item in captured:
        entry = item.entry
        check = HookCheck(item.hook, entry.get("written_as", item.hook), entry.get("source", "tap"),
                          labels.get(item.hook), item.shape, item.layout, dtype_of(entry), "match")
        if item.array is None:
            wanted = tuple(plan.shape(_HOOK_AXES[item.hook]))
            check.status, diverged = "shape differs", True
            check.reason = f"shape {item.shape} fits no layout of {item.hook} {wanted}"
        else:
            expected = _reference(reference, item)
            diff = _difference(item.array, expected, rtol, atol, item.hook)
            check.max_abs, check.max_rel = diff.max_abs, diff.max_rel
            check.cells, check.differing = int(diff.bad.size), int(diff.bad.sum())
            diverged = not diff.ok
            if diverged:
                check.first = _first_index(item, diff.bad, expected)
                check.status = "first divergence" if first is None else \
                    _own_or_consequence(spec, item, patches, rtol, atol)
                if check.status == "consequence":
                    check.reason = f"follows from the divergence at {first}"
        if diverged and first is None:
            first = item.hook
        checks.append(check)
        if item.patchable:
            patches.append((item.hook, item.array))
    for hook, entry, why in skipped:
        checks.append(HookCheck(hook, entry.get("written_as", hook), entry.get("source", "tap"), labels.get(hook),
                                (), None, dtype_of(entry), "not compared", reason=why))
    return checks


def _own_or_consequence(spec, item: _Captured, patches: List[Tuple[str, np.ndarray]], rtol: float,
                        atol: float) -> str:
    """Feed the captured earlier hooks into the reference: if this hook then matches, its
    difference is a consequence of theirs; otherwise it diverges on its own too."""
    if not patches:
        return "diverges"
    hooks = [(hook, (lambda array, *, hook, value=value: value)) for hook, value in patches]
    try:
        patched = _run(spec, keep=[item.hook], hooks=hooks)
    except (ShapeError, InputError):
        return "diverges"
    return "consequence" if _difference(item.array, _reference(patched, item), rtol, atol, item.hook).ok \
        else "diverges"


def check_capture(path: Union[str, Path], *, rtol: Optional[float] = None, atol: Optional[float] = None,
                  name_bugs: bool = True) -> CaptureReport:
    """Rebuild the captured attention, compare every captured hook with attntrace's reference
    (float64), and name the catalogue bug that reproduces a difference.  rtol/atol override
    the dtype's tolerances (see the module docstring)."""
    for label, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise input_error("ATT-E355", f"check_capture: {label} must be a positive number, got {value!r}")
    capture = load_capture(path)
    root = capture.root
    notes = [Diagnosis(code=n.get("code", "ATT-W340"), message=n.get("message", ""), severity="warning",
                       hint=n.get("hint")) for n in capture.document.get("notes", [])]
    parts: List[PartCheck] = []
    not_comparable: List[Dict[str, str]] = []
    if root["kind"] in BLOCK_KINDS:
        for name in root.get("parts", []):
            try:
                parts.append(_check_part(capture, capture.component(name), rtol, atol, name_bugs))
            except InputError as error:
                if error.diagnosis.code != "ATT-E351":
                    raise
                not_comparable.append({"part": name, "reason": error.diagnosis.message})
        not_comparable.append({"part": "block", "reason": (
            f"the {_class_name(root)}'s norms, MLP and residuals (norm_first={root['config'].get('norm_first')}) "
            "are recorded but not yet comparable: attntrace specs hold one attention until `blocks:` lands")})
        if not parts:
            raise input_error("ATT-E351", f"{capture.path}: not yet comparable: no attention part of the "
                                          f"{root['kind']} can be rebuilt",
                              hint="; ".join(f"{n['part']}: {n['reason']}" for n in not_comparable))
    else:
        parts.append(_check_part(capture, root, rtol, atol, name_bugs))
        if root["config"].get("block_after_attention"):
            not_comparable.append({"part": "block", "reason": (
                f"{_class_name(root)}'s {root['config']['block_after_attention']} after hook_attn_out is recorded "
                "but not yet comparable (blocks)")})
    for check in parts:
        notes.extend(check.notes)
    return CaptureReport(str(capture.path), capture.document.get("name", ""), root.get("class", ""), root["kind"],
                         capture.document.get("producer", {}), parts, not_comparable, notes)



def _class_name(record: Dict[str, Any]) -> str:
    return record.get("class", "").rsplit(".", 1)[-1] or record.get("kind", "module")
