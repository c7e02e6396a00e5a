"""`attntrace diff`: show where two traces first diverge, and by how much."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import FiniteFloat, dtype_option, width_option

TOLERANCE = FiniteFloat(minimum=0.0, code="ATT-E021")      # NaN would make every comparison "agree"


@click.command("diff")
@click.argument("a", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--atol", type=TOLERANCE, default=1e-9, show_default=True,
              help="Cells differ when |a-b| > atol + rtol·max(|a|, |b|) (finite, ≥ 0).")
@click.option("--rtol", type=TOLERANCE, default=1e-9, show_default=True)
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many of the most different cells to list.")
@click.option("--hook-a", "hooks_a", multiple=True, metavar="HOOK:ACTION[=ARG]",
              help="A hook action applied when running A (a spec), e.g. attn.hook_z:scale=0.5.")
@click.option("--hook-b", "hooks_b", multiple=True, metavar="HOOK:ACTION[=ARG]",
              help="A hook action applied when running B (a spec).")
@dtype_option
@width_option
@format_option
@handles_errors
def diff(a, b, atol, rtol, top, hooks_a, hooks_b, dtype, width, fmt):
    """Compare traces A and B hook by hook: each is a spec (.yaml) or a trace saved
    with `attntrace run --export FILE.npz|FILE.json`.

    For every hook both hold: how many cells differ, the largest absolute and
    relative difference, and the first step where they diverge with the cells
    that differ most. Exit 0 when they agree, 1 when they differ.

    \b
    attntrace diff configs/seed002_abc.yaml saved.npz
    attntrace diff spec.yaml spec.yaml --hook-b attn.hook_pattern:ablate-head=0
    attntrace diff spec.yaml other.yaml --format json
    """
    from attntrace.analysis.actions import parse_hook_texts
    from attntrace.analysis.diff import diff_traces, load_side
    from attntrace.errors import EXIT_CHECK_FAILED, EXIT_OK, input_error
    from attntrace.render.output import make_console, print_json
    sides = []
    for path, texts, flag in ((a, hooks_a, "--hook-a"), (b, hooks_b, "--hook-b")):
        if texts and path.suffix.lower() not in (".yaml", ".yml"):
            raise input_error("ATT-E065", f"{flag} applies to a spec; {path.name} is a saved trace")
        sides.append(load_side(path, dtype=dtype, hooks=parse_hook_texts(texts, _context(path))))
    report = diff_traces(sides[0], sides[1], atol=atol, rtol=rtol, top=top)
    exit_code = EXIT_OK if report.same else EXIT_CHECK_FAILED
    if fmt == "json":
        print_json({"attntrace": 1, "exit_code": exit_code, **report.to_json()})
    else:
        from attntrace.render.diff_view import render_diff
        render_diff(make_console(width), report)
    raise SystemExit(exit_code)


def _context(path: Path):
    from attntrace.analysis.actions import ActionContext
    return ActionContext(protected={path.resolve()})
