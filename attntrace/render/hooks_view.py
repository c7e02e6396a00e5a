"""The hook table of `attntrace hooks` and the list of built-in actions."""
from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text


def render_hooks(console, rows, actions, with_spec: bool) -> None:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title="hook points",
                  title_justify="left", title_style="bold")
    if with_spec:
        table.add_column("step", justify="right")
    table.add_column("hook", no_wrap=True)
    # with a spec the shape names its axes; without, the axes alone
    table.add_column("shape" if with_spec else "axes", no_wrap=not with_spec)
    table.add_column("what", ratio=1)
    table.add_column("aliases", style="dim")
    for row in rows:
        absent = with_spec and not row["in_run"]
        style = "dim" if absent else ""
        cells = [str(row.get("step", ""))] if with_spec else []
        if not with_spec:
            axes = f"({', '.join(row['axes'])})"
        elif absent:
            axes = "not in this run"
        else:
            axes = "(" + ", ".join(f"{a}={s}" for a, s in zip(row["axes"], row["shape"])) + ")"
        cells += [Text(row["hook"], style="dim" if absent else "magenta"), Text(axes, style=style),
                  Text(row["what"], style=style), " ".join(row["aliases"])]
        table.add_row(*cells)
    console.print(table)
    console.print(Text("Names may be aliases (Q, scores, weights ...) or patterns (attn.hook_*).", style="dim"))
    actions_table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                          title="actions: --hook HOOK:ACTION[=ARG]",
                          title_justify="left", title_style="bold")
    for heading in ("action", "argument", "what"):
        actions_table.add_column(heading, no_wrap=heading != "what")
    for action in actions:
        actions_table.add_row(Text(action["action"], style="cyan"), action["argument"], action["what"])
    console.print(actions_table)
