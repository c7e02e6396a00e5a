"""Array sources: where a matrix in a spec comes from.

An array in a spec is one of

* an inline nested list ``[[1, 0], [0, 1]]`` (or a numpy array from the Python API),
* ``{npy: file}`` -- loaded without pickle,
* ``{npz: file, key: name}``,
* ``{safetensors: file, key: name}`` -- needs the optional ``safetensors`` package,
* ``{random: {shape: [...], seed: 0, std: 0.02, mean: 0}}``,
* ``{identity: n}``.

File paths are relative to the spec's folder.  Every failure is an
:class:`~attntrace.errors.InputError` naming the YAML path and line.

Array files are read by attntrace itself, not by ``np.load``: the header is
parsed and checked first (magic, version, a literal dict with a shape of
whole numbers and a non-object dtype), the data's size is compared with what
the file holds, and only then is anything allocated -- so a truncated, empty,
mislabelled or unreadable file is a clean ATT-E013/E007, and an array bigger
than the machine is refused (ATT-E010) before it is read.  The same headers
let :func:`array_info` report a source's shape and dtype without loading it,
which is all ``explain-shapes`` needs (:func:`sizes_only`).
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from attntrace.errors import InputError, Location, input_error
from attntrace.text import did_you_mean, format_shape

if TYPE_CHECKING:
    import zipfile  # imported where an archive is opened: 6 ms of every start otherwise


@dataclass
class Array:
    """An array from the spec with the place it was written."""

    name: str
    data: np.ndarray
    location: Location

    @property
    def shape(self):
        return self.data.shape



SOURCE_KINDS = ("npy", "npz", "safetensors", "random", "identity")
MAX_ELEMENTS = 2 ** 31   # beyond this an array cannot be a sensible attention operand
LARGEST_FLOAT_INT = 2 ** 1024    # integers from here on have no float64
_PLAIN_NUMBERS = {float, int}      # exact types: bool (an int subclass) and numpy scalars take the full check

_SIZES_ONLY = contextvars.ContextVar("attntrace_sizes_only", default=False)


@contextlib.contextmanager
def sizes_only() -> Iterator[None]:
    """Load specs for their sizes alone: file, random and identity sources become zero-cost
    placeholders of the right shape and dtype (headers are read, data is not)."""
    token = _SIZES_ONLY.set(True)
    try:
        yield
    finally:
        _SIZES_ONLY.reset(token)


def physical_memory() -> int:
    """Bytes of memory this machine has (an array larger than this cannot be loaded at all)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 1 << 40


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if count < 1000 or unit == "PB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000
    return f"{count} PB"


class SourceContext:
    """What loading needs: the spec's folder and a way to locate YAML paths."""

    def __init__(self, base_dir: Optional[Path], locate: Callable[[Sequence], Location]):
        self.base_dir = base_dir or Path.cwd()
        self.locate = locate
        self.tensor_files: Dict[Path, Any] = {}     # .safetensors opened so far: each file once
        self.sizes_only = _SIZES_ONLY.get()          # placeholders instead of data (explain-shapes)


def load_array(value: Any, ctx: SourceContext, path: Sequence, *, allow_bool: bool = False,
               what: str = "array", allow_neg_inf: bool = False) -> np.ndarray:
    """Turn one spec value into a finite float (or bool) numpy array (-inf allowed for additive masks)."""
    if isinstance(value, np.ndarray):
        array = _checked_dtype(value, ctx, path, allow_bool)
    elif isinstance(value, (list, tuple)):
        array = _from_nested_list(value, ctx, path, allow_bool)
    elif isinstance(value, dict):
        array = _from_mapping(value, ctx, path, allow_bool)
        if is_placeholder(array):
            return array          # sizes only: no values to check
    else:
        raise input_error(
            "ATT-E003", f"{what} expected: a nested list or a source such as {{npy: file}}, "
                        f"got {describe_value(value)}", ctx.locate(path),
            hint="write the matrix as rows, e.g. [[1, 0], [0, 1]]")
    if array.dtype != bool:
        _check_finite(array, ctx, path, allow_neg_inf)
    return array


