"""One matrix as a rich table: token labels, heat colours, numpy-style elision."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

# Sequential palette for weights (0 → 1) and a diverging one for signed values.
_LOW, _HIGH = (242, 246, 252), (8, 69, 148)
_NEG, _MID, _POS = (178, 24, 43), (247, 247, 247), (33, 102, 172)


def _mix(a, b, t: float):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


_LEVELS = 64      # colour steps per side: finer than the eye tells apart in a terminal


def _position(value: float, lo: float, hi: float) -> float:
    """Where value lies between lo and hi, in [0, 1]; halved first, so ±1e308 ranges do not overflow."""
    span = hi / 2 - lo / 2
    t = (value / 2 - lo / 2) / span if span > 0 else 0.0
    return max(0.0, min(1.0, t)) if t == t else 0.0


def heat_style(value: float, lo: float, hi: float, diverging: bool) -> Style:
    if not np.isfinite(value):
        return _BLOCKED_STYLE
    if diverging:
        extent = max(abs(lo), abs(hi)) or 1.0
        level = round(max(-1.0, min(1.0, value / extent)) * _LEVELS)
    else:
        level = round(_position(value, lo, hi) * _LEVELS)
    return _level_style(level, diverging)


@functools.cache
def _level_style(level: int, diverging: bool) -> Style:
    """One Style per colour level, built once: big traces colour thousands of cells."""
    t = level / _LEVELS
    if diverging:
        rgb = _mix(_MID, _POS, t) if t >= 0 else _mix(_MID, _NEG, -t)
        dark = abs(t) > 0.55
    else:
        rgb = _mix(_LOW, _HIGH, t)
        dark = t > 0.5
    return Style(bgcolor=f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", color="white" if dark else "black")


_BLOCKED_STYLE = Style(color="grey50")


def fmt_number(value: float, precision: int) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "✓" if value else "·"
    if np.isnan(value):
        return "nan"
    if np.isinf(value):
        return "-inf" if value < 0 else "inf"
    if value != 0 and (abs(value) >= 10 ** 6 or abs(value) < 10 ** -precision):
        return f"{value:.{max(precision - 1, 1)}e}"
    return f"{value:.{precision}f}" if value != 0 else "0"


@dataclass
class MatrixView:
    """What to draw: values (already cut to the shown rows/cols) and their labels."""

    values: np.ndarray                 # 2-D
    row_labels: Sequence[str]
    col_labels: Sequence[str]
    rows: np.ndarray                   # original row indices (for elision marks)
    cols: np.ndarray
    full_rows: int
    full_cols: int
    title: str = ""
    diverging: bool = True
    value_range: Optional[tuple] = None   # colour scale; default the shown values' range
    row_sums: Optional[np.ndarray] = None
    row_top: Optional[Sequence[str]] = None   # per row "0.97 → C"
    pooled: Optional[str] = None              # "max" | "mean": values are a grid over token ranges
    row_edges: Optional[np.ndarray] = None    # pooled: cell r covers rows row_edges[r] .. row_edges[r+1]-1
    col_edges: Optional[np.ndarray] = None


def _gap_after(indices: np.ndarray, position: int) -> bool:
    """True where elided rows/columns sit between this index and the next shown one."""
    return position + 1 < len(indices) and indices[position + 1] != indices[position] + 1


def _skipped(indices: np.ndarray, position: int) -> int:
    return int(indices[position + 1] - indices[position] - 1)


def _row_gap(indices: np.ndarray, position: int) -> Text:
    """The line where rows were left out: a visible gap that says how many, never a silent jump."""
    n = _skipped(indices, position)
    return Text(f"⋯ {n} token{'s' if n != 1 else ''} ⋯ ({indices[position] + 1}–{indices[position + 1] - 1} "
                "not shown)", style="dim italic")


def shown_ranges(indices: np.ndarray, total: int) -> str:
    """"0–3, 41–44 of 45": which positions a view shows (all of them: "all 45")."""
    if len(indices) == total:
        return f"all {total}"
    parts, start = [], int(indices[0])
    for a, b in zip(indices, list(indices[1:]) + [None]):
        if b is None or b != a + 1:
            parts.append(f"{start}–{int(a)}" if a != start else str(start))
            if b is not None:
                start = int(b)
    return f"{', '.join(parts)} of {total}"


class Block:
    """Pre-laid lines of styled text with a known width.

    Matrices are laid out by hand rather than with rich.Table: a trace can hold
    hundreds of small matrices and Table's measuring dominated the run time."""

    def __init__(self, lines: List[Text], column_widths: Optional[List[int]] = None):
        self.lines = lines
        self.width = max((line.cell_len for line in lines), default=0)
        self.column_widths = column_widths      # a matrix of numbers: each data column's width (for paging)

    def __rich_console__(self, console, options):
        # the lines are laid out to fit already: rendered as they are, without rich's wrapping
        # pass (half of a toy run's time); a line that does not fit ends in "…", never wraps
        for line in self.lines:
            if line.cell_len > options.max_width:
                line = line.copy()          # the Block may be printed again at another width
                line.truncate(options.max_width, overflow="ellipsis")
            yield from line.render(console)
            yield Segment.line()


