"""Files a run reads and writes: which ones are inputs, and writing without ever half-writing.

Every file attntrace writes (exports, `save` hooks, imported specs) goes
through :func:`atomic_write`: a temporary file in the same folder, then
``os.replace``, so a reader never sees half a file and an interrupted run
leaves the old one intact.  Nothing is ever written over an input of the run:
the spec, the arrays it loads, hook files and patch files.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, List, Set

from attntrace.errors import input_error

SOURCE_FILE_KEYS = ("npy", "npz", "safetensors")
RENDERED_SUFFIXES = (".svg", ".html", ".txt")     # pictures of the trace (render/export.py)
DATA_SUFFIXES = (".json", ".npz")                # its numbers
EXPORT_SUFFIXES = RENDERED_SUFFIXES + DATA_SUFFIXES


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
        if suffix not in EXPORT_SUFFIXES:
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


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, then os.replace it over `path`.

    Every failure (a missing or read-only folder, a full disk) is an ATT-E064 input error,
    and leaves neither a temporary file nor a half-written target behind."""
    path = Path(path)
    temp = None
    try:
        handle, temp = tempfile.mkstemp(dir=str(path.resolve().parent), prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, _file_mode(path))      # mkstemp makes 0600; give the usual mode
        os.replace(temp, path)
    except OSError as exc:
        if temp is not None:
            _remove(temp)
        raise input_error("ATT-E064", f"cannot write {path}: {exc.strerror or exc}",
                          hint="check that the folder exists and is writable") from None
    except BaseException:
        if temp is not None:
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
