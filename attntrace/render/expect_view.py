"""A hand calculation against the truth, cell by cell (`attntrace check`, `run` with `expect:`).

Matching cells show the written value; a mismatching cell shows
``written ≠ true`` in red, or in yellow with ``↳`` when it only carries an
earlier divergence forward.
"""
from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from attntrace.analysis.expect import number, tolerance_text
from attntrace.core.stats import edge_indices
from attntrace.render.diagnosis import diagnosis_panel

MAX_SHOWN = 12      # rows / columns before eliding like numpy
EDGE = 4


def _cell_text(grid, i: int, j: int) -> Text:
    written, true = grid.written[i, j], grid.true[i, j]
    if grid.close[i, j]:
        return Text(number(written), style="green")
    if grid.carried[i, j]:
        return Text(f"↳ {number(written)} ≠ {number(true)}", style="yellow")
    return Text(f"{number(written)} ≠ {number(true)}", style="bold red reverse")


def row_table(grid) -> Table:
    """One written row, listed down the page: label, written, true."""
    # titles as Text: a token such as "[CLS]" or "[/b]" is not rich markup
    table = Table(title=Text(grid.row_labels[0]) if grid.row_labels[0] else None, box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False, show_edge=False, title_justify="left", title_style="bold")
    for heading, justify in (("", "left"), ("written", "right"), ("true", "right"), ("", "left")):
        table.add_column(Text(heading, style="bold"), justify=justify, no_wrap=True)
    for j, label in enumerate(grid.col_labels):
        ok, carried = bool(grid.close[0, j]), bool(grid.carried[0, j])
        mark = Text("✓", style="green") if ok else Text("↳ carried over", style="yellow") if carried \
            else Text("✗", style="bold red")
        style = "green" if ok else "yellow" if carried else "bold red"
        table.add_row(Text(label, style="bold"), Text(number(grid.written[0, j]), style=style),
                      Text(number(grid.true[0, j])), mark)
    return table


def grid_table(grid) -> Table:
    if grid.written.shape[0] == 1 and grid.written.shape[1] > 1:
        return row_table(grid)
    table = Table(title=Text(grid.title) if grid.title else None, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
                  show_edge=False, title_justify="left", title_style="bold")
    n_rows, n_cols = grid.written.shape
    rows = edge_indices(n_rows, EDGE) if n_rows > MAX_SHOWN else range(n_rows)
    cols = list(edge_indices(n_cols, EDGE) if n_cols > MAX_SHOWN else range(n_cols))
    table.add_column("", style="bold", no_wrap=True)
    for j in cols:
        table.add_column(Text(grid.col_labels[j], style="bold"), justify="right", no_wrap=True)
    for i in rows:
        cells = [Text(grid.row_labels[i])]
        cells.extend(_cell_text(grid, i, j) for j in cols)
        table.add_row(*cells)
    if n_rows > MAX_SHOWN or n_cols > MAX_SHOWN:
        table.caption = f"showing {len(rows)} of {n_rows} rows, {len(cols)} of {n_cols} columns"
    return table


def comparison_heading(comparison, spec_tolerance) -> Text:
    c = comparison
    where = f"  step {c.step.number} {c.hook}  "
    own = "" if c.tolerance == spec_tolerance else f"  ({tolerance_text(c.tolerance)})"
    if c.ok:
        return Text.assemble(("✓ ", "green bold"), (c.what, "bold"), (where, "dim"),
                             f"{c.written.size} cell(s) match", (own, "dim"))
    new = len(c.new_mismatches)
    carried = len(c.mismatches) - new
    summary = f"{len(c.mismatches)} of {c.written.size} cell(s) differ"
    if carried:
        summary += f" ({carried} carried over" + (f", {new} new)" if new else ")")
    return Text.assemble(("✗ ", "red bold"), (c.what, "bold"), (where, "dim"), (summary, "red"), (own, "dim"))


def render_expectations(console, report, show_all: bool = False) -> None:
    """Every expectation: a heading, and the cell table when it differs (or always with show_all)."""
    spec_tolerance = report.spec.tolerance if report.spec is not None else {}
    console.print(Text.assemble(("Hand calculation vs attention", "bold"),
                                (f"   tolerance: {tolerance_text(spec_tolerance)}", "dim")))
    for comparison in report.comparisons:
        console.print(comparison_heading(comparison, spec_tolerance))
        if show_all or not comparison.ok:
            for grid in comparison.grids():
                console.print(grid_table(grid))
    diagnosis = report.diagnosis()
    if diagnosis is not None:
        console.print(diagnosis_panel(diagnosis))
        return
    cells = sum(c.written.size for c in report.comparisons)
    console.print(Text.assemble(("✓ ", "green bold"), f"the hand calculation matches: {len(report.comparisons)} "
                                f"expectation(s), {cells} cell(s)"))
