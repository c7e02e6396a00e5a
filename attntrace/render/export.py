"""`--export FILE`: the rendered trace (.svg .txt), the offline HTML explorer (.html), or its data (.json .npz).

Exports are all or nothing: every target is validated before the run
(:func:`attntrace.inputs.files.check_targets`: a known suffix, a writable
folder, not an input of the run), the arrays are written during the run into
temporary files beside their targets, the rest after it, and only then is
every file moved into place -- so a failure (a full disk, a folder made
read-only meanwhile, a run that fails or is interrupted) leaves no partial set
behind and is one ATT-E064 error.  Exports never overwrite an input of the
run: the spec, the arrays it loads, hook files and patch files.

The arrays stream: :class:`Exports` is opened before the run, and its on_step
callback writes each step's array to the .npz files as the step finishes,
before the next step reuses the buffer -- so an export keeps no arrays and
needs no more memory than the run.

A .json export holds every array in full: up to a million values as nested
lists; bigger ones in the .npz of the same name beside it, under the hook's
name, referred to as ``{"npz": "trace.npz", "key": hook}``.  (A JSON document
written without a file beside it packs them as base64 bytes instead,
:mod:`attntrace.inputs.packed_array`.)

A saved .npz holds one array per hook, under the hook's name, plus
``__name__``, ``__tokens__``, ``__key_tokens__`` and ``__hooks__`` (the step
order) as text arrays, so it loads without pickle and ``attntrace diff`` can
compare it with a spec.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

import numpy as np

from attntrace.errors import input_error
from attntrace.inputs.files import DATA_SUFFIXES, PendingFile, check_writable, refuse_inputs, write_all, write_error
from attntrace.inputs.npz_writer import NpzWriter
from attntrace.inputs.packed_array import little_endian, packed_header
from attntrace.render.json_view import hook_entry, preview_entry, trace_header

LIST_VALUES_LIMIT = 1 << 20        # up to this many values: nested lists in a JSON export; more: the .npz beside it
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
                      color_system="truecolor", highlight=False, emoji=False, soft_wrap=False)
    render(console)
    kind = RENDERED[Path(path).suffix.lower()]
    if kind == "svg":
        text = console.export_svg(title=f"attntrace · {Path(path).stem}")
    else:
        text = console.export_text(styles=False)
    return text.encode("utf-8")


class ArrayArchive:
    """A .npz written member by member (:class:`attntrace.inputs.npz_writer.NpzWriter`), each array
    straight from the step that made it: memory stays one slice of one array, whatever the trace's size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = PendingFile(self.path)
        self.writer: Optional[NpzWriter] = None
        self.names: List[str] = []

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self.names:
            return
        try:
            if self.writer is None:
                self.writer = NpzWriter(self.file.open())
            self.writer.add(name, array)
        except OSError as exc:
            self.discard()
            raise write_error(self.path, exc) from None
        self.names.append(name)

    def close(self) -> None:
        """The zip's central directory (before the file is moved into place)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def discard(self) -> None:
        self.writer = None
        self.file.discard()


class Exports:
    """The --export targets of one run, opened before it.

    .npz targets (and the .npz beside a .json target, for its arrays of over a million values)
    are written while the run passes its steps (:meth:`on_step`): a score-sized step goes to disk
    before the next step reuses its buffer, so an export needs no arrays kept and no more memory
    than the run.  Everything else is written by :meth:`finish`, all or nothing with them; leaving
    the ``with`` block without finishing removes what was written."""

    def __init__(self, targets: Iterable[Path], shown: Optional[Iterable[str]] = None,
                 protected: Iterable[Path] = ()):
        self.targets = [Path(t) for t in targets]
        self.shown = None if shown is None else set(shown)
        self.archives: Dict[Path, ArrayArchive] = {}       # resolved path -> archive
        self.full: Dict[Path, ArrayArchive] = {}            # explicit .npz targets: every array
        self.beside: Dict[Path, ArrayArchive] = {}          # .json target -> its big arrays' archive
        for path in self.targets:
            suffix = path.suffix.lower()
            if suffix == ".npz":
                self.full[path] = self._archive(path)
            elif suffix == ".json":
                beside = sidecar_of(path)
                what = f"--export {path} (its big arrays go to {beside.name})"
                check_writable(beside, what)
                refuse_inputs(beside, protected, what)
                self.beside[path] = self._archive(beside)

    def check_space(self, plan, itemsize: int) -> None:
        """Before the run: refuse (ATT-E064) when the arrays the .npz files will hold do not fit on
        their disk (the plan knows every shape), instead of failing after the work is done."""
        import shutil

        from attntrace.core.memory import human
        for path, archive in self.archives.items():
            big_only = archive not in self.full.values()
            need = sum(plan.result_bytes(step, itemsize) for step in plan.steps
                       if (self.shown is None or step.hook in self.shown or step is plan.steps[-1]) and
                       not (big_only and plan.result_bytes(step, 1) <= LIST_VALUES_LIMIT))
            try:
                free = shutil.disk_usage(path.parent).free
            except OSError:
                continue
            if need > free:
                raise input_error("ATT-E064", f"--export: {archive.path} would hold about {human(need)} of arrays; "
                                              f"{human(free)} is free on its disk",
                                  hint="--steps LIST exports only the steps shown; or write into another folder")

    def _archive(self, path: Path) -> ArrayArchive:
        return self.archives.setdefault(path.resolve(), ArrayArchive(path))

    def on_step_or_none(self):
        """The run's on_step callback when there is something to stream."""
        return self.on_step if self.archives else None

    def wants(self, step, trace) -> bool:
        """In full: the steps shown (all without --steps), and always the output."""
        return self.shown is None or step.hook in self.shown or step is trace.plan.steps[-1]

    def on_step(self, step, array: np.ndarray, trace) -> None:
        if not self.wants(step, trace):
            return
        for archive in self.full.values():
            archive.add(step.hook, array)
        if array.size > LIST_VALUES_LIMIT:
            for archive in self.beside.values():
                archive.add(step.hook, array)

    def finish(self, trace, render: Callable[[Any], None], extra: Optional[dict] = None,
               width: Optional[int] = None) -> List[Path]:
        """Write the rest and move every file into place; returns the targets (for "exported: ...")."""
        writers = []
        for path in self.targets:
            suffix = path.suffix.lower()
            if suffix == ".html":
                from attntrace.render.trace_explorer import trace_page
                page = trace_page(trace).encode("utf-8")
                writers.append((path, lambda f, page=page: f.write(page)))
            elif suffix in RENDERED:
                text = rendered_bytes(path, render, width)
                writers.append((path, lambda f, text=text: f.write(text)))
            elif suffix == ".json":
                writers.append((path, lambda f, path=path: write_json_document(
                    f, trace, extra or {}, archive=self.beside[path], wanted=self.wanted(trace))))
        for archive in self.full.values():
            self._complete(archive, trace)
        try:
            write_all(writers, [archive.file for archive in self.archives.values()],
                      before_pending=self._close_archives)
        finally:
            self.discard()
        written = list(self.targets)
        written += [a.path for a in self.beside.values() if a.names and a.path.resolve() not in
                    {t.resolve() for t in self.targets}]
        return written

    def wanted(self, trace) -> Set[str]:
        return {step.hook for step in trace.plan.steps if self.wants(step, trace)}

    def _complete(self, archive: ArrayArchive, trace) -> None:
        """Kept arrays the run did not pass through on_step (a trace from elsewhere), then the text
        metadata: the name, tokens and step order."""
        for step in trace.plan.steps:
            if step.hook in trace.arrays and self.wants(step, trace):
                archive.add(step.hook, trace.arrays[step.hook])
        hooks = [hook for hook in trace.plan.hooks if hook in archive.names]
        for name, value in (("__name__", str(trace.spec.name)), ("__tokens__", [str(t) for t in trace.spec.tokens]),
                            ("__key_tokens__", [str(t) for t in trace.spec.key_tokens]), ("__hooks__", hooks)):
            archive.add(name, np.array(value))

    def _close_archives(self) -> None:
        for archive in self.archives.values():
            archive.close()

    def discard(self) -> None:
        for archive in self.archives.values():
            archive.discard()

    def __enter__(self) -> Exports:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def sidecar_of(path: Path) -> Path:
    """Where a .json export's big arrays go: the .npz of the same name beside it."""
    return Path(path).with_suffix(".npz")


