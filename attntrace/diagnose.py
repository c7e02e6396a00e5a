"""Pre-flight shape diagnosis: every operand checked against the plan before numpy runs.

A conflict becomes a :class:`~attntrace.errors.Diagnosis` that names the step,
its shape rule, the operands with their named axes and YAML lines, where each
size was bound, and the fixes that were *tried and verified* on a copy of the
spec (see :mod:`attntrace.fixes`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from .errors import Diagnosis, Operand, ShapeError
from .plan import Plan, output_width


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in shape)


class _Checker:
    def __init__(self, spec, plan: Plan):
        self.spec, self.plan = spec, plan
        self.att = spec.attention
        self.found: List[Diagnosis] = []

    # -- building blocks ---------------------------------------------------
    def bindings(self, *names: str) -> List[str]:
        return [self.plan.dims[n].describe() for n in names if n in self.plan.dims]

    def report(self, code: str, key: str, message: str, operands: List[Operand], dims: Sequence[str],
               details: Sequence[str] = (), hint: Optional[str] = None) -> None:
        step = self.plan.step(key)
        self.found.append(Diagnosis(
            code=code, step=step.label, hook=step.hook, rule=step.rule,
            message=f"shape mismatch in step {step.label}: {message}",
            operands=operands, bindings=self.bindings(*dims),
            locations=[o.location for o in operands if o.location is not None],
            details=list(details), hint=hint))

    def weight_operand(self, name: str, conflict: Optional[int] = None, origin: str = "") -> Operand:
        array = getattr(self.att, name)
        in_axis, out_axis = ("d_model", "d_out") if self.att.layout == "x_at_w" else ("d_out", "d_model")
        axes = (in_axis, out_axis) if array.data.ndim == 2 else tuple(f"axis{i}" for i in range(array.data.ndim))
        return Operand(name, array.shape, axes, origin or f"attention.{name} (layout: {self.att.layout})",
                       array.location, conflict)

    def x_operand(self, encoder: bool = False, conflict: Optional[int] = None) -> Operand:
        seq = self.spec.encoder if encoder else self.spec.source
        x = seq.embeddings
        axes = ("batch", "seq", "d_model")[-x.data.ndim:] if x.data.ndim <= 3 else ()
        name = "X_enc" if encoder else "X"
        return Operand(name, x.shape, axes, "encoder.embeddings" if encoder else "embeddings", x.location, conflict)

    # -- checks ------------------------------------------------------------
    def embeddings(self) -> None:
        for encoder in ((False, True) if self.spec.is_cross else (False,)):
            seq = self.spec.encoder if encoder else self.spec.source
            x = seq.embeddings
            where = "encoder.embeddings" if encoder else "embeddings"
            if x.data.ndim not in (2, 3):
                self.report("ATT-E105", "encoder_embed" if encoder else "embed",
                            f"{where} has {x.data.ndim} axes; it needs (seq, d_model) or (batch, seq, d_model)",
                            [self.x_operand(encoder)], ["d_model"])
                continue
            rows = x.shape[-2]
            if rows != len(seq.tokens):
                self.report("ATT-E102", "encoder_embed" if encoder else "embed",
                            f"{len(seq.tokens)} tokens but {rows} embedding rows in {where}",
                            [self.x_operand(encoder, conflict=x.data.ndim - 2)],
                            ["seq_k" if encoder else "seq_q"],
                            hint="give one embedding row per token (or the rows are columns: "
                                 "is the matrix transposed?)" if x.shape[-1] == len(seq.tokens) else
                            "give one embedding row per token")
        if self.spec.is_cross:
            xe = self.spec.encoder.embeddings
            if xe.data.ndim in (2, 3) and xe.shape[-1] != self.plan.size("d_model"):
                self.report("ATT-E101", "k", f"encoder embeddings have width {xe.shape[-1]}, the "
                            f"decoder's d_model is {self.plan.size('d_model')}",
                            [self.x_operand(False), self.x_operand(True, conflict=xe.data.ndim - 1)], ["d_model"])
            b_enc = xe.shape[0] if xe.data.ndim == 3 else 1
            if b_enc != self.plan.size("batch"):
                self.report("ATT-E106", "k", f"encoder batch {b_enc} ≠ decoder batch {self.plan.size('batch')}",
                            [self.x_operand(False), self.x_operand(True, conflict=0)], ["batch"])

    def projection(self, name: str, key: str, heads_dim: str, width_dim: str, encoder: bool = False) -> None:
        w = getattr(self.att, name)
        if w.data.ndim != 2:
            self.report("ATT-E105", key, f"{name} has {w.data.ndim} axes; a projection is a matrix",
                        [self.weight_operand(name)], [])
            return
        in_axis = 0 if self.att.layout == "x_at_w" else 1
        d_model = self.plan.size("d_model")
        if w.shape[in_axis] != d_model:
            self.report("ATT-E101", key,
                        f"X has d_model={d_model} columns but {name} has {w.shape[in_axis]} "
                        f"{'rows' if in_axis == 0 else 'columns'}",
                        [self.x_operand(encoder, conflict=-1), self.weight_operand(name, conflict=in_axis)],
                        ["d_model"])
            return
        width = output_width(w.shape, self.att.layout)
        heads = self.plan.size(heads_dim)
        per_head = self.plan.size(width_dim)
        if width != heads * per_head or width % heads:
            seq = self.plan.size("seq_k" if encoder else "seq_q")
            self.report("ATT-E103", key,
                        f"{name} gives {width} columns, which cannot split into {heads} heads × "
                        f"{width_dim}={per_head}",
                        [self.weight_operand(name, conflict=1 - in_axis)], [heads_dim, width_dim],
                        details=[f"reshape: {seq}×{width} = {seq * width} values cannot become "
                                 f"({seq}, {heads}, {per_head}) = {seq * heads * per_head}"])
        bias = getattr(self.att, "b_" + name[-1])
        if bias is not None and (bias.data.ndim != 1 or bias.shape[0] != width):
            self.report("ATT-E107", key, f"b_{name[-1]} has shape {_shape(bias.shape)}; {name} gives {width} columns",
                        [Operand(f"b_{name[-1]}", bias.shape, ("d_out",), f"attention.b_{name[-1]}",
                                 bias.location, 0), self.weight_operand(name)], [heads_dim, width_dim])

    def heads(self) -> None:
        h, kv = self.plan.size("n_heads"), self.plan.size("n_kv_heads")
        if h % kv:
            self.report("ATT-E104", "qk", f"{h} query heads cannot share {kv} kv heads evenly",
                        [], ["n_heads", "n_kv_heads"],
                        hint="kv_heads must divide heads (grouped-query attention)")

    def out_projection(self) -> None:
        w = self.att.W_o
        if w is None:
            return
        if w.data.ndim != 2:
            self.report("ATT-E105", "out", f"W_o has {w.data.ndim} axes; a projection is a matrix",
                        [self.weight_operand("W_o")], [])
            return
        in_axis = 0 if self.att.layout == "x_at_w" else 1
        concat = self.plan.size("n_heads") * self.plan.size("d_v")
        if w.shape[in_axis] != concat:
            seq = self.plan.size("seq_q")
            self.report("ATT-E101", "out",
                        f"concat has n_heads·d_v={concat} columns but W_o has {w.shape[in_axis]} "
                        f"{'rows' if in_axis == 0 else 'columns'}",
                        [Operand("concat", (seq, concat), ("seq_q", "n_heads·d_v"), "heads of z, concatenated",
                                 conflict_axis=1), self.weight_operand("W_o", conflict=in_axis)],
                        ["n_heads", "d_v"])
        if self.att.b_o is not None and self.att.b_o.shape != (output_width(w.shape, self.att.layout),):
            b = self.att.b_o
            self.report("ATT-E107", "out", f"b_o has shape {_shape(b.shape)}; W_o gives "
                        f"{output_width(w.shape, self.att.layout)} columns",
                        [Operand("b_o", b.shape, ("d_out",), "attention.b_o", b.location, 0)], ["d_out"])

    def mask(self) -> None:
        m = self.att.mask
        q, k, b = self.plan.size("seq_q"), self.plan.size("seq_k"), self.plan.size("batch")
        if m.matrix is not None:
            shape = m.matrix.shape
            ok = shape == (q, k) or shape == (b, q, k)
            if not ok:
                self.report("ATT-E108", "mask", f"mask matrix {_shape(shape)} does not fit scores "
                            f"(batch={b}, n_heads, seq_q={q}, seq_k={k})",
                            [Operand("mask", shape, ("seq_q", "seq_k") if len(shape) == 2 else (),
                                     "attention.mask", m.matrix.location)], ["seq_q", "seq_k", "batch"],
                            details=_alignment(shape, (b, self.plan.size("n_heads"), q, k),
                                               ("batch", "n_heads", "seq_q", "seq_k")),
                            hint=f"write a {q}×{k} matrix (or {b}×{q}×{k}, one per batch item)")
        if m.padding is not None:
            shape = m.padding.shape
            if not (shape == (k,) or shape == (b, k)):
                self.report("ATT-E108", "mask", f"padding {_shape(shape)} must be (seq_k={k},) or "
                            f"(batch={b}, seq_k={k})",
                            [Operand("padding", shape, (), "attention.mask.padding", m.padding.location)],
                            ["seq_k", "batch"])

    def positional(self) -> None:
        pos = self.spec.positional
        if pos.kind == "learned" and pos.table is not None:
            t = pos.table
            q, d = self.plan.size("seq_q"), self.plan.size("d_model")
            if t.data.ndim != 2 or t.shape[0] < q or t.shape[1] != d:
                self.report("ATT-E109", "pos", f"learned table {_shape(t.shape)} needs at least "
                            f"seq={q} rows and d_model={d} columns",
                            [Operand("PE", t.shape, ("max_len", "d_model"), "positional.table", t.location)],
                            ["seq_q", "d_model"])


def _alignment(shape: Sequence[int], target: Sequence[int], names: Sequence[str]) -> List[str]:
    """Broadcasting, axis by axis from the right, as numpy aligns them."""
    lines = ["broadcast alignment (right-aligned, as numpy does):"]
    n = max(len(shape), len(target))
    padded = [None] * (n - len(shape)) + list(shape)
    padded_t = [None] * (n - len(target)) + list(target)
    names = [""] * (n - len(names)) + list(names)
    for s, t, name in zip(padded, padded_t, names):
        verdict = "ok" if s is None or s == 1 or s == t else "CONFLICT"
        lines.append(f"  {name or '-':>8}: scores {t if t is not None else '-':>5}  mask "
                     f"{s if s is not None else '-':>5}  {verdict}")
    return lines


def find_problems(spec, plan: Plan) -> List[Diagnosis]:
    """Every shape conflict of the spec against the plan, in step order."""
    checker = _Checker(spec, plan)
    checker.embeddings()
    checker.positional()
    checker.projection("W_q", "q", "n_heads", "d_head")
    checker.projection("W_k", "k", "n_kv_heads", "d_head", encoder=spec.is_cross)
    checker.projection("W_v", "v", "n_kv_heads", "d_v", encoder=spec.is_cross)
    checker.heads()
    checker.mask()
    checker.out_projection()
    order = {s.hook: s.number for s in plan.steps}
    return sorted(checker.found, key=lambda d: order.get(d.hook, 0))


def preflight(spec, plan: Plan) -> None:
    """Raise ShapeError (exit 3) when the spec's arrays do not fit the plan."""
    problems = find_problems(spec, plan)
    if problems:
        from .fixes import attach_verified_fixes
        attach_verified_fixes(spec, problems)
        raise ShapeError(problems)
