"""`attntrace explain-shapes`: the data flow of attention, from sizes or a spec, without arrays."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import width_option


@click.command("explain-shapes")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seq", type=int, help="Tokens (seq_q; also seq_k unless --seq-k).")
@click.option("--d-model", type=int, help="Embedding width.")
@click.option("--heads", type=int, help="Query heads.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size.")
@click.option("--kv-heads", type=int, help="Key/value heads (grouped-query attention); default --heads.")
@click.option("--d-head", type=int, help="Features per head; default d_model / heads.")
@click.option("--d-v", type=int, help="Value features per head; default d_head.")
@click.option("--seq-k", type=int, help="Key tokens when they differ (cross-attention, KV cache).")
@click.option("--mask", "masked", is_flag=True, help="Include the masking step (causal, padding ...).")
@click.option("--positional", type=click.Choice(["none", "sinusoidal", "learned", "rope", "alibi"]),
              default="none", show_default=True, help="Positional encoding steps to include.")
@click.option("--no-w-o", is_flag=True, help="No output projection (out = concatenated heads).")
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="Element size for the bytes column.")
@width_option
@format_option
@handles_errors
def explain_shapes(spec, seq, d_model, heads, batch, kv_heads, d_head, d_v, seq_k, masked, positional, no_w_o,
                   dtype, width, fmt):
    """Show the data flow: every step with its hook, formula, operand and result shapes
    (named axes and numbers), FLOPs and result bytes, a compact diagram, and the memory a run
    would need against what is free now (with what would fit when it does not).

    Give sizes, or a SPEC to take them from (its shape errors are diagnosed, exit 3).
    Sizes only, no arrays: instant for any size.

    \b
    attntrace explain-shapes --seq 10 --d-model 512 --heads 8
    attntrace explain-shapes --seq 4096 --d-model 4096 --heads 32 --kv-heads 8 --mask --positional rope
    attntrace explain-shapes spec.yaml --format json
    """
    from attntrace.analysis.dataflow import describe_flow, plan_for_flags
    from attntrace.errors import EXIT_OK, EXIT_SHAPE_ERROR, input_error
    from attntrace.render.output import make_console, print_json
    sizes = {"--seq": seq, "--d-model": d_model, "--heads": heads}
    diagnoses = []
    if spec is not None:
        given = [flag for flag, value in dict(sizes, **{"--kv-heads": kv_heads, "--d-head": d_head, "--d-v": d_v,
                                                      "--seq-k": seq_k}).items() if value is not None]
        if given or batch != 1 or masked or positional != "none" or no_w_o:
            raise input_error("ATT-E035", "give either a SPEC or sizes (--seq, --d-model, --heads ...), not both",
                              hint="the spec binds every size itself; edit it to try other sizes")
        from attntrace.analysis.diagnose import find_problems
        from attntrace.analysis.fixes import attach_verified_fixes
        from attntrace.analysis.run import load as load_spec
        from attntrace.core.plan import plan_from_spec
        from attntrace.inputs.sources import sizes_only
        with sizes_only():              # headers and parameters give the sizes: no array is loaded
            loaded = load_spec(spec)
        plan = plan_from_spec(loaded)
        diagnoses = find_problems(loaded, plan)
        attach_verified_fixes(loaded, diagnoses)
    else:
        missing = [flag for flag, value in sizes.items() if value is None]
        if missing:
            raise input_error("ATT-E035", f"explain-shapes needs a SPEC or the sizes --seq, --d-model and --heads "
                                          f"(missing {', '.join(missing)})",
                              hint="e.g. attntrace explain-shapes --seq 10 --d-model 512 --heads 8")
        plan = plan_for_flags(seq=seq, d_model=d_model, heads=heads, batch=batch, kv_heads=kv_heads, d_head=d_head,
                              d_v=d_v, seq_k=seq_k, masked=masked, positional=positional, has_w_o=not no_w_o)
    from attntrace.analysis.run import memory_outlook
    outlook = memory_outlook(loaded if spec is not None else None, plan, dtype or "float64")
    flow = describe_flow(plan, dtype or "float64", outlook)
    exit_code = EXIT_SHAPE_ERROR if diagnoses else EXIT_OK
    if fmt == "json":
        print_json({"exit_code": exit_code, "flow": flow.to_json(), "diagnoses": [d.to_json() for d in diagnoses]})
    else:
        from attntrace.render.explain_view import render_flow
        render_flow(make_console(width), flow, diagnoses)
    raise SystemExit(exit_code)
