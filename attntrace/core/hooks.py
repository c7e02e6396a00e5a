"""Hooks at run time: the functions a run calls at its hook points.

A hook is ``fn(array, *, hook) -> array | None``; returning an array replaces
the activation after its shape and dtype are checked.  Hooks belong to one run.
The names, axes and aliases of hook points live in :mod:`attntrace.hookpoints`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from attntrace.errors import input_error
from attntrace.hookpoints import match_hooks, point_of

HookFn = Callable[..., Optional[np.ndarray]]


class HookSet:
    """The hooks of one run, resolved against the hook points that run has."""

    def __init__(self, hooks: Iterable[Tuple[str, HookFn]], available: Sequence[str]):
        self._by_hook: Dict[str, List[Tuple[str, HookFn]]] = {}
        for pattern, fn in hooks:
            if not callable(fn):
                raise input_error("ATT-E003", f"the hook for '{pattern}' is not callable")
            for name in match_hooks(pattern, available):
                self._by_hook.setdefault(name, []).append((pattern, fn))

    @property
    def hooked(self) -> frozenset:
        return frozenset(self._by_hook)

    def fire(self, name: str, array: np.ndarray, point=None) -> np.ndarray:
        """Call the hooks of hook `name` (a full name, e.g. blocks.2.attn.hook_q) on `array`.

        `point` is what the hook functions receive as `hook=` (default: the hook point of
        `name`, renamed to the full name as TransformerLens' hooks see it)."""
        hooks = self._by_hook.get(name, ())
        if not hooks:
            return array
        if point is None:
            point = point_of(name)
            if point.name != name:
                point = dataclasses.replace(point, name=name)
        for _pattern, fn in hooks:
            result = fn(array, hook=point)
            if result is None:
                continue
            result = np.asarray(result)
            if result.shape != array.shape:
                raise input_error(
                    "ATT-E016", f"hook for '{point.name}' returned shape {tuple(result.shape)}; the "
                                f"activation has shape {tuple(array.shape)} {point.axes}",
                    hint="return an array of the same shape, or None to leave it unchanged")
            if result.dtype != array.dtype:
                if not np.can_cast(result.dtype, array.dtype, casting="same_kind"):
                    raise input_error(
                        "ATT-E016", f"hook for '{point.name}' returned dtype {result.dtype}; the "
                                    f"activation is {array.dtype}", hint=f"return .astype({array.dtype})")
                result = result.astype(array.dtype)
            array = result
        return array
