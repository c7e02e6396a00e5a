"""The head finder's table: every layer × head with its scores, ranked, and a sparkline of where it looks."""
from __future__ import annotations

import math

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from attntrace.analysis.heads import SCORE_INFO, SCORES

SHORT = {"entropy": "ent", "entropy_norm": "ent%", "max_weight": "maxw", "sink": "sink",
         "sep": "sep", "previous_token": "prev", "same_token": "self", "distance": "dist",
         "duplicate_token": "dup", "induction": "ind"}


def _cell(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def heads_table(report) -> Group:
    scores = report.scores
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True,
                  title=f"heads ranked by {report.sort} ({SCORE_INFO[report.sort]})", title_justify="left",
                  title_style="bold")
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("head", justify="right", no_wrap=True)
    for name in SCORES:
        table.add_column(SHORT[name], justify="right", no_wrap=True, min_width=4,
                         style="bold" if name == report.sort else "")
    table.add_column("keys −8…+8", no_wrap=True, min_width=17)
    for ranked in report.ranked:
        values = scores.head(ranked.layer, ranked.head)
        table.add_row(str(ranked.layer), str(ranked.head), *(_cell(values[name]) for name in SCORES),
                      Text(scores.sparkline(ranked.layer, ranked.head), style="cyan"))
    parts = [table]
    for name in SCORES:
        parts.append(Text(f"{SHORT[name]:>5}  {SCORE_INFO[name]}", style="dim"))
    parts.append(Text("keys −8…+8: the mean weight at each key offset j − i (middle: the query itself)",
                      style="dim"))
    for name, how in report.how.items():
        parts.append(Text(f"{SHORT[name]}: {how}", style="dim"))
    for note in scores.notes:
        parts.append(Text(note, style="dim"))
    shown = len(report.ranked)
    total = scores.n_layers * scores.n_heads
    if shown < total:
        parts.append(Text(f"{shown} of {total} heads shown (--top)", style="dim"))
    return Group(*parts)