# --------------------------------------------------------------------------- lists

def _from_nested_list(value: list, ctx: SourceContext, path: Sequence, allow_bool: bool) -> np.ndarray:
    shape = nested_shape(value, ctx, list(path), allow_bool)
    if shape == (0,) or 0 in shape:
        raise input_error("ATT-E010", "array is empty", ctx.locate(path))
    flat_is_bool = allow_bool and _first_scalar(value).__class__ is bool
    return np.array(value, dtype=bool if flat_is_bool else np.float64)


def nested_shape(value: Any, ctx: SourceContext, path: List, allow_bool: bool) -> Tuple[int, ...]:
    """The shape of a nested list, or an error naming the first ragged/non-numeric element."""
    if isinstance(value, (list, tuple)):
        if not value:
            return (0,)
        kinds = set(map(type, value))               # a row of plain numbers: one check, not one per value
        if kinds <= _PLAIN_NUMBERS and (int not in kinds or max(map(abs, value)) < LARGEST_FLOAT_INT):
            return (len(value),)
        first = nested_shape(value[0], ctx, path + [0], allow_bool)
        for i, item in enumerate(value[1:], start=1):
            shape = nested_shape(item, ctx, path + [i], allow_bool)
            if shape != first:
                raise input_error(
                    "ATT-E004",
                    f"ragged list: item {i} has shape {format_shape(shape)} but item 0 has "
                    f"{format_shape(first)}", ctx.locate(path + [i]),
                    hint="every row of a matrix needs the same number of values")
        return (len(value),) + first
    if isinstance(value, bool):
        if allow_bool:
            return ()
        raise input_error("ATT-E005", f"expected a number, got {str(value).lower()}", ctx.locate(path),
                          hint="YAML reads yes/no/true/false as booleans; write 1 or 0")
    if isinstance(value, numbers.Integral) and abs(int(value)) >= LARGEST_FLOAT_INT:
        raise too_large(value, ctx.locate(path))
    if isinstance(value, numbers.Real):
        return ()
    raise input_error("ATT-E005", f"expected a number, got {describe_value(value)}", ctx.locate(path),
                      hint="matrix entries must be numbers (YAML writes NaN as .nan, which is also refused)")


def _first_scalar(value: Any) -> Any:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value


# --------------------------------------------------------------------------- sources

def _source_kind(value: dict, ctx: SourceContext, path: Sequence) -> str:
    """The one source kind of a mapping, with its keys checked."""
    kinds = [k for k in value if k in SOURCE_KINDS]
    if len(kinds) != 1:
        unknown = [str(k) for k in value if k not in SOURCE_KINDS and k != "key"]
        hint = None
        if unknown:
            hint = did_you_mean(unknown[0], SOURCE_KINDS, n=2)
        raise input_error(
            "ATT-E002", f"an array source needs exactly one of {', '.join(SOURCE_KINDS)}; got "
                        f"{', '.join(map(str, value)) or 'an empty mapping'}", ctx.locate(path), hint=hint)
    kind = kinds[0]
    allowed = {"npy": {"npy"}, "npz": {"npz", "key"}, "safetensors": {"safetensors", "key"},
               "random": {"random"}, "identity": {"identity"}}[kind]
    for extra in value:
        if extra not in allowed:
            raise input_error("ATT-E002", f"unknown key '{extra}' in a {kind} source",
                              ctx.locate(list(path) + [extra]),
                              hint=f"a {kind} source takes: {', '.join(sorted(allowed))}")
    return kind


def _source_file(value: dict, kind: str, ctx: SourceContext, path: Sequence) -> Path:
    """The file of a npy/npz/safetensors source (found first), with the `key:` an archive needs."""
    file = _resolve_file(value[kind], ctx, list(path) + [kind])
    if kind in ("npz", "safetensors") and "key" not in value:
        raise input_error("ATT-E002", f"a {kind} source needs `key:` (the array's name in the file)",
                          ctx.locate(path))
    return file


@dataclass(frozen=True)
class ArrayInfo:
    """What a source holds, known without reading its values."""

    shape: Tuple[int, ...]
    dtype: np.dtype


