"""The bug catalogue and the verdict of a run with a bug injected, for people and for JSON."""
from __future__ import annotations

from typing import Dict, List

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_STATUS_STYLE = {"caught": "green", "cannot show": "dim", "not caught": "bold red"}


def catalogue_table(bugs) -> Table:
    """One bug per row: name, then what it does, where it was seen, and, dimmed, what it replaces,
    what catches it, when it can show and how to fix it."""
    table = Table(box=None, pad_edge=False, header_style="bold", show_lines=False, padding=(0, 2, 1, 0))
    table.add_column("bug", no_wrap=True)
    table.add_column("what it does · seen in · replaces · caught by · can show when · fix", overflow="fold")
    for bug in bugs:
        parts = [bug.description, "\n"]
        if bug.seen_in:
            parts += [("seen in ", "dim"), (", ".join(bug.seen_in), "yellow"), "\n"]
        parts.append((f"replaces {', '.join(bug.steps)} · caught by {', '.join(bug.caught_by)} · "
                      f"shows when {bug.needs}", "dim"))
        if bug.fix:
            parts += ["\n", ("fix ", "dim"), (bug.fix, "green")]
        table.add_row(Text(bug.name, style="bold cyan"), Text.assemble(*parts))
    return table


def verdict_panel(verdict) -> Panel:
    bug = verdict.bug
    colour = _STATUS_STYLE[verdict.status]
    lines = [Text.assemble(("injected  ", "bold"), (bug.name, "bold cyan"), f" — {bug.description}"),
             Text.assemble(("replaces  ", "dim"), ", ".join(bug.steps))]
    if bug.seen_in:
        lines.append(Text.assemble(("seen in   ", "dim"), (", ".join(bug.seen_in), "yellow")))
    lines.append(Text.assemble(("verdict   ", "bold"), (verdict.summary(), colour)))
    for d in verdict.shape_error + verdict.caught:
        lines.append(Text(f"  {d.code} ({d.severity}) at step {d.step}" if d.step else f"  {d.code}", style="dim"))
    if verdict.fix_summary():
        lines.append(Text.assemble(("fix       ", "bold"), verdict.fix_summary()))
    return Panel(Group(*lines), title="--inject", title_align="left", border_style=colour.split()[-1], expand=False)


def verdicts_table(verdicts) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("bug", "status", "caught by", "why not / how"):
        table.add_column(column, overflow="fold")
    for v in verdicts:
        reason = v.cannot_show if v.status == "cannot show" else (
            "shape error before numpy ran" if v.shape_error else
            ("rerun with --check all" if v.status == "not caught" and v.missed_expensive else ""))
        table.add_row(Text(v.bug.name, style="cyan"), Text(v.status, style=_STATUS_STYLE[v.status]),
                      ", ".join(v.codes), reason or "")
    return table


def shape_error_document(verdict, exit_code: int) -> Dict:
    return {"exit_code": exit_code, "diagnoses": [d.to_json() for d in verdict.shape_error],
            "injected": verdict.to_json()}


def render_shape_error(console, verdict) -> None:
    """A bug that broke the shapes: its diagnosis, then what was injected."""
    from attntrace.render.diagnosis import render_diagnoses
    render_diagnoses(console, verdict.shape_error)
    console.print(verdict_panel(verdict))


def verdicts_document(verdicts: List, spec_name: str, exit_code: int) -> Dict:
    return {"exit_code": exit_code, "spec": spec_name, "bugs": [v.to_json() for v in verdicts]}
