"""`attntrace grad`: the backward pass of attention, each gradient verified by finite differences."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import FiniteFloat, check_selection, head_option, precision_option, width_option

LOSSES = ("sum", "mean", "sum_squares", "upstream")


@click.command("grad")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--loss", type=click.Choice(LOSSES), help="The loss to differentiate (default: the spec's "
              "`grad:` block, else sum): sum, mean, sum_squares (½·Σ out²), or upstream (grad.upstream).")
@click.option("--grads", "grad_names", metavar="LIST", help="Gradients to show: names (attn.hook_v_grad), "
              "what they are the gradient of (V, dV, weights, W_q, X) or patterns (attn.W_*), comma-separated.")
@head_option()
@click.option("--batch", type=click.IntRange(min=0), help="Show only this batch item.")
@precision_option(4)
@width_option
@click.option("--tolerance", type=FiniteFloat(minimum=0.0, code="ATT-E021"), default=1e-6, show_default=True,
              help="Largest max relative error a gradient may have against finite differences.")
@click.option("--cells", type=click.IntRange(min=0), default=64, show_default=True,
              help="Cells checked per gradient (a seeded sample plus the largest entry); 0 = every cell.")
@click.option("--no-verify", is_flag=True, help="Skip the finite-difference check.")
@format_option
@handles_errors
def grad(spec, loss, grad_names, heads, batch, precision, width, tolerance, cells, no_verify, fmt):
    """Run the backward pass of attention for SPEC and verify every gradient.

    Computes dL/dout, dL/dW_o, dL/dconcat, dL/dz, dL/dV, dL/dweights, dL/dscores
    (through the softmax Jacobian), dL/dQ, dL/dK, dL/dW_q/W_k/W_v (and biases) and
    dL/dX, in float64, each shown like a forward step.  Each is compared with
    central finite differences of the forward engine; exit 1 if any max relative
    error exceeds --tolerance.  Without SPEC, uses the built-in example.

    \b
    attntrace grad configs/grad_seed000_value_gradient.yaml
    attntrace grad spec.yaml --loss sum_squares --grads V,weights,W_q
    attntrace grad spec.yaml --format json
    """
    from attntrace.analysis.run import load
    from attntrace.analysis.run import run as run_engine
    from attntrace.cli.run import BUILTIN_EXAMPLE
    from attntrace.core.backward import backward, match_grads, require_one_layer
    from attntrace.core.plan import plan_from_spec
    from attntrace.errors import EXIT_CHECK_FAILED, EXIT_OK
    from attntrace.render.output import make_console, print_json
    loaded = load(spec if spec is not None else BUILTIN_EXAMPLE)
    sizes = plan_from_spec(loaded)
    check_selection(sizes, heads=heads, batch=batch)
    require_one_layer(sizes)            # before the forward pass runs
    # the gradients are those of attention itself: the spec's `hooks:` (ablations, patches) are left out
    trace = run_engine(loaded, keep="all", dtype="float64", spec_hooks=False)
    notes = ["the spec's hooks: list is not applied: grad differentiates attention without it"] \
        if trace.spec.hooks else []
    import numpy as np
    with np.errstate(all="ignore"):        # an overflowed forward pass: NaN gradients, reported, not warned
        grads = backward(trace, loss=loss)
    shown = None
    if grad_names:
        shown = [name for item in grad_names.split(",") if item.strip()
                 for name in match_grads(item.strip(), grads.points)]
    checks = None
    diagnoses = list(trace.warnings)
    if not no_verify:
        from attntrace.analysis.gradcheck import check_gradients, failures
        from attntrace.render.progress import progress_bar
        with progress_bar("finite differences") as progress:      # a bar on a terminal's stderr only
            checks = check_gradients(grads, cells=cells, tolerance=tolerance, progress=progress)
        diagnoses += failures(checks)
    exit_code = EXIT_CHECK_FAILED if checks is not None and not all(c.passed for c in checks) else EXIT_OK
    if fmt == "json":
        from attntrace.render.grad_view import grads_to_json
        print_json(grads_to_json(grads, checks, exit_code, tolerance, diagnoses, notes))
    else:
        from attntrace.render.grad_view import render_grads
        from attntrace.render.trace_view import ViewOptions
        options = ViewOptions(heads=list(heads) if heads else None, batch=batch, precision=precision, signed=True,
                              notes=notes)
        render_grads(make_console(width), grads, checks, options, shown=shown, tolerance=tolerance,
                     diagnoses=diagnoses)
    raise SystemExit(exit_code)