def _is_whole(finite: np.ndarray) -> bool:
    return bool(finite.size) and bool(np.all(finite == np.round(finite))) and float(np.abs(finite).max()) < 1e9


def matrix_block(view: MatrixView, precision: int) -> Block:
    """Numbers with heat colours, token labels, numpy-style ⋮ and … where rows/columns are elided."""
    values = view.values
    is_bool = values.dtype == bool
    finite = values.astype(float) if is_bool else values[np.isfinite(values)]
    lo, hi = view.value_range or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    if not is_bool and _is_whole(finite):
        precision = 0          # hand-calculation matrices read best without decimals
    header: List[Text] = [Text("")]
    rows: List[List[Text]] = []
    for j, label in enumerate(view.col_labels):
        header.append(Text(label, style="bold"))
        if _gap_after(view.cols, j):
            header.append(Text(f"⋯{_skipped(view.cols, j)}⋯", style="dim"))
    if view.row_sums is not None:
        header.append(Text("Σ", style="bold dim"))
    if view.row_top is not None:
        header.append(Text("max →", style="bold dim"))
    for i, label in enumerate(view.row_labels):
        cells = [Text(label, style="bold")]
        for j in range(values.shape[1]):
            v = values[i, j]
            style = Style(color="green" if v else "grey50") if is_bool else \
                heat_style(float(v), lo, hi, view.diverging)
            cells.append(Text(fmt_number(v, precision), style=style))
            if _gap_after(view.cols, j):
                cells.append(Text("…", style="dim"))
        if view.row_sums is not None:
            cells.append(Text(fmt_number(float(view.row_sums[i]), precision), style="dim"))
        if view.row_top is not None:
            cells.append(Text(view.row_top[i], style="dim"))
        rows.append(cells)
        if _gap_after(view.rows, i):
            rows.append(_row_gap(view.rows, i))
    widths = [max(row[c].cell_len for row in [header] + rows if not isinstance(row, Text))
              for c in range(len(header))]
    data_widths, c = [], 1
    for j in range(values.shape[1]):
        data_widths.append(widths[c])
        c += 2 if _gap_after(view.cols, j) else 1
    last_text_column = len(header) - 1 if view.row_top is not None else None

    def lay(cells: List[Text]) -> Text:
        line = Text()
        for c, cell in enumerate(cells):
            pad = " " * (widths[c] - cell.cell_len)
            left = c == 0 or c == last_text_column
            line.append_text(Text.assemble(cell, pad) if left else Text.assemble(pad, cell))
            if c < len(cells) - 1:
                line.append("  ")
        return line

    lines = [Text(view.title, style="bold")] if view.title else []
    lines.append(lay(header))
    lines.append(Text("─" * (sum(widths) + 2 * (len(widths) - 1)), style="dim"))
    lines.extend(row if isinstance(row, Text) else lay(row) for row in rows)
    return Block(lines, data_widths)


def side_by_side(blocks: Sequence[Block], width: int, gap: int = 4) -> Block:
    """Blocks packed left to right into rows that fit `width` (a grid of small matrices)."""
    lines: List[Text] = []
    row: List[Block] = []

    def flush():
        if not row:
            return
        height = max(len(b.lines) for b in row)
        for i in range(height):
            line = Text()
            for k, block in enumerate(row):
                part = block.lines[i] if i < len(block.lines) else Text("")
                line.append_text(part)
                if k < len(row) - 1:
                    line.append(" " * (block.width - part.cell_len + gap))
            lines.append(line)
        lines.append(Text(""))
        row.clear()

    used = 0
    for block in blocks:
        if row and used + gap + block.width > width:
            flush()
            used = 0
        used += (gap if row else 0) + block.width
        row.append(block)
    flush()
    return Block(lines[:-1])


_SHADES = " ░▒▓█"


def shade(value: float, lo: float, hi: float) -> str:
    """A block character for a value, so heat survives without colour (NO_COLOR, pipes)."""
    if not np.isfinite(value):
        return "·"
    t = _position(value, lo, hi)
    return _SHADES[min(int(t * len(_SHADES)), len(_SHADES) - 1)] * 2


LABEL_LINES = 4          # key labels are written downwards above a heatmap's columns, this many letters


def _downwards(labels: Sequence[str], lines: int = LABEL_LINES) -> List[List[str]]:
    """Each label as a column of characters (two cells wide each), cut with … past `lines`."""
    columns = []
    for label in labels:
        chars = [c for c in str(label) if c.strip()] or ["·"]
        if len(chars) > lines:
            chars = chars[:lines - 1] + ["…"]
        columns.append(chars + [""] * (lines - len(chars)))
    return columns


def _cell(text: str) -> str:
    return text + " " * max(0, 2 - Text(text).cell_len)


