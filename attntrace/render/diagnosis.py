"""Diagnoses as rich panels: headline, rule, operand table, bindings, fixes."""
from __future__ import annotations

from typing import List

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


def diagnosis_panel(d) -> Panel:
    error = d.severity == "error"
    colour = "red" if error else "yellow"
    parts: List = [Text(d.message, style="bold")]
    for loc in d.locations[:1] if not d.operands else []:
        parts.append(Text(f"at {loc}", style="cyan"))
    if d.rule:
        parts.append(Text.assemble(("rule  ", "dim"), d.rule))
    if d.operands:
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold dim")
        for column in ("operand", "shape", "axes", "from", "where"):
            table.add_column(column)
        for op in d.operands:
            shape = Text("(")
            for i, size in enumerate(op.shape):
                conflict = op.conflict_axis is not None and (i == op.conflict_axis or i == len(op.shape) + op.conflict_axis)
                shape.append(str(size), style="bold red reverse" if conflict else "")
                if i < len(op.shape) - 1:
                    shape.append("×")
            shape.append(")")
            axes = Text("(" + ", ".join(op.axes) + ")") if op.axes else Text("")
            where = f"{op.location.file}:{op.location.line}" if op.location and op.location.line else ""
            table.add_row(op.name, shape, axes, op.origin, where)
        parts.append(table)
    if d.bindings:
        parts.append(Text("sizes bound by: " + "; ".join(d.bindings), style="dim"))
    for line in d.details:
        parts.append(Text(line))
    for fix in d.fixes:
        parts.append(Text.assemble(("fix  ", "green bold"), fix))
    if d.hint:
        parts.append(Text.assemble(("hint ", "cyan bold"), d.hint))
    title = f"{d.code} {'error' if error else 'warning'}"
    if d.hook:
        title += f" · {d.hook}"
    return Panel(Group(*parts), title=title, title_align="left", border_style=colour, expand=False)


def render_diagnoses(console, diagnoses) -> None:
    for d in diagnoses:
        console.print(diagnosis_panel(d))
