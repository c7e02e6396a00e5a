"""The plan: the steps of attention with named axes, sizes only, no arrays.

A plan knows every step's hook, formula, shape rule and the size of every
named axis together with where that size was bound (a YAML field or a CLI
flag).  ``explain-shapes`` renders a plan from flags alone; the diagnosis
checks a spec's arrays against it before numpy ever runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from attntrace.errors import Location
from attntrace.hookpoints import HookPoint, full_name, point_of


@dataclass
class Dim:
    """A named axis size and where it was bound."""

    name: str
    size: int
    bound_by: str                        # e.g. "embeddings (columns)", "--heads"
    location: Optional[Location] = None

    def describe(self) -> str:
        where = f", {self.location.file}:{self.location.line}" if self.location and self.location.line else ""
        return f"{self.name}={self.size} from {self.bound_by}{where}"


@dataclass
class Step:
    key: str                             # engine step name: "q", "qk", "pattern", "ln1", "mlp_pre" ...
    hook: str                            # full hook name: "attn.hook_q" or "blocks.2.attn.hook_q"
    title: str                           # "scores = Q·Kᵀ"
    rule: str                            # "(seq_q×d_head)·(d_head×seq_k) → (seq_q×seq_k)"
    inputs: Tuple[str, ...] = ()         # names of the operands, for display
    number: int = 0                      # 1-based, set by the plan
    total: int = 0
    layer: Optional[int] = None          # the block it belongs to; None for embeddings and the final norm

    @property
    def point(self) -> HookPoint:
        return point_of(self.hook)

    @property
    def axes(self) -> Tuple[str, ...]:
        return self.point.axes

    @property
    def label(self) -> str:
        return f"{self.number}/{self.total} '{self.title}'"


@dataclass
class BlockPlan:
    """What one block computes, beyond the sizes every block shares."""

    scale: float = 1.0
    scale_text: str = "1/√d_head"
    layout: str = "x_at_w"
    masked: bool = False
    has_w_o: bool = True
    placement: str = "none"              # none (a single attention layer) | pre | post
    ln1: Optional[str] = None            # norm kind, or None
    ln2: Optional[str] = None
    mlp: Optional[str] = None            # None | plain | gated
    activation: str = "gelu"
    residual: bool = False
    chunk: Optional[int] = None          # online softmax over key blocks of this many keys
    chunk_row: int = -1                  # the query row whose running max, sum and output are traced


@dataclass
class Plan:
    dims: Dict[str, Dim]
    steps: List[Step]
    blocks: List[BlockPlan] = field(default_factory=lambda: [BlockPlan()])
    cross: bool = False
    positional: str = "none"
    named_blocks: bool = False           # hooks named blocks.L.* (a spec of blocks, a model)

    # The first block's options: for a single attention layer, *the* options.  Code that
    # works per block (engine, checks, diagnosis) reads plan.block(layer) instead.
    @property
    def scale(self) -> float:
        return self.blocks[0].scale

    @property
    def scale_text(self) -> str:
        return self.blocks[0].scale_text

    @property
    def layout(self) -> str:
        return self.blocks[0].layout

    @property
    def masked(self) -> bool:
        return self.blocks[0].masked

    @property
    def has_w_o(self) -> bool:
        return self.blocks[0].has_w_o

    def block(self, layer: Optional[int]) -> BlockPlan:
        return self.blocks[layer or 0]

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def size(self, axis: str) -> int:
        if axis in ("1", "row"):              # "row": the one query row chunked attention traces
            return 1
        if axis == "k_block":                 # chunked attention: key blocks of the first chunked block
            chunk = next((b.chunk for b in self.blocks if b.chunk), None) or self.size("seq_k")
            return -(-self.size("seq_k") // chunk)
        if axis == "n_heads·d_v":
            return self.size("n_heads") * self.size("d_v")
        return self.dims[axis].size

    def shape(self, axes: Sequence[str]) -> Tuple[int, ...]:
        return tuple(self.size(a) for a in axes)

    def step(self, key: str, layer: Optional[int] = None) -> Step:
        """The step `key` of block `layer` (default: the first step of that key)."""
        for step in self.steps:
            if step.key == key and (layer is None or step.layer == layer):
                return step
        raise KeyError(key)

    def step_for_hook(self, hook: str) -> Step:
        for step in self.steps:
            if step.hook == hook:
                return step
        raise KeyError(hook)

    @property
    def hooks(self) -> List[str]:
        return [s.hook for s in self.steps]

    def flops(self, step: Step) -> int:
        """Floating-point operations of a step (a multiply-add counts 2)."""
        d = self.size
        block = self.block(step.layer)
        b, h, q, k = d("batch"), d("n_heads"), d("seq_q"), d("seq_k")
        tokens = b * q
        mlp_width = d("d_mlp") if "d_mlp" in self.dims else 0
        per_step = {
            "embed": 0, "encoder_embed": 0, "mask": 0, "resid_pre": 0,
            "pos": tokens * d("d_model"),
            "embed_norm": 8 * tokens * d("d_model"), "ln1": 8 * tokens * d("d_model"),
            "ln2": 8 * tokens * d("d_model"), "ln_final": 8 * tokens * d("d_model"),
            "q": 2 * tokens * d("d_model") * h * d("d_head"),
            "k": 2 * b * k * d("d_model") * d("n_kv_heads") * d("d_head"),
            "v": 2 * b * k * d("d_model") * d("n_kv_heads") * d("d_v"),
            "rot_q": 3 * tokens * h * d("d_head"),
            "rot_k": 3 * b * k * d("n_kv_heads") * d("d_head"),
            "qk": 2 * b * h * q * k * d("d_head"),
            "scaled": (2 if self.positional == "alibi" else 1) * b * h * q * k,   # ALiBi adds a bias
            "attn_scores": b * h * q * k if block.masked else 0,                  # one select per score
            "pattern": 5 * b * h * q * k,          # max, subtract, exp, sum, divide
            "z": 0 if block.chunk else 2 * b * h * q * k * d("d_v"),
            "z_concat": 0,
            "out": 2 * tokens * h * d("d_v") * d("d_out") if block.has_w_o else 0,
            "resid_mid": tokens * d("d_model"), "resid_post": tokens * d("d_model"),
            "mlp_pre": (4 if block.mlp == "gated" else 2) * tokens * d("d_model") * mlp_width,
            "mlp_post": 10 * tokens * mlp_width,
            "mlp_out": 2 * tokens * mlp_width * d("d_model"),
            # chunked: both products and the exponentials, once (the stats pass recomputes the scores)
            "block_max": (2 * d("d_head") + 2 * d("d_v") + 5) * b * h * q * k, "block_sum": 0, "block_out": 0,
        }
        return per_step[step.key]

    def result_bytes(self, step: Step, itemsize: int = 8) -> int:
        shape = self.shape(step.axes)
        n = 1
        for s in shape:
            n *= s
        return n * (1 if step.key == "mask" else itemsize)


def attention_steps(block: BlockPlan, *, cross: bool, positional: str) -> List[Step]:
    """The steps of one attention layer, from the projections to the output (hooks named locally)."""
    wt = "ᵀ" if block.layout == "linear" else ""
    src_k = "X_enc" if cross else "X"
    steps = [
        Step("q", "attn.hook_q", f"Q = X·W_q{wt}, split heads",
             "(seq_q×d_model)·(d_model×n_heads·d_head) → (seq_q×n_heads×d_head)", ("X", "W_q")),
        Step("k", "attn.hook_k", f"K = {src_k}·W_k{wt}, split heads",
             "(seq_k×d_model)·(d_model×n_kv_heads·d_head) → (seq_k×n_kv_heads×d_head)", (src_k, "W_k")),
        Step("v", "attn.hook_v", f"V = {src_k}·W_v{wt}, split heads",
             "(seq_k×d_model)·(d_model×n_kv_heads·d_v) → (seq_k×n_kv_heads×d_v)", (src_k, "W_v")),
    ]
    if positional == "rope":
        steps += [Step("rot_q", "attn.hook_rot_q", "Q = RoPE(Q)", "(seq_q×d_head) → (seq_q×d_head)", ("Q",)),
                  Step("rot_k", "attn.hook_rot_k", "K = RoPE(K)", "(seq_k×d_head) → (seq_k×d_head)", ("K",))]
    if block.chunk:
        return steps + chunked_steps(block, positional)
    scale_title = {"none": "scaled = scores (no scale)"}.get(block.scale_text, f"scaled = scores · {block.scale_text}")
    if positional == "alibi":
        scale_title += " + ALiBi"
    steps += [
        Step("qk", "attn.hook_qk", "scores = Q·Kᵀ", "(seq_q×d_head)·(d_head×seq_k) → (seq_q×seq_k)", ("Q", "K")),
        Step("scaled", "attn.hook_scaled", scale_title, "(seq_q×seq_k) → (seq_q×seq_k)", ("scores",)),
    ]
    if block.masked:
        steps.append(Step("mask", "attn.hook_mask", "mask (True = may attend)", "(seq_q×seq_k)"))
    steps += [
        Step("attn_scores", "attn.hook_attn_scores",
             "masked = where(mask, scaled, −∞)" if block.masked else "masked = scaled (no mask)",
             "(seq_q×seq_k) → (seq_q×seq_k)", ("scaled", "mask") if block.masked else ("scaled",)),
        Step("pattern", "attn.hook_pattern", "weights = softmax(masked) over seq_k",
             "(seq_q×seq_k) → (seq_q×seq_k), rows sum to 1", ("masked",)),
        Step("z", "attn.hook_z", "z = weights·V", "(seq_q×seq_k)·(seq_k×d_v) → (seq_q×d_v)", ("weights", "V")),
        Step("z_concat", "attn.hook_z_concat", "concat heads",
             "(seq_q×n_heads×d_v) → (seq_q×n_heads·d_v)", ("z",)),
        Step("out", "hook_attn_out", f"out = concat·W_o{wt}" if block.has_w_o else "out = concat (no W_o)",
             "(seq_q×n_heads·d_v)·(n_heads·d_v×d_out) → (seq_q×d_out)" if block.has_w_o else
             "(seq_q×n_heads·d_v) → (seq_q×d_out), d_out = n_heads·d_v",
             ("concat", "W_o") if block.has_w_o else ("concat",)),
    ]
    return steps


def chunked_steps(block: BlockPlan, positional: str) -> List[Step]:
    """Attention by online softmax over key blocks: the weights are never materialised; the running
    max m, sum l and output acc of one query row are traced after every block (FlashAttention)."""
    wt = "ᵀ" if block.layout == "linear" else ""
    scores = f"s = Q·Kᵀ · {block.scale_text}" + (" + ALiBi" if positional == "alibi" else "") + \
        (", masked" if block.masked else "")
    row = "the last query" if block.chunk_row == -1 else f"query {block.chunk_row}"
    return [
        Step("block_max", "attn.hook_block_max", f"m = running max of {scores} over blocks of {block.chunk} keys "
             f"({row})", "(seq_q×seq_k in blocks of k) → (k_blocks)", ("Q", "K")),
        Step("block_sum", "attn.hook_block_sum", "l = l·e^(m_old − m) + Σ_block e^(s − m)",
             "(k_blocks)", ("scores",)),
        Step("block_out", "attn.hook_block_out", "acc = acc·e^(m_old − m) + Σ_block e^(s − m)·V",
             "(k_blocks×d_v)", ("scores", "V")),
        Step("z", "attn.hook_z", "z = acc / l (= softmax(s)·V, the weights never held)",
             "(seq_q×seq_k)·(seq_k×d_v) → (seq_q×d_v), by blocks", ("acc", "l")),
        Step("z_concat", "attn.hook_z_concat", "concat heads", "(seq_q×n_heads×d_v) → (seq_q×n_heads·d_v)", ("z",)),
        Step("out", "hook_attn_out", f"out = concat·W_o{wt}" if block.has_w_o else "out = concat (no W_o)",
             "(seq_q×n_heads·d_v)·(n_heads·d_v×d_out) → (seq_q×d_out)" if block.has_w_o else
             "(seq_q×n_heads·d_v) → (seq_q×d_out)", ("concat", "W_o") if block.has_w_o else ("concat",)),
    ]


_NORM_NAMES = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}
_RESIDUAL_RULE = "(seq×d_model) + (seq×d_model) → (seq×d_model)"
_NORM_RULE = "(seq×d_model) → (seq×d_model), per token"


def _norm_step(key: str, hook: str, kind: str, source: str) -> Step:
    return Step(key, hook, f"X = {_NORM_NAMES[kind]}({source})", _NORM_RULE, (source,))


def block_steps(block: BlockPlan, layer: int, *, cross: bool, positional: str) -> List[Step]:
    """One transformer block's steps in execution order; its last step is the block's output."""
    if block.placement == "none":
        return attention_steps(block, cross=cross, positional=positional)
    pre, post = block.placement == "pre", block.placement == "post"
    source = "embeddings" if layer == 0 else f"block {layer - 1}"
    steps = [Step("resid_pre", "hook_resid_pre", f"resid_pre = the output of {source}", "(seq×d_model)")]
    if pre and block.ln1:
        steps.append(_norm_step("ln1", "ln1.hook_normalized", block.ln1, "resid_pre"))
    steps += attention_steps(block, cross=cross, positional=positional)
    if block.residual:
        steps.append(Step("resid_mid", "hook_resid_mid", "resid_mid = resid_pre + attn_out", _RESIDUAL_RULE,
                          ("resid_pre", "out")))
    if post and block.ln1:
        steps.append(_norm_step("ln1", "ln1.hook_normalized", block.ln1, "resid_mid"))
    if block.mlp:
        mlp_in = "X"
        if pre and block.ln2:
            steps.append(_norm_step("ln2", "ln2.hook_normalized", block.ln2, "resid_mid"))
        if block.mlp == "gated":
            steps += [Step("mlp_pre", "mlp.hook_pre", f"pre = {mlp_in}·W_gate",
                           "(seq×d_model)·(d_model×d_mlp) → (seq×d_mlp)", (mlp_in, "W_gate")),
                      Step("mlp_post", "mlp.hook_post", f"post = {block.activation}(pre) ⊙ {mlp_in}·W_up",
                           "(seq×d_mlp) ⊙ (seq×d_mlp) → (seq×d_mlp)", ("pre", "W_up")),
                      Step("mlp_out", "hook_mlp_out", "mlp_out = post·W_down",
                           "(seq×d_mlp)·(d_mlp×d_model) → (seq×d_model)", ("post", "W_down"))]
        else:
            steps += [Step("mlp_pre", "mlp.hook_pre", f"pre = {mlp_in}·W_in + b_in",
                           "(seq×d_model)·(d_model×d_mlp) → (seq×d_mlp)", (mlp_in, "W_in")),
                      Step("mlp_post", "mlp.hook_post", f"post = {block.activation}(pre)",
                           "(seq×d_mlp) → (seq×d_mlp)", ("pre",)),
                      Step("mlp_out", "hook_mlp_out", "mlp_out = post·W_out + b_out",
                           "(seq×d_mlp)·(d_mlp×d_model) → (seq×d_model)", ("post", "W_out"))]
        if block.residual:
            base = "ln1" if post and block.ln1 else "resid_mid"
            steps.append(Step("resid_post", "hook_resid_post", f"resid_post = {base} + mlp_out", _RESIDUAL_RULE,
                              (base, "mlp_out")))
        if post and block.ln2:
            steps.append(_norm_step("ln2", "ln2.hook_normalized", block.ln2, "resid_post"))
    for step in steps:
        step.layer = layer
    return steps


def build_plan(*, batch: Dim, seq_q: Dim, seq_k: Dim, d_model: Dim, n_heads: Dim, n_kv_heads: Dim,
               d_head: Dim, d_v: Dim, d_out: Dim, cross: bool = False, masked: bool = False,
               positional: str = "none", scale: float = 1.0, scale_text: str = "1/√d_head",
               has_w_o: bool = True, layout: str = "x_at_w", blocks: Optional[List[BlockPlan]] = None,
               d_mlp: Optional[Dim] = None, embed_norm: Optional[str] = None,
               final_norm: Optional[str] = None, named: Optional[bool] = None) -> Plan:
    """Lay out the steps for the given sizes and options.

    Without `blocks`: one attention layer with the given options (short hook names).
    With `blocks`: transformer blocks (hooks named blocks.L.* unless `named` is False: the one
    block of a single-attention spec)."""
    named = blocks is not None if named is None else named
    if blocks is None:
        blocks = [BlockPlan(scale=scale, scale_text=scale_text, layout=layout, masked=masked, has_w_o=has_w_o)]
    steps: List[Step] = [Step("embed", "hook_embed", "X = embeddings", "(seq_q×d_model)")]
    if positional in ("sinusoidal", "learned"):
        steps.append(Step("pos", "hook_pos_embed", f"X = X + PE ({positional})",
                          "(seq_q×d_model) + (seq_q×d_model) → (seq_q×d_model)", ("X", "PE")))
    if embed_norm:
        steps.append(_norm_step("embed_norm", "embed.ln.hook_normalized", embed_norm, "X"))
    if cross:
        steps.append(Step("encoder_embed", "hook_encoder_embed", "X_enc = encoder embeddings",
                          "(seq_k×d_model)"))
    for layer, block in enumerate(blocks):
        for step in block_steps(block, layer, cross=cross, positional=positional):
            step.layer = layer
            step.hook = full_name(step.hook, layer if named else None)
            steps.append(step)
    if final_norm:
        steps.append(_norm_step("ln_final", "ln_final.hook_normalized", final_norm, "resid"))
    for number, step in enumerate(steps, start=1):
        step.number, step.total = number, len(steps)
    dims = {d.name: d for d in (batch, seq_q, seq_k, d_model, n_heads, n_kv_heads, d_head, d_v, d_out, d_mlp)
            if d is not None}
    return Plan(dims=dims, steps=steps, blocks=blocks, cross=cross, positional=positional, named_blocks=named)


def plan_from_sizes(*, seq: int, d_model: int, heads: int, batch: int = 1, kv_heads: Optional[int] = None,
                    d_head: Optional[int] = None, d_v: Optional[int] = None, seq_k: Optional[int] = None,
                    masked: bool = False, positional: str = "none", has_w_o: bool = True) -> Plan:
    """A plan from sizes alone (``explain-shapes`` flags).  Sizes must be consistent."""
    d_head_bound = "--d-head" if d_head else "d_model / heads"
    d_head = d_head or d_model // heads
    flag = "--{}".format
    return build_plan(
        batch=Dim("batch", batch, flag("batch")), seq_q=Dim("seq_q", seq, flag("seq")),
        seq_k=Dim("seq_k", seq_k or seq, flag("seq-k") if seq_k else flag("seq")),
        d_model=Dim("d_model", d_model, flag("d-model")), n_heads=Dim("n_heads", heads, flag("heads")),
        n_kv_heads=Dim("n_kv_heads", kv_heads or heads, flag("kv-heads") if kv_heads else flag("heads")),
        d_head=Dim("d_head", d_head, d_head_bound),
        d_v=Dim("d_v", d_v or d_head, flag("d-v") if d_v else "d_head"),
        d_out=Dim("d_out", d_model, flag("d-model")),
        cross=seq_k is not None, masked=masked, positional=positional,
        scale=(d_head ** -0.5), has_w_o=has_w_o)


def output_width(weight_shape: Sequence[int], layout: str) -> int:
    """Columns produced by a projection: W is (in, out) for x_at_w, (out, in) for linear."""
    if len(weight_shape) < 2:
        return weight_shape[-1] if weight_shape else 0
    return weight_shape[-1] if layout == "x_at_w" else weight_shape[-2]


def plan_from_spec(spec, chunk: Optional[int] = None, chunk_row: Optional[int] = None) -> Plan:
    """Bind every axis size from the spec's arrays, remembering which field bound it.

    Binding never fails: when arrays disagree, the first source wins and
    :func:`attntrace.analysis.diagnose.preflight` reports the conflict against it.
    In a spec of blocks the sizes come from the first block; the diagnosis
    checks every other block against them.  chunk: key blocks for online softmax in
    every block (0: none, whatever the spec says; None: as the spec says).
    """
    att = spec.attention_of(0)
    where = "blocks[0].attention" if spec.is_model else "attention"
    X = spec.source.embeddings
    loc = spec.locate
    batch = Dim("batch", X.shape[0] if X.data.ndim == 3 else 1, "embeddings (batch axis)", X.location)
    seq_q = Dim("seq_q", len(spec.tokens), "tokens", spec.source.tokens_location)
    d_model = Dim("d_model", X.shape[-1], "embeddings (columns)", X.location)
    if spec.encoder is not None:
        seq_k = Dim("seq_k", len(spec.encoder.tokens), "encoder.tokens", spec.encoder.tokens_location)
    else:
        seq_k = Dim("seq_k", seq_q.size, "tokens (self-attention: seq_k = seq_q)", seq_q.location)
    n_heads = Dim("n_heads", att.heads, f"{where}.heads", att.locations.get("heads", att.locations["attention"]))
    kv = att.kv_heads or att.heads
    n_kv_heads = Dim("n_kv_heads", kv, f"{where}.kv_heads" if att.kv_heads else f"{where}.heads (no kv_heads)",
                     att.locations.get("kv_heads", n_heads.location))
    side = "columns" if att.layout == "x_at_w" else "rows (layout: linear)"
    if att.d_head:
        d_head = Dim("d_head", att.d_head, f"{where}.d_head", att.locations.get("d_head"))
    else:
        d_head = Dim("d_head", max(output_width(att.W_q.shape, att.layout) // att.heads, 1),
                     f"W_q {side} / heads", att.W_q.location)
    d_v = Dim("d_v", max(output_width(att.W_v.shape, att.layout) // kv, 1), f"W_v {side} / kv heads",
              att.W_v.location)
    if att.W_o is not None:
        d_out = Dim("d_out", output_width(att.W_o.shape, att.layout), f"W_o {side}", att.W_o.location)
    else:
        d_out = Dim("d_out", att.heads * d_v.size, "n_heads·d_v (no W_o)", loc(where.split(".")))
    blocks = [block_plan(block, d_head.size, chunk, chunk_row) for block in spec.blocks]
    d_mlp = None
    mlp = next((b.mlp for b in spec.blocks if b.mlp is not None), None)
    if mlp is not None:
        first = mlp.get("W_gate") or mlp.get("W_in")
        d_mlp = Dim("d_mlp", output_width(first.shape, mlp.layout), f"{first.name} "
                    f"{'columns' if mlp.layout == 'x_at_w' else 'rows (layout: linear)'}", first.location)
    return build_plan(batch=batch, seq_q=seq_q, seq_k=seq_k, d_model=d_model, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, d_head=d_head, d_v=d_v, d_out=d_out, cross=spec.is_cross,
                      positional=spec.positional.kind, blocks=blocks, named=spec.is_model,
                      scale=blocks[0].scale, scale_text=blocks[0].scale_text, masked=blocks[0].masked,
                      has_w_o=blocks[0].has_w_o, layout=blocks[0].layout, d_mlp=d_mlp,
                      embed_norm=spec.embed_norm.kind if spec.embed_norm else None,
                      final_norm=spec.final_norm.kind if spec.final_norm else None)


def block_plan(block, d_head: int, chunk: Optional[int] = None, chunk_row: Optional[int] = None) -> BlockPlan:
    """The options of one block of a spec (its attention's scale, layout and mask; norms; MLP)."""
    att = block.attention
    if att.scale == "auto":
        scale, text = (att.d_head or d_head) ** -0.5, "1/√d_head"
    elif att.scale == "none":
        scale, text = 1.0, "none"
    else:
        scale, text = float(att.scale), f"{float(att.scale):g}"
    mlp = block.mlp
    return BlockPlan(scale=scale, scale_text=text, layout=att.layout, masked=not att.mask.is_empty,
                     has_w_o=att.W_o is not None, placement=block.placement,
                     ln1=block.ln1.kind if block.ln1 else None, ln2=block.ln2.kind if block.ln2 else None,
                     mlp=None if mlp is None else ("gated" if mlp.gated else "plain"),
                     activation=mlp.activation if mlp else "gelu", residual=block.residual,
                     chunk=None if chunk == 0 else (chunk or att.chunk),
                     chunk_row=-1 if chunk_row is None else chunk_row)