def write_json_document(f, trace, extra: dict, archive: Optional[ArrayArchive] = None,
                        wanted: Optional[Set[str]] = None) -> None:
    """The JSON document of `trace` with every kept array in full, streamed: the header, then one
    hook at a time, each array row by row, so memory stays one row of text (not the document).
    Arrays of over a million values are in `archive` (the .npz beside it), referred to as
    ``{"npz": "trace.npz", "key": hook}``; `wanted`: the hooks in full (all by default)."""
    import json  # here and in _dumps: a run without a JSON export does not load it
    header = dict(trace_header(trace, int(extra.get("exit_code", 0))), **extra)
    f.write(b"{\n")
    for key, value in header.items():
        f.write(f"  {json.dumps(key)}: ".encode() + _dumps(value) + b",\n")
    f.write(b'  "hooks": {')
    for n, step in enumerate(trace.plan.steps):
        entry = hook_entry(trace, step, "none")
        array = trace.arrays.get(step.hook) if wanted is None or step.hook in wanted else None
        big = math.prod(trace.stats[step.hook].shape) > LIST_VALUES_LIMIT
        in_archive = big and archive is not None and step.hook in archive.names
        f.write((",\n    " if n else "\n    ").encode() + json.dumps(step.hook).encode() + b": ")
        f.write(_dumps(entry)[:-1])            # the entry without its closing brace: its values follow
        if in_archive or (array is not None and big and archive is not None):
            if not in_archive:
                archive.add(step.hook, array)
            f.write(b', "values": ' + _dumps({"npz": archive.path.name, "key": step.hook}))
        elif array is not None and big:
            f.write(b', "values": ')
            _write_packed(f, array)
        elif array is not None:
            f.write(b', "values": ')
            _write_array(f, array)
        else:
            f.write(b', "preview": ' + _dumps(preview_entry(trace, step)))
        f.write(b"}")
    f.write(b"\n  }")
    winners = {hook: {"weight": w, "key": k} for hook, (w, k) in trace.winners.items()}
    if winners:
        f.write(b',\n  "pattern_row_max": ' + _dumps(winners))
    f.write(b"\n}\n")


def _dumps(value) -> bytes:
    import json

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
