"""A capture check as rich text: hook by hook, the first divergence, the bug that reproduces it.

``render_capture_report(report)`` returns one renderable; the ``attntrace check``
command prints it (and ``report.to_json()`` for ``--format json``).
"""
from __future__ import annotations

import math
from typing import List

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_STATUS = {
    "match": ("✓ match", "green"),
    "first divergence": ("✗ first divergence", "bold red"),
    "consequence": ("↳ consequence", "yellow"),
    "diverges": ("✗ diverges too", "red"),
    "shape differs": ("✗ shape differs", "bold red"),
    "not compared": ("· not compared", "dim"),
}


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.2g}" if value < 1e-3 else f"{value:.3g}"


def _cell(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                         ("inf" if value > 0 else "-inf"))


def _shape(shape) -> str:
    return "×".join(str(s) for s in shape) if shape else ""


def hooks_table(part) -> Table:
    """One row per captured hook, in the order attention computes them."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for heading, justify in (("step", "right"), ("hook", "left"), ("status", "left"), ("max abs", "right"),
                             ("max rel", "right"), ("captured as", "left")):
        table.add_column(heading, justify=justify, no_wrap=True)
    for h in part.hooks:
        label, style = _STATUS[h.status]
        marker = "▶ " if h is part.first_divergence else ""
        written = h.written_as if h.written_as != h.hook else ""
        captured = " ".join(bit for bit in (written, _shape(h.shape), f"({h.source})") if bit)
        numbers = h.compared and h.status != "shape differs"
        table.add_row(Text(marker + (h.step.split(" ")[0] if h.step else ""), style="bold" if marker else ""),
                      Text(h.hook, style="magenta"), Text(label, style=style),
                      _number(h.max_abs) if numbers else "-", _number(h.max_rel) if numbers else "-",
                      Text(captured + (f" · {h.reason}" if h.status in ("not compared", "shape differs") else ""),
                           style="dim"))
    return table


def first_row_table(check) -> Table:
    """The row that holds the first diverging cell, yours above the reference."""
    first = check.first
    table = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
    table.add_column(escape(first["row_axis"]), no_wrap=True)
    for i in range(len(first["row_captured"])):
        table.add_column(str(i), justify="right", no_wrap=True)
    marked = list(first["index"].values())[-1]
    for label, values in (("yours", first["row_captured"]), ("reference", first["row_expected"])):
        table.add_row(label, *[Text(_short(v), style="bold red" if i == marked else "")
                               for i, v in enumerate(values)])
    return table


def _short(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else _cell(value)


def _bug_panel(match, first_hook, title: str, colour: str) -> Panel:
    lines: List[Text] = [Text(match.sentence(first_hook))]
    for name, fix in zip(match.bugs, match.fixes):
        lines.append(Text.assemble(("fix  ", "bold"), (f"{name}: ", "cyan"), fix))
    for report in match.seen_in:
        lines.append(Text.assemble(("seen in  ", "dim"), report))
    return Panel(Group(*lines), title=title, title_align="left", border_style=colour, expand=False)


def part_renderable(part) -> Group:
    items: List = [Text.assemble(("part ", "dim"), (part.part or "(the captured module)", "bold"), "  ",
                                 part.description),
                   Text(f"tolerance ({part.dtype}): |yours − reference| ≤ {part.atol:g} + {part.rtol:g} × the hook's "
                        "largest |reference| value; reference: attntrace in float64 on your inputs and weights",
                        style="dim"),
                   hooks_table(part)]
    first = part.first_divergence
    if part.matches:
        items.append(Text.assemble(("✓ ", "bold green"), part.summary()))
        return Group(*items)
    items.append(Text.assemble(("✗ differs", "bold red"), f": first divergence at step {first.step} ({first.hook})"
                               if first and first.step else ""))
    if first is not None and first.first:
        cell = first.first
        where = ", ".join(f"{axis} {i}" for axis, i in cell["index"].items())
        items.append(Text(f"first diverging cell: {where} — yours {_cell(cell['captured'])}, reference "
                          f"{_cell(cell['expected'])}; its row:"))
        items.append(first_row_table(first))
    elif first is not None:
        items.append(Text(first.reason, style="red"))
    for match in part.bugs:
        items.append(_bug_panel(match, first.hook if first else None, "the bug", "red"))
    if not part.bugs:
        items.append(Text(f"no catalogue bug reproduces your numbers (tried {part.tried.get('bugs', 0)} bugs that can "
                          f"show here and {part.tried.get('pairs', 0)} pairs of them)", style="yellow"))
        if part.closest is not None:
            items.append(_bug_panel(part.closest, first.hook if first else None, "closest (partial, not a match)",
                                    "yellow"))
    return Group(*items)


def render_capture_report(report) -> Group:
    """The whole check: header, each attention part, what is not yet comparable, the capture's warnings."""
    producer = report.producer or {}
    made = ", ".join(f"{k} {v}" for k, v in producer.items() if v)
    items: List = [Text.assemble(("capture ", "dim"), (report.path, "bold"), "  ", report.name,
                                 (f"  ({report.module})", "dim"), (f"  written by {made}" if made else "", "dim"))]
    for part in report.parts:
        items.append(part_renderable(part))
    for entry in report.not_comparable:
        items.append(Text.assemble(("not yet comparable ", "yellow"), (entry["part"], "bold"), f": {entry['reason']}"))
    for note in report.notes:
        items.append(Text.assemble((f"{note.code} ", "yellow"), note.message,
                                   (f"  hint: {note.hint}" if note.hint else "", "dim")))
    verdict = Text.assemble(("✓ matches", "bold green") if report.ok else ("✗ differs", "bold red"),
                            f"  exit {report.exit_code}")
    items.append(verdict)
    return Group(*items)
