"""Check a capture: rebuild the attention as a spec, compare hook by hook, name the bug.

A capture (:mod:`attntrace.models.capture`) holds what a user's PyTorch module
computed in one forward pass.  :func:`check_capture`

1. reads the file lazily (header first, then one tensor at a time; float16 and
   bfloat16 are widened to float64 only when compared) and validates it;
2. rebuilds the same attention as an attntrace spec from the captured inputs,
   weights and configuration (:func:`spec_from_capture`);
3. runs attntrace's reference trace in float64 and compares every captured hook,
   after mapping its layout (PyTorch's (batch, heads, seq, d_head), averaged
   nn.MultiheadAttention weights, (seq, batch, d) inputs ...) to attntrace's axes;
4. marks the first diverging hook, and for each later one says whether it is a
   consequence (it matches once the captured earlier hooks are fed into the
   reference) or diverges on its own;
5. when the numbers differ, replays every catalogue bug that can show on this
   configuration, and every pair of them, on the same inputs, and names those
   that reproduce the captured numbers within the tolerance.

Tolerances depend on the least precise floating dtype among the part's captured
tensors.  A cell matches when ``|captured − reference| ≤ atol + rtol · M``,
where M is the largest finite |reference| of that hook (errors are measured
relative to the hook's magnitude, not cell by cell, so a weight of 1e-9 next to
weights of 0.5 is held to the same absolute standard as they are):

    float64  rtol 1e-9   atol 1e-12
    float32  rtol 1e-5   atol 1e-8
    float16  rtol 1e-2   atol 1e-5
    bfloat16 rtol 4e-2   atol 1e-4

Blocked scores compare equal when the reference holds −inf and the capture a
large negative (≤ −1e4, e.g. masked_fill(mask == 0, -1e9)); NaN equals NaN and
±inf equals the same inf.

The attntrace internals this module uses are imported in ONE place,
:func:`_internals`, so they can be repointed when modules move.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from attntrace.analysis import bugs
from attntrace.analysis.run import run
from attntrace.core.plan import plan_from_spec
from attntrace.errors import Diagnosis, InputError, ShapeError, input_error
from attntrace.hookpoints import HOOK_POINTS, resolve_hook_name
from attntrace.inputs.spec import load_spec
from attntrace.models.capture import DTYPE_CODES, FORMAT_NAME, FORMAT_VERSION, METADATA_KEY

# --------------------------------------------------------------------------- the one import of internals


@functools.cache
def _internals() -> SimpleNamespace:
    """Every attntrace internal this module needs (repoint here when modules move)."""
    return SimpleNamespace(
        catalogue=bugs.CATALOGUE,                         # name -> Bug (.overrides(), .cannot_show(), ...)
        run=run,                                          # run(spec, keep=, dtype=, overrides=, hooks=, check=)
        plan_from_spec=plan_from_spec,
        load_spec=load_spec,
        resolve_hook=resolve_hook_name,
        hook_axes={h.name: h.axes for h in HOOK_POINTS},
        hook_order=[h.name for h in HOOK_POINTS],
    )


# =========================================================================== tolerances

TOLERANCES: Dict[str, Tuple[float, float]] = {      # dtype -> (rtol relative to the hook's magnitude, atol)
    "float64": (1e-9, 1e-12), "float32": (1e-5, 1e-8), "float16": (1e-2, 1e-5), "bfloat16": (4e-2, 1e-4)}
PRECISION_ORDER = ("bfloat16", "float16", "float32", "float64")     # least precise first
ROW_PREVIEW = 16            # values of the first diverging row shown
BLOCKED_AT = -1e4           # a captured score at or below this counts as blocked (-1e9, -10000, finfo.min)

_AXIS_LABELS = {"batch": "batch", "n_heads": "head", "n_kv_heads": "kv head", "seq_q": "query", "seq_k": "key",
                "d_head": "d_head", "d_v": "d_v", "d_model": "d_model", "d_out": "d_out",
                "n_heads·d_v": "feature", "1": "mask"}


# =========================================================================== reading a capture

_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                 "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "u1"}
_DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
MAX_HEADER_BYTES = 100 << 20


def _file_error(code: str, path: Path, message: str, hint: Optional[str] = None) -> InputError:
    return input_error(code, f"{path}: {message}", hint=hint)


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str                 # torch-style name: float32, bfloat16, bool ...
    shape: Tuple[int, ...]
    start: int                 # byte offsets in the file
    end: int


class CaptureFile:
    """A capture opened lazily: the header is parsed, tensors are read one at a time on demand."""

    def __init__(self, path: Path, document: Dict[str, Any], tensors: Dict[str, TensorInfo]):
        self.path, self.document, self.tensors = path, document, tensors

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
        """One tensor, in its own dtype (bfloat16 widened to float32, bool as bool)."""
        info = self.tensors[key]
        count = int(np.prod(info.shape, dtype=np.int64))
        code = DTYPE_CODES[info.dtype]
        with open(self.path, "rb") as handle:
            handle.seek(info.start)
            raw = np.fromfile(handle, dtype=_NUMPY_DTYPES[code], count=count)
        if raw.size != count:
            raise _file_error("ATT-E346", self.path, f"tensor '{key}' is cut short (the file ends early)")
        if code == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        elif code == "BOOL":
            raw = raw.astype(bool)
        return raw.reshape(info.shape)

    def read64(self, key: str) -> np.ndarray:
        array = self.read(key)
        return array.astype(np.float64) if array.dtype != bool else array


def load_capture(path: Union[str, Path]) -> CaptureFile:
    """Open a capture file: parse and validate its header and metadata (no tensor is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _file_error("ATT-E346", path, f"is not a safetensors file ({size} bytes; the format starts "
                                                    "with an 8-byte header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length == 0 or length > min(size - 8, MAX_HEADER_BYTES):
                raise _file_error("ATT-E346", path, f"is not a safetensors file (header length {length} does not "
                                                    f"fit a file of {size} bytes)")
            raw = handle.read(length)
    except FileNotFoundError:
        raise _file_error("ATT-E345", path, "no such capture file",
                          hint="write one with `with attntrace.capture(module, path): module(...)`") from None
    except OSError as error:
        raise _file_error("ATT-E345", path, f"cannot read the capture file: {error.strerror or error}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _file_error("ATT-E346", path, f"is not a safetensors file (its header is not JSON: {error})") from None
    if not isinstance(header, dict):
        raise _file_error("ATT-E346", path, "is not a safetensors file (its header is not a JSON object)")
    tensors = _tensor_table(path, header, data_start=8 + length, data_size=size - 8 - length)
    document = _document(path, header.get("__metadata__"))
    capture = CaptureFile(path, document, tensors)
    _check_references(capture)
    return capture


def _tensor_table(path: Path, header: Dict[str, Any], data_start: int, data_size: int) -> Dict[str, TensorInfo]:
    tensors: Dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in _NUMPY_DTYPES and isinstance(entry.get("shape"), list) \
            and all(isinstance(s, int) and s >= 0 for s in entry["shape"]) \
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2 \
            and all(isinstance(o, int) for o in entry["data_offsets"])
        if not ok:
            raise _file_error("ATT-E346", path, f"tensor '{key}' has a malformed header entry")
        start, end = entry["data_offsets"]
        itemsize = np.dtype(_NUMPY_DTYPES[entry["dtype"]]).itemsize
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * itemsize
        if not 0 <= start <= end <= data_size or end - start != expected:
            raise _file_error("ATT-E346", path, f"tensor '{key}' claims bytes {start}–{end} for shape "
                                                f"{tuple(entry['shape'])} ({expected} bytes); the data holds "
                                                f"{data_size} bytes", hint="the file is truncated or damaged")
        tensors[key] = TensorInfo(key, _DTYPE_NAMES[entry["dtype"]], tuple(entry["shape"]),
                                  data_start + start, data_start + end)
    return tensors


def _document(path: Path, metadata: Any) -> Dict[str, Any]:
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise _file_error("ATT-E347", path, "is a safetensors file but not an attntrace capture (no "
                                            f"'{METADATA_KEY}' metadata)",
                          hint="write captures with attntrace.capture(module, path)")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as error:
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
    required = ("name", "kind", "config", "inputs", "weights", "outputs", "hooks")
    if not isinstance(components, list) or not components or not all(
            isinstance(c, dict) and all(k in c for k in required) for c in components):
        raise _file_error("ATT-E347", path, "its capture metadata has no valid 'components' list")
    return document


def _references(component: Dict[str, Any]) -> List[Tuple[str, str]]:
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
        for where, key in _references(component):
            if key not in capture.tensors:
                raise _file_error("ATT-E349", capture.path, f"its metadata refers to tensor '{key}' "
                                                            f"({component['name'] or 'root'} {where}), which the "
                                                            "file does not hold", hint="the file is damaged")
            if key in described and tuple(described[key].get("shape", ())) != capture.tensors[key].shape:
                raise _file_error("ATT-E349", capture.path, f"tensor '{key}' has shape "
                                                            f"{capture.tensors[key].shape} but the metadata says "
                                                            f"{tuple(described[key]['shape'])}")


# =========================================================================== rebuilding a spec

def _not_comparable(what: str, hint: Optional[str] = None) -> InputError:
    return input_error("ATT-E351", f"not yet comparable: {what}", hint=hint)


def _missing(what: str, hint: Optional[str] = None) -> InputError:
    return input_error("ATT-E350", f"cannot rebuild the attention: {what}", hint=hint)


@dataclass
class Rebuild:
    """A capture part rebuilt as a spec, and what was assumed on the way."""

    spec: Dict[str, Any]
    description: str
    notes: List[Diagnosis] = field(default_factory=list)


class _Part:
    """One component of a capture, with its tensors read on demand (float64, bool kept)."""

    def __init__(self, capture: CaptureFile, record: Dict[str, Any]):
        self.capture, self.record = capture, record
        self.name, self.kind, self.config = record["name"], record["kind"], record["config"]
        self.notes: List[Diagnosis] = []

    @property
    def label(self) -> str:
        return self.name or self.record.get("class", "").rsplit(".", 1)[-1] or self.kind

    def tensor(self, key: Optional[str]) -> Optional[np.ndarray]:
        return None if key is None else self.capture.read64(key)

    def input(self, name: str) -> Optional[np.ndarray]:
        return self.tensor(self.record["inputs"].get(name))

    def weight(self, name: str) -> Optional[np.ndarray]:
        return self.tensor(self.record["weights"].get(name))

    def note(self, code: str, message: str, hint: Optional[str] = None) -> None:
        self.notes.append(Diagnosis(code=code, message=message, severity="warning", hint=hint))

    def dtype(self) -> str:
        """The least precise floating dtype among this part's tensors: it sets the tolerance."""
        keys = {key for _, key in _references(self.record)}
        dtypes = {self.capture.tensors[k].dtype for k in keys if k in self.capture.tensors}
        floats = [d for d in PRECISION_ORDER if d in dtypes]
        return floats[0] if floats else "float64"


def _batched(x: np.ndarray) -> np.ndarray:
    return x[None] if x.ndim == 2 else x


def _tokens(n: int) -> List[str]:
    return [str(i) for i in range(n)]


def _scale(value: Any, d_head: int) -> Union[str, float]:
    """'auto' when the captured scale is 1/√d_head (so scale bugs can be replayed against it)."""
    if value in (None, "auto"):
        return "auto"
    if value == "none":
        return "none"
    value = float(value)
    return "auto" if abs(value - d_head ** -0.5) <= 1e-12 * value else value


# --------------------------------------------------------------------------- masks

def _additive_checked(array: np.ndarray, where: str) -> np.ndarray:
    soft = np.isfinite(array) & (array != 0) & (array > BLOCKED_AT)
    if soft.any():
        raise _not_comparable(f"{where} is a float mask with soft values such as {array[soft].flat[0]:g}: "
                              "attntrace masks block or keep (0 and -inf or ≤ -1e4)",
                              hint="soft biases (ALiBi, relative positions) are not part of a spec yet")
    if np.isnan(array).any() or np.isposinf(array).any():
        raise _not_comparable(f"{where} holds NaN or +inf")
    return np.where(array > BLOCKED_AT, 0.0, -np.inf)


def _zero_one_checked(array: np.ndarray, where: str, convention: str) -> np.ndarray:
    values = array.astype(np.float64)
    if not np.isin(values, (0.0, 1.0)).all():
        raise _not_comparable(f"{where} (convention {convention}) holds values other than 0 and 1",
                              hint="say mask='additive' if it is added to the scores")
    return values.astype(bool)


def _in_convention(array: np.ndarray, convention: str, where: str) -> np.ndarray:
    """A captured mask checked for its convention: bool arrays for keep/ignore, 0/-inf for additive."""
    if convention == "additive":
        return _additive_checked(np.asarray(array, dtype=np.float64), where)
    return _zero_one_checked(array, where, convention)


def _allowed_value(convention: str):
    return {"keep": True, "ignore": False, "additive": 0.0}[convention]


def _as_additive(array: np.ndarray, convention: str) -> np.ndarray:
    if convention == "additive":
        return array
    keep = array if convention == "keep" else ~array
    return np.where(keep, 0.0, -np.inf)


def _mask_block(pieces: Dict[str, Tuple[np.ndarray, str]], causal: bool = False) -> Any:
    """A spec mask mapping from {padding|matrix: (array, convention)}: one convention for both
    (additive when they were given in different ones)."""
    if not pieces:
        return "causal" if causal else "none"
    conventions = {conv for _, conv in pieces.values()}
    convention = conventions.pop() if len(conventions) == 1 else "additive"
    block: Dict[str, Any] = {"convention": convention}
    for name, (array, conv) in pieces.items():
        block[name] = array if conv == convention else _as_additive(array, conv)
    if causal:
        block["causal"] = True
    return block


def _user_mask(array: np.ndarray, convention: str, batch: int, seq_q: int, seq_k: int, where: str,
               part: _Part) -> Dict[str, Tuple[np.ndarray, str]]:
    """A mask as the user's code holds it -> {padding|matrix: (array, convention)}.

    Read batch-first, the way tutorials broadcast it against scores (batch, heads, seq_q, seq_k):
    (batch, 1 | heads, seq_q | 1, seq_k), (batch, seq_q | 1, seq_k), (seq_q, seq_k), (batch, seq_k) or (seq_k,)."""
    shape = array.shape
    if array.ndim == 4:
        if shape[1] != 1:
            raise _not_comparable(f"{where} has shape {shape}: a different mask per head",
                                  hint="attntrace masks are shared by the heads")
        array = array[:, 0]
    if array.ndim == 3 and array.shape[1] == 1:
        array = array[:, 0]
        return _fit_padding(array, convention, batch, seq_k, where, shape)
    if array.ndim == 3:
        if array.shape[0] not in (1, batch) or array.shape[1:] != (seq_q, seq_k):
            raise _mask_shape_error(where, shape, batch, seq_q, seq_k)
        matrix = array[0] if array.shape[0] == 1 else array
        return {"matrix": (_in_convention(matrix, convention, where), convention)}
    if array.ndim == 2:
        as_matrix, as_padding = shape == (seq_q, seq_k), shape == (batch, seq_k)
        if as_matrix and as_padding and batch != 1:
            part.note("ATT-W343", f"{where} of shape {shape} was read as a (seq_q, seq_k) matrix, not as "
                                  "(batch, seq_k) padding", "give it as (batch, 1, seq_k) to mean padding")
        if as_matrix:
            return {"matrix": (_in_convention(array, convention, where), convention)}
        return _fit_padding(array, convention, batch, seq_k, where, shape)
    if array.ndim == 1:
        return _fit_padding(array, convention, batch, seq_k, where, shape)
    raise _mask_shape_error(where, shape, batch, seq_q, seq_k)


def _fit_padding(array, convention, batch, seq_k, where, shape) -> Dict[str, Tuple[np.ndarray, str]]:
    if array.shape[-1] != seq_k or (array.ndim == 2 and array.shape[0] not in (1, batch)):
        raise _mask_shape_error(where, shape, batch, None, seq_k)
    padding = array[0] if array.ndim == 2 and array.shape[0] == 1 else array
    return {"padding": (_in_convention(padding, convention, where), convention)}


def _mask_shape_error(where: str, shape, batch: int, seq_q: Optional[int], seq_k: int) -> InputError:
    wanted = f"(batch={batch}, seq_q={seq_q}, seq_k={seq_k})" if seq_q else f"(batch={batch}, seq_k={seq_k})"
    return _not_comparable(f"{where} has shape {tuple(shape)}, which does not broadcast to {wanted}")


def _causal_top_left(seq_q: int, seq_k: int) -> np.ndarray:
    """PyTorch's is_causal: query i sees keys j ≤ i (aligned top-left)."""
    return np.arange(seq_k)[None, :] <= np.arange(seq_q)[:, None]


# --------------------------------------------------------------------------- side-by-side inputs

def _side_by_side(query: np.ndarray, key: np.ndarray, value: np.ndarray, weights: Dict[str, np.ndarray],
                  biases: Dict[str, Optional[np.ndarray]], layout: str, extra_rows: Sequence[Tuple[str, Any, Any]]):
    """Cross-attention whose keys and values read different inputs (or get extra key rows): the
    spec's encoder feeds both W_k and W_v, so the inputs are laid side by side — X = [query | 0],
    X_enc = [key | value | indicators] — and each weight reads only its own columns (zeros
    elsewhere).  An extra row (add_bias_kv, add_zero_attn) is an indicator column whose weight
    row makes k and v exactly the given vectors.  Exact: the added terms are zeros."""
    blocks: List[np.ndarray] = [query]           # distinct inputs, by identity of their values
    def block_of(array):
        for i, b in enumerate(blocks):
            if b.shape == array.shape and np.array_equal(b, array):
                return i
        blocks.append(array)
        return len(blocks) - 1
    k_block, v_block = block_of(key), block_of(value)
    widths = [b.shape[-1] for b in blocks]
    starts = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    total = int(starts[-1]) + len(extra_rows)
    batch, seq_q, seq_k = query.shape[0], query.shape[1], key.shape[1]
    x = np.zeros((batch, seq_q, total))
    x[..., :widths[0]] = query
    x_enc = np.zeros((batch, seq_k + len(extra_rows), total))
    for i in sorted({k_block, v_block}):
        x_enc[:, :seq_k, starts[i]:starts[i + 1]] = blocks[i]
    for r in range(len(extra_rows)):
        x_enc[:, seq_k + r, starts[-1] + r] = 1.0

    def widened(name: str, block: int, extras: Sequence[Any]) -> np.ndarray:
        w = weights[name] if layout == "linear" else weights[name].T       # as (out, in) here
        out = np.zeros((w.shape[0], total))
        out[:, starts[block]:starts[block + 1]] = w
        bias = biases.get(name.replace("W_", "b_"))
        for r, vector in enumerate(extras):     # indicator r: k (or v) = vector exactly, bias included
            out[:, starts[-1] + r] = vector - (bias if bias is not None else 0.0)
        return out if layout == "linear" else out.T
    return (x, x_enc, widened("W_q", 0, []), widened("W_k", k_block, [k for _, k, _ in extra_rows]),
            widened("W_v", v_block, [v for _, _, v in extra_rows]))


def _attention_inputs(spec: Dict[str, Any], query, key, value, weights, biases, layout,
                      extra_rows: Sequence[Tuple[str, Any, Any]] = ()) -> None:
    """Fill the spec's embeddings, encoder and W_q/W_k/W_v: self-attention when key and value
    are the query, plain cross-attention when key is value, side by side otherwise."""
    if not extra_rows and np.array_equal(key, value) and key.shape == query.shape and np.array_equal(key, query):
        spec.update(tokens=_tokens(query.shape[1]), embeddings=query)
        spec["attention"].update({k: weights[k] for k in ("W_q", "W_k", "W_v")})
        return
    if not extra_rows and key.shape == value.shape and np.array_equal(key, value) \
            and key.shape[-1] == query.shape[-1]:
        spec.update(tokens=_tokens(query.shape[1]), embeddings=query,
                    encoder={"tokens": _tokens(key.shape[1]), "embeddings": key})
        spec["attention"].update({k: weights[k] for k in ("W_q", "W_k", "W_v")})
        return
    x, x_enc, w_q, w_k, w_v = _side_by_side(query, key, value, weights, biases, layout, extra_rows)
    spec.update(tokens=_tokens(query.shape[1]), embeddings=x,
                encoder={"tokens": _tokens(key.shape[1]) + [name for name, _, _ in extra_rows], "embeddings": x_enc})
    spec["attention"].update(W_q=w_q, W_k=w_k, W_v=w_v)


def _base_spec(name: str, heads: int, kv_heads: int, layout: str, scale, biases: Dict[str, Optional[np.ndarray]],
               w_o: Optional[np.ndarray] = None) -> Dict[str, Any]:
    attention: Dict[str, Any] = {"heads": heads, "layout": layout, "scale": scale}
    if kv_heads != heads:
        attention["kv_heads"] = kv_heads
    if w_o is not None:
        attention["W_o"] = w_o
    attention.update({k: v for k, v in biases.items() if v is not None})
    return {"version": 1, "name": name, "attention": attention}


# --------------------------------------------------------------------------- nn.MultiheadAttention

def _mha_spec(part: _Part) -> Rebuild:
    c = part.config
    query, key, value = (part.input(n) for n in ("query", "key", "value"))
    if query is None or key is None or value is None:
        raise _missing(f"{part.label}: the query, key or value input was not recorded")
    if c["batched"] and not c["batch_first"]:              # (seq, batch, d) -> (batch, seq, d)
        query, key, value = (a.transpose(1, 0, 2) for a in (query, key, value))
    query, key, value = (_batched(a) for a in (query, key, value))
    batch, seq_q, seq_k, heads, e = query.shape[0], query.shape[1], key.shape[1], c["heads"], c["embed_dim"]
    if c["packed_in_proj"]:
        w_q, w_k, w_v = np.split(part.weight("in_proj_weight"), 3)
    else:
        w_q, w_k, w_v = (part.weight(f"{n}_proj_weight") for n in "qkv")
    in_bias = part.weight("in_proj_bias")
    b_q, b_k, b_v = np.split(in_bias, 3) if in_bias is not None else (None, None, None)
    biases = {"b_q": b_q, "b_k": b_k, "b_v": b_v, "b_o": part.weight("out_proj.bias")}
    extra: List[Tuple[str, Any, Any]] = []
    if c["add_bias_kv"]:
        extra.append(("bias_kv", part.weight("bias_k").reshape(e), part.weight("bias_v").reshape(e)))
    if c["add_zero_attn"]:
        extra.append(("zero_attn", np.zeros(e), np.zeros(e)))
    spec = _base_spec(part.label, heads, heads, "linear", "auto", biases, part.weight("out_proj.weight"))
    _attention_inputs(spec, query, key, value, {"W_q": w_q, "W_k": w_k, "W_v": w_v}, biases, "linear", extra)
    spec["attention"]["mask"] = _mha_mask(part, batch, seq_q, seq_k, len(extra))
    description = (f"nn.MultiheadAttention: {heads} heads, d_head {c['d_head']}, "
                   f"{'packed in_proj' if c['packed_in_proj'] else 'separate q/k/v_proj'}"
                   f"{'' if c['bias'] else ', no bias'}{', add_bias_kv' if c['add_bias_kv'] else ''}"
                   f"{', add_zero_attn' if c['add_zero_attn'] else ''}, batch_first={c['batch_first']}")
    return Rebuild(spec, description, part.notes)


def _mha_mask(part: _Part, batch: int, seq_q: int, seq_k: int, extra: int) -> Any:
    """nn.MultiheadAttention's masks in the convention they were given (bool: True = blocked)."""
    c = part.config
    kpm, attn_mask = part.input("key_padding_mask"), part.input("attn_mask")
    total = seq_k + extra
    if c["is_causal"] and kpm is None and not c["need_weights"]:
        # PyTorch then drops attn_mask and runs SDPA with is_causal=True (aligned top-left)
        if attn_mask is not None and not np.array_equal(_in_convention(
                attn_mask, c["masks"]["attn_mask"]["convention"], "attn_mask") == _allowed_value(
                c["masks"]["attn_mask"]["convention"]), _causal_top_left(seq_q, seq_k)):
            part.note("ATT-W345", "is_causal=True but attn_mask is not the causal mask: PyTorch used the causal "
                                  "mask (the hint wins when need_weights=False and there is no key_padding_mask)")
        if total == seq_q:
            return "causal"
        return {"matrix": _causal_top_left(seq_q, total), "convention": "keep"}
    pieces: Dict[str, Tuple[np.ndarray, str]] = {}
    if kpm is not None:
        convention = c["masks"]["key_padding_mask"]["convention"]
        padded = _in_convention(kpm if kpm.ndim == 2 else kpm[None], convention, "key_padding_mask")
        padded = np.pad(padded, ((0, 0), (0, extra)), constant_values=_allowed_value(convention))
        pieces["padding"] = (padded, convention)
    if attn_mask is not None:
        convention = c["masks"]["attn_mask"]["convention"]
        matrix = _in_convention(attn_mask, convention, "attn_mask")
        if matrix.ndim == 3:                    # (batch·heads, seq_q, seq_k): one mask per head
            per_head = matrix.reshape(batch, c["heads"], seq_q, seq_k)
            if not (per_head == per_head[:, :1]).all():
                raise _not_comparable("attn_mask differs between the heads of a batch item",
                                      hint="attntrace masks are shared by the heads")
            matrix = per_head[:, 0]
        pad = ((0, 0),) * (matrix.ndim - 1) + ((0, extra),)
        pieces["matrix"] = (np.pad(matrix, pad, constant_values=_allowed_value(convention)), convention)
    return _mask_block(pieces)


# --------------------------------------------------------------------------- tapped modules

def _split_fused(w: np.ndarray, b: Optional[np.ndarray], layout: str, heads: int, kv_heads: int):
    """A fused [q | k | v] projection split by heads (q: heads·d, k and v: kv_heads·d each)."""
    axis = 0 if layout == "linear" else 1
    width = w.shape[axis]
    if width % (heads + 2 * kv_heads):
        raise _missing(f"W_qkv has width {width}, which is not (heads + 2·kv_heads)·d_head for heads={heads}, "
                       f"kv_heads={kv_heads}", hint="give W_q, W_k, W_v separately")
    d = width // (heads + 2 * kv_heads)
    cuts = [heads * d, (heads + kv_heads) * d]
    ws = np.split(w, cuts, axis=axis)
    bs = np.split(b, cuts) if b is not None else (None, None, None)
    return ws, bs


def _tapped_spec(part: _Part, hooks: Dict[str, Dict[str, Any]]) -> Rebuild:
    c = part.config
    heads = c.get("heads")
    weights = {k: part.tensor(v) for k, v in c.get("weights", {}).items()}
    if not heads or not (("W_q" in weights and "W_k" in weights and "W_v" in weights) or "W_qkv" in weights):
        raise _missing(f"{part.label} is not a module attntrace knows, and the capture was not told what it is",
                       hint="capture(module, path, weights={'q': m.q_proj, 'k': ..., 'v': ..., 'o': ...}, heads=N)")
    kv_heads = c.get("kv_heads") or heads
    layout = c.get("layout") or "linear"
    if "W_qkv" in weights:
        (w_q, w_k, w_v), (b_q, b_k, b_v) = _split_fused(weights["W_qkv"], weights.get("b_qkv"), layout, heads,
                                                        kv_heads)
        weights.update(W_q=w_q, W_k=w_k, W_v=w_v, b_q=b_q, b_k=b_k, b_v=b_v)
    roles = c.get("roles", {})
    query = _tapped_input(part, hooks, "hook_embed", roles.get("query"))
    if query is None:
        raise _missing(f"{part.label}: no input was recorded (no tensor argument, no tap('hook_embed', x))")
    key = _tapped_input(part, hooks, "hook_encoder_embed", roles.get("key")) if roles.get("key") else None
    value = part.input(roles["value"]) if roles.get("value") else None
    key = query if key is None else key
    value = key if value is None else value
    query, key, value = (_batched(a) for a in (query, key, value))
    biases = {k: weights.get(k) for k in ("b_q", "b_k", "b_v", "b_o")}
    w_q = weights["W_q"]
    d_head = (w_q.shape[0] if layout == "linear" else w_q.shape[1]) // heads
    spec = _base_spec(part.label, heads, kv_heads, layout, _scale(c.get("scale"), d_head), biases,
                      weights.get("W_o"))
    _attention_inputs(spec, query, key, value, weights, biases, layout)
    spec["attention"]["mask"] = _tapped_mask(part, query.shape[0], query.shape[1], key.shape[1])
    description = (f"{part.record.get('class', 'module').rsplit('.', 1)[-1]} (tapped): {heads} heads"
                   f"{f', {kv_heads} kv heads' if kv_heads != heads else ''}, layout {layout}")
    return Rebuild(spec, description, part.notes)


def _tapped_input(part: _Part, hooks: Dict[str, Dict[str, Any]], hook: str, argument: Optional[str]):
    entry = hooks.get(hook)
    if entry is not None:
        return part.tensor(entry["tensor"])
    return part.input(argument) if argument else None


def _tapped_mask(part: _Part, batch: int, seq_q: int, seq_k: int) -> Any:
    mask = part.config.get("mask") or {"kind": "none"}
    kind = mask.get("kind", "none")
    if kind in ("none", "causal"):
        return kind
    convention = mask.get("convention", "keep")
    pieces: Dict[str, Tuple[np.ndarray, str]] = {}
    if kind == "argument":
        pieces = _user_mask(part.tensor(mask["tensor"]), convention, batch, seq_q, seq_k,
                            f"the mask argument '{mask.get('argument')}'", part)
    else:                                        # given to capture(mask=...)
        for name in ("matrix", "padding"):
            if mask.get(name):
                pieces.update(_user_mask(part.tensor(mask[name]), convention, batch, seq_q, seq_k,
                                         f"mask {name}", part))
    return _mask_block(pieces, causal=bool(mask.get("causal")))


# --------------------------------------------------------------------------- Hugging Face

def _hf_mask(part: _Part, batch: int, seq_q: int, seq_k: int) -> Any:
    """The attention_mask as the module got it: float = added (eager), bool = True may attend
    (sdpa), integer = the tokenizer's 1 = real token; None = causal only where the sdpa/flash
    path applies is_causal (eager adds nothing)."""
    c = part.config
    info = c.get("attention_mask")
    key = "encoder_attention_mask" if c.get("cross") and "encoder_attention_mask" in part.record["inputs"] \
        else "attention_mask"
    mask = part.input(key)
    if mask is None:
        causal = c.get("is_causal") and c.get("attn_implementation") != "eager" and seq_q > 1 and not c.get("cross")
        if causal and seq_q != seq_k:
            return {"matrix": _causal_top_left(seq_q, seq_k), "convention": "keep"}
        return "causal" if causal else "none"
    convention = (info or {}).get("convention", "additive")
    return _mask_block(_user_mask(mask, convention, batch, seq_q, seq_k, key, part))


def _hf_refuse_cache(part: _Part) -> None:
    if part.config.get("cache"):
        raise _not_comparable(f"{part.label} ran with a KV cache: its keys include earlier tokens the capture "
                              "does not hold", hint="capture a forward pass without cache (use_cache=False)")


def _hf_inputs(part: _Part):
    hidden = part.input("hidden_states")
    if hidden is None:
        raise _missing(f"{part.label}: hidden_states was not recorded")
    encoder = part.input("encoder_hidden_states")
    query = _batched(hidden)
    key = _batched(encoder) if encoder is not None else query
    return query, key


def _hf_spec(part: _Part, weights: Dict[str, np.ndarray], biases: Dict[str, Optional[np.ndarray]],
             w_o: Optional[np.ndarray], layout: str, description: str) -> Rebuild:
    _hf_refuse_cache(part)
    c = part.config
    query, key = _hf_inputs(part)
    spec = _base_spec(part.label, c["heads"], c["kv_heads"], layout, _scale(c.get("scale"), c["d_head"]), biases, w_o)
    _attention_inputs(spec, query, key, key, weights, biases, layout)
    spec["attention"]["mask"] = _hf_mask(part, query.shape[0], query.shape[1], key.shape[1])
    return Rebuild(spec, description, part.notes)


def _bert_spec(part: _Part) -> Rebuild:
    prefix = part.config.get("weight_prefix", "")
    weights = {f"W_{n}": part.weight(f"{prefix}{name}.weight") for n, name in zip("qkv", ("query", "key", "value"))}
    biases = {f"b_{n}": part.weight(f"{prefix}{name}.bias") for n, name in zip("qkv", ("query", "key", "value"))}
    w_o = None
    if part.config.get("has_w_o"):
        w_o, biases["b_o"] = part.weight("output.dense.weight"), part.weight("output.dense.bias")
    what = "BertAttention (self-attention and output.dense; its residual + LayerNorm is a block step)" \
        if w_o is not None else "BertSelfAttention"
    return _hf_spec(part, weights, biases, w_o, "linear",
                    f"{what}: {part.config['heads']} heads, d_head {part.config['d_head']}")


def _gpt2_spec(part: _Part) -> Rebuild:
    c = part.config
    w, b = part.weight("c_attn.weight"), part.weight("c_attn.bias")      # Conv1D: x @ W + b, W (in, out)
    if c.get("cross"):
        (w_k, w_v), (b_k, b_v) = np.split(w, 2, axis=1), np.split(b, 2)
        w_q, b_q = part.weight("q_attn.weight"), part.weight("q_attn.bias")
    else:
        (w_q, w_k, w_v), (b_q, b_k, b_v) = np.split(w, 3, axis=1), np.split(b, 3)
    biases = {"b_q": b_q, "b_k": b_k, "b_v": b_v, "b_o": part.weight("c_proj.bias")}
    return _hf_spec(part, {"W_q": w_q, "W_k": w_k, "W_v": w_v}, biases, part.weight("c_proj.weight"), "x_at_w",
                    f"GPT2Attention: {c['heads']} heads, d_head {c['d_head']}, Conv1D (x_at_w) weights")


def _llama_spec(part: _Part) -> Rebuild:
    c = part.config
    weights = {f"W_{n}": part.weight(f"{n}_proj.weight") for n in "qkv"}
    biases = {f"b_{n}": part.weight(f"{n}_proj.bias") for n in "qkvo"}
    rebuild = _hf_spec(part, weights, biases, part.weight("o_proj.weight"), "linear",
                       f"{part.record.get('class', '').rsplit('.', 1)[-1]}: {c['heads']} heads, {c['kv_heads']} kv "
                       f"heads, d_head {c['d_head']}, RoPE")
    rebuild.spec["positional"] = _llama_rope(part, rebuild.spec["embeddings"].shape[1])
    return rebuild


def _llama_rope(part: _Part, seq: int) -> Dict[str, Any]:
    """RoPE is passed in as (cos, sin); attntrace rebuilds it only when they are the standard
    table at positions 0..seq-1 (default frequencies, no scaling)."""
    c = part.config
    cos, sin = part.input("position_embeddings.0"), part.input("position_embeddings.1")
    if cos is None or sin is None:
        raise _missing(f"{part.label}: position_embeddings (cos, sin) were not recorded")
    base = float((c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    d = c["d_head"]
    angles = np.arange(seq)[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)             # rotate_half: pair i with i + d/2
    rtol, _ = TOLERANCES[part.dtype()]
    for name, got, want in (("cos", cos, np.cos(angles)), ("sin", sin, np.sin(angles))):
        if got.shape[-2:] != want.shape or np.abs(got - want).max() > 10 * rtol:
            raise _not_comparable(f"{part.label}'s RoPE {name} table is not the default one at positions "
                                  f"0..{seq - 1} (rope type {(c.get('rope_parameters') or {}).get('rope_type')})",
                                  hint="scaled RoPE, offsets and per-item positions are not part of a spec yet")
    return {"kind": "rope", "base": base, "pairing": "half"}


_BUILDERS: Dict[str, Callable[[_Part], Rebuild]] = {
    "mha": _mha_spec, "hf-bert-self": _bert_spec, "hf-bert-attention": _bert_spec, "hf-gpt2": _gpt2_spec,
    "hf-llama": _llama_spec}
BLOCK_KINDS = ("encoder-layer", "decoder-layer")


def _rebuild(part: _Part, hooks: Dict[str, Dict[str, Any]]) -> Rebuild:
    if part.kind == "tapped":
        return _tapped_spec(part, hooks)
    if part.kind in BLOCK_KINDS:
        parts = ", ".join(part.record.get("parts", []))
        raise _not_comparable(f"{part.label} is a whole {part.kind} (norms, MLP, residuals); attntrace specs hold "
                              f"one attention until `blocks:` lands", hint=f"its attention parts are: {parts}")
    if part.kind not in _BUILDERS:
        raise _not_comparable(f"a part of kind '{part.kind}' (written by a newer attntrace?)")
    return _BUILDERS[part.kind](part)


def spec_from_capture(capture: Union[CaptureFile, str, Path], part: Optional[str] = None) -> Dict[str, Any]:
    """The attntrace spec (a dict, today's single-attention format, arrays as numpy) that computes
    what the captured module computed.  `part` names an attention inside a block
    ("self_attn", "multihead_attn"); by default the captured module itself."""
    capture = capture if isinstance(capture, CaptureFile) else load_capture(capture)
    record = capture.root if part is None else capture.component(part)
    view = _Part(capture, record)
    return _rebuild(view, _resolved_hooks(view)[0]).spec


# =========================================================================== hooks and layouts

_HEADS_FOR = {"attn.hook_k": "n_kv_heads", "attn.hook_v": "n_kv_heads", "attn.hook_rot_k": "n_kv_heads"}
_KEY_SIDE = ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k", "hook_encoder_embed")
_SCORES = ("batch", "n_heads", "seq_q", "seq_k")


def _per_head_layouts(heads: str, seq: str, width: str) -> List[Tuple[str, ...]]:
    """(batch, heads, seq, d) as PyTorch code holds it, attntrace's (batch, seq, heads, d), the
    flat projection (batch, seq, heads·d), and heads folded into the batch (nn.MultiheadAttention)."""
    return [("batch", heads, seq, width), ("batch", seq, heads, width), ("batch", seq, f"{heads}·{width}"),
            (f"batch·{heads}", seq, width)]


def _candidates(hook: str) -> List[Tuple[str, ...]]:
    """Layouts a tapped tensor may have, in order of preference: PyTorch's head-major first."""
    if hook in ("attn.hook_q", "attn.hook_rot_q", "attn.hook_k", "attn.hook_rot_k", "attn.hook_v"):
        return _per_head_layouts(_HEADS_FOR.get(hook, "n_heads"), "seq_k" if hook in _KEY_SIDE else "seq_q",
                                 "d_v" if hook == "attn.hook_v" else "d_head")
    if hook in ("attn.hook_qk", "attn.hook_scaled", "attn.hook_attn_scores", "attn.hook_pattern"):
        return [_SCORES, ("batch·n_heads", "seq_q", "seq_k")]
    if hook == "attn.hook_z":
        return _per_head_layouts("n_heads", "seq_q", "d_v")
    return [tuple(_internals().hook_axes[hook])]


_AXIS_ALIASES = {"heads": "n_heads", "head": "n_heads", "h": "n_heads", "b": "batch", "query": "seq_q",
                 "queries": "seq_q", "key": "seq_k", "keys": "seq_k", "d_k": "d_head", "head_dim": "d_head",
                 "dk": "d_head", "hidden": "d_model", "embed": "d_model", "kv_heads": "n_kv_heads"}


def _canonical_axes(axes: Sequence[str], hook: str) -> Tuple[str, ...]:
    out = []
    for axis in axes:
        parts = []
        for name in str(axis).replace("*", "·").split("·"):
            name = _AXIS_ALIASES.get(name, name)
            if name == "seq":
                name = "seq_k" if hook in _KEY_SIDE else "seq_q"
            if name == "n_heads" and hook in _HEADS_FOR:
                name = "n_kv_heads"
            parts.append(name)
        out.append("·".join(parts))
    return tuple(out)


def _size(axis: str, sizes: Dict[str, int]) -> Optional[int]:
    total = 1
    for name in axis.split("·"):
        if name not in sizes:
            return None
        total *= sizes[name]
    return total


def _variants(layout: Tuple[str, ...], sizes: Dict[str, int]) -> List[Tuple[str, ...]]:
    """The layout with any size-1 batch/head axis left out (unbatched or single-head code)."""
    droppable = [a for a in layout if a in ("batch", "n_heads", "n_kv_heads") and sizes.get(a) == 1]
    found = []
    for r in range(len(droppable) + 1):
        for dropped in itertools.combinations(droppable, r):
            variant = tuple(a for a in layout if a not in dropped)
            if variant not in found:
                found.append(variant)
    return found


def _fits(shape: Tuple[int, ...], layout: Tuple[str, ...], sizes: Dict[str, int]) -> bool:
    return len(shape) == len(layout) and all(_size(a, sizes) == s for a, s in zip(layout, shape))


def _to_hook_layout(array: np.ndarray, layout: Tuple[str, ...], target: Tuple[str, ...],
                    sizes: Dict[str, int]) -> np.ndarray:
    """Reshape composite axes into their parts, add the missing size-1 axes, order as `target`."""
    names: List[str] = []
    shape: List[int] = []
    for axis in layout:
        for name in axis.split("·"):
            names.append(name)
            shape.append(sizes[name])
    array = array.reshape(shape)
    flat_target = [name for axis in target for name in axis.split("·")]
    for axis in flat_target:
        if axis not in names:                   # a size-1 axis the user's code does not have
            names.append(axis)
            array = array[..., None]
    array = array.transpose([names.index(a) for a in flat_target])
    return array.reshape([_size(axis, sizes) for axis in target])      # composite target axes, e.g. n_heads·d_v


def _given_layout(hook: str, shape: Tuple[int, ...], entry: Dict[str, Any],
                  sizes: Dict[str, int]) -> Optional[Tuple[str, ...]]:
    """The axes the capture recorded: a tap's must fit (else it is the user's mistake in naming
    them); a module output that does not fit has the wrong shape (None: compared as such)."""
    layout = _canonical_axes(entry["axes"], hook)
    if _fits(shape, layout, sizes):
        return layout
    if entry.get("source") == "tap":
        raise input_error("ATT-E353", f"tap '{entry.get('written_as', hook)}' says axes {tuple(entry['axes'])}, "
                                      f"but its shape {shape} does not fit them "
                                      f"({', '.join(f'{a}={_size(a, sizes)}' for a in layout)})",
                          hint="axes: batch, n_heads, n_kv_heads, seq_q, seq_k, d_head, d_v, d_model, d_out")
    return None


def _infer_layout(hook: str, shape: Tuple[int, ...], entry: Dict[str, Any], sizes: Dict[str, int],
                  target: Tuple[str, ...], notes: List[Diagnosis]) -> Optional[Tuple[str, ...]]:
    """The first candidate layout that fits the shape; a warning when another one fits too
    and would read the numbers differently."""
    matches = [v for c in _candidates(hook) for v in _variants(c, sizes) if _fits(shape, v, sizes)]
    if not matches:
        return None
    probe = np.arange(int(np.prod(shape))).reshape(shape)
    mapped = [_to_hook_layout(probe, m, target, sizes) for m in matches]
    if any(not np.array_equal(mapped[0], other) for other in mapped[1:]):
        notes.append(Diagnosis(
            code="ATT-W344", severity="warning", hook=hook,
            message=f"the axes of tapped '{entry.get('written_as', hook)}' {shape} are ambiguous (sizes coincide); "
                    f"read as ({', '.join(matches[0])})",
            hint=f"tap('{entry.get('written_as', hook)}', t, axes=(...)) names them"))
    return matches[0]


@dataclass
class _Captured:
    """A captured hook mapped to attntrace's layout."""

    hook: str
    entry: Dict[str, Any]
    shape: Tuple[int, ...]
    layout: Optional[Tuple[str, ...]]
    array: Optional[np.ndarray]          # in the hook's axes (heads axis of size 1 when averaged)
    averaged: bool = False

    @property
    def patchable(self) -> bool:
        return self.array is not None and not self.averaged


def _resolved_hooks(part: _Part):
    """Captured hooks by canonical name (aliases resolved) and those that are not attention hooks."""
    internals = _internals()
    resolved: Dict[str, Dict[str, Any]] = {}
    skipped: List[Tuple[str, Dict[str, Any], str]] = []
    for written, entry in part.record["hooks"].items():
        try:
            name = internals.resolve_hook(written)
        except InputError as error:
            if written.startswith("blocks."):
                skipped.append((written, entry, "a block hook: compared once blocks are rebuilt"))
                continue
            raise input_error("ATT-E352", f"{part.capture.path}: tapped hook '{written}' is not a hook point",
                              hint=error.diagnosis.hint) from None
        if name in resolved:
            skipped.append((written, entry, f"a second tensor for {name}"))
            continue
        resolved[name] = dict(entry, written_as=written)
    return resolved, skipped


def _map_hooks(part: _Part, resolved: Dict[str, Dict[str, Any]], plan, notes: List[Diagnosis]):
    sizes = {name: plan.size(name) for name in plan.dims}
    sizes["1"] = 1
    captured: List[_Captured] = []
    skipped: List[Tuple[str, Dict[str, Any], str]] = []
    for hook, entry in resolved.items():
        if hook in ("hook_embed", "hook_encoder_embed"):
            skipped.append((hook, entry, "an input: the rebuilt spec starts from it"))
            continue
        if hook not in plan.hooks:
            skipped.append((hook, entry, "not a step of the rebuilt attention"))
            continue
        if hook == "attn.hook_mask":
            skipped.append((hook, entry, "masks are compared through their effect on attn_scores and pattern"))
            continue
        array = part.tensor(entry["tensor"])
        if entry.get("slice"):
            axis, start, stop = entry["slice"]
            array = np.take(array, np.arange(start, stop), axis=axis)
        averaged = entry.get("reduce") == "mean_heads"
        target = tuple(_internals().hook_axes[hook])
        local = dict(sizes, n_heads=1) if averaged else sizes
        layout = _given_layout(hook, array.shape, entry, local) if entry.get("axes") else \
            _infer_layout(hook, array.shape, entry, local, target, notes)
        mapped = None if layout is None else _to_hook_layout(array, layout, target, local)
        captured.append(_Captured(hook, entry, tuple(array.shape), layout, mapped, averaged))
    order = {h: i for i, h in enumerate(plan.hooks)}
    captured.sort(key=lambda c: order[c.hook])
    return captured, skipped


# =========================================================================== comparing

@dataclass
class HookCheck:
    """One captured hook against the reference."""

    hook: str
    written_as: str
    source: str                          # tap | output | module
    step: Optional[str]                  # "8/11 'weights = softmax(masked) over seq_k'"
    shape: Tuple[int, ...]               # as captured
    axes: Optional[Tuple[str, ...]]      # as read
    dtype: str
    status: str                          # match | first divergence | consequence | diverges | shape differs
    #                                      | not compared
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    cells: int = 0
    differing: int = 0
    first: Optional[Dict[str, Any]] = None   # {"index": {"batch": 0, "head": 1, ...}, "captured", "expected"}
    reason: str = ""

    @property
    def compared(self) -> bool:
        return self.status != "not compared"

    @property
    def ok(self) -> bool:
        return self.status in ("match", "not compared")

    def to_json(self) -> Dict[str, Any]:
        return {"hook": self.hook, "written_as": self.written_as, "source": self.source, "step": self.step,
                "shape": list(self.shape), "axes": list(self.axes) if self.axes else None, "dtype": self.dtype,
                "status": self.status, "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel),
                "cells": self.cells, "differing": self.differing,
                "first": None if self.first is None else {
                    **self.first, **{k: _num(self.first[k]) for k in ("captured", "expected")},
                    **{k: [_num(v) for v in self.first[k]] for k in ("row_captured", "row_expected")}},
                "reason": self.reason}


def _num(x: Any) -> Any:
    """JSON-safe number: NaN and infinities as strings, as attntrace's JSON does."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


@dataclass
class _Diff:
    max_abs: float
    max_rel: float
    bad: np.ndarray

    @property
    def ok(self) -> bool:
        return not self.bad.any()


def _difference(captured: np.ndarray, expected: np.ndarray, rtol: float, atol: float, hook: str) -> _Diff:
    """Cell-wise comparison relative to the hook's magnitude (see the module docstring)."""
    finite_ref = np.isfinite(expected)
    magnitude = float(np.abs(expected[finite_ref]).max()) if finite_ref.any() else 0.0
    both_finite = finite_ref & np.isfinite(captured)
    diff = np.where(both_finite, np.abs(np.where(both_finite, captured, 0) - np.where(both_finite, expected, 0)),
                    np.inf)
    same_special = (np.isnan(captured) & np.isnan(expected)) | (np.isinf(captured) & (captured == expected))
    if hook == "attn.hook_attn_scores":          # -1e9 in the capture where attntrace writes -inf
        same_special |= np.isneginf(expected) & (captured <= BLOCKED_AT)
    diff = np.where(same_special, 0.0, diff)
    floor = max(magnitude, atol / rtol)
    bad = diff > atol + rtol * magnitude
    return _Diff(float(diff.max()) if diff.size else 0.0, float(diff.max() / floor) if diff.size else 0.0, bad)


def _reference(trace, item: _Captured) -> np.ndarray:
    array = trace.arrays[item.hook]
    return array.mean(axis=1, keepdims=True) if item.averaged else array


def _first_index(item: _Captured, bad: np.ndarray, expected: np.ndarray) -> Dict[str, Any]:
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    axes = _internals().hook_axes[item.hook]
    named = {}
    for axis, i in zip(axes, index):
        label = _AXIS_LABELS.get(axis, axis)
        named[label] = "mean" if (item.averaged and axis == "n_heads") else i
    row = index[:-1]                             # the cell's row along the last axis (a query's weights ...)
    return {"index": named, "captured": float(item.array[index]), "expected": float(expected[index]),
            "row_axis": _AXIS_LABELS.get(axes[-1], axes[-1]),
            "row_captured": [float(v) for v in item.array[row][:ROW_PREVIEW]],
            "row_expected": [float(v) for v in expected[row][:ROW_PREVIEW]]}


def _run(spec, *, keep="all", overrides=None, hooks=()):
    return _internals().run(spec, keep=keep, dtype="float64", overrides=overrides, hooks=list(hooks), check=False,
                            spec_hooks=False)


def _kept(captured: List[_Captured]) -> List[str]:
    """Keep only the hooks that are compared: a long-context replay holds a few score-sized arrays, not all."""
    return [c.hook for c in captured] or ["hook_attn_out"]


def _compare_all(trace, captured: List[_Captured], rtol: float, atol: float) -> Dict[str, _Diff]:
    return {c.hook: _difference(c.array, _reference(trace, c), rtol, atol, c.hook)
            for c in captured if c.array is not None}


# =========================================================================== naming the bug

# How to fix each catalogue bug in PyTorch code, used when the catalogue entry has no `fix` of its own.
PYTORCH_FIXES = {
    "forgot-transpose-k": "scores = Q @ K.transpose(-2, -1)",
    "softmax-wrong-axis": "normalise over the keys: F.softmax(scores, dim=-1)",
    "scale-by-d-model": "divide by math.sqrt(d_head) (= d_model // heads), not math.sqrt(d_model)",
    "no-scale": "scale the scores before softmax: scores / math.sqrt(d_head)",
    "split-heads-without-transpose": "x.view(batch, seq, heads, d_head).transpose(1, 2), not "
                                     "x.view(batch, heads, seq, d_head)",
    "merge-heads-without-transpose": "z.transpose(1, 2).contiguous().view(batch, seq, heads * d_head)",
    "mask-after-softmax": "mask the scores before softmax: scores.masked_fill(mask == 0, float('-inf')), then "
                          "softmax",
    "inverted-mask": "block where the mask says blocked: masked_fill(mask == 0, ...) when 1 = may attend "
                     "(or build the mask the other way round)",
    "mask-wrong-axis": "rows of a mask are queries, columns keys: (…, seq_q, seq_k); a padding mask broadcasts "
                       "as (batch, 1, 1, seq_k)",
    "additive-mask-zero-one": "turn a 0/1 mask into 0/-inf before adding it: scores.masked_fill(mask == 0, "
                              "float('-inf'))",
    "fully-masked-row-neg-inf": "give rows with no visible key zeros, not NaN: torch.nan_to_num(F.softmax(...)), "
                                "or F.scaled_dot_product_attention",
    "wrong-d-head-reshape": "d_head = projection width // heads, not d_model // heads",
    "kv-heads-tiled": "share kv heads with repeat_interleave(groups, dim=1), not repeat",
}


@dataclass
class BugMatch:
    """Catalogue bugs that, replayed on the captured inputs, give the captured numbers."""

    bugs: Tuple[str, ...]
    max_rel: float                        # the largest error over the hooks it reproduces
    reproduced: List[str]                 # hooks it reproduces within the tolerance
    missed: List[str]                     # hooks it does not (empty for a full match)
    descriptions: List[str]
    fixes: List[str]
    seen_in: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " + ".join(self.bugs)

    @property
    def full(self) -> bool:
        return not self.missed

    def sentence(self, first_hook: Optional[str]) -> str:
        what = "; ".join(self.descriptions)
        if self.full:
            where = f"your {first_hook}" if first_hook else "your numbers"
            return (f"{where} equals attntrace's with `{self.name}` (max error {self.max_rel:.1e}, "
                    f"on all {len(self.reproduced)} compared hooks): {what}")
        return (f"closest: `{self.name}` reproduces {', '.join(self.reproduced)} but not {', '.join(self.missed)} — "
                f"{what}")

    def to_json(self) -> Dict[str, Any]:
        return {"bugs": list(self.bugs), "max_rel": _num(self.max_rel), "reproduced": self.reproduced,
                "missed": self.missed, "full": self.full, "descriptions": self.descriptions, "fixes": self.fixes,
                "seen_in": self.seen_in}


def _bug_texts(names: Sequence[str]) -> Tuple[List[str], List[str], List[str]]:
    catalogue = _internals().catalogue
    descriptions, fixes, seen = [], [], []
    for name in names:
        bug = catalogue[name]
        descriptions.append(getattr(bug, "explanation", None) or bug.description)
        fixes.append(getattr(bug, "fix", None) or PYTORCH_FIXES.get(name, f"see `attntrace bugs` ({name})"))
        report = getattr(bug, "seen_in", None)
        if report:
            seen.append(report if isinstance(report, str) else ", ".join(report))
    return descriptions, fixes, seen


def _replay(spec, names: Sequence[str], captured: List[_Captured], rtol: float, atol: float) -> Optional[BugMatch]:
    catalogue = _internals().catalogue
    overrides: Dict[str, Any] = {}
    for name in names:
        overrides.update(catalogue[name].overrides([]))
    try:
        trace = _run(spec, keep=_kept(captured), overrides=overrides)
    except (ShapeError, InputError):
        return None                              # the bug breaks the shapes: it cannot give these numbers
    except Exception:                            # noqa: BLE001 -- a replay must never break the check itself
        return None
    diffs = _compare_all(trace, captured, rtol, atol)
    reproduced = [h for h, d in diffs.items() if d.ok]
    missed = [c.hook for c in captured if c.hook not in diffs or not diffs[c.hook].ok]
    worst = max((diffs[h].max_rel for h in reproduced), default=float("nan"))
    descriptions, fixes, seen = _bug_texts(names)
    return BugMatch(tuple(names), worst, reproduced, missed, descriptions, fixes, seen)


def _applicable_bugs(spec, plan) -> List[str]:
    return [name for name, bug in _internals().catalogue.items() if bug.cannot_show(spec, plan) is None]


def name_the_bug(spec, plan, captured: List[_Captured], rtol: float, atol: float, first_hook: str):
    """Replay single bugs, then pairs (disjoint steps); full matches sorted by error, and the
    closest partial one (it must at least reproduce the first diverging hook)."""
    catalogue = _internals().catalogue
    names = _applicable_bugs(spec, plan)
    singles = [m for m in (_replay(spec, [n], captured, rtol, atol) for n in names) if m is not None]
    full = sorted((m for m in singles if m.full), key=lambda m: m.max_rel)
    tried = {"bugs": len(names), "pairs": 0}
    pairs: List[BugMatch] = []
    if not full:
        combos = [(a, b) for a, b in itertools.combinations(names, 2)
                  if not set(catalogue[a].steps) & set(catalogue[b].steps)]
        tried["pairs"] = len(combos)
        pairs = [m for m in (_replay(spec, list(c), captured, rtol, atol) for c in combos) if m is not None]
        full = sorted((m for m in pairs if m.full), key=lambda m: m.max_rel)
    closest = None
    if not full:
        partial = [m for m in singles + pairs if first_hook in m.reproduced]
        closest = max(partial, key=lambda m: (len(m.reproduced), -len(m.bugs)), default=None)
    return full, closest, tried


# =========================================================================== the report

@dataclass
class PartCheck:
    """One attention of the capture, rebuilt and compared."""

    part: str
    kind: str
    description: str
    dtype: str
    rtol: float
    atol: float
    hooks: List[HookCheck]
    bugs: List[BugMatch] = field(default_factory=list)
    closest: Optional[BugMatch] = None
    tried: Dict[str, int] = field(default_factory=dict)
    spec: Optional[Dict[str, Any]] = None         # the rebuilt spec (arrays as numpy)
    notes: List[Diagnosis] = field(default_factory=list)

    @property
    def compared(self) -> List[HookCheck]:
        return [h for h in self.hooks if h.compared]

    @property
    def matches(self) -> bool:
        return bool(self.compared) and all(h.ok for h in self.compared)

    @property
    def verdict(self) -> str:
        return "matches" if self.matches else "differs"

    @property
    def first_divergence(self) -> Optional[HookCheck]:
        return next((h for h in self.hooks if h.status in ("first divergence", "shape differs")), None)

    def summary(self) -> str:
        if self.matches:
            worst = max(h.max_rel for h in self.compared)
            return (f"matches: {len(self.compared)} hooks within {self.dtype} tolerance "
                    f"(max error {worst:.1e} ≤ {self.rtol:g} × magnitude)")
        first = self.first_divergence
        where = f"first divergence at {first.hook}" if first else "differs"
        if self.bugs:
            return f"differs ({where}); {self.bugs[0].sentence(first.hook if first else None)}"
        return (f"differs ({where}); no catalogue bug reproduces it (tried {self.tried.get('bugs', 0)} bugs and "
                f"{self.tried.get('pairs', 0)} pairs)")

    def to_json(self) -> Dict[str, Any]:
        first = self.first_divergence
        return {"part": self.part, "kind": self.kind, "description": self.description, "verdict": self.verdict,
                "summary": self.summary(), "dtype": self.dtype, "tolerance": {"rtol": self.rtol, "atol": self.atol},
                "first_divergence": first.hook if first else None, "hooks": [h.to_json() for h in self.hooks],
                "bugs": [b.to_json() for b in self.bugs],
                "closest": self.closest.to_json() if self.closest else None, "tried": dict(self.tried)}


@dataclass
class CaptureReport:
    path: str
    name: str
    module: str
    kind: str
    producer: Dict[str, Any]
    parts: List[PartCheck]
    not_comparable: List[Dict[str, str]] = field(default_factory=list)
    notes: List[Diagnosis] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.matches for p in self.parts)

    @property
    def verdict(self) -> str:
        return "matches" if self.ok else "differs"

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @property
    def bug_names(self) -> List[str]:
        return [b.name for p in self.parts for b in p.bugs]

    def to_json(self) -> Dict[str, Any]:
        return {"attntrace": 1, "command": "check", "capture": self.path, "name": self.name, "module": self.module,
                "kind": self.kind, "producer": self.producer, "verdict": self.verdict, "exit_code": self.exit_code,
                "tolerances": {k: {"rtol": r, "atol": a} for k, (r, a) in TOLERANCES.items()},
                "parts": [p.to_json() for p in self.parts], "not_comparable": self.not_comparable,
                "diagnoses": [d.to_json() for d in self.notes]}


def _check_part(capture: CaptureFile, record: Dict[str, Any], rtol: Optional[float], atol: Optional[float],
                name_bugs: bool) -> PartCheck:
    internals = _internals()
    part = _Part(capture, record)
    resolved, skipped = _resolved_hooks(part)
    rebuild = _rebuild(part, resolved)
    try:
        spec = internals.load_spec(rebuild.spec)
        plan = internals.plan_from_spec(spec)
        reference = _run(spec, keep=[h for h in resolved if h in plan.hooks] or "auto")
    except ShapeError as error:
        raise input_error("ATT-E354", f"{capture.path}: the captured weights and inputs of {part.label} do not fit "
                                      f"together: {error.diagnosis.message}",
                          hint="check heads= and the weights given to capture()") from None
    dtype = part.dtype()
    default_rtol, default_atol = TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    captured, not_mapped = _map_hooks(part, resolved, plan, part.notes)

    def dtype_of(entry: Dict[str, Any]) -> str:
        info = capture.tensors.get(entry.get("tensor"))
        return info.dtype if info is not None else ""
    checks = _hook_checks(spec, plan, reference, captured, skipped + not_mapped, rtol, atol, dtype_of)
    result = PartCheck(part.name, part.kind, rebuild.description, dtype, rtol, atol, checks, spec=rebuild.spec,
                       notes=part.notes)
    if not result.compared:
        raise input_error("ATT-E350", f"{capture.path}: nothing to compare in {part.label}: no captured hook is a "
                                      "step of the rebuilt attention",
                          hint="tap('attn.hook_pattern', weights) and tap('hook_attn_out', out) in your forward")
    first = result.first_divergence
    if name_bugs and first is not None:
        result.bugs, result.closest, result.tried = name_the_bug(spec, plan, captured, rtol, atol, first.hook)
    return result


def _hook_checks(spec, plan, reference, captured: List[_Captured], skipped, rtol: float, atol: float,
                 dtype_of: Callable[[Dict[str, Any]], str]) -> List[HookCheck]:
    labels = {s.hook: s.label for s in plan.steps}
    checks: List[HookCheck] = []
    patches: List[Tuple[str, np.ndarray]] = []      # captured hooks before the current one
    first: Optional[str] = None
    for item in captured:
        entry = item.entry
        check = HookCheck(item.hook, entry.get("written_as", item.hook), entry.get("source", "tap"),
                          labels.get(item.hook), item.shape, item.layout, dtype_of(entry), "match")
        if item.array is None:
            wanted = tuple(plan.shape(_internals().hook_axes[item.hook]))
            check.status, diverged = "shape differs", True
            check.reason = f"shape {item.shape} fits no layout of {item.hook} {wanted}"
        else:
            expected = _reference(reference, item)
            diff = _difference(item.array, expected, rtol, atol, item.hook)
            check.max_abs, check.max_rel = diff.max_abs, diff.max_rel
            check.cells, check.differing = int(diff.bad.size), int(diff.bad.sum())
            diverged = not diff.ok
            if diverged:
                check.first = _first_index(item, diff.bad, expected)
                check.status = "first divergence" if first is None else \
                    _own_or_consequence(spec, item, patches, rtol, atol)
                if check.status == "consequence":
                    check.reason = f"follows from the divergence at {first}"
        if diverged and first is None:
            first = item.hook
        checks.append(check)
        if item.patchable:
            patches.append((item.hook, item.array))
    for hook, entry, why in skipped:
        checks.append(HookCheck(hook, entry.get("written_as", hook), entry.get("source", "tap"), labels.get(hook),
                                (), None, dtype_of(entry), "not compared", reason=why))
    return checks


def _own_or_consequence(spec, item: _Captured, patches: List[Tuple[str, np.ndarray]], rtol: float,
                        atol: float) -> str:
    """Feed the captured earlier hooks into the reference: if this hook then matches, its
    difference is a consequence of theirs; otherwise it diverges on its own too."""
    if not patches:
        return "diverges"
    hooks = [(hook, (lambda array, *, hook, value=value: value)) for hook, value in patches]
    try:
        patched = _run(spec, keep=[item.hook], hooks=hooks)
    except (ShapeError, InputError):
        return "diverges"
    return "consequence" if _difference(item.array, _reference(patched, item), rtol, atol, item.hook).ok \
        else "diverges"


def check_capture(path: Union[str, Path], *, rtol: Optional[float] = None, atol: Optional[float] = None,
                  name_bugs: bool = True) -> CaptureReport:
    """Rebuild the captured attention, compare every captured hook with attntrace's reference
    (float64), and name the catalogue bug that reproduces a difference.  rtol/atol override
    the dtype's tolerances (see the module docstring)."""
    for label, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise input_error("ATT-E355", f"check_capture: {label} must be a positive number, got {value!r}")
    capture = load_capture(path)
    root = capture.root
    notes = [Diagnosis(code=n.get("code", "ATT-W340"), message=n.get("message", ""), severity="warning",
                       hint=n.get("hint")) for n in capture.document.get("notes", [])]
    parts: List[PartCheck] = []
    not_comparable: List[Dict[str, str]] = []
    if root["kind"] in BLOCK_KINDS:
        for name in root.get("parts", []):
            try:
                parts.append(_check_part(capture, capture.component(name), rtol, atol, name_bugs))
            except InputError as error:
                if error.diagnosis.code != "ATT-E351":
                    raise
                not_comparable.append({"part": name, "reason": error.diagnosis.message})
        not_comparable.append({"part": "block", "reason": (
            f"the {_class_name(root)}'s norms, MLP and residuals (norm_first={root['config'].get('norm_first')}) "
            "are recorded but not yet comparable: attntrace specs hold one attention until `blocks:` lands")})
        if not parts:
            raise input_error("ATT-E351", f"{capture.path}: not yet comparable: no attention part of the "
                                          f"{root['kind']} can be rebuilt",
                              hint="; ".join(f"{n['part']}: {n['reason']}" for n in not_comparable))
    else:
        parts.append(_check_part(capture, root, rtol, atol, name_bugs))
        if root["config"].get("block_after_attention"):
            not_comparable.append({"part": "block", "reason": (
                f"{_class_name(root)}'s {root['config']['block_after_attention']} after hook_attn_out is recorded "
                "but not yet comparable (blocks)")})
    for check in parts:
        notes.extend(check.notes)
    return CaptureReport(str(capture.path), capture.document.get("name", ""), root.get("class", ""), root["kind"],
                         capture.document.get("producer", {}), parts, not_comparable, notes)



def _class_name(record: Dict[str, Any]) -> str:
    return record.get("class", "").rsplit(".", 1)[-1] or record.get("kind", "module")
