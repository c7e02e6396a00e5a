"""`attntrace hooks`: every hook point with its axes; given a spec, its actual shapes."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import width_option


@click.command("hooks")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@width_option
@format_option
@handles_errors
def hooks(spec, width, fmt):
    """List every hook point: name, axes, what it holds, and its aliases.

    With SPEC, also the step that fires each hook and its shape in this run
    (hooks the spec does not have, such as RoPE without `positional: rope`,
    are marked). Then the built-in actions for `--hook HOOK:ACTION[=ARG]`.

    \b
    attntrace hooks
    attntrace hooks configs/seed002_abc.yaml
    attntrace run spec.yaml --hook attn.hook_pattern:ablate-head=1
    """
    from attntrace.analysis.actions import ACTIONS
    from attntrace.analysis.actions import ALIASES as ACTION_ALIASES
    from attntrace.hookpoints import ALIASES, HOOK_POINTS
    from attntrace.render.output import make_console, print_json
    plan = None
    if spec is not None:
        from attntrace.analysis.diagnose import preflight
        from attntrace.analysis.run import load as load_spec
        from attntrace.core.plan import plan_from_spec
        loaded = load_spec(spec)
        plan = plan_from_spec(loaded)
        preflight(loaded, plan)
    aliases = {}
    for alias, hook in ALIASES.items():
        aliases.setdefault(hook, []).append(alias)
    rows = []
    for point in HOOK_POINTS:
        row = {"hook": point.name, "axes": list(point.axes), "what": point.what, "aliases": aliases.get(point.name, [])}
        if plan is not None:
            in_run = point.name in plan.hooks
            row["in_run"] = in_run
            if in_run:
                step = plan.step_for_hook(point.name)
                row.update(step=step.number, title=step.title, shape=list(plan.shape(point.axes)))
        rows.append(row)
    actions = [{"action": a.name, "argument": a.argument, "what": a.what} for a in ACTIONS.values()]
    if fmt == "json":
        print_json({"attntrace": 1, "exit_code": 0, "spec": str(spec) if spec else None, "hooks": rows,
                    "actions": actions,
                    "action_aliases": ACTION_ALIASES})
        return
    from attntrace.render.hooks_view import render_hooks
    render_hooks(make_console(width), rows, actions, with_spec=plan is not None)
