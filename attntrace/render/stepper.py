"""`run --step`: pause after each step of attention, like a debugger.

The stepper is the engine's ``on_step`` callback.  After each step it shows
the step and reads commands until told to go on:

    next, n, <enter>   run the next step
    show HOOK, s HOOK  show a step already run (hook name, alias or step number)
    stats              min / max / mean of every step run so far
    continue, c        run to the end without pausing
    quit, q            stop here
    help, h, ?         this list

Commands come from a stream (stdin by default), so tests drive it with
scripted input.  When the input ends -- or stdin is not a terminal and stays
silent -- the stepper continues to the end instead of waiting forever.

On a terminal the prompt is read with :mod:`readline` (where Python has it):
arrow keys move in the line and the Up arrow recalls earlier commands, as in
any debugger, instead of typing ``^[[A``.  Ctrl-C at the prompt stops the run
(exit 130).
"""
from __future__ import annotations

import os
import select
import sys
from typing import Callable, Optional

from rich.text import Text

COMMANDS_HELP = (
    ("next, n, <enter>", "run the next step"),
    ("show HOOK, s HOOK", "show a step already run (hook, alias such as Q or weights, or step number)"),
    ("stats", "min / max / mean of every step so far"),
    ("continue, c", "run to the end without pausing"),
    ("quit, q", "stop here"),
    ("help, h, ?", "this list"),
)
SILENT_INPUT_SECONDS = 2.0     # a non-terminal stdin with nothing to read after this is treated as ended


class StopStepping(Exception):
    """Raised by `quit`: the command stops the run and reports where."""

    def __init__(self, step):
        super().__init__(f"stopped after step {step.label}")
        self.step = step


class LineReader:
    """Lines from a stream; None at the end of input, or when a pipe stays silent."""

    def __init__(self, stream, timeout: float = SILENT_INPUT_SECONDS):
        self.stream = stream
        self.timeout = timeout
        try:
            self.fd: Optional[int] = stream.fileno()
        except (AttributeError, OSError, ValueError):    # io.StringIO, click's test runner
            self.fd = None
        self.interactive = self.fd is not None and os.isatty(self.fd)
        # line editing and history: input() uses readline when stdin and stdout are both terminals
        self.editing = self.interactive and stream is sys.stdin and _isatty(sys.stdout) and line_editing()
        self.buffer = b""

    def read_command(self, prompt: str) -> Optional[str]:
        """One command line read with readline (which draws `prompt`); None at the end of input."""
        try:
            return input(prompt) + "\n"
        except EOFError:
            return None

    def readline(self) -> Optional[str]:
        if self.fd is None or self.interactive:
            line = self.stream.readline()
            return line if line else None
        return self._read_fd()

    def _read_fd(self) -> Optional[str]:
        # Read the descriptor directly (no Python buffering) so select() tells the truth.
        while b"\n" not in self.buffer:
            try:
                ready, _, _ = select.select([self.fd], [], [], self.timeout)
            except (OSError, ValueError):
                ready = [self.fd]
            if not ready:
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:
                break
            self.buffer += chunk
        if not self.buffer:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("utf-8", "replace") + "\n"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def line_editing() -> bool:
    """Load readline (once) so that input() edits lines and keeps a history; False where it is missing."""
    try:
        import readline  # noqa: F401  (importing it is what turns line editing on)
    except ImportError:          # Windows without pyreadline, some minimal builds
        return False
    return True


class Stepper:
    """The engine's on_step callback: renders each step, then reads commands."""

    def __init__(self, console, stream, render_step: Callable, render_header: Callable,
                 timeout: float = SILENT_INPUT_SECONDS):
        self.console = console
        self.reader = LineReader(stream, timeout)
        self.render_step = render_step          # (trace, step) -> renderable
        self.render_header = render_header      # (trace) -> renderable
        self.running = False                    # `continue` given, or input ended
        self.started = False

    def __call__(self, step, array, trace) -> None:
        from rich.rule import Rule
        if not self.started:
            self.console.print(self.render_header(trace))
            self.console.print(Text("stepping: `help` lists the commands", style="dim"))
            self.started = True
        self.console.print(Rule(style="dim"))
        self.console.print(self.render_step(trace, step))
        if not self.running and step.number < step.total:
            self._prompt(step, trace)

    def _prompt(self, step, trace) -> None:
        while True:
            prompt = f"(attntrace) step {step.number}/{step.total} › "
            if self.reader.editing:
                line = self.reader.read_command(prompt)
            else:
                self.console.print(Text(prompt, style="bold cyan"), end="")
                line = self.reader.readline()
            if line is None:
                self.console.print(Text("\nend of input: running to the end", style="dim"))
                self.running = True
                return
            if not self.reader.interactive:
                self.console.print(line.rstrip("\n"))     # echo scripted input into the transcript
            command, _, argument = line.strip().partition(" ")
            command = command.lower()
            if command in ("", "n", "next"):
                return
            if command in ("c", "continue"):
                self.running = True
                return
            if command in ("q", "quit", "exit"):
                raise StopStepping(step)
            if command in ("s", "show", "p", "print"):
                self._show(argument.strip(), step, trace)
            elif command == "stats":
                self._stats(trace)
            elif command in ("h", "help", "?"):
                self._help()
            else:
                self.console.print(Text(f"unknown command '{command}'; type help", style="yellow"))

    def _show(self, name: str, current, trace) -> None:
        from attntrace.errors import AttnTraceError
        from attntrace.hookpoints import resolve_hook_name
        plan = trace.plan
        if not name:
            self.console.print(Text("show what? e.g. show Q, show weights, show 5", style="yellow"))
            return
        try:
            if name.isdigit() and 1 <= int(name) <= len(plan.steps):
                hook = plan.steps[int(name) - 1].hook
            else:
                hook = resolve_hook_name(name, available=plan.hooks)
        except AttnTraceError as exc:
            d = exc.diagnosis
            self.console.print(Text(d.message + (f" ({d.hint})" if d.hint else ""), style="yellow"))
            return
        step = plan.step_for_hook(hook)
        if step.number > current.number:
            self.console.print(Text(f"{hook} is step {step.number}; it has not run yet "
                                    f"(now at step {current.number})", style="yellow"))
            return
        self.console.print(self.render_step(trace, step))

    def _stats(self, trace) -> None:
        from rich import box
        from rich.table import Table

        from attntrace.render.matrix import fmt_number
        from attntrace.text import format_shape
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for heading in ("step", "hook", "shape", "min", "max", "mean"):
            table.add_column(heading, justify="right" if heading in ("min", "max", "mean", "step") else "left")
        for step in trace.plan.steps:
            st = trace.stats.get(step.hook)
            if st is None:
                break
            show = lambda v: "-" if v is None else fmt_number(v, 4)  # noqa: E731
            table.add_row(str(step.number), step.hook, format_shape(st.shape), show(st.min), show(st.max),
                          show(st.mean))
        self.console.print(table)

    def _help(self) -> None:
        for command, what in COMMANDS_HELP:
            self.console.print(Text.assemble((f"  {command:<20}", "bold"), what))


def stepper_for(console, options, stream=None) -> Stepper:
    """A stepper that renders steps the way `run` does (same heads, batch, precision)."""
    import sys

    from attntrace.render.trace_view import header_renderable, step_renderable
    return Stepper(console, stream if stream is not None else sys.stdin,
                   render_step=lambda trace, step: step_renderable(trace, step, options),
                   render_header=header_renderable)