def array_info(value: dict, ctx: SourceContext, path: Sequence) -> ArrayInfo:
    """The shape and dtype of a source mapping, from its header or its parameters (no data read)."""
    kind = _source_kind(value, ctx, path)
    path = list(path)
    if kind == "random":
        shape, _, _, _ = _random_options(value["random"], ctx, path + ["random"])
        return ArrayInfo(shape, np.dtype(np.float64))
    if kind == "identity":
        n = _identity_size(value["identity"], ctx, path + ["identity"])
        return ArrayInfo((n, n), np.dtype(np.float64))
    file = _source_file(value, kind, ctx, path)
    if kind == "safetensors":
        tensors = _tensor_file(file, ctx, path)
        key = str(value["key"])
        if key not in tensors:
            raise _missing_key(key, tensors.names(), file, ctx, path)
        info = tensors.info(key)
        return ArrayInfo(tuple(int(s) for s in info.shape), _safetensors_dtype(info.dtype))
    with _reading(file, ctx, path):
        if kind == "npy":
            with _open_npy(file) as handle:
                return read_npy_header(handle, file.name).info
        with open_npz(file) as archive:
            return read_npy_header(_npz_member(archive, str(value["key"]), file, ctx, path),
                                   f"{file.name}:{value['key']}").info


def _safetensors_dtype(stored: str) -> np.dtype:
    if stored == "BOOL":
        return np.dtype(bool)
    return np.dtype(np.float64 if stored == "F64" or not stored.startswith(("F", "BF")) else np.float32)


def _from_mapping(value: dict, ctx: SourceContext, path: Sequence, allow_bool: bool) -> np.ndarray:
    if ctx.sizes_only:
        info = array_info(value, ctx, path)
        dtype = info.dtype if info.dtype in (np.float32, np.float64) or (allow_bool and info.dtype == bool) \
            else np.dtype(np.float64)
        return placeholder(info.shape, dtype)
    kind = _source_kind(value, ctx, path)
    if kind == "random":
        return _random(value["random"], ctx, list(path) + ["random"])
    if kind == "identity":
        n = _identity_size(value["identity"], ctx, list(path) + ["identity"])
        refuse_too_large((n, n), 8, ctx.locate(list(path) + ["identity"]), "identity")
        return np.eye(n)
    file = _source_file(value, kind, ctx, path)
    if kind == "npy":
        array = _load_npy(file, ctx, path)
    elif kind == "npz":
        array = _load_npz(file, str(value["key"]), ctx, list(path))
    else:
        array = _load_safetensors(file, str(value["key"]), ctx, list(path))
    return _checked_dtype(array, ctx, path, allow_bool)


def placeholder(shape: Sequence[int], dtype=np.float64) -> np.ndarray:
    """A read-only array of zeros with this shape that takes no memory (every stride is 0)."""
    return np.broadcast_to(np.zeros((), dtype=dtype), tuple(shape))


def is_placeholder(array: np.ndarray) -> bool:
    return array.size > 1 and not array.flags.writeable and not any(array.strides)


def _identity_size(n: Any, ctx: SourceContext, path: Sequence) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_ELEMENTS:
        raise input_error("ATT-E010", f"identity size must be a positive whole number, got {describe_value(n)}",
                          ctx.locate(path))
    return int(n)


def refuse_too_large(shape: Sequence[int], itemsize: int, location: Optional[Location], what: str) -> None:
    """ATT-E010 for an array that could never be loaded here: more values than MAX_ELEMENTS, or
    more bytes than the machine has -- said before a byte of it is read or drawn."""
    count = 1
    for size in shape:
        count *= int(size)
    needed = count * max(int(itemsize), 1)
    memory = physical_memory()
    if count > MAX_ELEMENTS or needed > memory:
        raise input_error("ATT-E010", f"{what} of shape {format_shape(shape)} is impossibly large: {count:,} values, "
                                      f"{format_bytes(needed)} (this machine has {format_bytes(memory)})", location,
                          hint="use smaller sizes; `attntrace explain-shapes` shows the sizes of every step "
                               "without loading anything")


