"""`attntrace positions` for people and scripts: a heatmap of the encoding and its waves
as terminal line plots (seed 004 draws both with matplotlib).  No math here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from attntrace.render.matrix import MatrixView, fmt_number, heatmap_block

PLOT_HEIGHT = 7
MAX_HEATMAP_ROWS = 64
VALUES_LIMIT = 16384
WAVE_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red")


@dataclass
class PositionsPicture:
    kind: str
    seq: int
    d_model: int
    base: float
    heads: int
    formula: str
    table: np.ndarray               # (seq, d_model), or (heads, seq) for ALiBi
    wave_index: List[int]           # features (heads for ALiBi) whose waves are drawn
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def by_head(self) -> bool:
        return self.kind == "alibi"

    def wave(self, index: int) -> np.ndarray:
        return self.table[index] if self.by_head else self.table[:, index]


def line_plot(values: np.ndarray, height: int = PLOT_HEIGHT, style: str = "cyan") -> List[Text]:
    """One character per point, `height` rows, the y range labelled on the left."""
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo or 1.0
    levels = np.rint((values - lo) / span * (height - 1)).astype(int)
    labels = [_axis_label(hi), _axis_label((hi + lo) / 2), _axis_label(lo)]
    label_width = max(len(label) for label in labels)
    lines = []
    for row in range(height - 1, -1, -1):
        label = labels[0] if row == height - 1 else labels[2] if row == 0 else \
            labels[1] if row == (height - 1) // 2 else ""
        line = Text(f"{label:>{label_width}} ┤", style="dim")
        for level in levels:
            line.append("●" if level == row else " ", style=style)
        lines.append(line)
    lines.append(Text(" " * label_width + " └" + "─" * len(values), style="dim"))
    return lines


def _axis_label(value: float) -> str:
    return "0" if abs(value) < 5e-4 else f"{value:.3g}"


def _heatmap(picture: PositionsPicture, width: int) -> Group:
    table = picture.table
    rows = np.arange(min(table.shape[0], MAX_HEATMAP_ROWS))
    label_width = len(str(rows[-1])) + 1
    fit = max((width - label_width) // 2, 1)          # two characters a cell
    cols = np.arange(min(table.shape[1], fit))
    if picture.by_head:
        labels = [f"h{h}" for h in rows]
        what = f"heads × keys: bias a query at position {picture.seq - 1} gives each key"
    else:
        labels, what = [str(r) for r in rows], "positions (rows) × features (columns)"
    note = f"{what}; ░ low … █ high, range {fmt_number(float(table.min()), 3)} … {fmt_number(float(table.max()), 3)}"
    if len(cols) < table.shape[1]:
        note += f"; showing columns 0–{cols[-1]} of {table.shape[1]} (--width for more)"
    if len(rows) < table.shape[0]:
        note += f"; showing rows 0–{rows[-1]} of {table.shape[0]}"
    view = MatrixView(values=table[np.ix_(rows, cols)], row_labels=labels, col_labels=[str(c) for c in cols], rows=rows,
                      cols=cols, full_rows=table.shape[0], full_cols=table.shape[1], diverging=True)
    return Group(Text(note, style="bold"), heatmap_block(view))


def _waves(picture: PositionsPicture, width: int) -> Group:
    parts: List = []
    axis = "key position" if picture.by_head else "position"
    for n, index in enumerate(picture.wave_index):
        name = f"head {index}" if picture.by_head else f"dim={index}"
        colour = WAVE_COLOURS[n % len(WAVE_COLOURS)]
        wave = picture.wave(index)
        stride = -(-len(wave) // max(width - 12, 10))     # one column a point, fitted to the width
        every = f", one point in {stride}" if stride > 1 else ""
        parts.append(Text(f"{name} over {axis} 0 … {len(wave) - 1}{every}", style=f"bold {colour}"))
        parts.extend(line_plot(wave[::stride], style=colour))
    return Group(*parts)


def _extras(picture: PositionsPicture) -> List[Text]:
    extras = picture.extras
    lines = []
    if "source" in extras:
        lines.append(Text.assemble(("table ", "dim"), extras["source"]))
    if picture.kind == "rope":
        lines.append(Text.assemble(("pairing ", "dim"), (extras["pairing"], "bold"), f": {extras['pairing_note']}"))
        lines.append(Text.assemble(("other   ", "dim"), f"{extras['other_pairing']}: {extras['other_pairing_note']} "
                                   f"(--pairing {extras['other_pairing']})"))
        freqs = extras["frequencies"]
        lines.append(Text.assemble(("theta_i ", "dim"), ", ".join(fmt_number(float(f), 4) for f in freqs[:6])
                                   + (", …" if len(freqs) > 6 else "")))
        lines.append(Text.assemble(("check   ", "dim"), "q_m·k_n depends only on m − n: moving both positions "
                                   f"by 3 and 17 changes it by {extras['relative_check']:.1e}"))
    if picture.kind == "alibi":
        slopes = extras["slopes"]
        lines.append(Text.assemble(("slopes  ", "dim"), ", ".join(f"h{h}: {s:.6g}" for h, s in enumerate(slopes[:8]))
                                   + (", …" if len(slopes) > 8 else "")))
    return lines


def render_positions(console, picture: PositionsPicture) -> None:
    size = f"seq={picture.seq}  " + (f"heads={picture.heads}" if picture.by_head else
                                     f"{'d_head' if picture.kind == 'rope' else 'd_model'}={picture.d_model}")
    if picture.kind in ("sinusoidal", "rope"):
        size += f"  base={picture.base:g}"
    header = [Text(size), Text.assemble(("formula ", "dim"), picture.formula)] + _extras(picture)
    console.print(Panel(Group(*header), title=f"attntrace positions · {picture.kind}", title_align="left",
                        expand=False))
    if picture.kind == "rope":
        console.print(Text("cos of the rotation angle of every feature (the two features of a pair share it)",
                           style="dim"))
    console.print(_heatmap(picture, console.width))
    console.print(_waves(picture, console.width))


def positions_to_json(picture: PositionsPicture) -> Dict[str, Any]:
    document: Dict[str, Any] = {
        "attntrace": 1, "command": "positions", "exit_code": 0, "kind": picture.kind, "seq": picture.seq,
        "d_model": picture.d_model, "base": picture.base, "formula": picture.formula,
        "table_axes": ["head", "key"] if picture.by_head else ["position", "feature"],
        "table": picture.table if picture.table.size <= VALUES_LIMIT else None,
        "waves": {str(i): picture.wave(i) for i in picture.wave_index},
    }
    if picture.by_head:
        document["heads"] = picture.heads
    document.update(picture.extras)
    return document