def _range_label(edges: np.ndarray, r: int) -> str:
    first, last = int(edges[r]), int(edges[r + 1]) - 1
    return str(first) if first == last else f"{first}–{last}"


def pooled_block(view: MatrixView) -> Block:
    """The overview of a long sequence: each cell the block max (or mean) over a range of queries
    and keys; rows labelled with their token ranges, a ruler of key positions above."""
    values = view.values.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = view.value_range or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    row_labels = [_range_label(view.row_edges, r) for r in range(values.shape[0])]
    label_width = max(len(label) for label in row_labels)
    q_span = int(np.diff(view.row_edges).max())
    k_span = int(np.diff(view.col_edges).max())
    lines = [Text(view.title, style="bold")] if view.title else []
    lines.append(Text(f"pooled: each cell is the block {view.pooled} over up to {q_span} queries × {k_span} keys "
                      f"(queries 0–{view.full_rows - 1}, keys 0–{view.full_cols - 1}; --full for every cell)",
                      style="dim"))
    ruler = Text(" " * (label_width + 1), style="dim")
    position = 0
    for c in range(values.shape[1]):
        if c * 2 >= position:
            mark = str(int(view.col_edges[c]))
            ruler.append(mark + " " * max(0, 8 - len(mark)), style="dim")
            position = c * 2 + max(8, len(mark))
    lines.append(Text(ruler.plain[:label_width + 1 + 2 * values.shape[1] + 8].rstrip(), style="dim"))
    for r, label in enumerate(row_labels):
        line = Text(label.rjust(label_width) + " ", style="bold")
        for c in range(values.shape[1]):
            v = float(values[r, c])
            line.append(shade(v, lo, hi), style=heat_style(v, lo, hi, view.diverging))
        lines.append(line)
    return Block(lines)


def column_pages(view: MatrixView, width: int, block: Block) -> List[MatrixView]:
    """A matrix wider than the terminal (or --full) split into pages of whole columns ("keys 0–11
    of 45"), as many as fit: numbers by the widths `block` (the whole matrix laid out) gave each
    column, its labels, Σ and "max →" columns on every page; heatmaps at two cells a column."""
    import dataclasses
    if view.pooled:
        return [view]
    n = len(view.cols)
    if block.column_widths is not None:
        widths = [w + 2 for w in block.column_widths]           # each with the gap before the next
    else:
        widths = [2] * n
    room = width - (block.width - sum(widths))
    cuts, start, used = [], 0, 0
    for j, w in enumerate(widths):
        if j > start and used + w > room:
            cuts.append(slice(start, j))
            start, used = j, 0
        used += w
    cuts.append(slice(start, n))
    if len(cuts) == 1:
        return [view]
    title = f"{view.title} · " if view.title else ""
    return [dataclasses.replace(view, values=view.values[:, cut], col_labels=list(view.col_labels)[cut],
                                cols=view.cols[cut], title=f"{title}keys {int(view.cols[cut][0])}–"
                                                           f"{int(view.cols[cut][-1])} of {view.full_cols}")
            for cut in cuts]


def heatmap_block(view: MatrixView) -> Block:
    """A compact heatmap: two block characters a cell, the query tokens down the side, the key
    tokens written downwards on top, and a visible, counted gap wherever rows or columns were left
    out (never a silent jump from the last shown column to a later token)."""
    if view.pooled:
        return pooled_block(view)
    values = view.values.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = view.value_range or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    elided = len(view.rows) < view.full_rows or len(view.cols) < view.full_cols
    row_labels = [f"{int(r)} {label}" if elided else str(label) for r, label in zip(view.rows, view.row_labels)]
    label_width = max(Text(label).cell_len for label in row_labels)
    lines = [Text(view.title, style="bold")] if view.title else []
    if elided:
        lines.append(Text(f"queries {shown_ranges(view.rows, view.full_rows)} · keys "
                          f"{shown_ranges(view.cols, view.full_cols)}", style="dim"))
    downwards = _downwards(view.col_labels)
    for k in range(LABEL_LINES):
        if not any(column[k] for column in downwards):
            break
        line = Text(" " * (label_width + 1), style="dim")
        for j, column in enumerate(downwards):
            line.append(_cell(column[k]), style="dim")
            if _gap_after(view.cols, j):
                line.append("⋯" if k == 0 else " ", style="dim")
        lines.append(line)
    for i, label in enumerate(row_labels):
        line = Text(label + " " * (label_width - Text(label).cell_len + 1), style="bold")
        for j in range(values.shape[1]):
            v = float(values[i, j])
            line.append(shade(v, lo, hi), style=heat_style(v, lo, hi, view.diverging))
            if _gap_after(view.cols, j):
                line.append("┆", style="dim")
        lines.append(line)
        if _gap_after(view.rows, i):
            lines.append(Text(" " * (label_width + 1)) + _row_gap(view.rows, i))
    return Block(lines)