# --------------------------------------------------------------------------- array files

class BadArrayFile(Exception):
    """A file that is not the array file it claims to be; callers add where it was named."""

    def __init__(self, message: str, code: str = "ATT-E013", hint: Optional[str] = None):
        super().__init__(message)
        self.message, self.code, self.hint = message, code, hint


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")      # a local file header; an empty archive
MAX_NPY_HEADER = 1 << 16
_NPY_VERSIONS = {(1, 0): ("<H", "latin1"), (2, 0): ("<I", "latin1"), (3, 0): ("<I", "utf8")}


@dataclass(frozen=True)
class NpyHeader:
    info: ArrayInfo
    fortran_order: bool


def _read_exactly(stream: BinaryIO, count: int, what: str, name: str) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise BadArrayFile(f"{name} is truncated: {what} needs {count} bytes, the file holds {len(data)}",
                           hint="the file was cut short while it was written or copied; save it again")
    return data


def read_npy_header(stream: BinaryIO, name: str) -> NpyHeader:
    """Parse and check a .npy header (the stream is left at the start of the data)."""
    import struct
    if stream.read(6) != NPY_MAGIC:
        raise BadArrayFile(f"{name} is not a .npy file (no NUMPY header)", hint="write it with np.save(path, array)")
    version = tuple(_read_exactly(stream, 2, "the format version", name))
    if version not in _NPY_VERSIONS:
        raise BadArrayFile(f"{name} has .npy format version {version[0]}.{version[1]}, which does not exist")
    length_format, encoding = _NPY_VERSIONS[version]
    (length,) = struct.unpack(length_format, _read_exactly(stream, struct.calcsize(length_format),
                                                           "the header length", name))
    if length > MAX_NPY_HEADER:
        raise BadArrayFile(f"{name} declares a .npy header of {length:,} bytes (real ones take about 128)")
    try:
        text = _read_exactly(stream, length, "the header", name).decode(encoding)
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError, UnicodeDecodeError) as exc:
        raise BadArrayFile(f"{name} has a .npy header that is not a literal dict: "
                           f"{type(exc).__name__}") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise BadArrayFile(f"{name} has a .npy header without exactly descr, fortran_order and shape")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 62
                                               for s in shape) or len(shape) > 32:
        raise BadArrayFile(f"{name} has an invalid shape in its header: {str(shape)[:60]}")
    if not isinstance(fortran, bool):
        raise BadArrayFile(f"{name} has an invalid fortran_order in its header")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        raise BadArrayFile(f"{name} has an invalid dtype in its header: {type(exc).__name__}") from None
    if dtype.hasobject:
        raise BadArrayFile(f"{name} holds Python objects; attntrace loads .npy without pickle", code="ATT-E011",
                           hint="save a numeric array: np.save(path, array.astype(np.float64))")
    return NpyHeader(ArrayInfo(tuple(shape), dtype), fortran)


def read_npy(stream: BinaryIO, name: str, location: Optional[Location] = None,
             total_size: Optional[int] = None) -> np.ndarray:
    """A whole .npy array from a stream: header checked, size refused if impossible, data read
    into a fresh (writable) array.  `total_size`: the stream's length in bytes, when known."""
    import math
    header = read_npy_header(stream, name)
    shape, dtype = header.info.shape, header.info.dtype
    refuse_too_large(shape, dtype.itemsize, location, name)
    count = math.prod(shape)
    needed = count * dtype.itemsize
    available = None if not total_size else total_size - stream.tell()
    if available is not None and available < needed:
        raise BadArrayFile(f"{name} is truncated: its header promises {format_shape(shape)} {dtype} "
                           f"({needed:,} bytes of data), the file holds {available:,}",
                           hint="the file was cut short while it was written or copied; save it again")
    array = np.empty(count, dtype=dtype)
    if needed:
        view = memoryview(array.view(np.uint8))
        filled = 0
        while filled < needed:
            got = stream.readinto(view[filled:])
            if not got:
                raise BadArrayFile(f"{name} is truncated: {needed:,} bytes of data expected, {filled:,} found")
            filled += got
    return array.reshape(shape, order="F" if header.fortran_order else "C")


