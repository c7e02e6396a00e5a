"""Diagnoses as rich panels: headline, rule, operand table, bindings, fixes."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from attntrace.hookpoints import split_name
from attntrace.text import ranges


def diagnosis_panel(d, also: str = "") -> Panel:
    colour = {"error": "red", "warning": "yellow"}.get(d.severity, "blue")
    # the headline: `ATT-E101 shape mismatch in step 4/10 'scores = Q·Kᵀ': ...`
    head, _, rest = d.message.partition(": ")
    if not (d.step and rest and d.step in head):
        head, rest = d.message, ""
    parts: List = [Text.assemble((d.code + " ", f"bold {colour}"), (head, "bold"))]
    if rest:
        parts.append(Text(rest))
    for loc in d.locations[:1] if not d.operands else []:
        parts.append(Text(f"at {loc}", style="cyan"))
    if d.operands and d.locations:     # every YAML place involved, operands and derived ones alike
        parts.append(Text.assemble(("yaml  ", "dim"), ("; ".join(
            f"{Path(loc.file).name if loc.file else '<spec>'}:{loc.line} {loc.path}".rstrip()
            for loc in d.locations), "cyan")))
    if d.rule:
        parts.append(Text.assemble(("rule  ", "dim"), d.rule))
    if d.operands:
        from rich.table import Table  # only shape errors draw one: rich.table (and fractions) cost ~5 ms
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold dim")
        for column in ("operand", "shape", "axes", "from", "where"):
            table.add_column(column)
        for op in d.operands:
            # the conflicting axis is marked ⟨…⟩ (readable without colour) and highlighted
            def conflict(i, op=op):
                return op.conflict_axis is not None and i in (op.conflict_axis, len(op.shape) + op.conflict_axis)
            shape = Text("(")
            for i, size in enumerate(op.shape):
                shape.append(f"⟨{size}⟩" if conflict(i) else str(size), style="bold red reverse" if conflict(i) else "")
                if i < len(op.shape) - 1:
                    shape.append("×")
            shape.append(")")
            axes = Text("")
            if op.axes:
                axes.append("(")
                for i, name in enumerate(op.axes):
                    axes.append(f"⟨{name}⟩" if conflict(i) else name, style="bold red" if conflict(i) else "")
                    if i < len(op.axes) - 1:
                        axes.append(", ")
                axes.append(")")
            where = f"{Path(op.location.file).name if op.location.file else '<spec>'}:{op.location.line}" \
                if op.location and op.location.line else ""
            table.add_row(op.name, shape, axes, op.origin, where)
        parts.append(table)
    if d.bindings:
        parts.append(Text("sizes bound by:", style="dim"))
        parts.extend(Text("  " + binding, style="dim") for binding in d.bindings)
    for line in d.details:
        parts.append(Text(line))
    for fix in d.fixes:
        parts.append(Text.assemble(("fix  ", "green bold"), fix))
    if d.hint:
        parts.append(Text.assemble(("hint ", "cyan bold"), d.hint))
    title = d.severity if d.severity in ("error", "warning") else "note"
    if d.hook:
        title += f" · {d.hook}"
    title += also
    return Panel(Group(*parts), title=Text(title), title_align="left", border_style=colour, expand=False)


_HEAD = re.compile(r"\bhead (\d+)")


def grouped(diagnoses) -> List[Tuple[object, int, List[int], List[int]]]:
    """Repeated findings told once: (first diagnosis, how many, heads, layers) for each code and
    hook point, so twelve heads with the same warning read "ATT-W203 on heads 0–11"."""
    groups: Dict[Tuple, List] = {}
    for d in diagnoses:
        layer, local = split_name(d.hook) if d.hook else (None, None)
        groups.setdefault((d.code, d.severity, local, d.message if local is None else ""), []).append(d)
    out = []
    for members in groups.values():
        heads = sorted({h for d in members for h in ([d.head] if d.head is not None else
                                                     [int(m) for m in _HEAD.findall(d.message)])})
        layers = sorted({split_name(d.hook)[0] for d in members if d.hook and split_name(d.hook)[0] is not None})
        out.append((members[0], len(members), heads, layers))
    return out


def group_title(count: int, heads: List[int], layers: List[int]) -> str:
    if count < 2:
        return ""
    where = []
    if len(heads) > 1:
        where.append(f"heads {ranges(heads)}")
    if len(layers) > 1:
        where.append(f"layers {ranges(layers)}")
    return f" · ×{count}" + (f" on {' in '.join(where)}" if where else "")


def note_line(d) -> Text:
    """An information note (ATT-Ixxx) on one line: what and, briefly, which."""
    which = f" ({', '.join(d.details[:3])}{' …' if len(d.details) > 3 else ''})" if d.details else ""
    return Text.assemble(("note ", "blue bold"), (d.code + " ", "blue"), (d.message + which, "dim"))


def render_diagnoses(console, diagnoses) -> None:
    for d in diagnoses:
        console.print(diagnosis_panel(d))
