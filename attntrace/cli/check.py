"""`attntrace check`: check a hand calculation (`expect:` in a spec), or a capture of your own attention."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import dtype_option, width_option


@click.command("check")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--all", "show_all", is_flag=True, help="Show the cell table of matching expectations too.")
@click.option("--rtol", type=click.FloatRange(min=0), help="A capture: relative tolerance (default: by dtype).")
@click.option("--atol", type=click.FloatRange(min=0), help="A capture: absolute tolerance (default: by dtype).")
@dtype_option
@width_option
@format_option
@handles_errors
def check(spec, show_all, rtol, atol, dtype, width, fmt):
    """Compare the hand calculation in SPEC's `expect:` with true attention, or
    a capture of your own PyTorch attention (a .safetensors file written by
    `attntrace.capture`) with attntrace's.

    A spec: every written cell is compared (|written - true| <= atol + rtol·|true|,
    or a number of decimals); mismatches show `written ≠ true`. The first step
    where the hand diverges is named with its cell; later differences that only
    carry it forward are marked ↳.

    A capture: every captured hook is compared with attntrace's float64 trace on
    the same inputs and weights, with tolerances that depend on the dtype; when
    they differ, the bug catalogue is replayed to name the bug that reproduces
    your numbers. Exit 0 when everything matches, 1 otherwise.

    \b
    attntrace check configs/expect_seed002_article.yaml
    attntrace check run.safetensors
    attntrace check homework.yaml --format json
    """
    if spec.suffix.lower() == ".safetensors":
        _check_capture(spec, rtol, atol, width, fmt)
    from attntrace.analysis.expect import check_expectations
    from attntrace.analysis.run import load as load_spec
    from attntrace.errors import EXIT_CHECK_FAILED, EXIT_OK, input_error
    from attntrace.render.output import make_console, print_json
    loaded = load_spec(spec)
    if not loaded.expect:
        raise input_error("ATT-E066", f"{spec} has no `expect:` section: nothing to check",
                          loaded.locate([]), hint="add the values you computed by hand, e.g.\n"
                                                  "expect:\n  scores: [[10, 58], [58, 234]]\n  decimals: 2")
    report = check_expectations(loaded, dtype=dtype)
    exit_code = EXIT_OK if report.ok else EXIT_CHECK_FAILED
    if fmt == "json":
        diagnosis = report.diagnosis()
        print_json({"attntrace": 1, "name": loaded.name, "exit_code": exit_code, **report.to_json(),
                    "diagnoses": [diagnosis.to_json()] if diagnosis else []})
    else:
        from attntrace.render.expect_view import render_expectations
        render_expectations(make_console(width), report, show_all=show_all)
    raise SystemExit(exit_code)


def _check_capture(path, rtol, atol, width, fmt):
    from attntrace.analysis.capture import check_capture
    from attntrace.render.output import make_console, print_json
    report = check_capture(path, rtol=rtol, atol=atol)
    if fmt == "json":
        print_json(report.to_json())
    else:
        from attntrace.render.capture_view import render_capture_report
        make_console(width).print(render_capture_report(report))
    raise SystemExit(report.exit_code)
