"""A progress display for long runs (a model's many layers): on the terminal only, never in pipes."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def layer_progress(plan, enabled: bool = True):
    """A context giving an on_step(step, array, trace) that advances a bar per block; a no-op
    callback when stderr is not a terminal (CI logs, pipes) or when disabled."""
    if not enabled or not sys.stderr.isatty() or plan.n_blocks < 2:
        yield None
        return
    console = Console(file=sys.stderr)
    with Progress(TextColumn("[dim]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("tracing layers", total=plan.n_blocks)
        last = {step.layer: step.hook for step in plan.steps if step.layer is not None}

        def on_step(step, array, trace):
            if step.layer is not None and last.get(step.layer) == step.hook:
                progress.update(task, advance=1, description=f"layer {step.layer + 1} of {plan.n_blocks} done")
        yield on_step
