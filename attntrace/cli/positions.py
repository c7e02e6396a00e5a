"""`attntrace positions`: render a positional encoding as a heatmap and a few of its waves."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import FiniteFloat, width_option


def parse_dims(text, limit, what):
    from attntrace.errors import input_error
    try:
        dims = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise input_error("ATT-E042", f"--dims {text!r}: write whole numbers separated by commas",
                          hint="e.g. --dims 0,4,8,16") from None
    bad = [d for d in dims if not 0 <= d < limit]
    if bad:
        raise input_error("ATT-E042", f"--dims: {what} {bad[0]} does not exist; there are {limit} (0 to {limit - 1})")
    return dims


def load_table(path, seq, d_model):
    """A learned table from a .npy file, or seed 004's random one: randn(max_len, d_model) * 0.02."""
    import numpy as np

    from attntrace.errors import Location, input_error
    from attntrace.inputs.sources import SourceContext, load_array
    if path is None:
        return np.random.default_rng(0).normal(size=(max(seq, 512), d_model)) * 0.02, \
            "random, as seed 004's LearnedPositionalEncoding: randn(512, d_model) * 0.02 (seed 0)"
    ctx = SourceContext(Path.cwd(), lambda p: Location(str(path), None, None, "--table"))
    table = load_array({"npy": str(path)}, ctx, ["--table"], what="--table")
    if table.ndim != 2 or table.shape[0] < seq:
        raise input_error("ATT-E042", f"--table {path} has shape {tuple(table.shape)}; it needs "
                                      f"(max_len ≥ {seq}, d_model)", hint="a learned table is (max_len, d_model)")
    return table, f"from {path}"


@click.command("positions")
@click.option("--kind", type=click.Choice(["sinusoidal", "learned", "rope", "alibi"]), default="sinusoidal",
              show_default=True, help="Which encoding to draw.")
@click.option("--seq", type=click.IntRange(min=1, max=4096), default=50, show_default=True, help="Positions.")
@click.option("--d-model", "d_model", type=click.IntRange(min=2, max=4096), default=64, show_default=True,
              help="Features (d_head for RoPE).")
@click.option("--dims", help="Features whose waves are plotted (heads for ALiBi), comma-separated "
              "[default: 0,4,8,16, as seed 004].")
@click.option("--base", type=FiniteFloat(above=1.0, code="ATT-E042"), default=10000.0, show_default=True,
              help="Frequency base (sinusoidal, RoPE).")
@click.option("--pairing", type=click.Choice(["half", "interleaved"]), default="half", show_default=True,
              help="RoPE: which features rotate together.")
@click.option("--heads", type=click.IntRange(min=1, max=256), default=8, show_default=True, help="ALiBi: heads.")
@click.option("--table", type=click.Path(dir_okay=False, path_type=Path), help="Learned: a (max_len, d_model) .npy.")
@width_option
@format_option
@handles_errors
def positions(kind, seq, d_model, dims, base, pairing, heads, table, width, fmt):
    """Render a positional encoding as a heatmap plus a few of its waves.

    \b
    attntrace positions --kind sinusoidal --seq 50 --d-model 64      seed 004's plots
    attntrace positions --kind rope --d-model 16 --pairing interleaved
    attntrace positions --kind alibi --heads 8 --seq 16
    attntrace positions --kind learned --table pos.npy

    Sinusoidal and learned tables are added to X; RoPE rotates pairs of features of
    Q and K (default pairing: half, as GPT-NeoX and Llama); ALiBi adds a per-head
    linear bias to the scores.
    """
    from attntrace.core import positional
    from attntrace.errors import EXIT_OK, input_error
    from attntrace.render.output import make_console, print_json
    from attntrace.render.positions_view import PositionsPicture, positions_to_json, render_positions

    if kind == "rope" and d_model % 2:
        raise input_error("ATT-E042", f"--d-model {d_model}: RoPE rotates pairs of features, so d_head must be even")
    learned_table, source = load_table(table, seq, d_model) if kind == "learned" else (None, "")
    if learned_table is not None:
        d_model = learned_table.shape[1]
    picture = positional.encoding_table(kind, seq, d_model, base=base, heads=heads, pairing=pairing,
                                        table=learned_table)
    waves_over = heads if kind == "alibi" else d_model
    chosen = parse_dims(dims, waves_over, "head" if kind == "alibi" else "feature") if dims else \
        [d for d in (0, 4, 8, 16) if d < waves_over]
    extras = {"source": source} if source else {}
    if kind == "rope":
        other = "interleaved" if pairing == "half" else "half"
        extras = {"pairing": pairing, "pairing_note": positional.PAIRING_NOTES[pairing],
                  "other_pairing": other, "other_pairing_note": positional.PAIRING_NOTES[other],
                  "frequencies": positional.rope_frequencies(d_model, base),
                  "relative_check": positional.rope_relative_check(d_model, base, pairing)}
    if kind == "alibi":
        extras = {"slopes": positional.alibi_slopes(heads)}
    result = PositionsPicture(kind=kind, seq=seq, d_model=d_model, base=base, heads=heads,
                              formula=positional.FORMULAS[kind], table=picture, wave_index=chosen, extras=extras)
    if fmt == "json":
        print_json(positions_to_json(result))
    else:
        render_positions(make_console(width), result)
    raise SystemExit(EXIT_OK)
