"""Gradients for people (and scripts): each drawn like a forward step, with its check.

A gradient of an activation has that activation's shape and axes, so it is
drawn by the forward step renderers of :mod:`attntrace.render.trace_view`
through a small adapter that answers ``trace.arrays[hook]`` with dL/dhook.
Parameter gradients (dL/dW_q ...) are plain matrices with feature labels.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from rich.console import Group
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from attntrace.core.stats import edge_indices
from attntrace.render.diagnosis import diagnosis_panel
from attntrace.render.json_view import VALUES_LIMIT
from attntrace.render.matrix import MatrixView, fmt_number
from attntrace.render.trace_view import (
    ViewOptions,
    _axis_labels,
    _matrices,
    _stats_line,
    header_renderable,
    matrix_grid,
    named_shape,
)


class GradientsAsForward:
    """What the forward renderers read, with every activation replaced by its gradient."""

    def __init__(self, grads):
        forward = grads.forward
        self.plan, self.spec = forward.plan, forward.spec
        self.arrays = {p.of: grads.grads[p.name] for p in grads.points}
        self.stats = {p.of: grads.stats[p.name] for p in grads.points}
        self.previews: Dict[str, Any] = {}
        self.winners = None


def parameter_shape(point, array: np.ndarray) -> str:
    return "(" + ", ".join(f"{axis}={size}" for axis, size in zip(point.axes, array.shape)) + ")"


def parameter_view(view, point, options: ViewOptions) -> MatrixView:
    """A weight's gradient as one matrix; a bias's as one row."""
    array = view.arrays[point.of]
    matrix = array[None, :] if array.ndim == 1 else array
    axes = (None,) + tuple(point.axes) if array.ndim == 1 else tuple(point.axes)
    n_rows, n_cols = matrix.shape
    rows = edge_indices(n_rows, options.edge) if n_rows > options.max_rows else np.arange(n_rows)
    cols = edge_indices(n_cols, options.edge) if n_cols > options.max_rows else np.arange(n_cols)
    row_labels = [point.of] if axes[0] is None else _axis_labels(view, point.of, axes[0], rows)
    return MatrixView(values=matrix[np.ix_(rows, cols)], row_labels=row_labels,
                      col_labels=_axis_labels(view, point.of, axes[1], cols), rows=rows, cols=cols,
                      full_rows=n_rows, full_cols=n_cols)


def check_line(check) -> Text:
    if check is None:
        return Text("finite differences: not checked", style="dim")
    verdict = ("✓", "green bold") if check.passed else ("✗", "red bold")
    cells = f"{check.checked} of {check.total} cells" if check.checked < check.total else f"all {check.total} cells"
    return Text.assemble(("finite differences ", "dim"), f"max rel error {check.max_rel_error:.1e} ",
                         (f"({cells}, tolerance {check.tolerance:g}) ", "dim"), verdict)


def grad_renderable(view, point, number: int, total: int, check, options: ViewOptions, width: int = 120):
    array = view.arrays[point.of]
    header = Text.assemble((f"∇ {number}/{total}  ", "bold"), (point.title, "bold cyan"),
                           ("   " + point.name, "magenta"))
    shape = parameter_shape(point, array) if point.is_parameter else named_shape(view, point.of)
    body = [header,
            Text.assemble(("shape ", "dim"), shape, ("   formula ", "dim"), point.formula),
            _stats_line(view, point.of, options.precision),
            check_line(check)]
    views = [parameter_view(view, point, options)] if point.is_parameter else list(_matrices(view, point.of, options))
    body.extend(matrix_grid(views, point.of, options, width,
                            "heatmaps: ░ most negative … █ most positive (--head N for numbers)"))
    return Group(*body)


def checks_table(grads, checks: Sequence) -> Table:
    by_name = {c.name: c for c in checks}
    table = Table(title="gradient check: analytic vs central finite differences (float64)", title_justify="left",
                  box=None, pad_edge=False, header_style="bold dim")
    for column, justify in (("gradient", "left"), ("of", "left"), ("shape", "left"), ("max |grad|", "right"),
                            ("max rel error", "right"), ("cells", "right"), ("", "left")):
        table.add_column(column, justify=justify, no_wrap=True)
    for point in grads.points:
        check = by_name.get(point.name)
        if check is None:
            continue
        st = grads.stats[point.name]
        largest = max(abs(st.min), abs(st.max)) if st.min is not None else float("nan")
        table.add_row(point.name, point.title, "×".join(str(s) for s in st.shape), f"{largest:.4g}",
                      f"{check.max_rel_error:.1e}", f"{check.checked}/{check.total}",
                      Text("✓", style="green bold") if check.passed else Text("✗ too large", style="red bold"))
    return table


def summary_line(checks: Sequence, tolerance: float) -> Text:
    failed = [c for c in checks if not c.passed]
    worst = max((c.max_rel_error for c in checks), default=0.0)
    if failed:
        return Text.assemble(("✗ ", "red bold"), f"{len(failed)} of {len(checks)} gradients differ from finite "
                                                f"differences by more than {tolerance:g}: "
                                                + ", ".join(c.name for c in failed))
    return Text.assemble(("✓ ", "green bold"), f"all {len(checks)} gradients match central finite differences "
                                              f"(max rel error {worst:.1e} ≤ {tolerance:g})")


def render_grads(console, grads, checks: Optional[Sequence], options: ViewOptions,
                 shown: Optional[Sequence[str]] = None, tolerance: float = 1e-6, diagnoses: Sequence = ()) -> None:
    """The header, the loss, every gradient (or those in `shown`) in backward order, then the checks."""
    view = GradientsAsForward(grads)
    by_name = {c.name: c for c in checks or ()}
    console.print(header_renderable(grads.forward))
    console.print(Text.assemble(("loss ", "dim"), grads.loss_formula, " = ", fmt_number(grads.loss, options.precision),
                                ("   gradients in backward order, named <hook>_grad", "dim")))
    total = len(grads.points)
    for number, point in enumerate(grads.points, start=1):
        if shown is not None and point.name not in shown:
            continue
        console.print(Rule(style="dim"))
        console.print(grad_renderable(view, point, number, total, by_name.get(point.name), options, console.width))
    console.print(Rule(style="dim"))
    if checks:
        console.print(checks_table(grads, checks))
        console.print(summary_line(checks, tolerance))
    else:
        console.print(Text("gradients not verified (--no-verify)", style="dim"))
    for d in diagnoses:
        console.print(diagnosis_panel(d))
    for note in options.notes:
        console.print(Text(note, style="dim"))


def grads_to_json(grads, checks: Optional[Sequence], exit_code: int, tolerance: float,
                  diagnoses: Sequence = (), notes: Sequence[str] = (),
                  values_limit: int = VALUES_LIMIT) -> Dict[str, Any]:
    """The backward pass as a JSON document (numbers made JSON-safe by render.output.print_json)."""
    forward, by_name = grads.forward, {c.name: c for c in checks or ()}
    entries: List[Dict[str, Any]] = []
    for number, point in enumerate(grads.points, start=1):
        array = grads.grads[point.name]
        entry: Dict[str, Any] = {"number": number, "name": point.name, "of": point.of, "title": point.title,
                                 "formula": point.formula, "axes": list(point.axes), "shape": list(array.shape),
                                 "stats": grads.stats[point.name].to_json()}
        if array.size <= values_limit:
            entry["values"] = array
        check = by_name.get(point.name)
        entry["check"] = check.to_json() if check is not None else None
        entries.append(entry)
    return {
        "attntrace": 1,
        "command": "grad",
        "name": forward.spec.name,
        "exit_code": exit_code,
        "tokens": forward.spec.tokens,
        "key_tokens": forward.spec.key_tokens,
        "dims": {name: dim.size for name, dim in forward.plan.dims.items()},
        "loss": {"kind": grads.loss_kind, "formula": grads.loss_formula, "value": grads.loss},
        "verified": None if checks is None else all(c.passed for c in checks),
        "tolerance": tolerance,
        "gradients": entries,
        "diagnoses": [d.to_json() for d in diagnoses],
        "notes": list(notes),
    }
