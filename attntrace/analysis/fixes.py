"""Fixes that are tried, not guessed.

For a spec with shape problems, each candidate edit (transpose a matrix,
switch the weight layout, change heads, derive d_head ...) is applied to a copy
of the spec, the plan is rebuilt and the pre-flight checks run again.  A fix
is offered only for the problems it makes disappear without creating new ones;
a fix that clears every problem says so.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, List, Optional, Tuple

from attntrace.errors import Diagnosis
from attntrace.text import format_shape

Candidate = Tuple[str, Callable]
NEAREST = 2              # heads / kv_heads values tried: this many divisors on each side


def _with_attention(spec, layer: Optional[int], **changes):
    return spec.with_attention(layer, dataclasses.replace(spec.attention_of(layer), **changes))


def _with_mask(spec, layer: Optional[int], **changes):
    return _with_attention(spec, layer, mask=dataclasses.replace(spec.attention_of(layer).mask, **changes))


def _transposed(array):
    return dataclasses.replace(array, data=array.data.T)


def _flat(array):
    return dataclasses.replace(array, data=array.data.reshape(-1))


def _nearest_divisors(n: int, current: int, limit: Optional[int] = None) -> List[int]:
    """Divisors of n closest to `current` (excluding it), nearest first."""
    found = [d for d in range(1, (limit or n) + 1) if n % d == 0 and d != current]
    below = sorted((d for d in found if d < current), reverse=True)[:NEAREST]
    above = sorted(d for d in found if d > current)[:NEAREST]
    return sorted(below + above, key=lambda d: abs(d - current))


def _layers(spec) -> List[Tuple[Optional[int], str]]:
    """(layer, how a fix names that attention) for every attention of the spec ("" for the only one)."""
    if not spec.is_model:
        return [(None, "")]
    return [(layer, f"blocks[{layer}].attention") for layer in range(len(spec.blocks))]


def _of(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _in(where: str) -> str:
    return f" in {where}" if where else ""


def _input_candidates(spec) -> Iterator[Candidate]:
    """Transposed embeddings or position table: once per spec."""
    for encoder in (False, True) if spec.is_cross else (False,):
        seq = spec.encoder if encoder else spec.source
        x = seq.embeddings
        if x.data.ndim == 2 and x.shape[0] != x.shape[1]:
            field = "encoder" if encoder else "source"
            where = "encoder.embeddings" if encoder else "embeddings"
            yield (f"transpose {where}: one row per token ({format_shape(x.shape[::-1], 'bare')}), at {x.location}",
                   lambda s, f=field: dataclasses.replace(s, **{f: dataclasses.replace(
                       getattr(s, f), embeddings=_transposed(getattr(s, f).embeddings))}))
    pos = spec.positional
    if pos.table is not None and pos.table.data.ndim == 2:
        yield (f"transpose positional.table: one row per position ({format_shape(pos.table.shape[::-1], 'bare')})",
               lambda s: dataclasses.replace(s, positional=dataclasses.replace(
                   s.positional, table=_transposed(s.positional.table))))


def _transpose_candidates(spec, layer: Optional[int], where: str) -> Iterator[Candidate]:
    att = spec.attention_of(layer)
    for name in ("W_q", "W_k", "W_v", "W_o"):
        w = getattr(att, name)
        if w is not None and w.data.ndim == 2 and w.shape[0] != w.shape[1]:
            yield (f"transpose {_of(where, name)}: write it as {format_shape(w.shape[::-1], 'bare')} ({name}.T), "
                   f"at {w.location}",
                   lambda s, n=name: _with_attention(s, layer, **{n: _transposed(getattr(s.attention_of(layer), n))}))
    wrong = [n for n in ("W_q", "W_k", "W_v") if getattr(att, n).data.ndim == 2
             and getattr(att, n).shape[0] != getattr(att, n).shape[1]]
    if len(wrong) >= 2:
        yield (f"transpose {' and '.join(wrong)}{_in(where)} (each written (out, in))",
               lambda s: _with_attention(s, layer, **{n: _transposed(getattr(s.attention_of(layer), n))
                                                      for n in wrong}))
    mask = att.mask
    if mask.matrix is not None and mask.matrix.data.ndim == 2 and mask.matrix.shape[0] != mask.matrix.shape[1]:
        flipped = format_shape(mask.matrix.shape[::-1], "bare")
        yield (f"transpose the mask matrix: rows are queries, columns keys ({flipped})",
               lambda s: _with_mask(s, layer, matrix=_transposed(s.attention_of(layer).mask.matrix)))
    if mask.padding is not None and mask.padding.data.ndim == 2:
        yield (f"transpose mask.padding: one row per batch item ({format_shape(mask.padding.shape[::-1], 'bare')})",
               lambda s: _with_mask(s, layer, padding=_transposed(s.attention_of(layer).mask.padding)))


def _size_candidates(spec, layer: Optional[int], where: str) -> Iterator[Candidate]:
    from attntrace.core.plan import output_width
    att = spec.attention_of(layer)
    width = output_width(att.W_q.shape, att.layout) if att.W_q.data.ndim == 2 else 0
    if width:
        for heads in _nearest_divisors(width, att.heads):
            keep_kv = att.kv_heads if att.kv_heads and heads % att.kv_heads == 0 else None
            yield (f"set `heads: {heads}`{_in(where)} (d_head = {width} / {heads} = {width // heads})",
                   lambda s, h=heads, kv=keep_kv: _with_attention(s, layer, heads=h, kv_heads=kv))
    if att.kv_heads:
        for kv in _nearest_divisors(att.heads, att.kv_heads):
            yield (f"set `kv_heads: {kv}`{_in(where)} (it must divide heads={att.heads}: "
                   f"{att.heads // kv} query heads per kv head)", lambda s, k=kv: _with_attention(s, layer, kv_heads=k))
    if att.d_head:
        inferred = f" = {width} / {att.heads} = {width // att.heads}" if width and width % att.heads == 0 else ""
        yield (f"remove `d_head: {att.d_head}`{_in(where)}: it is then W_q's width / heads{inferred}",
               lambda s: _with_attention(s, layer, d_head=None))
    for name in ("b_q", "b_k", "b_v", "b_o"):
        b = getattr(att, name)
        if b is not None and b.data.ndim > 1 and b.data.size == max(b.shape):
            yield (f"write {_of(where, name)} as one flat list of {b.data.size} numbers, not "
                   f"{format_shape(b.shape, 'bare')}",
                   lambda s, n=name: _with_attention(s, layer, **{n: _flat(getattr(s.attention_of(layer), n))}))


def _candidates(spec) -> Iterator[Candidate]:
    for layer, where in _layers(spec):
        att = spec.attention_of(layer)
        other = "linear" if att.layout == "x_at_w" else "x_at_w"
        yield (f"set `layout: {other}` in {where or 'attention'} (weights stored as "
               f"{'(out, in), like nn.Linear: Q = X @ W_q.T' if other == 'linear' else '(in, out): Q = X @ W_q'})",
               lambda s, layer=layer, other=other: _with_attention(s, layer, layout=other))
    yield from _input_candidates(spec)
    for layer, where in _layers(spec):
        yield from _transpose_candidates(spec, layer, where)
        yield from _size_candidates(spec, layer, where)


def _key(d: Diagnosis) -> Tuple[str, str, str]:
    return (d.code, d.hook or "", d.message)


def verified_fixes(spec, problems: List[Diagnosis]) -> List[Tuple[str, List[Diagnosis], bool]]:
    """(text, problems it removes, whether it removes all) for every candidate that helps."""
    from attntrace.analysis.diagnose import find_problems
    from attntrace.core.plan import plan_from_spec
    before = {_key(d) for d in problems}
    helpful = []
    for text, apply in _candidates(spec):
        try:
            fixed = apply(spec)
            after = {_key(d) for d in find_problems(fixed, plan_from_spec(fixed))}
        except Exception:   # a candidate that cannot even be planned is simply not offered
            continue
        if not after < before:      # it must remove something and add nothing
            continue
        helpful.append((text, [p for p in problems if _key(p) not in after], not after))
    return helpful


def attach_verified_fixes(spec, problems: List[Diagnosis]) -> None:
    """Add to each problem the candidate fixes that verifiably remove it (complete fixes first)."""
    for text, removed, solves_all in sorted(verified_fixes(spec, problems), key=lambda f: not f[2]):
        suffix = " — verified: all shapes then agree" if solves_all else " — verified: removes this conflict"
        for problem in removed:
            problem.fixes.append(text + suffix)
