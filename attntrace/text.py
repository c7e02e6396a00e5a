"""Words every layer shares: "did you mean", shapes written the one way, plural-free lists.

Kept at the bottom of the package (no imports from attntrace) so that an error
raised while reading YAML and one raised while checking a trace suggest and
print shapes in exactly the same way.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence


def did_you_mean(word: object, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6,
                 otherwise: Optional[str] = None) -> Optional[str]:
    """'did you mean 'causal'?' for the closest choices, else `otherwise` (a fallback hint or None)."""
    import difflib  # only when there is something to suggest
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=cutoff)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return otherwise


def format_shape(shape: Sequence[int], style: str = "tuple") -> str:
    """A shape as numpy prints it, "(4, 8)" / "(4,)" (tuple); or "4×8" (bare) and "(4×8)" (times)."""
    dims = [str(int(s)) for s in shape]
    if style == "tuple":
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
    bare = "×".join(dims) if dims else "scalar"
    return bare if style == "bare" else f"({bare})"


def ranges(numbers: Iterable[int]) -> str:
    """0, 1, 2, 3, 7 -> "0–3, 7": for grouped messages such as "ATT-W222 on heads 0–11"."""
    values = sorted(set(int(n) for n in numbers))
    parts = []
    start = prev = None
    for value in values:
        if start is None:
            start = prev = value
        elif value == prev + 1:
            prev = value
        else:
            parts.append(f"{start}–{prev}" if prev > start else str(start))
            start = prev = value
    if start is not None:
        parts.append(f"{start}–{prev}" if prev > start else str(start))
    return ", ".join(parts)
