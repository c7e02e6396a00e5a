"""`--export FILE`: the rendered trace (.svg .html .txt) or its data (.json .npz).

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
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, List, Optional, Set

import numpy as np

from attntrace.errors import input_error

RENDERED = {".svg": "svg", ".html": "html", ".txt": "text"}
DATA = (".json", ".npz")
EXTENSIONS = tuple(RENDERED) + DATA
SOURCE_FILE_KEYS = ("npy", "npz", "safetensors")
META_KEYS = ("__name__", "__tokens__", "__key_tokens__", "__hooks__")


# --------------------------------------------------------------------------- what must not be overwritten

def input_files(spec) -> Set[Path]:
    """The spec file and every array file it loads (resolved paths)."""
    if spec is None or not getattr(spec, "file", None):
        return set()
    spec_path = Path(spec.file).resolve()
    found = {spec_path}
    stack = [spec.document.data] if spec.document is not None else []
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if key in SOURCE_FILE_KEYS and isinstance(item, str):
                    path = Path(item)
                    found.add((path if path.is_absolute() else spec_path.parent / path).resolve())
                else:
                    stack.append(item)
        elif isinstance(value, list):
            stack.extend(v for v in value if isinstance(v, (dict, list)))
    return found


def refuse_inputs(path: Path, protected: Iterable[Path], what: str) -> None:
    resolved = Path(path).resolve()
    if resolved in {Path(p).resolve() for p in protected}:
        raise input_error("ATT-E064", f"{what}: refusing to overwrite {path}, an input of this run",
                          hint="choose another file name")


def check_targets(paths: Iterable[Path], protected: Iterable[Path]) -> List[Path]:
    """Validate --export targets before the run: known extension, writable folder, not an input."""
    targets: List[Path] = []
    for raw in paths:
        path = Path(raw)
        suffix = path.suffix.lower()
        what = f"--export {raw}"
        if suffix not in EXTENSIONS:
            raise input_error("ATT-E064", f"{what}: unknown export format '{suffix or path.name}'",
                              hint="rendered: .svg .html .txt; data: .json .npz")
        if path.is_dir():
            raise input_error("ATT-E064", f"{what}: is a folder, not a file name")
        if not path.resolve().parent.is_dir():
            raise input_error("ATT-E064", f"{what}: folder {path.resolve().parent} does not exist")
        refuse_inputs(path, protected, what)
        if path.resolve() in {t.resolve() for t in targets}:
            raise input_error("ATT-E064", f"{what}: given twice")
        targets.append(path)
    return targets


def wants_data(paths: Iterable[Path]) -> bool:
    return any(Path(p).suffix.lower() in DATA for p in paths)


# --------------------------------------------------------------------------- writing

def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, then os.replace it over `path`."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(dir=str(path.resolve().parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, _file_mode(path))      # mkstemp makes 0600; give the usual mode
        os.replace(temp, path)
    except OSError as exc:
        _remove(temp)
        raise input_error("ATT-E064", f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        _remove(temp)
        raise


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else what a plain open() would give (0666 minus umask)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _remove(temp: str) -> None:
    try:
        os.unlink(temp)
    except OSError:
        pass


def write_rendered(path: Path, render: Callable[[Any], None], width: Optional[int] = None) -> None:
    """Render into a recording console and write rich's SVG / HTML / text export."""
    from rich.console import Console
    console = Console(file=io.StringIO(), record=True, width=width or 120, force_terminal=True,
                      color_system="truecolor", highlight=False, soft_wrap=False)
    render(console)
    kind = RENDERED[Path(path).suffix.lower()]
    if kind == "svg":
        text = console.export_svg(title=f"attntrace · {Path(path).stem}")
    elif kind == "html":
        text = console.export_html(inline_styles=True)
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
    document = dict(trace_to_json(trace, 0, values_limit=float("inf")), **(extra or {}))
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
        if Path(path).suffix.lower() in RENDERED:
            write_rendered(path, render, width)
        else:
            write_data(path, trace, extra)
        written.append(Path(path))
    return written