@contextlib.contextmanager
def _open_npy(file: Path) -> Iterator[BinaryIO]:
    """A .npy file opened at its start, or BadArrayFile saying what else it is."""
    with open(file, "rb") as handle:
        magic = handle.read(6)
        if magic != NPY_MAGIC:
            # np.load would take any other file for a pickle and say so: misleading
            hint = f"it is a .npz archive: write {{npz: {file.name}, key: NAME}}" if magic[:4] in ZIP_MAGICS \
                else "write it with np.save(path, array)"
            raise BadArrayFile(f"{file.name} is not a .npy file (no NUMPY header)", hint=hint)
        handle.seek(0)
        yield handle


def read_npy_file(file: Path, location: Optional[Location] = None) -> np.ndarray:
    with _open_npy(file) as handle:
        size = os.fstat(handle.fileno()).st_size
        return read_npy(handle, file.name, location, total_size=size)   # /proc files report size 0


@contextlib.contextmanager
def open_npz(file: Path) -> Iterator[zipfile.ZipFile]:
    """A .npz archive, or BadArrayFile saying what the file is instead."""
    with open(file, "rb") as handle:
        magic = handle.read(6)
    if magic[:4] not in ZIP_MAGICS:
        if magic == NPY_MAGIC:
            raise BadArrayFile(f"{file.name} is a .npy file, not a .npz archive", hint=f"write {{npy: {file.name}}}")
        what = "an empty file" if not magic else "not a .npz archive (no zip header)"
        raise BadArrayFile(f"{file.name} is {what}", hint="write it with np.savez(path, name=array)")
    import zipfile
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise BadArrayFile(f"{file.name} is not a readable .npz archive: {exc}") from None
    with archive:
        yield archive


def npz_keys(archive: zipfile.ZipFile) -> List[str]:
    return [name[:-4] if name.endswith(".npy") else name for name in archive.namelist()]


def _npz_member(archive: zipfile.ZipFile, key: str, file: Path, ctx: SourceContext, path: Sequence) -> BinaryIO:
    names = archive.namelist()
    member = key if key in names else f"{key}.npy"
    if member not in names:
        raise _missing_key(key, npz_keys(archive), file, ctx, list(path))
    return _open_member(archive, member, file)


def _open_member(archive: zipfile.ZipFile, member: str, file: Path) -> BinaryIO:
    import zipfile
    try:
        return archive.open(member)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, EOFError) as exc:
        raise BadArrayFile(f"{file.name}: the array '{member}' cannot be read: {exc}") from None


def read_npz_member(archive: zipfile.ZipFile, member: str, file: Path,
                    location: Optional[Location] = None) -> np.ndarray:
    import zipfile
    import zlib
    size = archive.getinfo(member).file_size
    with _open_member(archive, member, file) as stream:
        try:
            return read_npy(stream, f"{file.name}:{member}", location, total_size=size)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise BadArrayFile(f"{file.name}: the array '{member}' is damaged: {exc}") from None


def read_npz_all(file: Path) -> Dict[str, np.ndarray]:
    """Every array of a .npz archive (names without .npy), read without pickle."""
    with open_npz(file) as archive:
        return {key: read_npz_member(archive, member, file)
                for key, member in zip(npz_keys(archive), archive.namelist())}


@contextlib.contextmanager
def _reading(file: Path, ctx: SourceContext, path: Sequence) -> Iterator[None]:
    """Turn a bad or unreadable array file into an input error at the YAML line that names it."""
    try:
        yield
    except BadArrayFile as exc:
        raise input_error(exc.code, exc.message, ctx.locate(path), hint=exc.hint) from None
    except OSError as exc:
        raise input_error("ATT-E007", f"cannot read {file.name}: {exc.strerror or exc}", ctx.locate(path),
                          hint="check that it is a regular file you may read") from None


