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
"""
from __future__ import annotations

import numbers
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from attntrace.errors import InputError, Location, input_error
from attntrace.inputs.safetensors_io import open_tensors
from attntrace.text import did_you_mean, format_shape


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


class SourceContext:
    """What loading needs: the spec's folder and a way to locate YAML paths."""

    def __init__(self, base_dir: Optional[Path], locate: Callable[[Sequence], Location]):
        self.base_dir = base_dir or Path.cwd()
        self.locate = locate
        self.tensor_files: Dict[Path, Any] = {}     # .safetensors opened so far: each file once


def load_array(value: Any, ctx: SourceContext, path: Sequence, *, allow_bool: bool = False,
               what: str = "array", allow_neg_inf: bool = False) -> np.ndarray:
    """Turn one spec value into a finite float (or bool) numpy array (-inf allowed for additive masks)."""
    if isinstance(value, np.ndarray):
        array = _checked_dtype(value, ctx, path, allow_bool)
    elif isinstance(value, (list, tuple)):
        array = _from_nested_list(value, ctx, path, allow_bool)
    elif isinstance(value, dict):
        array = _from_mapping(value, ctx, path, allow_bool)
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
    if isinstance(value, numbers.Real):
        return ()
    raise input_error("ATT-E005", f"expected a number, got {describe_value(value)}", ctx.locate(path),
                      hint="matrix entries must be numbers (YAML writes NaN as .nan, which is also refused)")


def _first_scalar(value: Any) -> Any:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value


# --------------------------------------------------------------------------- sources

def _from_mapping(value: dict, ctx: SourceContext, path: Sequence, allow_bool: bool) -> np.ndarray:
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
    if kind == "random":
        return _random(value["random"], ctx, list(path) + ["random"])
    if kind == "identity":
        n = value["identity"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n * n > MAX_ELEMENTS:
            raise input_error("ATT-E010", f"identity size must be a positive whole number, got {describe_value(n)}",
                              ctx.locate(list(path) + ["identity"]))
        return np.eye(n)
    file = _resolve_file(value[kind], ctx, list(path) + [kind])
    if kind == "npy":
        array = _load_npy(file, ctx, path)
    else:
        if "key" not in value:
            raise input_error("ATT-E002", f"a {kind} source needs `key:` (the array's name in the file)",
                              ctx.locate(path))
        loader = _load_npz if kind == "npz" else _load_safetensors
        array = loader(file, str(value["key"]), ctx, list(path))
    return _checked_dtype(array, ctx, path, allow_bool)


def _resolve_file(name: Any, ctx: SourceContext, path: Sequence) -> Path:
    if not isinstance(name, str) or not name:
        raise input_error("ATT-E003", f"file name expected, got {describe_value(name)}", ctx.locate(path))
    file = Path(name)
    if not file.is_absolute():
        file = ctx.base_dir / file
    if not file.exists():
        raise input_error("ATT-E007", f"file not found: {file}", ctx.locate(path),
                          hint="paths are relative to the spec file's folder")
    if not file.is_file():
        raise input_error("ATT-E007", f"not a file: {file}", ctx.locate(path))
    return file


def _load_npy(file: Path, ctx: SourceContext, path: Sequence) -> np.ndarray:
    with open(file, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            # np.load would take any other file for a pickle and say so: misleading
            raise input_error("ATT-E013", f"{file.name} is not a .npy file (no NUMPY header)", ctx.locate(path),
                              hint="write it with np.save(path, array)")
    try:
        return np.load(file, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise input_error("ATT-E011", f"{file.name} holds Python objects; attntrace loads .npy "
                                          "without pickle", ctx.locate(path),
                              hint="save a numeric array: np.save(path, array.astype(np.float64))") from None
        raise input_error("ATT-E013", f"{file.name} is not a readable .npy file: {exc}", ctx.locate(path)) from None
    except OSError as exc:
        raise input_error("ATT-E013", f"cannot read {file.name}: {exc}", ctx.locate(path)) from None


def _load_npz(file: Path, key: str, ctx: SourceContext, path: List) -> np.ndarray:
    try:
        with np.load(file, allow_pickle=False) as archive:
            if key not in archive.files:
                raise _missing_key(key, archive.files, file, ctx, path)
            return archive[key]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise input_error("ATT-E013", f"{file.name} is not a readable .npz file: {exc}", ctx.locate(path)) from None


def _load_safetensors(file: Path, key: str, ctx: SourceContext, path: List) -> np.ndarray:
    """One tensor, read lazily: each file's header is parsed once per spec and only the
    tensors named are read (bfloat16 and float16 arrive as float32)."""
    try:
        tensors = ctx.tensor_files.get(file)
        if tensors is None:
            tensors = ctx.tensor_files[file] = open_tensors(file)
        if key not in tensors:
            raise _missing_key(key, tensors.names(), file, ctx, path)
        return tensors.read(key)
    except InputError as error:          # the reader names the file and tensor; add the YAML line
        diagnosis = error.diagnosis
        diagnosis.locations.insert(0, ctx.locate(path))
        raise


def _missing_key(key: str, available: List[str], file: Path, ctx: SourceContext, path: List):
    listing = ", ".join(sorted(available)[:12]) + (" ..." if len(available) > 12 else "")
    return input_error("ATT-E007", f"no array named '{key}' in {file.name} (it holds: {listing})",
                       ctx.locate(path + ["key"]), hint=did_you_mean(key, available))


def _random(options: Any, ctx: SourceContext, path: List) -> np.ndarray:
    if not isinstance(options, dict):
        raise input_error("ATT-E003", "random expects a mapping like {shape: [4, 8], seed: 0, std: 1.0}",
                          ctx.locate(path))
    for key in options:
        if key not in ("shape", "seed", "std", "mean"):
            raise input_error("ATT-E002", f"unknown key '{key}' in random", ctx.locate(path + [key]),
                              hint=did_you_mean(key, ["shape", "seed", "std", "mean"],
                                                otherwise="random takes shape, seed, std, mean"))
    shape = options.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise input_error("ATT-E003", "random.shape must be a list of positive whole numbers, "
                                      f"got {describe_value(shape)}",
                          ctx.locate(path + ["shape"]))
    if int(np.prod([float(s) for s in shape])) > MAX_ELEMENTS:
        raise input_error("ATT-E010", f"random.shape {format_shape(shape)} is impossibly large "
                                      f"(more than {MAX_ELEMENTS:,} values)", ctx.locate(path + ["shape"]))
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise input_error("ATT-E003", f"random.seed must be a whole number ≥ 0, got {describe_value(seed)}",
                          ctx.locate(path + ["seed"]))
    std, mean = options.get("std", 1.0), options.get("mean", 0.0)
    for name, number in (("std", std), ("mean", mean)):
        if isinstance(number, bool) or not isinstance(number, numbers.Real) or not np.isfinite(number):
            raise input_error("ATT-E003", f"random.{name} must be a finite number, got {describe_value(number)}",
                              ctx.locate(path + [name]))
    return np.random.default_rng(seed).normal(float(mean), float(std), size=tuple(shape))


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
    return f"{type(value).__name__} {value!r}"


