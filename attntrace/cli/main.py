"""Command line: click commands that parse options, call the library, pick a renderer.

Commands live in :mod:`attntrace.commands` and are imported only when run,
so ``attntrace --help`` does not import numpy or rich.  No math, no formatting
here: errors become diagnoses rendered by :mod:`attntrace.render`, and exit codes

    0 success · 1 a check or expectation failed · 2 bad input or usage · 3 shape error
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys

import click

# command name -> (module, function, one-line help shown by `attntrace --help`)
COMMANDS = {
    "run": ("attntrace.cli.run", "run", "Trace every step of attention for a spec."),
    "explain-shapes": ("attntrace.cli.explain", "explain_shapes",
                       "Show the data flow: steps, formulas, shapes, hooks and cost."),
    "bugs": ("attntrace.cli.bugs", "bugs", "List the deliberate bugs that --inject can put in."),
    "mask": ("attntrace.cli.mask", "mask", "Show attention masks, their conventions and effect."),
    "positions": ("attntrace.cli.positions", "positions", "Render positional encodings."),
    "hooks": ("attntrace.cli.hooks", "hooks", "List hook points, with shapes for a spec."),
    "check": ("attntrace.cli.check", "check", "Check a hand calculation (`expect:` in a spec)."),
    "diff": ("attntrace.cli.diff", "diff", "Show where two traces first diverge."),
    "grad": ("attntrace.cli.grad", "grad", "Run and verify the backward pass of attention."),
    "heads": ("attntrace.cli.heads", "heads", "Score every layer × head and rank them (the head finder)."),
    "import-model": ("attntrace.cli.import_model", "import_model",
                     "Write a real checkpoint on some text as an editable spec."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def list_commands(self, ctx):
        return [name for name, (module, _, _) in COMMANDS.items() if importlib.util.find_spec(module)]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError:
            return None

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, with two conventions of ours: a usage error under `--format json` is a JSON
        error document (exit 2), and Ctrl-C exits 130 quietly (exit 1 means a failed check)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            if _wants_json(argv):
                from attntrace.errors import Diagnosis
                command = exc.ctx.command_path if exc.ctx is not None else "attntrace"
                _report([Diagnosis(getattr(exc, "code", "ATT-E022"), exc.format_message(),
                                   hint=f"`{command} --help` lists the options")], "json", 2)
            exc.show()
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            sys.stderr.write("\ninterrupted\n")
            sys.exit(130)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        sys.exit(0)


def _wants_json(argv) -> bool:
    return "--format=json" in argv or any(a == "--format" and b == "json" for a, b in zip(argv, argv[1:]))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="attntrace", prog_name="attntrace")
def cli():
    """attntrace: trace, explain and debug scaled dot-product attention.

    \b
    attntrace run                      the built-in example, every step
    attntrace run spec.yaml            trace your own spec
    attntrace explain-shapes --seq 10 --d-model 512 --heads 8
    attntrace run spec.yaml --format json

    Exit codes: 0 ok, 1 a check or expectation failed, 2 bad input, 3 shape error.
    """


def format_option(f):
    return click.option("--format", "fmt", type=click.Choice(["rich", "json"]), default="rich",
                        show_default=True, help="rich: for people; json: for scripts and graders.")(f)


def handles_errors(f):
    """Turn attntrace errors into rendered diagnoses and exit codes; never a traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        fmt = kwargs.get("fmt", "rich")
        try:
            return f(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # every error ends as a message, not a traceback
            from attntrace.errors import AttnTraceError
            if isinstance(exc, AttnTraceError):
                _report(exc.diagnoses, fmt, exc.exit_code)
            if os.environ.get("ATTNTRACE_DEBUG"):
                raise
            from attntrace.errors import Diagnosis
            if isinstance(exc, MemoryError):    # the estimate said it fits, but the system disagreed
                diag = Diagnosis("ATT-E020", "the system refused memory during the run (the estimate said it "
                                             "would fit: other programs may be using it)",
                                 hint="--chunk N (online softmax over key blocks) needs far less; or float32")
                _report([diag], fmt, 2)
            diag = Diagnosis("ATT-E999", f"internal error: {type(exc).__name__}: {exc}",
                             hint="this is a bug in attntrace; set ATTNTRACE_DEBUG=1 to see the traceback "
                                  "and please report it")
            _report([diag], fmt, 70)

    return wrapper


def _report(diagnoses, fmt: str, code: int):
    from attntrace.render import output
    output.report_errors(diagnoses, fmt, code)
    sys.exit(code)


# A command imports numpy, rich and ours: ~300,000 objects that live until the process exits. At
# Python's default (a collection every 700 new containers) the cycle collector ran ~80 times during
# the built-in run, 18 ms of it, finding nothing. The command line collects less often, as mypy's
# does; arrays are freed by reference counting as before. The Python API keeps Python's setting.
CLI_GC_THRESHOLD = 50_000


def main():
    import gc
    gc.set_threshold(CLI_GC_THRESHOLD)
    try:
        cli(prog_name="attntrace")
    finally:
        # the command is done and its files are closed: the collector's last pass at exit would free
        # the modules' classes and functions cycle by cycle (~25 ms of a small run) just before the
        # OS takes the whole process back; frozen, they are left to it (reference counts still free
        # everything else as usual)
        gc.freeze()


if __name__ == "__main__":
    main()
