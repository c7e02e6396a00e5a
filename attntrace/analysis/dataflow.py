"""The data flow of a plan: every step's operands and result as named and numeric shapes,
with the FLOPs and bytes of its result.  Sizes only, no arrays: this is what
``attntrace explain-shapes`` shows, and it is instant for any size.

Also validates the sizes given as flags (``--seq 0`` or ``--heads 5`` with
``--d-model 512`` are bad input, exit 2) before a plan is built from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from attntrace.core.plan import Plan, Step, plan_from_sizes
from attntrace.errors import Diagnosis, InputError
from attntrace.hookpoints import HOOKS_BY_NAME, PARAMETERS_BY_NAME, SYMBOLS, parameter_axes

ITEMSIZE = {"float64": 8, "float32": 4}

# axes shown only when they carry information
_QUIET_WHEN_ONE = ("batch", "1")


def operand_axes(plan: Plan, name: str) -> Tuple[str, ...]:
    """Named axes of an operand of a step (X, W_q, Q, scores, ...)."""
    if name in PARAMETERS_BY_NAME:
        return parameter_axes(name, plan.layout)
    if name == "PE":
        return ("seq_q", "d_model")
    if name in SYMBOLS:
        return HOOKS_BY_NAME[SYMBOLS[name]].axes
    step = next((s for s in plan.steps if s.key == name), None)    # a block's operands: resid_pre, ln1 ...
    if step is not None:
        return step.axes
    return _MLP_WEIGHT_AXES.get(name, ())


_MLP_WEIGHT_AXES = {"W_in": ("d_model", "d_mlp"), "W_gate": ("d_model", "d_mlp"), "W_up": ("d_model", "d_mlp"),
                    "W_out": ("d_mlp", "d_model"), "W_down": ("d_mlp", "d_model")}


def axis_size(plan: Plan, axis: str) -> int:
    """The size of a named axis; a product axis such as `n_heads·d_head` multiplies its parts."""
    size = 1
    for part in axis.split("·"):
        size *= plan.size(part)
    return size


def shown_axes(plan: Plan, axes: Sequence[str]) -> List[str]:
    """Axes without the batch / broadcast axes that are 1 (as the spec is written by hand)."""
    return [a for a in axes if not (a in _QUIET_WHEN_ONE and axis_size(plan, a) == 1)]


def axis_label(plan: Plan, axis: str, keep_seq_names: bool = False) -> str:
    """`seq` for seq_q/seq_k in self-attention, where they are the same axis (except on scores)."""
    if not plan.cross and not keep_seq_names and axis in ("seq_q", "seq_k"):
        return "seq"
    return axis


@dataclass
class Shape:
    """A shape as named axes and as numbers."""

    axes: Tuple[str, ...]
    sizes: Tuple[int, ...]

    @property
    def named(self) -> str:
        return "(" + ", ".join(self.axes) + ")"

    @property
    def numbers(self) -> str:
        return "×".join(str(s) for s in self.sizes) if self.sizes else "scalar"

    def to_json(self) -> Dict[str, Any]:
        return {"axes": list(self.axes), "shape": list(self.sizes)}


def shape_of(plan: Plan, axes: Sequence[str], keep_seq_names: bool = False) -> Shape:
    visible = shown_axes(plan, axes)
    return Shape(tuple(axis_label(plan, a, keep_seq_names) for a in visible),
                 tuple(axis_size(plan, a) for a in visible))


@dataclass
class FlowStep:
    """One step of the data flow."""

    step: Step
    inputs: List[Tuple[str, Shape]]
    output: Shape
    flops: int
    bytes: int

    def to_json(self) -> Dict[str, Any]:
        return {
            "number": self.step.number, "key": self.step.key, "hook": self.step.hook,
            "title": self.step.title, "rule": self.step.rule,
            "inputs": [dict(name=name, **shape.to_json()) for name, shape in self.inputs],
            "output": self.output.to_json(), "flops": self.flops, "bytes": self.bytes,
        }


@dataclass
class Flow:
    plan: Plan
    steps: List[FlowStep]
    dtype: str = "float64"
    notes: List[str] = field(default_factory=list)
    memory: Optional[Any] = None        # analysis.run.MemoryOutlook: what a run of this plan would need

    @property
    def total_flops(self) -> int:
        return sum(s.flops for s in self.steps)

    @property
    def peak_bytes(self) -> int:
        """The largest single result (the engine reuses score buffers in place)."""
        return max((s.bytes for s in self.steps), default=0)

    def to_json(self) -> Dict[str, Any]:
        plan = self.plan
        return {
            "dims": {name: {"size": d.size, "bound_by": d.bound_by,
                            "location": d.location.to_json() if d.location else None}
                     for name, d in plan.dims.items()},
            "scale": plan.scale, "scale_text": plan.scale_text, "layout": plan.layout,
            "masked": plan.masked, "positional": plan.positional, "cross": plan.cross,
            "dtype": self.dtype, "steps": [s.to_json() for s in self.steps],
            "total_flops": self.total_flops, "peak_result_bytes": self.peak_bytes,
            "notes": list(self.notes),
            "memory": self.memory.to_json() if self.memory is not None else None,
        }


_SCORE_OPERANDS = ("scores", "scaled", "mask", "masked", "weights")


def describe_flow(plan: Plan, dtype: str = "float64", memory=None) -> Flow:
    """Every step with its operands' and result's shapes, FLOPs and result bytes."""
    itemsize = ITEMSIZE[dtype]
    steps = []
    for step in plan.steps:
        scores_step = step.point.axes[-2:] == ("seq_q", "seq_k")
        inputs = [(name, shape_of(plan, operand_axes(plan, name), name in _SCORE_OPERANDS))
                  for name in step.inputs]
        steps.append(FlowStep(step, inputs, shape_of(plan, step.axes, scores_step),
                              plan.flops(step), plan.result_bytes(step, itemsize)))
    flow = Flow(plan, steps, dtype, memory=memory)
    if plan.size("batch") == 1:
        flow.notes.append("batch = 1: the batch axis is not shown")
    return flow


# --------------------------------------------------------------------------- flags

def _bad_flag(code: str, message: str, hint: Optional[str] = None) -> InputError:
    return InputError(Diagnosis(code=code, message=message, hint=hint))


def plan_for_flags(*, seq: int, d_model: int, heads: int, batch: int = 1, kv_heads: Optional[int] = None,
                   d_head: Optional[int] = None, d_v: Optional[int] = None, seq_k: Optional[int] = None,
                   masked: bool = False, positional: str = "none", has_w_o: bool = True) -> Plan:
    """A plan from explain-shapes flags, after checking they describe a possible attention."""
    given = {"--seq": seq, "--d-model": d_model, "--heads": heads, "--batch": batch, "--kv-heads": kv_heads,
             "--d-head": d_head, "--d-v": d_v, "--seq-k": seq_k}
    for flag, value in given.items():
        if value is not None and value < 1:
            raise _bad_flag("ATT-E030", f"{flag} {value}: a size must be a whole number ≥ 1")
    if d_head is None and d_model % heads:
        below = max(h for h in range(1, heads + 1) if d_model % h == 0)
        above = next(h for h in range(heads + 1, d_model + 1) if d_model % h == 0) if heads < d_model else None
        options = f"--heads {below}" + (f" or --heads {above}" if above else "")
        raise _bad_flag("ATT-E031", f"--d-model {d_model} does not split into --heads {heads}: "
                                    f"{d_model} = {heads}×{d_model // heads} + {d_model % heads}, "
                                    f"so d_head = d_model / heads is not a whole number",
                        hint=f"use {options}, or give --d-head (projections may be wider or narrower "
                             f"than d_model)")
    kv = kv_heads or heads
    if heads % kv:
        divisors = [k for k in range(1, heads + 1) if heads % k == 0]
        raise _bad_flag("ATT-E032", f"--kv-heads {kv} does not divide --heads {heads}: grouped-query "
                                    f"attention shares each kv head among heads / kv_heads query heads",
                        hint=f"--kv-heads is one of {', '.join(map(str, divisors))}")
    if positional == "rope" and (d_head or d_model // heads) % 2:
        raise _bad_flag("ATT-E033", f"RoPE rotates pairs of features; d_head={d_head or d_model // heads} is odd",
                        hint="choose an even d_head, or another --positional")
    return plan_from_sizes(seq=seq, d_model=d_model, heads=heads, batch=batch, kv_heads=kv_heads,
                           d_head=d_head, d_v=d_v, seq_k=seq_k, masked=masked, positional=positional,
                           has_w_o=has_w_o)
