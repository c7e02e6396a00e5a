"""Hook points: the named places where activations can be read or replaced.

Names follow TransformerLens (``attn.hook_q``, ``attn.hook_pattern`` ...).  A
hook is ``fn(array, *, hook) -> array | None``; returning an array replaces the
activation after its shape and dtype are checked.  Hooks belong to one run.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from attntrace.errors import Location, input_error


@dataclass(frozen=True)
class HookPoint:
    name: str
    axes: Tuple[str, ...]
    what: str


# The single table of hook points, in execution order.  Optional points exist
# only when the spec needs them (positional encodings, RoPE, masks, cross-attention).
HOOK_POINTS: Tuple[HookPoint, ...] = (
    HookPoint("hook_embed", ("batch", "seq_q", "d_model"), "X, the token embeddings"),
    HookPoint("hook_pos_embed", ("batch", "seq_q", "d_model"), "X plus the positional encoding"),
    HookPoint("hook_encoder_embed", ("batch", "seq_k", "d_model"),
              "the encoder's embeddings (cross-attention: keys and values come from here)"),
    HookPoint("attn.hook_q", ("batch", "seq_q", "n_heads", "d_head"), "queries, split into heads"),
    HookPoint("attn.hook_k", ("batch", "seq_k", "n_kv_heads", "d_head"), "keys, split into heads"),
    HookPoint("attn.hook_v", ("batch", "seq_k", "n_kv_heads", "d_v"), "values, split into heads"),
    HookPoint("attn.hook_rot_q", ("batch", "seq_q", "n_heads", "d_head"), "queries after RoPE"),
    HookPoint("attn.hook_rot_k", ("batch", "seq_k", "n_kv_heads", "d_head"), "keys after RoPE"),
    HookPoint("attn.hook_qk", ("batch", "n_heads", "seq_q", "seq_k"), "raw scores Q·Kᵀ"),
    HookPoint("attn.hook_scaled", ("batch", "n_heads", "seq_q", "seq_k"), "scores times the scale"),
    HookPoint("attn.hook_mask", ("batch", "1", "seq_q", "seq_k"), "the mask, True = may attend"),
    HookPoint("attn.hook_attn_scores", ("batch", "n_heads", "seq_q", "seq_k"),
              "scores after masking (blocked = -inf)"),
    HookPoint("attn.hook_pattern", ("batch", "n_heads", "seq_q", "seq_k"), "softmax weights"),
    HookPoint("attn.hook_z", ("batch", "seq_q", "n_heads", "d_v"), "weights·V per head"),
    HookPoint("attn.hook_z_concat", ("batch", "seq_q", "n_heads·d_v"), "heads concatenated"),
    HookPoint("hook_attn_out", ("batch", "seq_q", "d_out"), "output after W_o"),
)
HOOKS_BY_NAME: Dict[str, HookPoint] = {h.name: h for h in HOOK_POINTS}

# Names people use in articles and homework, mapped to hook points.
ALIASES: Dict[str, str] = {
    "X": "hook_embed", "embed": "hook_embed",
    "Q": "attn.hook_q", "K": "attn.hook_k", "V": "attn.hook_v",
    "scores": "attn.hook_qk", "QK": "attn.hook_qk", "qk": "attn.hook_qk",
    "scaled": "attn.hook_scaled", "mask": "attn.hook_mask", "masked": "attn.hook_attn_scores",
    "weights": "attn.hook_pattern", "pattern": "attn.hook_pattern", "attn": "attn.hook_pattern",
    "z": "attn.hook_z", "concat": "attn.hook_z_concat",
    "output": "hook_attn_out", "out": "hook_attn_out",
}


def _strip_block(name: str) -> str:
    # single-layer traces accept the `blocks.0.` prefix TransformerLens writes
    return name[len("blocks.0."):] if name.startswith("blocks.0.") else name


def resolve_hook_name(name: str, location: Optional[Location] = None,
                      available: Optional[Sequence[str]] = None) -> str:
    """An exact hook name, an alias or a `blocks.0.` name -> the hook name; else a did-you-mean error."""
    bare = _strip_block(name)
    if bare in ALIASES:
        bare = ALIASES[bare]
    names = list(available) if available is not None else list(HOOKS_BY_NAME)
    if bare in names:
        return bare
    if bare in HOOKS_BY_NAME:   # a real hook point this spec does not have (no RoPE, no mask ...)
        raise input_error("ATT-E015", f"hook point '{bare}' is not part of this run "
                                      f"({HOOKS_BY_NAME[bare].what})", location,
                          hint="`attntrace hooks SPEC` lists the hook points of a spec")
    candidates = names + list(ALIASES)
    close = difflib.get_close_matches(bare, candidates, n=2, cutoff=0.5)
    if not close and not bare.startswith("attn.") and "attn." + bare in names:
        close = ["attn." + bare]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        "`attntrace hooks` lists every hook point"
    raise input_error("ATT-E015", f"unknown hook '{name}'", location, hint=hint)


def match_hooks(pattern: str, available: Sequence[str], location: Optional[Location] = None) -> List[str]:
    """Hook names matching a name, alias or glob pattern such as `attn.hook_*`."""
    if any(ch in pattern for ch in "*?["):
        matched = [n for n in available if fnmatch.fnmatchcase(n, _strip_block(pattern))]
        if not matched:
            raise input_error("ATT-E015", f"hook pattern '{pattern}' matches no hook point of this run",
                              location, hint="`attntrace hooks SPEC` lists the hook points of a spec")
        return matched
    return [resolve_hook_name(pattern, location, available)]


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

    def fire(self, point: HookPoint, array: np.ndarray) -> np.ndarray:
        for pattern, fn in self._by_hook.get(point.name, ()):
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
