"""`attntrace bugs`: the catalogue of deliberate bugs, or what catches each of them on a spec."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import width_option


@click.command("bugs")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--check", "check_level", type=click.Choice(["default", "all"]), default="default", show_default=True,
              help="Invariant checks for the runs on SPEC (all: also causality and head independence).")
@width_option
@format_option
@handles_errors
def bugs(spec, check_level, width, fmt):
    """List the deliberate bugs that `run --inject` can put in, with what catches each one.

    With SPEC, inject every bug into it in turn and report what caught it, that it
    cannot show on this spec, or that nothing did (exit 1 if a bug went unnoticed).

    \b
    attntrace bugs
    attntrace run spec.yaml --inject softmax-wrong-axis
    attntrace bugs spec.yaml --check all
    """
    from attntrace.analysis.bugs import CATALOGUE, inject
    from attntrace.errors import EXIT_CHECK_FAILED, EXIT_OK
    from attntrace.render import bugs_view
    from attntrace.render.output import make_console, print_json
    if spec is None:
        if fmt == "json":
            print_json({"exit_code": EXIT_OK, "bugs": [bug.to_json() for bug in CATALOGUE.values()]})
        else:
            console = make_console(width)
            console.print(bugs_view.catalogue_table(CATALOGUE.values()))
            console.print("\nattntrace run SPEC --inject NAME   runs SPEC with the bug in place", style="dim")
        raise SystemExit(EXIT_OK)
    from attntrace.analysis.run import load as load_spec
    loaded = load_spec(spec)
    verdicts = [inject(loaded, name, check=check_level) for name in CATALOGUE]
    exit_code = EXIT_CHECK_FAILED if any(v.status == "not caught" for v in verdicts) else EXIT_OK
    if fmt == "json":
        print_json(bugs_view.verdicts_document(verdicts, loaded.name, exit_code))
    else:
        console = make_console(width)
        console.print(f"bugs injected into {loaded.name} (checks: {check_level})", style="bold")
        console.print(bugs_view.verdicts_table(verdicts))
    raise SystemExit(exit_code)
