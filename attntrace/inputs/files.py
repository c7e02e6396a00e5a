"""Files a run reads and writes: which ones are inputs, and writing without ever half-writing.

Every file attntrace writes (exports, `save` hooks, imported specs) goes
through :func:`atomic_write`: a temporary file in the same folder, then
``os.replace``, so a reader never sees half a file and an interrupted run
leaves the old one intact (files are not forced to disk: see PendingFile.finish).
Nothing is ever written over an input of the run: the spec, the arrays it loads,
hook files and patch files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, List, Optional, Sequence, Set, Tuple

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


def check_writable(path: Path, what: str, location=None) -> None:
    """Before a run: the target is a file name (not a folder) in an existing folder we may write into,
    and not a file we may not replace -- so a failure cannot come after the work is done."""
    try:
        path = Path(path)
        folder = path.resolve().parent
        if path.is_dir():
            raise input_error("ATT-E064", f"{what}: is a folder, not a file name", location)
        if not folder.is_dir():
            raise input_error("ATT-E064", f"{what}: folder {folder} does not exist", location,
                              hint="create the folder first, or write into an existing one")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise input_error("ATT-E064", f"{what}: folder {folder} is not writable", location,
                              hint="choose a folder you may write into")
        if path.exists() and not path.is_file():
            raise input_error("ATT-E064", f"{what}: {path} exists and is not a regular file", location)
    except (OSError, ValueError) as exc:          # a name too long, a NUL byte, a loop of links
        raise input_error("ATT-E064", f"{what}: cannot use this file name: {exc}", location) from None


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
        check_writable(path, what)
        refuse_inputs(path, protected, what)
        if path.resolve() in {t.resolve() for t in targets}:
            raise input_error("ATT-E064", f"{what}: given twice")
        targets.append(path)
    return targets


class PendingFile:
    """A file written over time -- an export streamed while the run passes its steps -- into a
    temporary file beside `path`, opened on first use; :func:`write_all` moves it into place
    together with the other files of the set, or removes it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.temp: Optional[str] = None
        self.stream: Optional[BinaryIO] = None

    def open(self) -> BinaryIO:
        if self.stream is None:
            import tempfile  # (and its `random`) only when a file is written: most runs write none
            try:
                handle, self.temp = tempfile.mkstemp(dir=str(self.path.resolve().parent),
                                                     prefix=f".{self.path.name}.", suffix=".tmp")
                self.stream = os.fdopen(handle, "w+b")
            except OSError as exc:
                self.discard()
                raise write_error(self.path, exc) from None
        return self.stream

    @property
    def opened(self) -> bool:
        return self.stream is not None

    def finish(self) -> str:
        """Close it with the mode the target will have; the temporary file's name.  No fsync: the
        rename is what makes a write all or nothing for every reader; forcing a gigabyte export to
        disk before it would double its cost (1.35 s for 850 MB here), for a guarantee against a
        power cut that numpy's own np.save does not give either."""
        assert self.stream is not None and self.temp is not None
        self.stream.flush()
        self.stream.close()
        os.chmod(self.temp, _file_mode(self.path))
        return self.temp

    def discard(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except OSError:
                pass
        if self.temp is not None:
            _remove(self.temp)
        self.stream = self.temp = None


def write_error(path: Path, exc: OSError):
    return input_error("ATT-E064", f"cannot write {path}: {exc.strerror or exc}",
                       hint="nothing was written; check that the folder exists and is writable")


def write_all(writers: Sequence[Tuple[Path, Callable[[BinaryIO], None]]],
              pending: Sequence[PendingFile] = (), before_pending: Optional[Callable[[], None]] = None) -> None:
    """Write several files all or nothing: each into a temporary file in its folder first, then all
    moved into place with ``os.replace``.  If any write fails (a read-only folder, a full disk),
    every temporary file is removed and no target is touched: one ATT-E064 names the file.
    `pending` files (written already, or by the writers) join the set once the writers are done
    (and `before_pending` has completed them: a zip's central directory, say)."""
    temps: List[Tuple[str, Path]] = []
    current = None
    try:
        for current, write in writers:
            temps.append((_write_temp(Path(current), write), Path(current)))
        if before_pending is not None:
            before_pending()
        for file in pending:
            current = file.path
            if file.opened:
                temps.append((file.finish(), file.path))
        for temp, current in temps:
            os.replace(temp, current)
    except OSError as exc:
        raise write_error(current, exc) from None
    finally:
        for temp, _ in temps:
            _remove(temp)           # after a successful os.replace the temporary name is gone already
        for file in pending:
            file.discard()


def _write_temp(path: Path, write: Callable[[BinaryIO], None]) -> str:
    """`write` into a new temporary file beside `path` (with the mode `path` will have); its name."""
    file = PendingFile(path)
    try:
        write(file.open())
        return file.finish()
    except BaseException:
        file.discard()
        raise


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, then os.replace it over `path`.

    Every failure (a missing or read-only folder, a full disk) is an ATT-E064 input error,
    and leaves neither a temporary file nor a half-written target behind."""
    write_all([(Path(path), write)])


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
