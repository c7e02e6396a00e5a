"""Progress of long computations on stderr: a rich bar when stderr is a terminal, nothing when piped.

Two kinds: :func:`progress_bar` turns the library's plain callbacks
``progress(done, total, what)`` (see :func:`attntrace.analysis.gradcheck.check_gradients`)
into a bar; :func:`layer_progress` advances one per block of a model's run.  Piped or
redirected stderr gets nothing, so logs and JSON consumers see no control characters.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Optional

ProgressFn = Callable[[int, int, str], None]


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _bar(*columns):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn
    return Progress(TextColumn("{task.description}", style="dim", markup=False), BarColumn(), *columns,
                    console=Console(file=sys.stderr, emoji=False), transient=True)


@contextlib.contextmanager
def progress_bar(description: str, enabled: Optional[bool] = None) -> Iterator[Optional[ProgressFn]]:
    """A callback drawing a transient bar (cells done, rate, time left) on stderr, or None when
    stderr is not a terminal (or `enabled` is False)."""
    if not (stderr_is_terminal() if enabled is None else enabled):
        yield None
        return
    from rich.progress import MofNCompleteColumn, TextColumn, TimeRemainingColumn
    what = TextColumn("{task.fields[what]}", style="dim", markup=False)
    with _bar(MofNCompleteColumn(), TimeRemainingColumn(), what) as bar:
        tasks = []          # added at the first call, when the total is known (rich 12 has no total=None)

        def update(done: int, total: int, what: str) -> None:
            if not tasks:
                tasks.append(bar.add_task(description, total=total, what=what))
            bar.update(tasks[0], completed=done, total=total, what=what)
        yield update


@contextlib.contextmanager
def layer_progress(plan, enabled: bool = True):
    """A context giving an on_step(step, array, trace) that advances a bar per block; None when
    stderr is not a terminal (CI logs, pipes), when disabled, or for a single block."""
    if not enabled or not stderr_is_terminal() or plan.n_blocks < 2:
        yield None
        return
    from rich.progress import TextColumn, TimeElapsedColumn
    with _bar(TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()) as bar:
        task = bar.add_task("tracing layers", total=plan.n_blocks)
        last = {step.layer: step.hook for step in plan.steps if step.layer is not None}

        def on_step(step, array, trace):
            if step.layer is not None and last.get(step.layer) == step.hook:
                bar.update(task, advance=1, description=f"layer {step.layer + 1} of {plan.n_blocks} done")
        yield on_step
