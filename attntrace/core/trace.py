"""The result of a run: arrays per hook, stats, previews and diagnoses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Set, Tuple

import numpy as np

from attntrace.core.stats import Pooled, Preview, Stats
from attntrace.errors import Diagnosis
from attntrace.hookpoints import point_of, resolve_hook_name


@dataclass
class Trace:
    spec: object
    plan: object
    dtype: str
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)     # kept hooks only
    stats: Dict[str, Stats] = field(default_factory=dict)           # every hook
    previews: Dict[str, Preview] = field(default_factory=dict)      # big hooks not kept
    winners: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # pattern hook: row max, argmax
    row_sums: Dict[str, np.ndarray] = field(default_factory=dict)   # pattern hook: per-row sum of weights
    pooled: Dict[str, Pooled] = field(default_factory=dict)         # long score steps not kept: an overview
    diagnoses: List[Diagnosis] = field(default_factory=list)
    checks_passed: List[str] = field(default_factory=list)        # what the clean checks verified
    # hooks whose array is the engine's own step function's result (no hook, no injected bug): what
    # holds by construction there (blocked scores are -inf, blocked weights 0) needs no second pass
    engine_computed: Set[str] = field(default_factory=set)

    def __getitem__(self, name: str) -> np.ndarray:
        hook = resolve_hook_name(name, available=self.plan.hooks)
        if hook not in self.arrays:
            raise KeyError(f"{hook} was not kept in this trace; run with keep='all' or keep={{'{hook}'}}")
        return self.arrays[hook]

    def __contains__(self, name: str) -> bool:
        try:
            return resolve_hook_name(name, available=self.plan.hooks) in self.arrays
        except Exception:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def keys(self) -> List[str]:
        return list(self.arrays)

    @property
    def warnings(self) -> List[Diagnosis]:
        return [d for d in self.diagnoses if d.severity == "warning"]

    def hand_view(self, name: str) -> np.ndarray:
        """The array as people write it by hand: the batch axis dropped when batch is 1,
        the head axis dropped when there is one head (e.g. Q as (seq, d_head))."""
        hook = resolve_hook_name(name, available=self.plan.hooks)
        array = self[hook]
        heads_axis = point_of(hook).panels
        if heads_axis is not None and array.shape[heads_axis] == 1:
            array = np.take(array, 0, axis=heads_axis)
        if array.shape[0] == 1:
            array = array[0]
        return array
