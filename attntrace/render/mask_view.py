"""`attntrace mask` for people and scripts: the grid, one convention, the conventions table,
and (with --apply) the weights before and after.  No math: the picture comes from
:mod:`attntrace.masks`."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from rich.console import Group
from rich.padding import Padding
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from attntrace.core.stats import edge_indices
from attntrace.render.diagnosis import diagnosis_panel
from attntrace.render.matrix import MatrixView, matrix_block, side_by_side

MAX_SHOWN = 24          # beyond this many rows/columns, elide like numpy
EDGE = 8
VALUES_LIMIT = 4096     # JSON carries arrays up to this many values

CONVENTION_TITLES = {
    "allow": "allow convention: 1 = True = may attend (PyTorch SDPA boolean attn_mask)",
    "ignore": "ignore convention: 1 = True = blocked (nn.MultiheadAttention key_padding_mask / attn_mask)",
    "additive": "additive form: 0 = may attend, -inf = blocked (added to the scores before softmax)",
    "additive-1e9": "additive form with -1e9: 0 = may attend, -1e9 = blocked (seed 004's scores + mask·-1e9)",
}


def _indices(n: int) -> np.ndarray:
    return edge_indices(n, EDGE) if n > MAX_SHOWN else np.arange(n)


def _views(picture, values: np.ndarray) -> List[MatrixView]:
    """One view per batch item of a (batch, 1, seq_q, seq_k) array, elided when big."""
    rows, cols = _indices(picture.seq_q), _indices(picture.seq_k)
    views = []
    for b in range(values.shape[0]):
        shown = values[b, 0][np.ix_(rows, cols)]
        views.append(MatrixView(values=shown, row_labels=[picture.query_tokens[i] for i in rows],
                                col_labels=[picture.key_tokens[j] for j in cols], rows=rows, cols=cols,
                                full_rows=picture.seq_q, full_cols=picture.seq_k,
                                title=f"batch item {b}" if values.shape[0] > 1 else "", diverging=False))
    return views


def _tables(picture, values: np.ndarray, precision: int, width: int):
    return side_by_side([matrix_block(view, precision) for view in _views(picture, values)], width)


def _counts_line(picture) -> Text:
    total = picture.batch * picture.seq_q * picture.seq_k
    allowed = int(picture.keep.sum())
    return Text(f"may attend: {allowed} of {total} (query, key) pairs; blocked: {total - allowed}", style="dim")


def _conventions(picture) -> Group:
    from attntrace.analysis.maskinfo import CONVENTION_NOTES
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style="bold cyan")
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for note in CONVENTION_NOTES:
        row = picture.in_convention(note.name)[0, 0, 0]
        shown = " ".join(_cell(v) for v in row[:8]) + (" …" if row.size > 8 else "")
        grid.add_row(note.name, shown, Text.assemble(
            f"may attend = {note.allowed}, blocked = {note.blocked}\n", ("apply: ", "dim"), note.apply,
            ("\nused by: ", "dim"), note.used_by))
    return Group(Text("the same mask in four conventions (query row 0 shown)", style="bold"), grid)


def _cell(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if np.isneginf(value):
        return "-inf"
    return "0" if value == 0 else f"{value:.0e}".replace("e+0", "e")


def _fully_masked_note(seq_k: int) -> Group:
    from attntrace.core.masks import fully_masked_row_outcomes
    outcomes = fully_masked_row_outcomes(seq_k)
    lines = [Text(f"a query row whose every key is blocked ({seq_k} keys), after softmax:", style="bold")]
    for name, row in outcomes.items():
        shown = ", ".join(_weight(v) for v in row[:8]) + (", …" if row.size > 8 else "")
        lines.append(Text(f"  {name:<20} → [{shown}]"))
    lines.append(Padding(Text("-1e9 never gives NaN, but a fully masked row then attends uniformly to every key, "
                              "padding included (and in float16 -1e9 overflows to -inf).  attntrace, like "
                              "PyTorch SDPA's safe softmax, gives zeros and warns (ATT-W203).", style="dim"),
                         (0, 0, 0, 2)))
    return Group(*lines)


def _weight(value: float) -> str:
    return "nan" if np.isnan(value) else f"{value:.2f}"


def _matrix_for_display(values: np.ndarray) -> np.ndarray:
    # 1/0 reads better than ✓/· when the convention gives booleans a meaning of their own
    return values.astype(np.int8) if values.dtype == bool else values


def render_mask(console, picture, diagnoses: Sequence, traces=None, precision: int = 3,
                heads: Optional[Sequence[int]] = None, explicit_convention: bool = False) -> None:
    header = [Text.assemble(("mask ", "dim"), (picture.description, "bold")),
              Text(f"seq_q={picture.seq_q}  seq_k={picture.seq_k}"
                   + (f"  batch={picture.batch}" if picture.batch > 1 else "")
                   + ("   (queries are the last positions: KV-cache decoding)" if picture.seq_q < picture.seq_k else
                      f"   (aligned bottom-right as flash-attn: the first {picture.seq_q - picture.seq_k} queries "
                      "come before every key)" if picture.seq_q > picture.seq_k else ""))]
    console.print(Panel(Group(*header), title="attntrace mask", title_align="left", expand=False))
    console.print(Text("may attend (✓) / blocked (·) — rows: queries, columns: keys", style="bold"))
    console.print(_tables(picture, picture.keep, precision, console.width))
    console.print(_counts_line(picture))
    console.print(Rule(style="dim"))
    console.print(Text(CONVENTION_TITLES[picture.convention], style="bold"))
    console.print(_tables(picture, _matrix_for_display(picture.in_convention()), precision, console.width))
    if not explicit_convention:
        console.print(Rule(style="dim"))
        console.print(_conventions(picture))
        console.print(_fully_masked_note(picture.seq_k))
    if traces is not None:
        _render_before_after(console, traces, precision, heads)
    for d in diagnoses:
        console.print(diagnosis_panel(d))


def _render_before_after(console, traces, precision: int, heads) -> None:
    from attntrace.render.trace_view import ViewOptions, step_renderable
    for label, trace in zip(("before the mask", "after the mask"), traces):
        console.print(Rule(f"{label} · {trace.spec.name}", style="dim"))
        step = trace.plan.step("pattern")
        console.print(step_renderable(trace, step, ViewOptions(heads=heads, precision=precision), console.width))
    console.print(Rule(style="dim"))
    after = traces[1]
    for line in after.checks_passed:
        console.print(Text.assemble(("✓ ", "green bold"), line))
    for d in after.diagnoses:
        console.print(diagnosis_panel(d))


def mask_to_json(picture, diagnoses: Sequence, traces=None) -> Dict[str, Any]:
    from attntrace.analysis.maskinfo import CONVENTION_NOTES
    from attntrace.core.masks import fully_masked_row_outcomes
    document: Dict[str, Any] = {
        "attntrace": 1,
        "command": "mask",
        "exit_code": 0,
        "mask": picture.description,
        "batch": picture.batch, "seq_q": picture.seq_q, "seq_k": picture.seq_k,
        "query_tokens": picture.query_tokens, "key_tokens": picture.key_tokens,
        "keep": picture.keep[:, 0],
        "visible_keys_per_query": picture.visible,
        "convention": picture.convention,
        "in_convention": picture.in_convention()[:, 0],
        "fully_masked_rows": [{"batch": b, "query": q, "token": picture.query_tokens[q]}
                              for b, q in picture.empty_rows],
        "conventions": [{"name": c.name, "may_attend": c.allowed, "blocked": c.blocked, "apply": c.apply,
                         "used_by": c.used_by} for c in CONVENTION_NOTES],
        "fully_masked_row_softmax": fully_masked_row_outcomes(picture.seq_k),
        "diagnoses": [d.to_json() for d in diagnoses],
    }
    if picture.keep.size > VALUES_LIMIT:      # big masks: the summary only
        for key in ("keep", "in_convention"):
            document.pop(key)
        document["elided"] = True
    if traces is not None:
        document["apply"] = {
            "spec": traces[1].spec.name,
            "before": _pattern(traces[0]), "after": _pattern(traces[1]),
            "diagnoses": [d.to_json() for d in traces[1].diagnoses],
        }
    return document


def _pattern(trace) -> Any:
    pattern = trace.arrays.get("attn.hook_pattern")
    return pattern if pattern is not None and pattern.size <= VALUES_LIMIT else None
