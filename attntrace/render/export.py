"""`--export FILE`: the rendered trace (.svg .txt), the offline HTML explorer (.html), or its data (.json .npz).

Every file is written atomically: into a temporary file in the same folder,
then moved over the target with ``os.replace``, so a reader never sees half a
file and an interrupted run leaves the old one intact.  Exports never
overwrite an input of the run: the spec, the arrays it loads, hook files and
patch files.

A saved .npz holds one array per hook, under the hook's name, plus
``__name__``, ``__tokens__``, ``__key_tokens__`` and ``__hooks__`` (the step
order) as text arrays, so it loads without pickle and ``attntrace diff`` can
compare it with a spec.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional

import numpy as np

from attntrace.inputs.files import DATA_SUFFIXES, atomic_write

RENDERED = {".svg": "svg", ".txt": "text"}    # suffix -> rich export (.html is the explorer)
META_KEYS = ("__name__", "__tokens__", "__key_tokens__", "__hooks__")


def wants_data(paths: Iterable[Path]) -> bool:
    return any(Path(p).suffix.lower() in DATA_SUFFIXES for p in paths)


def wants_patterns(paths: Iterable[Path]) -> bool:
    """The explorer draws every layer's weights: they must be kept."""
    return any(Path(p).suffix.lower() == ".html" for p in paths)


def write_rendered(path: Path, render: Callable[[Any], None], width: Optional[int] = None) -> None:
    """Render into a recording console and write rich's SVG / HTML / text export."""
    from rich.console import Console
    console = Console(file=io.StringIO(), record=True, width=width or 120, force_terminal=True,
                      color_system="truecolor", highlight=False, soft_wrap=False)
    render(console)
    kind = RENDERED[Path(path).suffix.lower()]
    if kind == "svg":
        text = console.export_svg(title=f"attntrace · {Path(path).stem}")
    else:
        text = console.export_text(styles=False)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_data(path: Path, trace, extra: Optional[dict] = None) -> None:
    """.npz: every kept array under its hook name; .json: the JSON document of the trace
    with every kept array in full (plus `extra` keys, e.g. the expectations)."""
    if Path(path).suffix.lower() == ".npz":
        atomic_write(path, lambda f: np.savez(f, **trace_arrays(trace)))
        return
    from attntrace.render.json_view import trace_to_json
    from attntrace.render.output import jsonable
    document = dict(trace_to_json(trace, 0, values="full"), **(extra or {}))
    text = json.dumps(jsonable(document), ensure_ascii=False, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def trace_arrays(trace) -> dict:
    """What a saved .npz holds: hook arrays in step order plus text metadata."""
    arrays = {hook: trace.arrays[hook] for hook in trace.plan.hooks if hook in trace.arrays}
    arrays.update({
        "__name__": np.array(str(trace.spec.name)),
        "__tokens__": np.array([str(t) for t in trace.spec.tokens]),
        "__key_tokens__": np.array([str(t) for t in trace.spec.key_tokens]),
        "__hooks__": np.array(list(arrays)),
    })
    return arrays


def export_all(targets: Iterable[Path], trace, render: Callable[[Any], None], extra: Optional[dict] = None,
               width: Optional[int] = None) -> List[Path]:
    """Write every --export target; returns them (for a "wrote ..." line)."""
    written = []
    for path in targets:
        if Path(path).suffix.lower() == ".html":
            from attntrace.render.trace_explorer import write_trace_explorer
            write_trace_explorer(path, trace)
        elif Path(path).suffix.lower() in RENDERED:
            write_rendered(path, render, width)
        else:
            write_data(path, trace, extra)
        written.append(Path(path))
    return written
