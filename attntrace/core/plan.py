"""The plan: the steps of attention with named axes, sizes only, no arrays.

A plan knows every step's hook, formula, shape rule and the size of every
named axis together with where that size was bound (a YAML field or a CLI
flag).  ``explain-shapes`` renders a plan from flags alone; the diagnosis
checks a spec's arrays against it before numpy ever runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from attntrace.errors import Location
from attntrace.hookpoints import HOOKS_BY_NAME, HookPoint


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
    key: str                             # engine step name: "q", "qk", "pattern" ...
    hook: str
    title: str                           # "scores = Q·Kᵀ"
    rule: str                            # "(seq_q×d_head)·(d_head×seq_k) → (seq_q×seq_k)"
    inputs: Tuple[str, ...] = ()         # names of the operands, for display
    number: int = 0                      # 1-based, set by the plan
    total: int = 0

    @property
    def point(self) -> HookPoint:
        return HOOKS_BY_NAME[self.hook]

    @property
    def axes(self) -> Tuple[str, ...]:
        return self.point.axes

    @property
    def label(self) -> str:
        return f"{self.number}/{self.total} '{self.title}'"


@dataclass
class Plan:
    dims: Dict[str, Dim]
    steps: List[Step]
    cross: bool = False
    masked: bool = False
    positional: str = "none"
    scale: float = 1.0
    scale_text: str = "1/√d_head"
    has_w_o: bool = True
    layout: str = "x_at_w"

    def size(self, axis: str) -> int:
        if axis == "1":
            return 1
        if axis == "n_heads·d_v":
            return self.size("n_heads") * self.size("d_v")
        return self.dims[axis].size

    def shape(self, axes: Sequence[str]) -> Tuple[int, ...]:
        return tuple(self.size(a) for a in axes)

    def step(self, key: str) -> Step:
        for step in self.steps:
            if step.key == key:
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
        b, h, q, k = d("batch"), d("n_heads"), d("seq_q"), d("seq_k")
        per_step = {
            "embed": 0, "encoder_embed": 0, "mask": 0,
            "pos": b * q * d("d_model"),
            "q": 2 * b * q * d("d_model") * h * d("d_head"),
            "k": 2 * b * k * d("d_model") * d("n_kv_heads") * d("d_head"),
            "v": 2 * b * k * d("d_model") * d("n_kv_heads") * d("d_v"),
            "rot_q": 3 * b * q * h * d("d_head"),
            "rot_k": 3 * b * k * d("n_kv_heads") * d("d_head"),
            "qk": 2 * b * h * q * k * d("d_head"),
            "scaled": (2 if self.positional == "alibi" else 1) * b * h * q * k,   # ALiBi adds a bias
            "attn_scores": b * h * q * k if self.masked else 0,                   # one select per score
            "pattern": 5 * b * h * q * k,          # max, subtract, exp, sum, divide
            "z": 2 * b * h * q * k * d("d_v"),
            "z_concat": 0,
            "out": 2 * b * q * h * d("d_v") * d("d_out") if self.has_w_o else 0,
        }
        return per_step[step.key]

    def result_bytes(self, step: Step, itemsize: int = 8) -> int:
        shape = self.shape(step.axes)
        n = 1
        for s in shape:
            n *= s
        return n * (1 if step.key == "mask" else itemsize)


def build_plan(*, batch: Dim, seq_q: Dim, seq_k: Dim, d_model: Dim, n_heads: Dim, n_kv_heads: Dim,
               d_head: Dim, d_v: Dim, d_out: Dim, cross: bool = False, masked: bool = False,
               positional: str = "none", scale: float = 1.0, scale_text: str = "1/√d_head",
               has_w_o: bool = True, layout: str = "x_at_w") -> Plan:
    """Lay out the steps for the given sizes and options."""
    wt = "ᵀ" if layout == "linear" else ""
    src_k = "X_enc" if cross else "X"
    steps: List[Step] = [Step("embed", "hook_embed", "X = embeddings", "(seq_q×d_model)")]
    if positional in ("sinusoidal", "learned"):
        steps.append(Step("pos", "hook_pos_embed", f"X = X + PE ({positional})",
                          "(seq_q×d_model) + (seq_q×d_model) → (seq_q×d_model)", ("X", "PE")))
    if cross:
        steps.append(Step("encoder_embed", "hook_encoder_embed", "X_enc = encoder embeddings",
                          "(seq_k×d_model)"))
    steps += [
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
    scale_title = {"none": "scaled = scores (no scale)"}.get(scale_text, f"scaled = scores · {scale_text}")
    if positional == "alibi":
        scale_title += " + ALiBi"
    steps += [
        Step("qk", "attn.hook_qk", "scores = Q·Kᵀ", "(seq_q×d_head)·(d_head×seq_k) → (seq_q×seq_k)", ("Q", "K")),
        Step("scaled", "attn.hook_scaled", scale_title, "(seq_q×seq_k) → (seq_q×seq_k)", ("scores",)),
    ]
    if masked:
        steps.append(Step("mask", "attn.hook_mask", "mask (True = may attend)", "(seq_q×seq_k)"))
    steps += [
        Step("attn_scores", "attn.hook_attn_scores",
             "masked = where(mask, scaled, −∞)" if masked else "masked = scaled (no mask)",
             "(seq_q×seq_k) → (seq_q×seq_k)", ("scaled", "mask") if masked else ("scaled",)),
        Step("pattern", "attn.hook_pattern", "weights = softmax(masked) over seq_k",
             "(seq_q×seq_k) → (seq_q×seq_k), rows sum to 1", ("masked",)),
        Step("z", "attn.hook_z", "z = weights·V", "(seq_q×seq_k)·(seq_k×d_v) → (seq_q×d_v)", ("weights", "V")),
        Step("z_concat", "attn.hook_z_concat", "concat heads",
             "(seq_q×n_heads×d_v) → (seq_q×n_heads·d_v)", ("z",)),
        Step("out", "hook_attn_out", f"out = concat·W_o{wt}" if has_w_o else "out = concat (no W_o)",
             "(seq_q×n_heads·d_v)·(n_heads·d_v×d_out) → (seq_q×d_out)" if has_w_o else
             "(seq_q×n_heads·d_v) → (seq_q×d_out), d_out = n_heads·d_v", ("concat", "W_o") if has_w_o else ("concat",)),
    ]
    for number, step in enumerate(steps, start=1):
        step.number, step.total = number, len(steps)
    dims = {d.name: d for d in (batch, seq_q, seq_k, d_model, n_heads, n_kv_heads, d_head, d_v, d_out)}
    return Plan(dims=dims, steps=steps, cross=cross, masked=masked, positional=positional, scale=scale,
                scale_text=scale_text, has_w_o=has_w_o, layout=layout)


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


def plan_from_spec(spec) -> Plan:
    """Bind every axis size from the spec's arrays, remembering which field bound it.

    Binding never fails: when arrays disagree, the first source wins and
    :func:`attntrace.diagnose.preflight` reports the conflict against it.
    """
    att = spec.attention
    X = spec.source.embeddings
    loc = spec.locate
    batch = Dim("batch", X.shape[0] if X.data.ndim == 3 else 1, "embeddings (batch axis)", X.location)
    seq_q = Dim("seq_q", len(spec.tokens), "tokens", spec.source.tokens_location)
    d_model = Dim("d_model", X.shape[-1], "embeddings (columns)", X.location)
    if spec.encoder is not None:
        seq_k = Dim("seq_k", len(spec.encoder.tokens), "encoder.tokens", spec.encoder.tokens_location)
    else:
        seq_k = Dim("seq_k", seq_q.size, "tokens (self-attention: seq_k = seq_q)", seq_q.location)
    n_heads = Dim("n_heads", att.heads, "attention.heads", att.locations.get("heads", att.locations["attention"]))
    kv = att.kv_heads or att.heads
    n_kv_heads = Dim("n_kv_heads", kv, "attention.kv_heads" if att.kv_heads else "attention.heads (no kv_heads)",
                     att.locations.get("kv_heads", n_heads.location))
    side = "columns" if att.layout == "x_at_w" else "rows (layout: linear)"
    if att.d_head:
        d_head = Dim("d_head", att.d_head, "attention.d_head", att.locations.get("d_head"))
    else:
        d_head = Dim("d_head", max(output_width(att.W_q.shape, att.layout) // att.heads, 1),
                     f"W_q {side} / heads", att.W_q.location)
    d_v = Dim("d_v", max(output_width(att.W_v.shape, att.layout) // kv, 1), f"W_v {side} / kv heads",
              att.W_v.location)
    if att.W_o is not None:
        d_out = Dim("d_out", output_width(att.W_o.shape, att.layout), f"W_o {side}", att.W_o.location)
    else:
        d_out = Dim("d_out", att.heads * d_v.size, "n_heads·d_v (no W_o)", loc(["attention"]))
    if att.scale == "auto":
        scale, text = d_head.size ** -0.5, "1/√d_head"
    elif att.scale == "none":
        scale, text = 1.0, "none"
    else:
        scale, text = float(att.scale), f"{float(att.scale):g}"
    return build_plan(batch=batch, seq_q=seq_q, seq_k=seq_k, d_model=d_model, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, d_head=d_head, d_v=d_v, d_out=d_out, cross=spec.is_cross,
                      masked=not att.mask.is_empty, positional=spec.positional.kind, scale=scale,
                      scale_text=text, has_w_o=att.W_o is not None, layout=att.layout)
