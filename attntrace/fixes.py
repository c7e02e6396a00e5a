"""Fixes that are tried, not guessed.

For a spec with shape problems, each candidate edit (transpose a matrix,
switch the weight layout, change heads ...) is applied to a copy of the spec,
the plan is rebuilt and the pre-flight checks run again.  A fix is offered
only for the problems it makes disappear without creating new ones.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, List, Tuple

from .errors import Diagnosis

Candidate = Tuple[str, Callable]


def _with_attention(spec, **changes):
    return dataclasses.replace(spec, attention=dataclasses.replace(spec.attention, **changes))


def _transposed(array):
    return dataclasses.replace(array, data=array.data.T)


def _candidates(spec) -> Iterator[Candidate]:
    att = spec.attention
    other = "linear" if att.layout == "x_at_w" else "x_at_w"
    yield (f"set `layout: {other}` in attention (weights stored as "
           f"{'(out, in), like nn.Linear' if other == 'linear' else '(in, out), Q = X @ W_q'})",
           lambda s: _with_attention(s, layout=other))
    for name in ("W_q", "W_k", "W_v", "W_o"):
        w = getattr(att, name)
        if w is not None and w.data.ndim == 2 and w.shape[0] != w.shape[1]:
            yield (f"transpose {name}: write it as {w.shape[1]}×{w.shape[0]} "
                   f"({name}.T), {w.location}", lambda s, n=name: _with_attention(s, **{n: _transposed(getattr(s.attention, n))}))
    x = spec.source.embeddings
    if x.data.ndim == 2 and x.shape[0] != x.shape[1]:
        yield (f"transpose embeddings: one row per token ({x.shape[1]}×{x.shape[0]}), {x.location}",
               lambda s: dataclasses.replace(s, source=dataclasses.replace(
                   s.source, embeddings=_transposed(s.source.embeddings))))
    width = att.W_q.shape[-1] if att.W_q.data.ndim == 2 else 0
    for heads in range(1, 65):
        if heads != att.heads and width and width % heads == 0:
            yield (f"set `heads: {heads}` (d_head = {width // heads})",
                   lambda s, h=heads: _with_attention(s, heads=h, kv_heads=None if s.attention.kv_heads and h % s.attention.kv_heads else s.attention.kv_heads))
    if att.kv_heads:
        for kv in range(1, att.heads + 1):
            if att.heads % kv == 0 and kv != att.kv_heads:
                yield (f"set `kv_heads: {kv}` (it must divide heads={att.heads})",
                       lambda s, k=kv: _with_attention(s, kv_heads=k))
    if att.d_head:
        yield ("remove `d_head:` (it is then inferred from W_q)", lambda s: _with_attention(s, d_head=None))


def _key(d: Diagnosis) -> Tuple[str, str, str]:
    return (d.code, d.hook or "", d.message)


def attach_verified_fixes(spec, problems: List[Diagnosis]) -> None:
    """Add to each problem the candidate fixes that verifiably remove it."""
    from .diagnose import find_problems
    from .plan import plan_from_spec
    before = {_key(d) for d in problems}
    for text, apply in _candidates(spec):
        try:
            fixed = apply(spec)
            after = {_key(d) for d in find_problems(fixed, plan_from_spec(fixed))}
        except Exception:   # a candidate that cannot even be planned is simply not offered
            continue
        if not after <= before or after == before:
            continue
        solved_all = not after
        for problem in problems:
            if _key(problem) not in after:
                problem.fixes.append(text + (" — verified: all shapes then agree" if solved_all else
                                             " — verified: removes this conflict"))
