"""One matrix as a rich table: token labels, heat colours, numpy-style elision."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from rich import box
from rich.style import Style
from rich.table import Table
from rich.text import Text

# Sequential palette for weights (0 → 1) and a diverging one for signed values.
_LOW, _HIGH = (242, 246, 252), (8, 69, 148)
_NEG, _MID, _POS = (178, 24, 43), (247, 247, 247), (33, 102, 172)


def _mix(a, b, t: float):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def heat_style(value: float, lo: float, hi: float, diverging: bool) -> Style:
    if not np.isfinite(value):
        return Style(color="grey50")
    if diverging:
        extent = max(abs(lo), abs(hi)) or 1.0
        t = value / extent
        rgb = _mix(_MID, _POS, t) if t >= 0 else _mix(_MID, _NEG, -t)
        dark = abs(t) > 0.55
    else:
        t = 0.0 if hi == lo else (value - lo) / (hi - lo)
        rgb = _mix(_LOW, _HIGH, t)
        dark = t > 0.5
    return Style(bgcolor=f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", color="white" if dark else "black")


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


def _gap_after(indices: np.ndarray, position: int) -> bool:
    """True where elided rows/columns sit between this index and the next shown one."""
    return position + 1 < len(indices) and indices[position + 1] != indices[position] + 1


def matrix_table(view: MatrixView, precision: int) -> Table:
    values = view.values
    finite = values[np.isfinite(values)] if values.dtype != bool else values.astype(float)
    lo, hi = view.value_range or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    table = Table(title=view.title or None, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
                  collapse_padding=True, title_justify="left", title_style="bold", show_edge=False)
    # hand-calculation matrices (all whole numbers) read best without decimals
    if values.dtype != bool and finite.size and np.all(finite == np.round(finite)) and np.abs(finite).max() < 1e9:
        precision = 0
    table.add_column("", style="bold", no_wrap=True)
    for j, label in enumerate(view.col_labels):
        table.add_column(Text(label, style="bold"), justify="right", no_wrap=True)
        if _gap_after(view.cols, j):
            table.add_column("…", justify="center")
    if view.row_sums is not None:
        table.add_column(Text("Σ", style="bold dim"), justify="right")
    if view.row_top is not None:
        table.add_column(Text("max →", style="bold dim"), no_wrap=True)
    for i, label in enumerate(view.row_labels):
        cells = [Text(label)]
        for j in range(values.shape[1]):
            v = values[i, j]
            style = Style() if values.dtype == bool else heat_style(float(v), lo, hi, view.diverging)
            if values.dtype == bool:
                style = Style(color="green" if v else "grey50")
            cells.append(Text(fmt_number(v, precision), style=style))
            if _gap_after(view.cols, j):
                cells.append(Text("…", style="dim"))
        if view.row_sums is not None:
            cells.append(Text(fmt_number(float(view.row_sums[i]), precision), style="dim"))
        if view.row_top is not None:
            cells.append(Text(view.row_top[i], style="dim"))
        table.add_row(*cells)
        if _gap_after(view.rows, i):
            table.add_row(*([Text("⋮", style="dim")] + [Text("⋮", style="dim")] * (len(cells) - 1)))
    return table


_SHADES = " ░▒▓█"


def shade(value: float, lo: float, hi: float) -> str:
    """A block character for a value, so heat survives without colour (NO_COLOR, pipes)."""
    if not np.isfinite(value):
        return "·"
    t = 0.0 if hi == lo else (value - lo) / (hi - lo)
    return _SHADES[min(int(t * len(_SHADES)), len(_SHADES) - 1)] * 2


def heatmap_table(view: MatrixView) -> Table:
    """A compact heatmap: two block characters a cell, labels on both axes (seed 004's grid)."""
    values = view.values.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = view.value_range or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    table = Table(title=view.title or None, box=None, padding=0, pad_edge=False, show_header=False,
                  title_justify="left", title_style="bold")
    table.add_column(no_wrap=True)
    for _ in range(values.shape[1]):
        table.add_column(no_wrap=True)
    for i, label in enumerate(view.row_labels):
        cells = [Text(f"{label} ", style="bold")]
        for j in range(values.shape[1]):
            v = float(values[i, j])
            cells.append(Text(shade(v, lo, hi), style=heat_style(v, lo, hi, view.diverging)))
        table.add_row(*cells)
    return table