def _resolve_file(name: Any, ctx: SourceContext, path: Sequence) -> Path:
    if not isinstance(name, str) or not name or "\0" in name:
        raise input_error("ATT-E003", f"file name expected, got {describe_value(name)}", ctx.locate(path))
    file = Path(name)
    try:
        if not file.is_absolute():
            file = ctx.base_dir / file
        exists, regular = file.exists(), file.is_file()
    except (OSError, ValueError) as exc:
        raise input_error("ATT-E007", f"cannot use the file name {name!r}: {exc}", ctx.locate(path)) from None
    if not exists:
        raise input_error("ATT-E007", f"file not found: {file}", ctx.locate(path),
                          hint="paths are relative to the spec file's folder")
    if not regular:
        raise input_error("ATT-E007", f"not a file: {file}", ctx.locate(path))
    return file


def _load_npy(file: Path, ctx: SourceContext, path: Sequence) -> np.ndarray:
    with _reading(file, ctx, path):
        return read_npy_file(file, ctx.locate(path))


def _load_npz(file: Path, key: str, ctx: SourceContext, path: List) -> np.ndarray:
    with _reading(file, ctx, path), open_npz(file) as archive:
        names = archive.namelist()
        member = key if key in names else f"{key}.npy"
        if member not in names:
            raise _missing_key(key, npz_keys(archive), file, ctx, path)
        return read_npz_member(archive, member, file, ctx.locate(path))


def _tensor_file(file: Path, ctx: SourceContext, path: Sequence):
    try:
        tensors = ctx.tensor_files.get(file)
        if tensors is None:
            from attntrace.inputs.safetensors_io import open_tensors  # only for a spec that reads one
            tensors = ctx.tensor_files[file] = open_tensors(file)
        return tensors
    except InputError as error:          # the reader names the file; add the YAML line
        error.diagnosis.locations.insert(0, ctx.locate(path))
        raise


def _load_safetensors(file: Path, key: str, ctx: SourceContext, path: List) -> np.ndarray:
    """One tensor, read lazily: each file's header is parsed once per spec and only the
    tensors named are read (bfloat16 and float16 arrive as float32)."""
    tensors = _tensor_file(file, ctx, path)
    if key not in tensors:
        raise _missing_key(key, tensors.names(), file, ctx, path)
    info = tensors.info(key)
    refuse_too_large(info.shape, 8, ctx.locate(path), f"{file.name}:{key}")
    try:
        return tensors.read(key)
    except InputError as error:          # the reader names the file and tensor; add the YAML line
        error.diagnosis.locations.insert(0, ctx.locate(path))
        raise
    except OSError as exc:
        raise input_error("ATT-E007", f"cannot read {file.name}: {exc.strerror or exc}", ctx.locate(path)) from None


def _missing_key(key: str, available: List[str], file: Path, ctx: SourceContext, path: List):
    listing = ", ".join(sorted(available)[:12]) + (" ..." if len(available) > 12 else "")
    return input_error("ATT-E007", f"no array named '{key}' in {file.name} (it holds: {listing or 'nothing'})",
                       ctx.locate(list(path) + ["key"]), hint=did_you_mean(key, available))


RANDOM_KEYS = ("shape", "seed", "std", "mean")


