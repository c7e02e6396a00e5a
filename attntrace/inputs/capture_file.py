"""The capture format, and reading a capture: a safetensors file with one JSON document.

:mod:`attntrace.models.capture` writes one forward pass of a PyTorch module in this
format; :mod:`attntrace.analysis.capture` checks it.  The file is ordinary safetensors
(read here by :class:`~attntrace.inputs.safetensors_io.SafetensorsFile`, lazily: the
header once, then one tensor at a time), and its ``__metadata__`` holds, under
:data:`METADATA_KEY`, a JSON document::

    {"format": "attntrace-capture", "version": 1,
     "components": [{"name", "kind", "class", "config",          # one per captured module
                     "inputs": {arg: key}, "weights": {W_q: key}, "outputs": {i: key},
                     "hooks": {hook: {"tensor": key, "axes": [...]}}, "modules": {...}}],
     "tensors": {key: {"shape": [...], "dtype": ...}}, ...}

Every tensor key the document names must be in the file, with the shape it says.
Codes: ATT-E345 (cannot read the file), E346 (not a valid safetensors file), E347 (not
an attntrace capture), E348 (a newer format version), E349 (the document and the
tensors disagree).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from attntrace.errors import InputError, input_error
from attntrace.inputs.safetensors_io import SafetensorsFile

FORMAT_NAME = "attntrace-capture"
FORMAT_VERSION = 1
METADATA_KEY = "attntrace.capture"

# torch dtype name -> safetensors dtype code
DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
_COMPONENT_KEYS = ("name", "kind", "config", "inputs", "weights", "outputs", "hooks")


def _file_error(code: str, path: Path, message: str, hint: Union[str, None] = None) -> InputError:
    return input_error(code, f"{path}: {message}", hint=hint)


@dataclass(frozen=True)
class CapturedTensor:
    key: str
    dtype: str                 # torch-style name: float32, bfloat16, bool ...
    shape: Tuple[int, ...]


class CaptureFile:
    """A capture opened lazily: the header is parsed, tensors are read one at a time on demand."""

    def __init__(self, path: Path, store: SafetensorsFile, document: Dict[str, Any]):
        self.path, self._store, self.document = path, store, document
        self.tensors = {name: CapturedTensor(name, _DTYPE_NAMES.get(info.dtype, info.dtype.lower()), info.shape)
                        for name, info in ((name, store.info(name)) for name in store.names())}

    @property
    def components(self) -> List[Dict[str, Any]]:
        return self.document["components"]

    @property
    def root(self) -> Dict[str, Any]:
        return self.components[0]

    def component(self, name: str) -> Dict[str, Any]:
        for component in self.components:
            if component["name"] == name:
                return component
        names = ", ".join(repr(c["name"] or "(root)") for c in self.components)
        raise _file_error("ATT-E356", self.path, f"the capture has no part '{name}'", hint=f"parts: {names}")

    def read(self, key: str) -> np.ndarray:
        """One tensor in its own dtype (bfloat16 widened to float32 exactly, bool as bool); read-only."""
        return self._store.read(key)

    def read64(self, key: str) -> np.ndarray:
        array = self.read(key)
        return array.astype(np.float64) if array.dtype != bool else array


def load_capture(path: Union[str, Path]) -> CaptureFile:
    """Open a capture file: parse and validate its header and document (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise _file_error("ATT-E345", path, "no such capture file" if not path.exists() else "is not a file",
                          hint="write one with `with attntrace.capture(module, path): module(...)`")
    try:
        store = SafetensorsFile(path)
    except InputError as error:
        code = "ATT-E345" if error.diagnosis.code == "ATT-E300" else "ATT-E346"
        what = "cannot read the capture file" if code == "ATT-E345" else "is not a valid safetensors file"
        raise _file_error(code, path, f"{what}: {error.diagnosis.message}", hint=error.diagnosis.hint) from None
    capture = CaptureFile(path, store, _document(path, store.metadata))
    _check_references(capture)
    return capture


def _document(path: Path, metadata: Dict[str, str]) -> Dict[str, Any]:
    if METADATA_KEY not in metadata:
        raise _file_error("ATT-E347", path, "is a safetensors file but not an attntrace capture (no "
                                            f"'{METADATA_KEY}' metadata)",
                          hint="write captures with attntrace.capture(module, path)")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise _file_error("ATT-E347", path, f"its capture metadata is not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise _file_error("ATT-E347", path, f"its metadata is not an {FORMAT_NAME} document")
    version = document.get("version")
    if not isinstance(version, int) or version < 1:
        raise _file_error("ATT-E347", path, f"capture format version {version!r} is not valid")
    if version > FORMAT_VERSION:
        raise _file_error("ATT-E348", path, f"is capture format version {version}; this attntrace reads version "
                                            f"{FORMAT_VERSION}", hint="upgrade attntrace")
    components = document.get("components")
    if not isinstance(components, list) or not components or not all(
            isinstance(c, dict) and all(k in c for k in _COMPONENT_KEYS) for c in components):
        raise _file_error("ATT-E347", path, "its capture metadata has no valid 'components' list")
    return document


def references(component: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(where, tensor key) for every tensor a component refers to."""
    found = [(f"{section}.{name}", key) for section in ("inputs", "weights", "outputs")
             for name, key in component[section].items()]
    found += [(f"hooks.{name}", entry.get("tensor")) for name, entry in component["hooks"].items()]
    for label, entry in component.get("modules", {}).items():
        for side in ("inputs", "outputs"):
            found += [(f"modules.{label}.{side}.{i}", key) for i, key in entry.get(side, {}).items()]
    config = component.get("config", {})          # a tapped module: weights= and mask= given to capture()
    found += [(f"config.weights.{name}", key) for name, key in (config.get("weights") or {}).items()]
    mask = config.get("mask") if isinstance(config.get("mask"), dict) else {}
    found += [(f"config.mask.{name}", mask[name]) for name in ("tensor", "matrix", "padding") if mask.get(name)]
    return found


def _check_references(capture: CaptureFile) -> None:
    described = capture.document.get("tensors", {})
    for component in capture.components:
        for where, key in references(component):
            if key not in capture.tensors:
                raise _file_error("ATT-E349", capture.path, f"its metadata refers to tensor '{key}' "
                                                            f"({component['name'] or 'root'} {where}), which the "
                                                            "file does not hold", hint="the file is damaged")
            if key in described and tuple(described[key].get("shape", ())) != capture.tensors[key].shape:
                raise _file_error("ATT-E349", capture.path, f"tensor '{key}' has shape "
                                                            f"{capture.tensors[key].shape} but the metadata says "
                                                            f"{tuple(described[key]['shape'])}")
