"""A trace as a JSON document (format 2; the README's "JSON output", schema in schema/).

Hooks are keyed by name (``document["hooks"]["attn.hook_pattern"]``) in step order;
``steps`` lists the names in that order.  How many numbers a hook carries is the
caller's choice (``values``):

    none     shapes, stats and formulas only
    preview  every number of a hook with at most 4,096 of them; a corner preview otherwise
    full     every number of every kept hook, whatever its size
"""
from __future__ import annotations

from typing import Any, Dict

from attntrace.core.stats import PREVIEW_EDGE, preview
from attntrace.hookpoints import point_of

FORMAT = 2
VALUES_LIMIT = 4096      # with values="preview", hooks with at most this many values carry them in full
VALUE_MODES = ("none", "preview", "full")


def hook_entry(trace, step, values: str = "preview") -> Dict[str, Any]:
    """One hook: its step, formula, shape, stats and (per `values`) its numbers or a preview."""
    entry: Dict[str, Any] = {
        "number": step.number, "key": step.key, "layer": step.layer, "title": step.title, "rule": step.rule,
        "axes": list(step.axes), "shape": list(trace.stats[step.hook].shape),
        "stats": trace.stats[step.hook].to_json(),
    }
    if values == "none":
        return entry
    array = trace.arrays.get(step.hook)
    if array is not None and (values == "full" or array.size <= VALUES_LIMIT):
        entry["values"] = array
    else:
        entry["preview"] = preview_entry(trace, step)
    return entry


def preview_entry(trace, step) -> Dict[str, Any]:
    """The corner preview of a hook: its first and last rows and columns."""
    point = point_of(step.hook)
    corner = trace.previews.get(step.hook) or preview(trace.arrays[step.hook], point.rows, point.cols, PREVIEW_EDGE)
    return {"row_axis": point.rows, "col_axis": point.cols, "rows": corner.rows, "cols": corner.cols,
            "values": corner.values}


def trace_header(trace, exit_code: int = 0) -> Dict[str, Any]:
    """Everything but the hooks (exports stream the hooks one at a time after it)."""
    plan, spec = trace.plan, trace.spec
    return {
        "attntrace": FORMAT,
        "name": spec.name,
        "exit_code": exit_code,
        "tokens": spec.tokens,
        "key_tokens": spec.key_tokens,
        "dims": {name: dim.size for name, dim in plan.dims.items()},
        "scale": plan.scale,
        "dtype": trace.dtype,
        "steps": [step.hook for step in plan.steps],
        "checks_passed": trace.checks_passed,
        "diagnoses": [d.to_json() for d in trace.diagnoses],
    }


def trace_to_json(trace, exit_code: int = 0, values: str = "preview") -> Dict[str, Any]:
    document = trace_header(trace, exit_code)
    document["hooks"] = {step.hook: hook_entry(trace, step, values) for step in trace.plan.steps}
    winners = {hook: {"weight": w, "key": k} for hook, (w, k) in trace.winners.items()
               if values == "full" or (values == "preview" and w.size <= VALUES_LIMIT)}
    if winners:
        document["pattern_row_max"] = winners
    return document
