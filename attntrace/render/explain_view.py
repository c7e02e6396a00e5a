"""The data flow of a plan (`explain-shapes`): a step table and a compact diagram."""
from __future__ import annotations

from typing import Dict, List, Optional

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_FLOP_UNITS = ("", "k", "M", "G", "T", "P", "E", "Z")
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB")


def human(n: int, units, base: int) -> str:
    """1234567 -> '1.23 M' (FLOPs, base 1000) or '1.18 MiB' (bytes, base 1024)."""
    value, unit = float(n), 0
    while value >= base and unit < len(units) - 1:
        value /= base
        unit += 1
    number = str(int(n)) if unit == 0 else f"{value:.3g}"
    return f"{number} {units[unit]}"


def flops_text(n: int) -> str:
    return "—" if n == 0 else human(n, _FLOP_UNITS, 1000) + "FLOP"


def bytes_text(n: int) -> str:
    return human(n, _BYTE_UNITS, 1024)


def sizes_panel(flow) -> Panel:
    plan = flow.plan
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(style="dim")
    for name, dim in plan.dims.items():
        if name == "seq_k" and not plan.cross:
            continue
        where = f", {dim.location.file}:{dim.location.line}" if dim.location and dim.location.line else ""
        grid.add_row(f"{name}={dim.size}", f"from {dim.bound_by}{where}")
    lines = [grid]
    lines.append(Text.assemble(("scale ", "dim"), f"{plan.scale_text} = {plan.scale:.6g}", ("   layout ", "dim"),
                               plan.layout, ("   dtype ", "dim"), flow.dtype))
    return Panel(Group(*lines), title="attntrace explain-shapes · sizes", title_align="left", expand=False)


