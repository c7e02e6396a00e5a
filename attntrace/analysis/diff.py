"""Comparing two traces hook by hook: where they first diverge, and by how much.

Either side is a spec (.yaml/.yml, run here) or a trace saved by
``attntrace run --export file.npz|file.json``.  For every hook both sides hold,
the difference is measured per cell: the largest absolute difference, the
largest relative difference |a - b| / max(|a|, |b|), how many cells differ
beyond the tolerance, and the cells that differ most.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from attntrace.analysis.cells import cell_label
from attntrace.analysis.run import run
from attntrace.errors import input_error
from attntrace.hookpoints import HOOKS_BY_NAME
from attntrace.inputs.packed_array import is_packed, unpack
from attntrace.inputs.sources import BadArrayFile, read_npz_all

SPEC_SUFFIXES = (".yaml", ".yml")
SAVED_SUFFIXES = (".npz", ".json")


@dataclass
class TraceData:
    """The arrays of one side of a diff, whatever it was loaded from."""

    name: str
    source: str
    hooks: List[str]                          # in step order
    arrays: Dict[str, np.ndarray]
    tokens: List[str] = field(default_factory=list)
    key_tokens: List[str] = field(default_factory=list)
    titles: Dict[str, str] = field(default_factory=dict)     # hook -> "5/11 'scores = Q·Kᵀ'"


def from_trace(trace, source: str = "") -> TraceData:
    arrays = {h: trace.arrays[h] for h in trace.plan.hooks if h in trace.arrays}
    return TraceData(str(trace.spec.name), source, list(arrays), arrays, list(trace.spec.tokens),
                     list(trace.spec.key_tokens), {s.hook: s.label for s in trace.plan.steps})


def load_side(path, *, dtype: Optional[str] = None, hooks: Sequence = ()) -> TraceData:
    """A spec (run with every array kept) or a saved .npz / .json trace."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SPEC_SUFFIXES:
        return from_trace(run(path, hooks=hooks, keep="all", dtype=dtype, check=False), str(path))
    if suffix not in SAVED_SUFFIXES:
        raise input_error("ATT-E065", f"{path}: diff compares specs (.yaml) and saved traces (.npz, .json)",
                          hint="save a trace with: attntrace run spec.yaml --export trace.npz")
    if not path.is_file():
        raise input_error("ATT-E007", f"file not found: {path}")
    return _load_npz(path) if suffix == ".npz" else _load_json(path)


def _load_npz(path: Path) -> TraceData:
    try:
        stored = read_npz_all(path)
    except BadArrayFile as exc:
        raise input_error("ATT-E065", f"{path.name} is not a readable .npz trace: {exc.message}",
                          hint=exc.hint or "save a trace with: attntrace run spec.yaml --export trace.npz") from None
    except OSError as exc:
        raise input_error("ATT-E065", f"cannot read {path.name}: {exc.strerror or exc}") from None
    stored = {key: value for key, value in stored.items()
              if key.startswith("__") or np.issubdtype(value.dtype, np.number) or value.dtype == bool}
    hooks = [str(h) for h in stored.get("__hooks__", [])] or [k for k in stored if k in HOOKS_BY_NAME]
    missing = [h for h in hooks if h not in stored]
    if not hooks or missing:
        raise input_error("ATT-E065", f"{path.name} holds no attntrace hook arrays",
                          hint="save a trace with: attntrace run spec.yaml --export trace.npz")
    text = lambda key, default: [str(t) for t in stored[key]] if key in stored else default  # noqa: E731
    name = str(stored["__name__"]) if "__name__" in stored else path.stem
    return TraceData(name, str(path), hooks, {h: stored[h] for h in hooks}, text("__tokens__", []),
                     text("__key_tokens__", text("__tokens__", [])))


def _load_json(path: Path) -> TraceData:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        steps = document["steps"]
        if isinstance(document.get("hooks"), dict):       # format 2: hooks keyed by name, steps their order
            steps = [dict(document["hooks"][hook], hook=hook) for hook in steps]
        beside = _Beside(path.parent)
        arrays = {s["hook"]: _json_array(s["values"], beside) for s in steps if "values" in s}
        titles = {s["hook"]: f"{s['number']}/{len(steps)} '{s['title']}'" for s in steps}
    except BadArrayFile as exc:
        raise input_error("ATT-E065", f"{path.name}: its arrays beside it cannot be read: {exc.message}",
                          hint=exc.hint or "keep a .json export and the .npz beside it together") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise input_error("ATT-E065", f"{path.name} is not an attntrace JSON trace ({type(exc).__name__}: {exc})",
                          hint="save a trace with: attntrace run spec.yaml --export trace.json") from None
    if not arrays:
        raise input_error("ATT-E065", f"{path.name} holds no full arrays (only previews)",
                          hint="--export trace.json writes every kept array in full; or use .npz")
    hooks = [s["hook"] for s in steps if s["hook"] in arrays]
    return TraceData(str(document.get("name", path.stem)), str(path), hooks, arrays,
                     [str(t) for t in document.get("tokens", [])],
                     [str(t) for t in document.get("key_tokens", document.get("tokens", []))], titles)


_JSON_SPECIAL = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


class _Beside:
    """The .npz archives a JSON export refers to, read once each (names are plain file names in the
    export's own folder: a document cannot point elsewhere)."""

    def __init__(self, folder: Path):
        self.folder, self.read = folder, {}

    def array(self, reference: dict) -> np.ndarray:
        name, key = reference["npz"], reference["key"]
        if not isinstance(name, str) or Path(name).name != name or not isinstance(key, str):
            raise ValueError(f"an array reference must name a .npz file beside it and a key, got {reference!r}")
        if name not in self.read:
            self.read[name] = read_npz_all(self.folder / name)
        if key not in self.read[name]:
            raise ValueError(f"{name} holds no array '{key}'")
        return self.read[name][key]


