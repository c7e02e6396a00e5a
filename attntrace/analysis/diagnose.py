"""Shape diagnosis in attention terms, before numpy ever runs.

Pre-flight (:func:`preflight`): every array of a spec is checked against the
plan.  A conflict becomes a :class:`~attntrace.errors.Diagnosis` naming the step
(and head), its shape rule, the operands with their named axes, where each
came from (``X(4×6) @ W_q(6×6) → split heads → head 0``) and its YAML line, where
each size was bound, the arithmetic of an impossible reshape or the axis-by-axis
alignment of a failed broadcast, and the fixes that were *tried and verified*
on a copy of the spec (:mod:`attntrace.fixes`).

Runtime (:func:`check_matmul`, :func:`check_reshape`, :func:`check_broadcast`):
code that runs with named operands -- the deliberate bugs of
:mod:`attntrace.bugs` -- asks these before calling numpy.  Sizes that conflict
raise the same diagnosis a pre-flight conflict would; sizes that agree while the
axis *names* do not (``Q @ K`` when d_head == seq_k) give a warning, because
numpy would have computed something wrong without a word.

What sizes cannot tell (documented in the README): a square matrix written
transposed (W_q 6×6, or embeddings 4×4 with 4 tokens) has the same shape either
way.  attntrace then uses what evidence there is: the token count against the
embedding rows, the other (non-square) weights, and the name of the tensor a
weight was loaded from (``q_proj.weight`` is an nn.Linear weight, stored (out, in)).

Codes: ATT-E101 contracted axes differ · E102 tokens ≠ embedding rows · E103
reshape into heads impossible · E104 kv_heads does not divide heads · E105 wrong
rank · E106 batch mismatch · E107 bias length · E108 mask/padding does not fit the
scores · E109 learned positions table · W220 axes swapped where sizes coincide ·
W221 a reshape moved an axis · W222 square weight that looks like nn.Linear's with
layout x_at_w.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

from attntrace.core.plan import Plan, output_width
from attntrace.errors import Diagnosis, Location, Operand, ShapeError
from attntrace.hookpoints import PROJECTIONS as PROJECTION_TABLE
from attntrace.hookpoints import point_of
from attntrace.text import format_shape

# weight -> (step, result symbol, heads axis, width axis), from the one projection table
PROJECTIONS = {weight: (step, point_of("attn.hook_" + step).symbol, heads, width)
               for weight, (_, step, heads, width, _) in PROJECTION_TABLE.items()}






def _product(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dedupe(locations: Iterable[Optional[Location]]) -> List[Location]:
    seen, out = set(), []
    for loc in locations:
        if loc is not None and (loc.file, loc.line, loc.path) not in seen:
            seen.add((loc.file, loc.line, loc.path))
            out.append(loc)
    return out


def headline(step, head: Optional[int] = None) -> str:
    """`shape mismatch in step 4/10 'scores = Q·Kᵀ'` (with the head when one is involved)."""
    return f"shape mismatch in step {step.label}" + (f", head {head}" if head is not None else "")


def bindings(plan: Plan, names: Iterable[str]) -> List[str]:
    out = []
    for name in names:
        for part in name.split("·"):
            text = plan.dims[part].describe() if part in plan.dims else None
            if text and text not in out:
                out.append(text)
    return out


def make_diagnosis(plan: Plan, key: str, code: str, message: str, operands: Sequence[Operand],
                   dims: Sequence[str] = (), details: Sequence[str] = (), hint: Optional[str] = None,
                   head: Optional[int] = None, severity: str = "error",
                   locations: Iterable[Optional[Location]] = (), layer: Optional[int] = None) -> Diagnosis:
    """A diagnosis in the one format every shape finding uses (pre-flight or runtime)."""
    step = plan.step(key, layer)
    lead = headline(step, head) if severity == "error" else f"step {step.label}" + (
        f", head {head}" if head is not None else "")
    return Diagnosis(code=code, severity=severity, step=step.label, hook=step.hook, head=head, rule=step.rule,
                     message=f"{lead}: {message}", operands=list(operands), bindings=bindings(plan, dims),
                     locations=_dedupe([o.location for o in operands] + list(locations)),
                     details=list(details), hint=hint)


# =========================================================================== operands

class Operands:
    """The operands of a spec as diagnoses show them: shape, named axes, origin, YAML line."""

    def __init__(self, spec, plan: Plan, layer: Optional[int] = None):
        self.spec, self.plan, self.layer = spec, plan, layer
        self.att = spec.attention_of(layer)
        self.where = f"blocks[{layer or 0}].attention" if spec.is_model else "attention"

    @property
    def linear(self) -> bool:
        return self.att.layout == "linear"

    def x_name(self, encoder: bool = False) -> str:
        return "X_enc" if encoder else "X"

    def x(self, encoder: bool = False, conflict: Optional[int] = None) -> Operand:
        seq = self.spec.encoder if encoder else self.spec.source
        x = seq.embeddings
        names = ("batch", "seq_k" if encoder else "seq", "d_model")
        axes = names[-x.data.ndim:] if 1 <= x.data.ndim <= 3 else tuple(f"axis{i}" for i in range(x.data.ndim))
        where = "encoder.embeddings" if encoder else "embeddings"
        return Operand(self.x_name(encoder), x.shape, axes, f"{where}, one row per token", x.location, conflict)

    def weight(self, name: str, conflict: Optional[int] = None) -> Operand:
        from attntrace.analysis.dataflow import operand_axes  # only a shape error names operands' axes
        array = getattr(self.att, name)
        axes = operand_axes(self.plan, name) if array.data.ndim == 2 else \
            tuple(f"axis{i}" for i in range(array.data.ndim))
        how = "(out, in), used as .T (layout: linear)" if self.linear else "(in, out)"
        return Operand(name, array.shape, axes, f"{self.where}.{name} {how}", array.location, conflict)

    def hand_x_shape(self, encoder: bool = False) -> Tuple[int, ...]:
        x = (self.spec.encoder if encoder else self.spec.source).embeddings
        return tuple(x.shape)

    def projection_origin(self, weight: str, then: str = "split heads", head: Optional[int] = 0) -> str:
        """`X(4×6) @ W_q(6×6) → split heads → head 0` (with PE, RoPE and .T as the plan has them)."""
        encoder = self.spec.is_cross and weight in ("W_k", "W_v")
        x = f"{self.x_name(encoder)}({format_shape(self.hand_x_shape(encoder), 'bare')})"
        if not encoder and self.plan.positional in ("sinusoidal", "learned"):
            x = f"({x} + PE)"
        w = getattr(self.att, weight)
        text = f"{x} @ {weight}{'.T' if self.linear else ''}({format_shape(w.shape, 'bare')})"
        if then:
            text += f" → {then}"
        if self.plan.positional == "rope" and weight in ("W_q", "W_k"):
            text += " → RoPE"
        if head is not None:
            text += f" → head {head}"
        return text

    def head_of(self, weight: str, width_per_head: int, head: int = 0, conflict: Optional[int] = None,
                transposed: bool = False) -> Operand:
        """One head of Q, K or V as (seq, d): the operand of the scores or mixing step."""
        seq_axis = "seq_k" if weight in ("W_k", "W_v") else "seq_q"
        seq = self.plan.size(seq_axis)
        width_axis = "d_v" if weight == "W_v" else "d_head"
        name = PROJECTIONS[weight][1]
        shape, axes = (seq, width_per_head), (seq_axis, width_axis)
        if transposed:
            shape, axes, name = shape[::-1], axes[::-1], name + "ᵀ"
        origin = self.projection_origin(weight, head=head) + (" → transposed" if transposed else "")
        return Operand(name, shape, axes, origin, getattr(self.att, weight).location, conflict)

    def x_location(self, weight: str) -> Location:
        """Where the X a projection reads was written (a derived operand's second YAML line)."""
        encoder = self.spec.is_cross and weight in ("W_k", "W_v")
        return (self.spec.encoder if encoder else self.spec.source).embeddings.location


# =========================================================================== pre-flight

_MODEL_STEPS = ("embed", "pos", "embed_norm", "encoder_embed", "ln_final")

class _Checker:
    def __init__(self, spec, plan: Plan):
        self.spec, self.plan = spec, plan
        self.found: List[Diagnosis] = []
        self.warnings: List[Diagnosis] = []
        self.enter(None if not spec.is_model else 0)

    def enter(self, layer: Optional[int]) -> None:
        """Check block `layer` next (a single attention layer has one block, layer None)."""
        self.layer = layer
        self.att = self.spec.attention_of(layer)
        self.ops = Operands(self.spec, self.plan, layer)
        self.broken: set = set()        # projections already reported: later checks would only echo them

    def report(self, code: str, key: str, message: str, operands: Sequence[Operand], dims: Sequence[str] = (),
               details: Sequence[str] = (), hint: Optional[str] = None, head: Optional[int] = None,
               locations: Iterable[Optional[Location]] = ()) -> None:
        layer = self.layer if key not in _MODEL_STEPS else None
        self.found.append(make_diagnosis(self.plan, key, code, message, operands, dims, details, hint, head,
                                         locations=locations, layer=layer))

    def warn(self, code: str, key: str, message: str, operands: Sequence[Operand], dims: Sequence[str] = (),
             details: Sequence[str] = (), hint: Optional[str] = None) -> None:
        self.warnings.append(make_diagnosis(self.plan, key, code, message, operands, dims, details, hint,
                                            severity="warning", layer=self.layer))

    # -- embeddings ----------------------------------------------------------
    def embeddings(self) -> None:
        for encoder in ((False, True) if self.spec.is_cross else (False,)):
            seq = self.spec.encoder if encoder else self.spec.source
            x = seq.embeddings
            where = "encoder.embeddings" if encoder else "embeddings"
            key = "encoder_embed" if encoder else "embed"
            if x.data.ndim not in (2, 3):
                self.report("ATT-E105", key, f"{where} has {x.data.ndim} axes; it needs (seq, d_model) or "
                            "(batch, seq, d_model)", [self.ops.x(encoder)], ["d_model"])
                continue
            rows, cols, tokens = x.shape[-2], x.shape[-1], len(seq.tokens)
            if rows != tokens:
                looks_transposed = cols == tokens
                self.report(
                    "ATT-E102", key, f"{tokens} tokens but {rows} embedding rows in {where}",
                    [self.ops.x(encoder, conflict=x.data.ndim - 2)], ["seq_k" if encoder else "seq_q"],
                    details=[f"the rows of {where} are tokens: ({'seq_k' if encoder else 'seq'}={tokens}, "
                             f"d_model) was expected, {format_shape(x.shape)} was given"],
                    hint=("its columns match the tokens: the matrix looks transposed (d_model, seq)"
                          if looks_transposed else "give one embedding row per token"),
                    locations=[seq.tokens_location])
        if self.spec.is_cross:
            xe = self.spec.encoder.embeddings
            if xe.data.ndim in (2, 3) and xe.shape[-1] != self.plan.size("d_model"):
                self.report("ATT-E101", "k", f"encoder embeddings have width {xe.shape[-1]}, the decoder's "
                            f"d_model is {self.plan.size('d_model')}: W_k and W_v read both",
                            [self.ops.x(False, conflict=-1), self.ops.x(True, conflict=-1)], ["d_model"])
            b_enc = xe.shape[0] if xe.data.ndim == 3 else 1
            if b_enc != self.plan.size("batch"):
                self.report("ATT-E106", "k", f"encoder batch {b_enc} ≠ decoder batch {self.plan.size('batch')}",
                            [self.ops.x(False, conflict=0), self.ops.x(True, conflict=0)], ["batch"])

    def positional(self) -> None:
        pos = self.spec.positional
        if pos.kind == "learned" and pos.table is not None:
            t = pos.table
            q, d = self.plan.size("seq_q"), self.plan.size("d_model")
            if t.data.ndim != 2 or t.shape[0] < q or t.shape[1] != d:
                self.report("ATT-E109", "pos", f"learned table {format_shape(t.shape, 'bare')} needs at least "
                            f"seq={q} rows and d_model={d} columns",
                            [Operand("PE", t.shape, ("max_len", "d_model")[:t.data.ndim], "positional.table",
                                     t.location, 1 if t.data.ndim == 2 and t.shape[1] != d else 0)],
                            ["seq_q", "d_model"])
        if pos.type_table is not None and any(step.key == "pos" for step in self.plan.steps):
            self.token_types(pos)

    def token_types(self, pos) -> None:
        """BERT's segment embeddings: a (types, d_model) table, ids (seq,) or (batch, seq)."""
        table, ids = pos.type_table, pos.type_ids
        q, d, batch = self.plan.size("seq_q"), self.plan.size("d_model"), self.plan.size("batch")
        if table.data.ndim != 2 or table.shape[1] != d:
            self.report("ATT-E112", "pos", f"token_types.table {format_shape(table.shape, 'bare')} needs "
                        f"d_model={d} columns (one row per token type)",
                        [Operand("token_types.table", table.shape, (), "positional.token_types.table",
                                 table.location)], ["d_model"])
        if ids.data.ndim not in (1, 2) or ids.shape[-1] != q or (ids.data.ndim == 2 and ids.shape[0] not in
                                                                (1, batch)):
            self.report("ATT-E112", "pos", f"token_types.ids {format_shape(ids.shape, 'bare')} needs one id per "
                        f"token: (seq={q},) or (batch={batch}, seq={q})",
                        [Operand("token_types.ids", ids.shape, (), "positional.token_types.ids", ids.location)],
                        ["seq_q", "batch"])

    # -- projections ---------------------------------------------------------
    def projection(self, name: str) -> None:
        key, result, heads_dim, width_dim = PROJECTIONS[name]
        encoder = self.spec.is_cross and name in ("W_k", "W_v")
        w = getattr(self.att, name)
        self.broken.add(name)
        if w.data.ndim != 2:
            self.report("ATT-E105", key, f"{name} has {w.data.ndim} axes; a projection is a matrix",
                        [self.ops.weight(name)], [])
            return
        in_axis = 0 if self.att.layout == "x_at_w" else 1
        d_model = self.plan.size("d_model")
        if w.shape[in_axis] != d_model:
            side = "rows" if in_axis == 0 else "columns"
            other = "columns" if in_axis == 0 else "rows"
            hint = (f"its {other} match d_model={d_model}: {name} looks transposed"
                    if w.shape[1 - in_axis] == d_model else None)
            self.report("ATT-E101", key,
                        f"{self.ops.x_name(encoder)} has d_model={d_model} columns but {name} has "
                        f"{w.shape[in_axis]} {side} ({self.ops.x_name(encoder)} @ {name} contracts them)",
                        [self.ops.x(encoder, conflict=-1), self.ops.weight(name, conflict=in_axis)],
                        ["d_model"], hint=hint)
            return
        width = output_width(w.shape, self.att.layout)
        heads = self.plan.size(heads_dim)
        seq = self.plan.size("seq_k" if name in ("W_k", "W_v") else "seq_q")
        explicit = width_dim == "d_head" and self.att.d_head is not None
        if width % heads:
            self.report("ATT-E103", key, f"{name} gives {width} columns, which do not split into {heads} "
                        f"heads ({heads_dim}={heads})",
                        [self.ops.weight(name, conflict=1 - in_axis)], [heads_dim, width_dim],
                        details=[f"{seq * width} = {seq}×{width} cannot become ({seq}, {heads}, {width}/{heads}): "
                                 f"{width} is not a multiple of {heads} ({width} = {heads}×{width // heads} + "
                                 f"{width % heads})"],
                        hint=f"{result} = X·{name} is split into heads by a reshape (seq, {heads_dim}·{width_dim})"
                             f" → (seq, {heads_dim}, {width_dim}); its width must be a multiple of {heads_dim}")
        elif explicit and width != heads * self.plan.size("d_head"):
            d = self.plan.size("d_head")
            self.report("ATT-E103", key, f"{name} gives {width} columns but {heads_dim}×d_head = "
                        f"{heads}×{d} = {heads * d}",
                        [self.ops.weight(name, conflict=1 - in_axis)], [heads_dim, "d_head"],
                        details=[f"{seq * width} = {seq}×{width} cannot become ({seq}, {heads}, {d}) = "
                                 f"{seq * heads * d}"])
        else:
            self.broken.discard(name)
            if name == "W_k" and "W_q" not in self.broken and width // heads != self.plan.size("d_head"):
                self.qk_disagree(width // heads)
        self.bias(name, width, heads_dim, width_dim)

    def qk_disagree(self, d_k: int) -> None:
        """Q and K both split cleanly, into heads of different widths: Q·Kᵀ cannot contract them."""
        d_q = self.plan.size("d_head")
        h, kv = self.plan.size("n_heads"), self.plan.size("n_kv_heads")
        wq = output_width(self.att.W_q.shape, self.att.layout)
        wk = output_width(self.att.W_k.shape, self.att.layout)
        q_op = self.ops.head_of("W_q", d_q, conflict=1)
        k_op = self.ops.head_of("W_k", d_k, conflict=0, transposed=True)
        self.report("ATT-E101", "qk", f"W_q and W_k disagree on d_head: Q has d_head={d_q} "
                    f"(W_q: {wq} columns / {h} heads), K has d_head={d_k} (W_k: {wk} columns / {kv} kv heads)",
                    [q_op, k_op], ["d_head", "n_heads", "n_kv_heads"], head=0,
                    locations=[self.ops.x_location("W_q"), self.ops.x_location("W_k")],
                    details=[f"Q·Kᵀ per head: ({q_op.shape[0]}×{d_q})·({d_k}×{k_op.shape[1]}) — the inner "
                             f"sizes {d_q} and {d_k} must be equal"],
                    hint="queries and keys are compared feature by feature: W_q and W_k need the same "
                         "number of columns per head")

    def bias(self, name: str, width: int, heads_dim: str, width_dim: str) -> None:
        bias_name = "b_" + name[-1]
        bias = getattr(self.att, bias_name)
        if bias is None or (bias.data.ndim == 1 and bias.shape[0] == width):
            return
        key = PROJECTIONS[name][0] if name in PROJECTIONS else "out"
        self.report("ATT-E107", key, f"{bias_name} has shape {format_shape(bias.shape)}; {name} gives "
                    f"{width} columns, so {bias_name} needs {width} numbers",
                    [Operand(bias_name, bias.shape, ("d_out",) if bias.data.ndim == 1 else (),
                             f"{self.ops.where}.{bias_name}, added to every row of X @ {name}", bias.location,
                             0 if bias.data.ndim == 1 else None),
                     self.ops.weight(name, conflict=(1 if self.att.layout == "x_at_w" else 0))],
                    [heads_dim, width_dim] if heads_dim else [width_dim],
                    hint=f"a bias is one flat list with one number per output column of {name}")

    def heads(self) -> None:
        h, kv = self.plan.size("n_heads"), self.plan.size("n_kv_heads")
        if h % kv:
            divisors = [k for k in range(1, h + 1) if h % k == 0]
            sq, sk, d = (self.plan.size(n) for n in ("seq_q", "seq_k", "d_head"))
            operands = [Operand("Q", (sq, h, d), ("seq_q", "n_heads", "d_head"),
                                self.ops.projection_origin("W_q", head=None), self.att.W_q.location, 1),
                        Operand("K", (sk, kv, d), ("seq_k", "n_kv_heads", "d_head"),
                                self.ops.projection_origin("W_k", head=None), self.att.W_k.location, 1)]
            self.report("ATT-E104", "qk", f"{h} query heads cannot share {kv} kv heads evenly "
                        f"({h} = {kv}×{h // kv} + {h % kv})", operands, ["n_heads", "n_kv_heads"],
                        details=[f"grouped-query attention gives each kv head n_heads / n_kv_heads query heads; "
                                 f"kv_heads must be one of {', '.join(map(str, divisors))}"],
                        locations=[self.att.locations.get("kv_heads"), self.att.locations.get("heads")])

    def out_projection(self) -> None:
        w = self.att.W_o
        if w is None:
            return
        if w.data.ndim != 2:
            self.report("ATT-E105", "out", f"W_o has {w.data.ndim} axes; a projection is a matrix",
                        [self.ops.weight("W_o")], [])
            return
        in_axis = 0 if self.att.layout == "x_at_w" else 1
        concat = self.plan.size("n_heads") * self.plan.size("d_v")
        width = output_width(w.shape, self.att.layout)
        if w.shape[in_axis] != concat:
            seq = self.plan.size("seq_q")
            self.report("ATT-E101", "out",
                        f"concat has n_heads·d_v={concat} columns but W_o has {w.shape[in_axis]} "
                        f"{'rows' if in_axis == 0 else 'columns'} (concat @ W_o contracts them)",
                        [Operand("concat", (seq, concat), ("seq", "n_heads·d_v"),
                                 f"{self.plan.size('n_heads')} heads of z (seq×d_v={self.plan.size('d_v')}), "
                                 f"side by side", conflict_axis=1),
                         self.ops.weight("W_o", conflict=in_axis)], ["n_heads", "d_v"],
                        hint="W_o reads the concatenated heads: its input side is n_heads·d_v")
            return
        self.bias("W_o", width, "", "d_out")      # d_out may differ from d_model: W_o's output is free

    # -- mask ----------------------------------------------------------------
    def mask(self) -> None:
        m = self.att.mask
        q, k, b, h = (self.plan.size(n) for n in ("seq_q", "seq_k", "batch", "n_heads"))
        scores_axes = ("batch", "n_heads", "seq_q", "seq_k")
        if m.matrix is not None:
            shape = tuple(m.matrix.shape)
            if shape not in ((q, k), (b, q, k), (1, q, k), (b, 1, k), (1, 1, k)):
                mask_axes = {2: ("seq_q", "seq_k"), 3: ("batch", "seq_q", "seq_k")}.get(len(shape), ())
                placed = (shape[0], None, shape[1], shape[2]) if len(shape) == 3 else shape
                details = alignment_table(placed, (b, h, q, k), scores_axes, "mask")
                if len(shape) == 3:
                    details.insert(1, "  a 3-axis mask is read as (batch, seq_q, seq_k): it gets a head axis of 1")
                self.report("ATT-E108", "mask", f"mask matrix {format_shape(shape)} does not fit the scores "
                            f"(batch={b}, n_heads={h}, seq_q={q}, seq_k={k})",
                            [Operand("mask", shape, mask_axes, f"{self.ops.where}.mask (True = may attend)",
                                     m.matrix.location, _first_conflict(placed, (b, h, q, k)))],
                            ["seq_q", "seq_k", "batch"], details=details,
                            hint=f"write a {q}×{k} matrix (one row per query, one column per key)"
                                 + (f", or {b}×{q}×{k}, one per batch item" if b > 1 else ""))
        if m.padding is not None:
            shape = tuple(m.padding.shape)
            if shape not in ((k,), (b, k), (1, k)):
                placed = (shape[0], None, None, shape[1]) if len(shape) == 2 else shape
                conflict = _first_conflict(placed, (b, h, q, k))
                batch_only = len(shape) == 2 and shape[1] == k
                self.report("ATT-E106" if batch_only else "ATT-E108", "mask",
                            f"padding {format_shape(shape)} must be (seq_k={k},) or (batch={b}, seq_k={k})",
                            [Operand("padding", shape, ("batch", "seq_k")[-len(shape):] if len(shape) <= 2 else (),
                                     f"{self.ops.where}.mask.padding (1 = real token)", m.padding.location,
                                     conflict)],
                            ["seq_k", "batch"], details=alignment_table(placed, (b, h, q, k), scores_axes, "padding"),
                            hint="one 1/0 per key token" + (" and one row per batch item" if b > 1 else ""))

    # -- transformer blocks --------------------------------------------------
    def model_norms(self) -> None:
        for key, norm, where in (("embed_norm", self.spec.embed_norm, "embed_norm"),
                                 ("ln_final", self.spec.final_norm, "ln_final")):
            if norm is not None:
                self.norm_vectors(key, norm, where)

    def norm_vectors(self, key: str, norm, where: str) -> None:
        d = self.plan.size("d_model")
        for part in ("weight", "bias"):
            array = getattr(norm, part)
            if array is not None and tuple(array.shape) != (d,):
                self.report("ATT-E110", key, f"{where}.{part} has shape {format_shape(array.shape)}; a norm "
                            f"scales each of the d_model={d} features, so it needs ({d},)",
                            [Operand(f"{where}.{part}", array.shape, ("d_model",)[:array.data.ndim],
                                     f"{where}.{part}", array.location, 0)], ["d_model"],
                            hint="one number per feature of the residual stream")

    def same_sizes_as_first(self) -> None:
        """Every block of a spec shares the first block's heads and head widths."""
        first, att = self.spec.attention_of(0), self.att
        for field_name, label in (("heads", "heads"), ("kv_heads", "kv_heads"), ("d_head", "d_head")):
            mine, theirs = getattr(att, field_name), getattr(first, field_name)
            if field_name == "kv_heads":
                mine, theirs = mine or att.heads, theirs or first.heads
            if mine is not None and theirs is not None and mine != theirs:
                self.report("ATT-E111", "qk", f"block {self.layer} has {label}={mine} but block 0 has "
                            f"{label}={theirs}", [], ["n_heads", "n_kv_heads", "d_head"],
                            locations=[att.locations.get(field_name), first.locations.get(field_name)],
                            hint="every block of a spec has the same number and width of heads")

    def block_parts(self) -> None:
        if not self.spec.is_model:
            return
        block = self.spec.blocks[self.layer]
        where = f"blocks[{self.layer}]"
        if block.residual and self.plan.size("d_out") != self.plan.size("d_model") and "W_o" not in self.broken:
            w_o = self.att.W_o
            self.report("ATT-E101", "resid_mid", f"the residual adds attn_out (d_out={self.plan.size('d_out')}) "
                        f"to the block's input (d_model={self.plan.size('d_model')})",
                        [self.ops.weight("W_o", conflict=1 if self.att.layout == "x_at_w" else 0)]
                        if w_o is not None else [], ["d_out", "d_model"],
                        hint="W_o must map the heads back to d_model (or write residual: false)")
        for key, norm in (("ln1", block.ln1), ("ln2", block.ln2)):
            if norm is not None and any(s.key == key and s.layer == self.layer for s in self.plan.steps):
                self.norm_vectors(key, norm, f"{where}.{key}")
        if block.mlp is not None:
            self.mlp_shapes(block.mlp, f"{where}.mlp")

    def mlp_shapes(self, mlp, where: str) -> None:
        d, m = self.plan.size("d_model"), self.plan.size("d_mlp")
        linear = mlp.layout == "linear"
        expected = {"W_in": (d, m), "W_gate": (d, m), "W_up": (d, m), "W_out": (m, d), "W_down": (m, d)}
        steps = {"W_in": "mlp_pre", "W_gate": "mlp_pre", "W_up": "mlp_post", "W_out": "mlp_out", "W_down": "mlp_out",
                 "b_in": "mlp_pre", "b_gate": "mlp_pre", "b_up": "mlp_post", "b_out": "mlp_out", "b_down": "mlp_out"}
        for name, array in mlp.weights.items():
            if name.startswith("W_"):
                shape = expected[name][::-1] if linear else expected[name]
                axes = ("d_model", "d_mlp") if expected[name] == (d, m) else ("d_mlp", "d_model")
                axes = axes[::-1] if linear else axes
            else:
                shape = (m,) if name in ("b_in", "b_gate", "b_up") else (d,)
                axes = ("d_mlp",) if shape == (m,) else ("d_model",)
            if tuple(array.shape) != shape:
                self.report("ATT-E110", steps[name], f"{where}.{name} has shape {format_shape(array.shape)}; "
                            f"with d_model={d} and d_mlp={m} it must be {format_shape(shape)}"
                            + (" (layout: linear stores (out, in))" if linear and name.startswith("W_") else ""),
                            [Operand(f"{where}.{name}", array.shape, axes if array.data.ndim == len(axes) else (),
                                     f"{where}.{name}", array.location)], ["d_model", "d_mlp"],
                            hint="d_mlp is bound by the first MLP weight; check its layout (x_at_w: (in, out))")

    # -- layout evidence -----------------------------------------------------
    def layout_hint(self) -> None:
        """A square weight cannot show its layout; the name of the tensor it was loaded from can."""
        if self.att.layout != "x_at_w":
            return
        for name in ("W_q", "W_k", "W_v", "W_o"):
            w = getattr(self.att, name)
            if w is None or w.data.ndim != 2 or w.shape[0] != w.shape[1]:
                continue
            key = _source_key(self.spec, (["blocks", self.layer] if self.spec.is_model else []) + ["attention", name])
            if key and looks_like_linear_weight(key):
                self.warn("ATT-W222", PROJECTIONS.get(name, ("out",))[0],
                          f"{name} comes from '{key}', a name nn.Linear weights carry; nn.Linear stores "
                          f"(out, in), but the layout is x_at_w (in, out). {name} is square "
                          f"({format_shape(w.shape, 'bare')}), so its shape cannot tell the two apart",
                          [self.ops.weight(name)], ["d_model"],
                          hint=f"if these are nn.Linear weights, set `layout: linear` in {self.ops.where}")


def _first_conflict(placed: Sequence[Optional[int]], target: Sequence[int]) -> Optional[int]:
    """Index (in the operand's own axes) of the first axis that cannot broadcast to the target."""
    n = max(len(placed), len(target))
    padded = [None] * (n - len(placed)) + list(placed)
    padded_t = [None] * (n - len(target)) + list(target)
    own = 0
    for size, t in zip(padded, padded_t):
        if size is None:
            continue
        if not (size == 1 or size == t):
            return own
        own += 1
    return None


def alignment_table(shape: Sequence[Optional[int]], target: Sequence[int], names: Sequence[str],
                    what: str = "mask") -> List[str]:
    """Broadcasting axis by axis (right-aligned, as numpy does); None marks an axis the operand lacks."""
    n = max(len(shape), len(target))
    padded = [None] * (n - len(shape)) + list(shape)
    padded_t = [None] * (n - len(target)) + list(target)
    names = [""] * (n - len(names)) + list(names)
    width = max(len(what), 6)
    lines = ["broadcast alignment (right-aligned, as numpy does):",
             f"  {'axis':>8}  {'scores':>7}  {what:>{width}}  verdict"]
    for s, t, name in zip(padded, padded_t, names):
        if s is None:
            verdict = "ok (absent: repeated)"
        elif s == 1 and t != 1:
            verdict = "ok (1: repeated)"
        elif s == t:
            verdict = "ok"
        else:
            verdict = f"CONFLICT: {s} ≠ {t}"
        lines.append(f"  {name or '-':>8}  {t if t is not None else '-':>7}  "
                     f"{s if s is not None else '-':>{width}}  {verdict}")
    return lines


def _source_key(spec, path: Sequence) -> Optional[str]:
    """The tensor name a weight was loaded from (`{safetensors: f, key: q_proj.weight}`), if any."""
    node = spec.document.data if spec.document is not None else None
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    if isinstance(node, dict):
        key = node.get("key")
        return str(key) if key is not None else None
    return None


def looks_like_linear_weight(key: str) -> bool:
    """`self_attn.q_proj.weight`, `attention.self.query.weight` ...; not GPT-2's Conv1D (`c_attn`)."""
    lowered = key.lower()
    return lowered.endswith("weight") and not any(conv in lowered for conv in ("c_attn", "c_proj"))


def find_problems(spec, plan: Plan) -> List[Diagnosis]:
    """Every shape conflict of the spec against the plan, in step order."""
    return _run_checks(spec, plan).found


def _run_checks(spec, plan: Plan) -> _Checker:
    checker = _Checker(spec, plan)
    checker.embeddings()
    checker.positional()
    checker.model_norms()
    for layer in (range(len(spec.blocks)) if spec.is_model else (None,)):
        checker.enter(layer)
        if layer:
            checker.same_sizes_as_first()
        for name in ("W_q", "W_k", "W_v"):
            checker.projection(name)
        checker.heads()
        checker.mask()
        checker.out_projection()
        checker.layout_hint()
        checker.block_parts()
    order = {s.hook: s.number for s in plan.steps}
    checker.found.sort(key=lambda d: order.get(d.hook, 0))
    return checker


def preflight(spec, plan: Plan) -> List[Diagnosis]:
    """Raise ShapeError (exit 3) when the spec's arrays do not fit the plan; return the warnings."""
    checker = _run_checks(spec, plan)
    if checker.found:
        raise ShapeError(checker.found)
    return checker.warnings


# =========================================================================== runtime, named operands

def _visible(axes: Sequence[str], shape: Sequence[int]) -> List[str]:
    """Axis names without the size-1 axes: moving or swapping those changes nothing."""
    return [a for a, s in zip(axes, shape) if s != 1]


def check_matmul(plan: Plan, key: str, left: Operand, right: Operand, head: Optional[int] = None,
                 hint: Optional[str] = None, locations: Iterable[Optional[Location]] = ()) -> Optional[Diagnosis]:
    """left (…, m, k) @ right (…, k, n).  Raise ShapeError when the contracted sizes differ;
    return a W220 warning when they agree but the axes are not the same axis."""
    la, ra = left.axes[-1], right.axes[-2]
    ls, rs = left.shape[-1], right.shape[-2]
    if ls != rs:
        left.conflict_axis, right.conflict_axis = len(left.shape) - 1, len(right.shape) - 2
        raise ShapeError(make_diagnosis(
            plan, key, "ATT-E101", f"{left.name} @ {right.name} contracts {left.name}'s {la}={ls} with "
            f"{right.name}'s {ra}={rs}", [left, right], [la, ra],
            details=[f"({format_shape(left.shape, 'bare')}) @ ({format_shape(right.shape, 'bare')}): "
                     f"the inner sizes {ls} and {rs} must be equal"], hint=hint, head=head, locations=locations))
    if la != ra and ls != 1:
        left.conflict_axis, right.conflict_axis = len(left.shape) - 1, len(right.shape) - 2
        return make_diagnosis(
            plan, key, "ATT-W220", f"{left.name} @ {right.name} contracts {left.name}'s {la} with "
            f"{right.name}'s {ra}: both are {ls}, so numpy did not complain, but they are different axes",
            [left, right], [la, ra], hint=hint, head=head, severity="warning", locations=locations)
    return None


def check_reshape(plan: Plan, key: str, operand: Operand, target: Sequence[Tuple[str, int]],
                  hint: Optional[str] = None) -> Optional[Diagnosis]:
    """A reshape of `operand` into named `target` axes.  Raise ShapeError when the element counts
    differ (with the arithmetic); return a W221 warning when it moves an axis (a reshape only
    splits or merges neighbouring axes, in order: moving one needs a transpose)."""
    names = [n for n, _ in target]
    sizes = [int(s) for _, s in target]
    have, want = _product(operand.shape), _product(sizes)
    if have != want:
        raise ShapeError(make_diagnosis(
            plan, key, "ATT-E103", f"{operand.name} {format_shape(operand.shape)} cannot be reshaped to "
            f"({', '.join(f'{n}={s}' for n, s in target)})", [operand], names,
            details=[f"{have} = {format_shape(operand.shape, 'bare')} cannot become {format_shape(sizes)} = {want}"],
            hint=hint))
    before = _visible(*_atoms(plan, operand.axes, operand.shape))
    after = _visible(*_atoms(plan, names, sizes))
    if before != after:
        return make_diagnosis(
            plan, key, "ATT-W221", f"the reshape reads {operand.name} ({', '.join(operand.axes)}) as "
            f"({', '.join(names)}): that moves an axis, which a reshape cannot do — the values of "
            f"different {'tokens and heads' if any('heads' in n for n in after) else 'axes'} get mixed",
            [operand], names, details=[f"axis order before: {' · '.join(before)}",
                                       f"axis order after:  {' · '.join(after)}"],
            hint=hint, severity="warning")
    return None


def _atoms(plan: Plan, axes: Sequence[str], sizes: Sequence[int]) -> Tuple[List[str], List[int]]:
    """Atomic axes and their sizes: `n_heads·d_head` counts as the two axes it merges."""
    names, out = [], []
    for axis, size in zip(axes, sizes):
        parts = axis.split("·")
        names.extend(parts)
        out.extend([int(size)] if len(parts) == 1 else [plan.size(p) for p in parts])
    return names, out


def check_broadcast(plan: Plan, key: str, target: Operand, operand: Operand,
                    hint: Optional[str] = None) -> Optional[Diagnosis]:
    """`operand` applied elementwise to `target` (a mask on the scores).  Raise ShapeError
    (with the axis-by-axis alignment) when it cannot broadcast to the target's shape; return a
    W220 warning when the sizes fit but the axis names do not (seq_k against seq_q)."""
    placed = list(operand.shape)
    conflict = _first_conflict(placed, target.shape)
    if conflict is not None:
        operand.conflict_axis = conflict
        raise ShapeError(make_diagnosis(
            plan, key, "ATT-E108", f"{operand.name} {format_shape(operand.shape)} does not broadcast to "
            f"{target.name} {format_shape(target.shape)}", [target, operand], list(target.axes),
            details=alignment_table(placed, target.shape, target.axes, operand.name), hint=hint))
    n = len(target.axes)
    mine = [None] * (n - len(operand.axes)) + list(operand.axes)
    swapped = [i for i, (a, b, s) in enumerate(zip(mine, target.axes, [None] * (n - len(placed)) + placed))
               if a is not None and s not in (None, 1) and a != b and a != "1"]
    if swapped:
        operand.conflict_axis = swapped[0] - (n - len(operand.axes))
        return make_diagnosis(
            plan, key, "ATT-W220", f"{operand.name} axes ({', '.join(operand.axes)}) meet {target.name} axes "
            f"({', '.join(target.axes)}): the sizes fit, so numpy broadcast it, but "
            f"{' and '.join(f'{mine[i]}↔{target.axes[i]}' for i in swapped)} are different axes",
            [target, operand], list(target.axes),
            details=alignment_table(placed, target.shape, target.axes, operand.name), hint=hint,
            severity="warning")
    return None
