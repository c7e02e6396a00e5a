"""A trace as the offline HTML explorer: every layer's pattern, every step's range, the diagnoses.

`--export trace.html` writes it; in Jupyter a Trace displays as it (``Trace._repr_html_``).
The page itself is :mod:`attntrace.render.explorer`; this module only maps a trace onto it.
"""
from __future__ import annotations

from attntrace.hookpoints import split_name
from attntrace.render.explorer import (
    ExplorerData,
    ExplorerDiagnosis,
    ExplorerLayer,
    ExplorerStep,
    explorer_html,
    explorer_iframe,
)


def pattern_hooks(plan) -> list:
    """The hooks the explorer draws: every layer's softmax weights."""
    return [step.hook for step in plan.steps if step.key == "pattern"]


def explorer_data(trace) -> ExplorerData:
    spec = trace.spec
    layers = []
    for hook in pattern_hooks(trace.plan):
        if hook not in trace.arrays:
            continue
        layer, _ = split_name(hook)
        layers.append(ExplorerLayer(name=f"blocks.{layer}" if layer is not None else "attention",
                                    pattern=trace.arrays[hook]))
    steps = [ExplorerStep(hook=step.hook, axes=list(step.axes), **trace.stats[step.hook].to_json())
             for step in trace.plan.steps]
    diagnoses = [ExplorerDiagnosis.from_diagnosis(d, layer=split_name(d.hook)[0] if d.hook else None)
                 for d in trace.diagnoses]
    queries = spec.batch_tokens or list(spec.tokens)
    keys = list(spec.key_tokens) if spec.is_cross else None
    return ExplorerData(title=f"attntrace · {spec.name}", query_tokens=queries, key_tokens=keys, layers=layers,
                        steps=steps, diagnoses=diagnoses)


def trace_page(trace) -> str:
    """The explorer's whole page for a trace (what `--export trace.html` writes)."""
    return explorer_html(explorer_data(trace))


def trace_html(trace) -> str:
    """The explorer as a notebook fragment (an iframe with the whole page inline: still offline)."""
    return explorer_iframe(explorer_data(trace))
