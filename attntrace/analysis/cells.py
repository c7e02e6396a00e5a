"""Names for cells of an activation: "[B, C]", "head 1 [猫, d3]".

Expectations and diffs both point at single numbers inside a hook's array;
they name them the way a person reads the trace: tokens for sequence axes,
``d0, d1 ...`` for feature axes, and head / batch only when there are several.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from attntrace.hookpoints import HOOKS_BY_NAME

FEATURE_PREFIX = {"d_model": "d", "d_head": "d", "d_v": "d", "d_out": "d", "n_heads·d_v": "c"}


def axis_label(axis: str, index: int, tokens: Sequence[str], key_tokens: Sequence[str]) -> str:
    """One coordinate: a token for seq axes (its position when tokens are unknown), else d3 / c3."""
    if axis == "seq_q":
        return str(tokens[index]) if index < len(tokens) else str(index)
    if axis == "seq_k":
        return str(key_tokens[index]) if index < len(key_tokens) else str(index)
    return f"{FEATURE_PREFIX.get(axis, '')}{index}"


def cell_label(hook: str, index: Tuple[int, ...], shape: Sequence[int], tokens: Sequence[str],
               key_tokens: Optional[Sequence[str]] = None) -> str:
    """The name of one cell of a hook's full array (batch and head shown only when > 1)."""
    axes = HOOKS_BY_NAME[hook].axes if hook in HOOKS_BY_NAME else tuple(f"axis{i}" for i in range(len(shape)))
    key_tokens = tokens if key_tokens is None else key_tokens
    prefix, coords = [], []
    for axis, i, size in zip(axes, index, shape):
        if axis == "batch":
            if size > 1:
                prefix.append(f"batch {i}")
        elif axis in ("n_heads", "n_kv_heads"):
            if size > 1:
                prefix.append(("kv head " if axis == "n_kv_heads" else "head ") + str(i))
        elif axis == "1":
            continue
        else:
            coords.append(axis_label(axis, int(i), tokens, key_tokens))
    return " ".join(prefix + [f"[{', '.join(coords)}]"])