def steps_table(flow, failing: Optional[set] = None) -> Table:
    """Every step: formula and hook, its rule (operands and result in named axes), the operands
    and the result in numbers, then its FLOPs and result bytes."""
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False, padding=(0, 1, 1, 1))
    table.add_column("#", justify="right")
    table.add_column("step · rule in named axes · shapes in numbers", overflow="fold")
    table.add_column("FLOPs", justify="right", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    for fs in flow.steps:
        style = "bold red" if failing and fs.step.hook in failing else "bold cyan"
        operands = " · ".join(f"{name} {shape.numbers}" for name, shape in fs.inputs)
        body = Text.assemble(
            (fs.step.title, style), "   ", (fs.step.hook, "magenta"), "\n",
            ("rule ", "dim"), fs.step.rule, "\n",
            ("in   ", "dim"), operands or "—", ("   out ", "dim"), f"{fs.output.named} = {fs.output.numbers}")
        table.add_row(str(fs.step.number), body, flops_text(fs.flops), bytes_text(fs.bytes))
    table.add_row("", Text.assemble(("total", "bold"), ("   (peak: the largest single result)", "dim")),
                  flops_text(flow.total_flops), f"peak {bytes_text(flow.peak_bytes)}")
    return table


def _shapes(flow) -> Dict[str, str]:
    return {fs.step.key: fs.output.numbers for fs in flow.steps}


def diagram_lines(flow) -> List[str]:
    """The data flow as four lines:

        X 4×8 ─┬─ ·W_q ─▶ Q 4×2×4 ─┐
               ├─ ·W_k ─▶ K 4×2×4 ─┴─ Q·Kᵀ ─▶ scores 2×4×4 ─ ×1/√d_head, softmax ─▶ weights 2×4×4 ─┐
               └─ ·W_v ─▶ V 4×2×4 ─────────────────────────────────────────────────────────────────┴─ ·V ─▶ z 4×2×4
        z ─ concat ─▶ 4×8 ─ ·W_o ─▶ out 4×8
    """
    plan, shape = flow.plan, _shapes(flow)
    t = "ᵀ" if plan.layout == "linear" else ""
    x = "X+PE" if "pos" in shape else "X"
    x_shape = shape.get("pos", shape["embed"])
    q = f"Q {shape['q']}" + (" ─ RoPE" if "rot_q" in shape else "")
    k = f"K {shape['k']}" + (" ─ RoPE" if "rot_k" in shape else "")
    width = max(len(q), len(k))
    q, k = q.ljust(width, " "), k.ljust(width, " ")
    middle = [f"×{plan.scale_text}" if plan.scale_text != "none" else "no scale"]
    if plan.positional == "alibi":
        middle.append("+ALiBi")
    if plan.masked:
        middle.append("mask")
    middle.append("softmax")
    if plan.cross:
        head_q = f"{x} {x_shape} ─── ·W_q{t} ─▶ "
        head_k = f"X_enc {shape['encoder_embed']} ─┬─ ·W_k{t} ─▶ "
        pad = max(len(head_q), len(head_k))
        head_q, head_k = head_q.rjust(pad, " "), head_k.rjust(pad, " ")
        head_v = " " * (pad - len(f"└─ ·W_v{t} ─▶ ") - 0) + f"└─ ·W_v{t} ─▶ "
    else:
        head_q = f"{x} {x_shape} ─┬─ ·W_q{t} ─▶ "
        pad = len(head_q)
        head_k = " " * (pad - len(f"├─ ·W_k{t} ─▶ ")) + f"├─ ·W_k{t} ─▶ "
        head_v = " " * (pad - len(f"└─ ·W_v{t} ─▶ ")) + f"└─ ·W_v{t} ─▶ "
    line1 = f"{head_q}{q} ─┐"
    line2 = (f"{head_k}{k} ─┴─ Q·Kᵀ ─▶ scores {shape['qk']} ─ {', '.join(middle)} ─▶ "
             f"weights {shape['pattern']} ─┐")
    v = f"{head_v}V {shape['v']} "
    line3 = v + "─" * max(len(line2) - 1 - len(v), 1) + f"┴─ ·V ─▶ z {shape['z']}"
    out = f"─ ·W_o{t} ─▶ out {shape['out']}" if plan.has_w_o else "= out"
    line4 = f"z ─ concat heads ─▶ {shape['z_concat']} {out}"
    return [line1, line2, line3, line4]


def memory_text(outlook) -> Text:
    """`memory  a run needs about 24.1 GiB (...); 22.6 GiB is available: too much` and what would fit."""
    text = Text.assemble(("memory ", "bold"), f"a run needs {outlook.summary()}")
    if outlook.available is None:
        text.append("; the free memory is unknown here", style="dim")
    elif outlook.fits:
        text.append(f"; {bytes_text(outlook.available)} is available: it fits", style="green")
    else:
        text.append(f"; {bytes_text(outlook.available)} is available: too much, a run would be refused (ATT-E020)",
                    style="bold red")
        for option in outlook.options or ["`attntrace run --chunk 1024` holds one tile of the weights at a time "
                                          "(a spec's estimate names the chunk that fits)"]:
            text.append(f"\n  · {option}", style="yellow")
    return text


def render_flow(console, flow, diagnoses=()) -> None:
    console.print(sizes_panel(flow))
    console.print(steps_table(flow, {d.hook for d in diagnoses}))
    console.print()
    console.print(Text("data flow" + (" (batch axis not shown: batch = 1)" if flow.plan.size("batch") == 1 else ""),
                       style="bold"))
    for line in diagram_lines(flow):
        console.print(Text("  " + line), overflow="ignore", crop=False, no_wrap=True)
    if flow.memory is not None:
        console.print()
        console.print(memory_text(flow.memory))
    if diagnoses:
        from attntrace.render.diagnosis import render_diagnoses
        console.print()
        console.print(Text("the shapes above are the ones the plan expects; the spec differs from them here "
                           "(the red steps):", style="bold red"))
        render_diagnoses(console, diagnoses)