def _json_array(values: Any, beside: _Beside) -> np.ndarray:
    if isinstance(values, dict) and "npz" in values:      # a big array of an export: in the .npz beside it
        return beside.array(values)
    if is_packed(values):                 # a big array of an earlier export: base64 bytes
        return unpack(values)

    def convert(v):
        if isinstance(v, list):
            return [convert(x) for x in v]
        return _JSON_SPECIAL[v] if isinstance(v, str) else v
    array = np.array(convert(values))
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise ValueError(f"values of dtype {array.dtype} are not real numbers")
    return array


# --------------------------------------------------------------------------- comparing

@dataclass
class CellDiff:
    index: Tuple[int, ...]
    label: str
    a: float
    b: float

    @property
    def abs_diff(self) -> float:
        return float(abs(self.a - self.b)) if np.isfinite(self.a) and np.isfinite(self.b) else float("inf")

    def to_json(self) -> Dict[str, Any]:
        return {"index": list(self.index), "cell": self.label, "a": self.a, "b": self.b, "abs_diff": self.abs_diff}


@dataclass
class HookDiff:
    hook: str
    title: str
    shape_a: Tuple[int, ...]
    shape_b: Tuple[int, ...]
    cells: int = 0
    differing: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    top: List[CellDiff] = field(default_factory=list)

    @property
    def comparable(self) -> bool:
        return self.shape_a == self.shape_b

    @property
    def same(self) -> bool:
        return self.comparable and self.differing == 0

    def to_json(self) -> Dict[str, Any]:
        return {"hook": self.hook, "step": self.title, "shape_a": list(self.shape_a), "shape_b": list(self.shape_b),
                "comparable": self.comparable, "cells": self.cells, "differing": self.differing,
                "max_abs_diff": self.max_abs, "max_rel_diff": self.max_rel, "top": [c.to_json() for c in self.top]}


@dataclass
class DiffReport:
    a: TraceData
    b: TraceData
    hooks: List[HookDiff]
    only_a: List[str]
    only_b: List[str]
    atol: float
    rtol: float

    @property
    def first_divergence(self) -> Optional[HookDiff]:
        return next((h for h in self.hooks if not h.same), None)

    @property
    def same(self) -> bool:
        return self.first_divergence is None

    def to_json(self) -> Dict[str, Any]:
        first = self.first_divergence
        return {"a": self.a.source or self.a.name, "b": self.b.source or self.b.name, "same": self.same,
                "atol": self.atol, "rtol": self.rtol,
                "first_divergence": None if first is None else first.hook,
                "hooks": [h.to_json() for h in self.hooks], "only_in_a": self.only_a, "only_in_b": self.only_b}


def differences(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-cell |a - b| and |a - b| / max(|a|, |b|); equal infinities (and NaN vs NaN) count as 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        absolute = np.abs(a - b)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        absolute = np.where(same, 0.0, np.where(np.isnan(absolute), np.inf, absolute))
        scale = np.maximum(np.abs(a), np.abs(b))
        relative = np.where(absolute == 0, 0.0, np.where(scale > 0, absolute / scale, np.inf))
        relative = np.where(np.isnan(relative), np.inf, relative)
    return absolute, relative


def diff_hook(hook: str, a: np.ndarray, b: np.ndarray, title: str, tokens: Sequence[str],
              key_tokens: Sequence[str], atol: float, rtol: float, top: int) -> HookDiff:
    result = HookDiff(hook, title, tuple(a.shape), tuple(b.shape))
    if a.shape != b.shape:
        return result
    absolute, relative = differences(a, b)
    scale = np.maximum(np.abs(np.asarray(a, dtype=np.float64)), np.abs(np.asarray(b, dtype=np.float64)))
    with np.errstate(invalid="ignore"):
        differ = absolute > atol + rtol * np.where(np.isfinite(scale), scale, 0.0)
    result.cells = int(a.size)
    result.differing = int(differ.sum())
    result.max_abs = float(absolute.max()) if a.size else 0.0
    result.max_rel = float(relative.max()) if a.size else 0.0
    if result.differing:
        flat = np.where(differ.ravel(), absolute.ravel(), -1.0)
        count = min(top, result.differing)
        order = np.argsort(-flat, kind="stable")[:count]
        for position in order:
            index = tuple(int(i) for i in np.unravel_index(int(position), a.shape))
            result.top.append(CellDiff(index, cell_label(hook, index, a.shape, tokens, key_tokens),
                                       float(a[index]), float(b[index])))
    return result


def check_tolerance(value: Any, name: str) -> float:
    """A tolerance is a finite number ≥ 0 (ATT-E021): with NaN every comparison would say "agree"."""
    from attntrace.inputs.sources import finite_number
    return finite_number(value, None, name, minimum=0.0, code="ATT-E021")


def diff_traces(a: TraceData, b: TraceData, *, atol: float = 1e-9, rtol: float = 1e-9, top: int = 5) -> DiffReport:
    """Compare every hook both sides hold, in a's step order."""
    atol, rtol = check_tolerance(atol, "atol"), check_tolerance(rtol, "rtol")
    common = [h for h in a.hooks if h in b.arrays]
    hooks = [diff_hook(h, a.arrays[h], b.arrays[h], a.titles.get(h) or b.titles.get(h) or h,
                       a.tokens, a.key_tokens, atol, rtol, top) for h in common]
    return DiffReport(a, b, hooks, [h for h in a.hooks if h not in b.arrays],
                      [h for h in b.hooks if h not in a.arrays], atol, rtol)
