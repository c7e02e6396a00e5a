"""Two traces side by side: one line per hook, then the cells of the first divergence."""
from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from attntrace.analysis.expect import number
from attntrace.text import format_shape


def _status(h) -> Text:
    if not h.comparable:
        return Text(f"shape {format_shape(h.shape_a)} vs {format_shape(h.shape_b)}", style="bold red")
    if h.same:
        return Text("same", style="green")
    return Text(f"{h.differing}/{h.cells}", style="red")


def pair(a: float, b: float) -> str:
    """a → b, with enough digits to tell them apart."""
    left, right = number(a), number(b)
    if left == right:
        left, right = f"{a:.12g}", f"{b:.12g}"
    return f"{left} → {right}"


def hooks_table(report) -> Table:
    first = report.first_divergence
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for heading, justify in (("step", "right"), ("hook", "left"), ("differ", "left"), ("max |a-b|", "right"),
                             ("max rel", "right"), ("worst cell: a → b", "left")):
        table.add_column(heading, justify=justify, no_wrap=True)
    for h in report.hooks:
        worst = h.top[0] if h.top else None
        marker = "▶ " if h is first else ""
        table.add_row(Text(marker + h.title.split(" ")[0], style="bold" if marker else ""),
                      Text(h.hook, style="magenta"), _status(h),
                      f"{h.max_abs:.3g}" if h.comparable else "-", f"{h.max_rel:.3g}" if h.comparable else "-",
                      f"{worst.label} {pair(worst.a, worst.b)}" if worst else "")
    return table


def top_cells_table(h) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for heading, justify in (("cell", "left"), ("a", "right"), ("b", "right"), ("|a-b|", "right")):
        table.add_column(heading, justify=justify, no_wrap=True)
    for cell in h.top:
        a, b = pair(cell.a, cell.b).split(" → ")
        table.add_row(cell.label, a, b, f"{cell.abs_diff:.3g}")
    return table


def render_diff(console, report) -> None:
    console.print(Text.assemble(("a ", "bold"), f"{report.a.source or report.a.name}  ({report.a.name})"))
    console.print(Text.assemble(("b ", "bold"), f"{report.b.source or report.b.name}  ({report.b.name})"))
    console.print(hooks_table(report))
    for side, names in (("a", report.only_a), ("b", report.only_b)):
        if names:
            console.print(Text(f"only in {side}: {', '.join(names)}", style="yellow"))
    first = report.first_divergence
    tolerance = f"(differ: |a-b| > {report.atol:g} + {report.rtol:g}·max(|a|, |b|))"
    if first is None:
        console.print(Text.assemble(("✓ ", "green bold"), f"the traces agree on all {len(report.hooks)} "
                                    "common hook(s) ", (tolerance, "dim")))
        return
    console.print(Text.assemble(("✗ ", "red bold"), "first divergence: step ", (first.title, "bold"),
                                f" ({first.hook}) ", (tolerance, "dim")))
    if first.top:
        console.print(Text(f"cells that differ most in {first.hook}:", style="bold"))
        console.print(top_cells_table(first))