def _random_options(options: Any, ctx: SourceContext, path: List):
    """(shape, seed, std, mean) of a random source, each checked."""
    if not isinstance(options, dict):
        raise input_error("ATT-E003", "random expects a mapping like {shape: [4, 8], seed: 0, std: 1.0}",
                          ctx.locate(path))
    for key in options:
        if key not in RANDOM_KEYS:
            raise input_error("ATT-E002", f"unknown key '{key}' in random", ctx.locate(path + [key]),
                              hint=did_you_mean(key, RANDOM_KEYS, otherwise="random takes shape, seed, std, mean"))
    shape = options.get("shape")
    if (not isinstance(shape, list) or not shape or len(shape) > 32
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise input_error("ATT-E003", "random.shape must be a list of positive whole numbers, "
                                      f"got {describe_value(shape)}",
                          ctx.locate(path + ["shape"]))
    shape = tuple(int(s) for s in shape)
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 128:
        raise input_error("ATT-E003", f"random.seed must be a whole number from 0 to 2¹²⁸, got {describe_value(seed)}",
                          ctx.locate(path + ["seed"]))
    # + 0.0 turns -0.0 (which passes `>= 0`) into 0.0: numpy refuses a negative sign bit
    std = finite_number(options.get("std", 1.0), ctx.locate(path + ["std"]), "random.std", minimum=0.0) + 0.0
    mean = finite_number(options.get("mean", 0.0), ctx.locate(path + ["mean"]), "random.mean")
    return shape, int(seed), std, mean


def _random(options: Any, ctx: SourceContext, path: List) -> np.ndarray:
    shape, seed, std, mean = _random_options(options, ctx, path)
    refuse_too_large(shape, 8, ctx.locate(path + ["shape"]), "random.shape")
    with np.errstate(over="ignore", invalid="ignore"):
        return np.random.default_rng(seed).normal(mean, std, size=shape)


def finite_number(value: Any, location: Optional[Location], what: str, minimum: Optional[float] = None,
                  above: Optional[float] = None, code: str = "ATT-E003") -> float:
    """A real number as a float: refused when it is not a number, has no float64 (ATT-E019),
    is NaN or infinite, or lies below `minimum` (or not above `above`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise input_error(code, f"{what} must be a number, got {describe_value(value)}", location)
    if isinstance(value, numbers.Integral) and abs(int(value)) >= LARGEST_FLOAT_INT:
        raise too_large(value, location, what)
    number = float(value)
    if not np.isfinite(number):
        raise input_error(code, f"{what} must be a finite number, got {number}", location,
                          hint="NaN and infinity would make every value of the trace NaN")
    if minimum is not None and number < minimum:
        raise input_error(code, f"{what} must be ≥ {minimum:g}, got {number:g}", location)
    if above is not None and not number > above:
        raise input_error(code, f"{what} must be > {above:g}, got {number:g}", location)
    return number


def too_large(value: Any, location: Optional[Location], what: str = "a number"):
    """ATT-E019 for an integer without a float64 (its digits are never turned into text)."""
    bits = int(value).bit_length()
    return input_error("ATT-E019", f"{what}: an integer of about {int(bits * 0.30103):,} digits is too large to "
                                   "represent (a float64 holds up to about 1.8e308)", location,
                       hint="write a smaller number")


# --------------------------------------------------------------------------- checks

def _checked_dtype(array: np.ndarray, ctx: SourceContext, path: Sequence, allow_bool: bool) -> np.ndarray:
    if array.dtype == bool:
        return array if allow_bool else array.astype(np.float64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise input_error("ATT-E005", f"array has dtype {array.dtype}; a real-valued numeric array is needed",
                          ctx.locate(path))
    if array.size == 0:
        raise input_error("ATT-E010", f"array is empty (shape {format_shape(array.shape)})", ctx.locate(path))
    if array.dtype in (np.float32, np.float64):
        return array             # kept in its own precision: a float32 run does not round-trip through float64
    with np.errstate(over="ignore"):         # a longdouble beyond float64 becomes inf: refused as non-finite
        return np.asarray(array, dtype=np.float32 if array.dtype == np.float16 else np.float64)


def _check_finite(array: np.ndarray, ctx: SourceContext, path: Sequence, allow_neg_inf: bool = False) -> None:
    finite = np.isfinite(array)
    if allow_neg_inf:
        finite |= np.isneginf(array)
    if finite.all():
        return
    index = tuple(int(i) for i in np.argwhere(~finite)[0])
    bad = array[index]
    count = int((~finite).sum())
    where = list(path) + list(index)
    raise input_error("ATT-E006", f"{'NaN' if np.isnan(bad) else bad} at index {list(index)} "
                                  f"({count} non-finite value{'s' if count > 1 else ''} in all)",
                      ctx.locate(where), hint="inputs must be finite; attntrace reports NaN/inf that "
                                              "attention itself produces, not ones fed to it")


def describe_value(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the text {value!r}" if len(value) < 40 else f"a text of {len(value)} characters"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, numbers.Integral) and int(value).bit_length() > 256:     # no 5,000-digit texts
        return f"an integer of about {int(int(value).bit_length() * 0.30103):,} digits"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:40] + ' …'}"


