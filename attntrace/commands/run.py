"""`attntrace run`: trace every step of attention for a spec."""
from __future__ import annotations

from pathlib import Path

import click

from ..cli import format_option, handles_errors

BUILTIN_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "builtin.yaml"


def parse_steps(text, plan):
    """`--steps qk,pattern,7` -> hook names (aliases, hook names, or step numbers)."""
    from ..errors import input_error
    from ..hooks import match_hooks
    hooks = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item.isdigit():
            number = int(item)
            if not 1 <= number <= len(plan.steps):
                raise input_error("ATT-E017", f"--steps: there is no step {number}; this plan has "
                                              f"{len(plan.steps)} steps")
            hooks.append(plan.steps[number - 1].hook)
        else:
            hooks.extend(match_hooks(item, plan.hooks))
    return hooks


@click.command("run")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--steps", metavar="LIST", help="Steps to show: hook names, aliases (Q, scores, weights, "
              "output ...), patterns (attn.hook_*) or step numbers, comma-separated.")
@click.option("--head", "heads", type=click.IntRange(min=0), multiple=True, help="Show only this head (repeatable).")
@click.option("--batch", type=click.IntRange(min=0), help="Show only this batch item.")
@click.option("--precision", type=click.IntRange(0, 12), default=4, show_default=True, help="Decimals shown.")
@click.option("--width", type=click.IntRange(min=40), help="Output width in columns (default: the terminal's).")
@click.option("--heatmap/--values", default=None,
              help="Score matrices as compact block heatmaps or as numbers (default: heatmaps when "
                   "more than two heads or batch items are shown).")
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True)
@click.option("--strict", is_flag=True, help="Exit 1 when any invariant check warns.")
@format_option
@handles_errors
def run(spec, steps, heads, batch, precision, width, heatmap, dtype, strict, fmt):
    """Trace every step of attention for SPEC (a YAML file).

    Without SPEC, runs the built-in example: seed 000's four tokens "猫 抓 了 老鼠".
    Each step shows its formula, its shape with named axes, min/max/mean and the
    matrices with token labels; big matrices are elided like numpy's `...`.
    """
    from ..engine import run as run_engine
    from ..errors import EXIT_CHECK_FAILED, EXIT_OK, input_error
    from ..render.output import make_console, print_json
    trace = run_engine(spec if spec is not None else BUILTIN_EXAMPLE, dtype=dtype)
    if batch is not None and batch >= trace.plan.size("batch"):
        raise input_error("ATT-E017", f"--batch {batch}: the spec has batch size {trace.plan.size('batch')}")
    if heads and max(heads) >= trace.plan.size("n_heads"):
        raise input_error("ATT-E017", f"--head {max(heads)}: the spec has {trace.plan.size('n_heads')} head(s), "
                                      f"numbered from 0")
    exit_code = EXIT_CHECK_FAILED if strict and trace.warnings else EXIT_OK
    if fmt == "json":
        from ..render.json_view import trace_to_json
        print_json(trace_to_json(trace, exit_code))
    else:
        from ..render.trace_view import ViewOptions, render_trace
        options = ViewOptions(steps=parse_steps(steps, trace.plan) if steps else None,
                              heads=list(heads) or None, batch=batch, precision=precision,
                              heatmap=heatmap)
        render_trace(make_console(width), trace, options)
    raise SystemExit(exit_code)
