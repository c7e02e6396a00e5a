"""`--export FILE`: the rendered trace (.svg .txt), the offline HTML explorer (.html), or its data (.json .npz).

Exports are all or nothing: every target is validated before the run
(:func:`attntrace.inputs.files.check_targets`: a known suffix, a writable
folder, not an input of the run), every file is rendered in memory, then all
are written into temporary files beside their targets and only then moved
into place -- so a failure (a full disk, a folder made read-only meanwhile)
leaves no partial set behind and is one ATT-E064 error.  Exports never
overwrite an input of the run: the spec, the arrays it loads, hook files and
patch files.

A .json export holds every kept array in full: up to a million values as
nested lists, bigger ones packed as base64 bytes (:mod:`attntrace.inputs.packed_array`),
streamed hook by hook so memory stays one slice of one array.

A saved .npz holds one array per hook, under the hook's name, plus
``__name__``, ``__tokens__``, ``__key_tokens__`` and ``__hooks__`` (the step
order) as text arrays, so it loads without pickle and ``attntrace diff`` can
compare it with a spec.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional

import numpy as np

from attntrace.inputs.files import DATA_SUFFIXES, write_all
from attntrace.inputs.packed_array import little_endian, packed_header
from attntrace.render.json_view import hook_entry, trace_header

LIST_VALUES_LIMIT = 1 << 20        # arrays up to this many values are nested lists in a JSON export; bigger: base64
PACK_SLICE_BYTES = 1 << 22
RENDERED = {".svg": "svg", ".txt": "text"}    # suffix -> rich export (.html is the explorer)
META_KEYS = ("__name__", "__tokens__", "__key_tokens__", "__hooks__")


def wants_data(paths: Iterable[Path]) -> bool:
    return any(Path(p).suffix.lower() in DATA_SUFFIXES for p in paths)


def wants_patterns(paths: Iterable[Path]) -> bool:
    """The explorer draws every layer's weights: they must be kept."""
    return any(Path(p).suffix.lower() == ".html" for p in paths)


def rendered_bytes(path: Path, render: Callable[[Any], None], width: Optional[int] = None) -> bytes:
    """Render into a recording console: rich's SVG / text export of it, as bytes."""
    from rich.console import Console
    console = Console(file=io.StringIO(), record=True, width=width or 120, force_terminal=True,
                      color_system="truecolor", highlight=False, soft_wrap=False)
    render(console)
    kind = RENDERED[Path(path).suffix.lower()]
    if kind == "svg":
        text = console.export_svg(title=f"attntrace · {Path(path).stem}")
    else:
        text = console.export_text(styles=False)
    return text.encode("utf-8")


def data_writer(path: Path, trace, extra: Optional[dict] = None) -> Callable[[Any], None]:
    """.npz: every kept array under its hook name; .json: the JSON document of the trace
    with every kept array in full (plus `extra` keys, e.g. the expectations)."""
    if Path(path).suffix.lower() == ".npz":
        arrays = trace_arrays(trace)
        return lambda f: np.savez(f, **arrays)
    return lambda f: write_json_document(f, trace, extra or {})


def write_json_document(f, trace, extra: dict) -> None:
    """The JSON document of `trace` with every kept array in full, streamed: the header, then one
    hook at a time, each array row by row, so memory stays one row of text (not the document)."""
    header = dict(trace_header(trace, int(extra.get("exit_code", 0))), **extra)
    f.write(b"{\n")
    for key, value in header.items():
        f.write(f"  {json.dumps(key)}: ".encode() + _dumps(value) + b",\n")
    f.write(b'  "hooks": {')
    for n, step in enumerate(trace.plan.steps):
        entry = hook_entry(trace, step, "none")
        array = trace.arrays.get(step.hook)
        f.write((",\n    " if n else "\n    ").encode() + json.dumps(step.hook).encode() + b": ")
        f.write(_dumps(entry)[:-1])            # the entry without its closing brace: its values follow
        if array is not None and array.size > LIST_VALUES_LIMIT:
            f.write(b', "values": ')
            _write_packed(f, array)
        elif array is not None:
            f.write(b', "values": ')
            _write_array(f, array)
        else:
            preview = hook_entry(trace, step, "preview")["preview"]
            f.write(b', "preview": ' + _dumps(preview))
        f.write(b"}")
    f.write(b"\n  }")
    winners = {hook: {"weight": w, "key": k} for hook, (w, k) in trace.winners.items()}
    if winners:
        f.write(b',\n  "pattern_row_max": ' + _dumps(winners))
    f.write(b"\n}\n")


def _dumps(value) -> bytes:
    from attntrace.render.output import jsonable
    return json.dumps(jsonable(value), ensure_ascii=False).encode("utf-8")


def _write_packed(f, array: np.ndarray) -> None:
    """A big array as {"encoding": "base64", "dtype", "shape", "data"} (see inputs/packed_array.py),
    its bytes written a slice at a time."""
    flat = np.ascontiguousarray(array).reshape(-1)
    dtype = little_endian(flat.dtype)
    f.write(_dumps(packed_header(array))[:-1] + b', "data": "')
    step = PACK_SLICE_BYTES // flat.itemsize // 3 * 3          # whole base64 groups: the slices join
    for start in range(0, flat.size, step):
        f.write(base64.b64encode(flat[start:start + step].astype(dtype, copy=False).tobytes()))
    f.write(b'"}')


def _write_array(f, array: np.ndarray) -> None:
    """A nested JSON list written one last-axis row at a time (non-finite numbers as strings)."""
    if array.ndim <= 1:
        f.write(_dumps(array))
        return
    f.write(b"[")
    for i in range(array.shape[0]):
        if i:
            f.write(b", ")
        _write_array(f, array[i])
    f.write(b"]")


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
    """Write every --export target, all or nothing; returns them (for an "exported: ..." line)."""
    writers = []
    for path in targets:
        suffix = Path(path).suffix.lower()
        if suffix == ".html":
            from attntrace.render.trace_explorer import trace_page
            page = trace_page(trace).encode("utf-8")
            writers.append((Path(path), lambda f, page=page: f.write(page)))
        elif suffix in RENDERED:
            text = rendered_bytes(path, render, width)
            writers.append((Path(path), lambda f, text=text: f.write(text)))
        else:
            writers.append((Path(path), data_writer(path, trace, extra)))
    write_all(writers)
    return [path for path, _ in writers]
