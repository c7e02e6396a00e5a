"""A trace for people: each step with its formula, named shape, range and matrices."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.console import Group
from rich.panel import Panel
from rich.rule import Rule
from rich.text import Text

from attntrace.core.stats import POOL_CELLS, coarsen_columns, edge_indices, pool
from attntrace.hookpoints import point_of, split_name
from attntrace.render.diagnosis import diagnosis_panel, group_title, grouped, note_line
from attntrace.render.matrix import MatrixView, column_pages, fmt_number, heatmap_block, matrix_block, side_by_side

LABEL_CELLS = 16        # the widest a token label is drawn (see _label)
SCORE_HOOKS = {"attn.hook_qk", "attn.hook_scaled", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_mask"}


@dataclass
class ViewOptions:
    steps: Optional[Sequence[str]] = None    # hook names to show; None = all
    layers: Optional[Sequence[int]] = None   # blocks to show; None = all (the embeddings are always shown)
    heads: Optional[Sequence[int]] = None    # head indices to show; None = all
    batch: Optional[int] = None              # batch item; None = all when few
    precision: int = 4
    heatmap: Optional[bool] = None           # compact block heatmaps; None = when many panels
    max_rows: int = 12                       # beyond this, elide like numpy (edge rows each side)
    edge: int = 4
    full: bool = False                       # every row and column (columns paged to the width)
    max_cells: Optional[int] = None          # cells one matrix may show (default 12×12 numbers, 48×48 heat)
    pool: str = "max"                        # a long sequence's overview: block max or mean
    max_batch_shown: int = 4
    max_heads_shown: int = 4                 # per-head vectors (Q, K, V, z); scores show every head
    signed: bool = False                     # gradients: every matrix signed (diverging colours, own range)
    notes: List[str] = field(default_factory=list)


def named_shape(trace, hook: str) -> str:
    """(seq=4, d_head=2): batch and head axes are shown only when larger than 1."""
    plan = trace.plan
    axes = plan.step_for_hook(hook).axes
    parts = []
    for axis in axes:
        size = plan.size(axis)
        if axis in ("batch", "n_heads", "n_kv_heads", "1") and size == 1:
            continue
        name = axis
        if not plan.cross and split_name(hook)[1] not in SCORE_HOOKS and axis in ("seq_q", "seq_k"):
            name = "seq"
        parts.append(f"{name}={size}")
    return "(" + ", ".join(parts) + ")"


def _labels(tokens: Sequence[str], indices: np.ndarray, prefix: str = "") -> List[str]:
    return [f"{prefix}{i}" if i >= len(tokens) else _label(str(tokens[i])) for i in indices]


def _label(token: str) -> str:
    """A token as a row or column label: cut to LABEL_CELLS ("averyverylongto…"), since a column is
    as wide as its label and one long token would otherwise push every number off the screen."""
    if cell_len(token) <= LABEL_CELLS:
        return token
    return set_cell_size(token, LABEL_CELLS - 1) + "…"


def _axis_labels(trace, hook: str, axis_name: str, indices: np.ndarray) -> List[str]:
    spec = trace.spec
    if axis_name == "seq_q":
        return _labels(spec.tokens, indices)
    if axis_name == "seq_k":
        return _labels(spec.key_tokens, indices)
    short = {"d_model": "d", "d_head": "d", "d_v": "d", "d_out": "d", "d_mlp": "m", "n_heads·d_v": "c",
             "n_heads·d_head": "c",
             "n_kv_heads·d_head": "c", "n_kv_heads·d_v": "c"}.get(axis_name, "")
    return [f"{short}{i}" for i in indices]


def _side(options: ViewOptions, compact: bool) -> int:
    """How many rows (and columns) a matrix shows before eliding: from --max-cells, else the default."""
    default = POOL_CELLS if compact else options.max_rows
    return max(2, int(options.max_cells ** 0.5)) if options.max_cells else default


def _shown(n: int, side: int, full: bool, edge: int) -> np.ndarray:
    """All indices, or the first and last `edge` (numpy's way) when there are more than `side`."""
    return np.arange(n) if full or n <= side else edge_indices(n, edge)


def _pool_side(width: Optional[int], n_rows: int, side: int) -> int:
    """Cells a side of a pooled overview: as many as the terminal fits (two characters a cell)."""
    if width is None:
        return side
    label = len(f"{n_rows - 1}–{n_rows - 1}") + 1
    return max(4, min(side, (width - label) // 2))


def _matrices(trace, hook: str, options: ViewOptions, compact: bool = False, width: Optional[int] = None):
    """Yield a MatrixView for every batch item and head shown (pooled for a long sequence's heatmap)."""
    plan = trace.plan
    step = plan.step_for_hook(hook)
    row_axis, col_axis, head_axis = point_of(hook).display
    full = trace.arrays.get(hook)
    pooled = None
    if full is not None:
        n_rows, n_cols = full.shape[row_axis], full.shape[col_axis]
        side = _side(options, compact)
        if compact and not options.full and max(n_rows, n_cols) > side and (row_axis, col_axis) == (2, 3) \
                and np.isfinite(full).all():
            pooled = pool(full, _pool_side(width, n_rows, side))
        edge = side // 2 if options.max_cells else options.edge
        rows = _shown(n_rows, side, options.full, edge)
        cols = _shown(n_cols, side, options.full, edge)
        data = np.take(np.take(full, rows, axis=row_axis), cols, axis=col_axis)
    else:
        pooled = trace.pooled.get(hook) if compact and not options.full else None
        pv = trace.previews[hook]
        rows, cols, data, n_rows, n_cols = pv.rows, pv.cols, pv.values, pv.full_rows, pv.full_cols
    batch = data.shape[0]
    # a step broadcast over the batch (a mask of batch 1) shows its one item for any --batch
    batches = [options.batch if options.batch < batch else 0] if options.batch is not None else \
        list(range(min(batch, options.max_batch_shown)))
    if options.batch is None and batch > options.max_batch_shown:
        options.notes.append(f"{hook}: showing batch items 0–{options.max_batch_shown - 1} of {batch} (use --batch)")
    requested = options.heads
    if requested is not None and step.axes[head_axis or 0] == "n_kv_heads":
        # grouped-query attention: query head h reads kv head h // (n_heads / n_kv_heads)
        group = plan.size("n_heads") // plan.size("n_kv_heads")
        requested = sorted({h // group for h in requested})
    heads = [0] if head_axis is None else (
        [h for h in (requested if requested is not None else range(data.shape[head_axis]))
         if h < data.shape[head_axis]])
    if options.heads is None and split_name(hook)[1] not in SCORE_HOOKS and len(heads) > options.max_heads_shown:
        options.notes.append(f"{hook}: showing heads 0–{options.max_heads_shown - 1} of {len(heads)} "
                             "(use --head N)")
        heads = heads[:options.max_heads_shown]
    row_name, col_name = step.axes[row_axis], step.axes[col_axis]
    row_labels = _axis_labels(trace, hook, row_name, rows)
    col_labels = _axis_labels(trace, hook, col_name, cols)
    local = split_name(hook)[1]
    is_pattern = local == "attn.hook_pattern" and not options.signed
    for b in batches:
        for h in heads:
            index = [b] + [slice(None)] * (data.ndim - 1)
            if head_axis is not None:
                index[head_axis] = h
            matrix = data[tuple(index)]
            title_bits = []
            if batch > 1:
                title_bits.append(f"batch {b}")
            if head_axis is not None and data.shape[head_axis] > 1:
                kv = (local in ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k")
                      and plan.size("n_kv_heads") != plan.size("n_heads"))
                if kv:
                    group = plan.size("n_heads") // plan.size("n_kv_heads")
                    shared = f"query head {h * group}" if group == 1 else \
                        f"query heads {h * group}–{h * group + group - 1}"
                    title_bits.append(f"kv head {h} ({shared})")
                else:
                    title_bits.append(f"head {h}")
            view = MatrixView(values=matrix, row_labels=row_labels, col_labels=col_labels, rows=rows, cols=cols,
                              full_rows=n_rows, full_cols=n_cols, title=" · ".join(title_bits),
                              diverging=options.signed or local not in ("attn.hook_pattern", "attn.hook_mask"),
                              value_range=(0.0, 1.0) if is_pattern else None)
            if pooled is not None:
                grid = (pooled.max if options.pool == "max" else pooled.mean)[b, h]
                view = dataclasses.replace(view, values=grid, pooled=options.pool,
                                           row_edges=pooled.row_edges, col_edges=pooled.col_edges)
                yield view
                continue
            if is_pattern and hook in trace.winners:
                top_w, top_k = trace.winners[hook]
                key_labels = _labels(trace.spec.key_tokens, top_k[b, h, rows])
                view.row_top = [f"{fmt_number(float(top_w[b, h, r]), 2)} → {label}"
                                for r, label in zip(rows, key_labels)]
                if hook in trace.row_sums:     # over every key, also when columns are elided
                    view.row_sums = trace.row_sums[hook][b, h, rows]
            yield view


def _stats_line(trace, hook: str, precision: int) -> Text:
    st = trace.stats[hook]
    if st.true is not None:
        total = int(np.prod(st.shape))
        return Text(f"may attend: {st.true} of {total} (query, key) pairs; blocked: {total - st.true}", style="dim")
    parts = [f"min {fmt_number(st.min, precision)}" if st.min is not None else "min -",
             f"max {fmt_number(st.max, precision)}" if st.max is not None else "max -",
             f"mean {fmt_number(st.mean, precision)}" if st.mean is not None else "mean -"]
    if st.neginf:
        parts.append(f"{st.neginf} × -inf (blocked)")
    if st.nan:
        parts.append(f"{st.nan} × NaN")
    return Text("  ".join(parts), style="dim")


def step_renderable(trace, step, options: ViewOptions, width: int = 120):
    hook = step.hook
    header = Text.assemble((f"Step {step.number}/{step.total}  ", "bold"), (step.title, "bold cyan"),
                           ("   " + hook, "magenta"))
    body = [header,
            Text.assemble(("shape ", "dim"), named_shape(trace, hook), ("   rule ", "dim"), (step.rule, "")),
            _stats_line(trace, hook, options.precision)]
    if split_name(hook)[1] == "attn.hook_scaled":
        body.append(Text(f"scale = {trace.plan.scale_text} = {trace.plan.scale:.6g}", style="dim"))
    compact = _compact(trace, hook, options)
    body.extend(matrix_grid(list(_matrices(trace, hook, options, compact, width)), hook, options, width,
                            "heatmaps: ░ low … █ high (--values for numbers, --head N for one head)", compact))
    return Group(*body)


def _compact(trace, hook: str, options: ViewOptions) -> bool:
    """Heatmaps when asked for, or for a score step with more than two panels or a long sequence."""
    if options.heatmap is not None:
        return options.heatmap
    if split_name(hook)[1] not in SCORE_HOOKS:
        return False
    shape = trace.stats[hook].shape
    heads = len(options.heads) if options.heads else shape[1]
    items = 1 if options.batch is not None else min(shape[0], options.max_batch_shown)
    return heads * items > 2 or shape[-1] > 2 * options.max_rows


def _fit_pooled(view, width: int):
    """A pooled overview (computed before the width was known) wider than the terminal: every k
    adjacent key ranges merged until a row fits."""
    max_cols = _pool_side(width, view.full_rows, view.values.shape[-1])
    grid, col_edges = coarsen_columns(view.values, view.col_edges, view.pooled, max_cols)
    return view if grid is view.values else dataclasses.replace(view, values=grid, col_edges=col_edges)


def matrix_grid(views, hook: str, options: ViewOptions, width: int, legend: str, compact: bool = False) -> list:
    """The matrices of one step laid out as a grid: numbers or compact heatmaps; with --full,
    matrices wider than the terminal are paged by columns."""
    blocks = []
    for view in views:           # a matrix wider than the terminal is paged by columns, never wrapped
        if view.pooled:
            view = _fit_pooled(view, width)
        block = heatmap_block(view) if compact else matrix_block(view, options.precision)
        if block.width > width or options.full:
            pages = column_pages(view, width, block)
            if len(pages) > 1:
                blocks.extend(heatmap_block(p) if compact else matrix_block(p, options.precision) for p in pages)
                continue
        blocks.append(block)
    if not blocks:
        return []
    return ([Text(legend, style="dim")] if compact else []) + [side_by_side(blocks, width)]


def header_renderable(trace) -> Panel:
    plan, spec = trace.plan, trace.spec
    dims = "  ".join(f"{name}={plan.size(name)}" for name in
                     ("batch", "seq_q", "seq_k", "d_model", "n_heads", "n_kv_heads", "d_head", "d_v", "d_out")
                     if not (name == "seq_k" and not plan.cross)
                     and not (name == "n_kv_heads" and plan.size(name) == plan.size("n_heads"))
                     and not (name == "d_v" and plan.size("d_v") == plan.size("d_head")))
    tokens = " ".join(spec.tokens[:32]) + (" …" if len(spec.tokens) > 32 else "")
    lines = [Text(dims), Text.assemble(("tokens ", "dim"), tokens)]
    if spec.is_cross:
        enc = " ".join(spec.key_tokens[:32]) + (" …" if len(spec.key_tokens) > 32 else "")
        lines.append(Text.assemble(("encoder tokens ", "dim"), enc))
    first = spec.attention_of(0)
    lines.append(Text.assemble(("scale ", "dim"), f"{plan.scale_text} = {plan.scale:.6g}",
                               ("   mask ", "dim"), first.mask.describe(),
                               ("   positional ", "dim"), spec.positional.kind,
                               ("   layout ", "dim"), first.layout,
                               ("   dtype ", "dim"), trace.dtype))
    if spec.is_model:
        block = plan.blocks[0]
        mlp = f"{block.mlp} MLP ({block.activation})" if block.mlp else "no MLP"
        norms = f"{block.placement}-norm ({block.ln1 or block.ln2})" if (block.ln1 or block.ln2) else "no norms"
        lines.append(Text.assemble(("blocks ", "dim"), f"{plan.n_blocks} × [attention, {mlp}, {norms}"
                                   + (", residual]" if block.residual else "]")))
    # the title as Text: a spec named "[/b] test" or ":cat:" is printed as written, not read as markup
    return Panel(Group(*lines), title=Text(f"attntrace · {spec.name}"), title_align="left", expand=False)


def render_trace(console, trace, options: ViewOptions) -> None:
    console.print(header_renderable(trace))
    shown = set(options.steps) if options.steps is not None else None
    layers = options.layers if options.layers is not None else trace.spec.shown_layers
    for step in trace.plan.steps:
        if shown is not None and step.hook not in shown:
            continue
        if layers is not None and step.layer is not None and trace.plan.named_blocks and step.layer not in layers:
            continue
        console.print(Rule(style="dim"))
        console.print(step_renderable(trace, step, options, console.width))
    console.print(Rule(style="dim"))
    render_checks(console, trace)
    for note in options.notes:
        console.print(Text(note, style="dim"))


def render_checks(console, trace) -> None:
    for line in trace.checks_passed:
        console.print(Text.assemble(("✓ ", "green bold"), line))
    for d, count, heads, layers in grouped(trace.diagnoses):
        if d.severity == "info":          # a note: one quiet line, not a panel
            console.print(note_line(d))
        else:
            console.print(diagnosis_panel(d, group_title(count, heads, layers)))
    if not any(d.severity != "info" for d in trace.diagnoses):
        console.print(Text("no warnings", style="green"))
