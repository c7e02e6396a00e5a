"""`attntrace check`: check a hand calculation written under `expect:` in a spec."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import dtype_option, width_option


@click.command("check")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--all", "show_all", is_flag=True, help="Show the cell table of matching expectations too.")
@dtype_option
@width_option
@format_option
@handles_errors
def check(spec, show_all, dtype, width, fmt):
    """Compare the hand calculation in SPEC's `expect:` with true attention.

    Every written cell is compared (|written - true| <= atol + rtol·|true|, or a
    number of decimals); mismatches show `written ≠ true`. The first step where
    the hand diverges is named with its cell; later differences that only carry
    it forward are marked ↳. Exit 0 when everything matches, 1 otherwise.

    \b
    attntrace check configs/expect_seed002_article.yaml
    attntrace check homework.yaml --format json
    """
    from attntrace.analysis.expect import check_expectations
    from attntrace.errors import EXIT_CHECK_FAILED, EXIT_OK, input_error
    from attntrace.inputs.spec import load_spec
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
