"""A trace as a JSON document (stable keys; see the README's "JSON output")."""
from __future__ import annotations

from typing import Any, Dict

from attntrace.core.stats import PREVIEW_EDGE, preview
from attntrace.hookpoints import point_of

VALUES_LIMIT = 4096      # hooks with at most this many values carry them in full


def trace_to_json(trace, exit_code: int = 0, values_limit: int = VALUES_LIMIT) -> Dict[str, Any]:
    plan, spec = trace.plan, trace.spec
    steps = []
    for step in plan.steps:
        entry: Dict[str, Any] = {
            "number": step.number, "key": step.key, "hook": step.hook, "title": step.title,
            "rule": step.rule, "axes": list(step.axes), "shape": list(trace.stats[step.hook].shape),
            "stats": trace.stats[step.hook].to_json(),
        }
        array = trace.arrays.get(step.hook)
        if array is not None and array.size <= values_limit:
            entry["values"] = array
        else:
            rows, cols, _ = point_of(step.hook).display
            corner = trace.previews.get(step.hook) or preview(array, rows, cols, PREVIEW_EDGE)
            entry["preview"] = {"row_axis": rows, "col_axis": cols, "rows": corner.rows,
                                "cols": corner.cols, "values": corner.values}
        steps.append(entry)
    document: Dict[str, Any] = {
        "attntrace": 1,
        "name": spec.name,
        "exit_code": exit_code,
        "tokens": spec.tokens,
        "key_tokens": spec.key_tokens,
        "dims": {name: dim.size for name, dim in plan.dims.items()},
        "scale": plan.scale,
        "dtype": trace.dtype,
        "steps": steps,
        "checks_passed": trace.checks_passed,
        "diagnoses": [d.to_json() for d in trace.diagnoses],
    }
    winners = {hook: {"weight": w, "key": k} for hook, (w, k) in trace.winners.items() if w.size <= values_limit}
    if len(trace.winners) == 1 and winners:          # one attention layer: its pattern's winners
        document["pattern_row_max"] = next(iter(winners.values()))
    elif winners:
        document["pattern_row_max"] = winners
    return document
