"""The offline HTML explorer: one self-contained page for attention patterns.

The page is plain data in, one HTML file out.  Its input is an
:class:`ExplorerData` (or a plain ``dict`` with the same field names, see
:func:`coerce_data`); nothing here reads a trace, so the caller decides what to
show.  The page makes no network request of any kind: its CSS and JavaScript
are inlined from ``explorer_assets/`` (package data), there are no fonts or
images to load, and a Content-Security-Policy (``default-src 'none'``) makes the
browser refuse any request a future edit might add.

Data model
----------
``ExplorerData``
    ``title``; ``query_tokens`` / ``key_tokens`` (labels per batch item, a list
    of lists of str, or one list shared by every item; ``key_tokens`` defaults to
    ``query_tokens``, ``None`` shows positions); ``layers``; ``steps``;
    ``diagnoses``.
``ExplorerLayer``
    ``name`` (``"blocks.3.attn"``), ``pattern`` (a real array shaped
    ``(batch, heads, seq_q, seq_k)``; ``n_heads`` is its axis 1), and optional
    ``query_tokens`` / ``key_tokens`` overriding the data's (e.g. for
    cross-attention in an encoder-decoder).
``ExplorerStep``
    one row of the steps table: ``hook``, ``shape``, ``axes``, ``dtype``,
    ``min``, ``max``, ``mean``, ``nan``, ``posinf``, ``neginf``, ``true``.  The
    field names are those of ``attntrace.stats.Stats.to_json()``, so
    ``ExplorerStep(hook=name, axes=axes, **stats.to_json())`` works.  Numbers are
    shown exactly as given (Python ``repr``).
``ExplorerDiagnosis``
    ``code``, ``severity``, ``message``, ``hint``, ``hook``, ``layer`` (index
    into ``layers``), ``head``.  :meth:`ExplorerDiagnosis.from_diagnosis` takes
    an ``attntrace.errors.Diagnosis``.

Encoding of the weights in the page
-----------------------------------
Each (layer, batch item, head) matrix is stored as uint8 codes, row-major
(query rows, key columns), zlib-compressed and base64-encoded in a
``<script type="application/octet-stream" data-chunk="L.B.H">`` element; the
browser inflates it with the native ``DecompressionStream('deflate')``.  Per
layer, ``lo``/``hi`` is ``0``/``1`` when every finite value lies in [0, 1]
(an attention pattern), else the layer's finite min/max.  With
``step = (hi - lo) / (LEVELS - 1)``:

    code 0              the value is exactly 0
    code 1 .. LEVELS    lo + (code - 1) * step   (nearest level; |error| <= step / 2,
                        0.002 for a pattern; a non-zero value never gets code 0)
    CODE_NAN            NaN;  CODE_POSINF +inf;  CODE_NEGINF -inf

The page's readout shows the decoded value with its ± step / 2; the steps table
shows the exact statistics given.  Softmax patterns compress well (most weights
round to a few codes); a 2,048-token, 12-head layer of white noise would not,
see the README's budget note.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
import zlib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from attntrace.errors import Diagnosis, input_error
from attntrace.inputs.files import atomic_write

LEVELS = 250            # codes 1..250 are value levels
CODE_NAN, CODE_POSINF, CODE_NEGINF = 251, 252, 253
# Level 1 deflate: ~4x faster than the default level 6 on 50M codes and
# still ~20x smaller than the raw bytes for softmax patterns (the 2 s budget
# of a 2,048-token, 12-head layer matters more than the last third of size).
ZLIB_LEVEL = 1
FORMAT_VERSION = 1
_MARKER = re.compile(r"@TITLE@|/\*@CSS@\*/|/\*@JS@\*/|@META@|@CHUNKS@")

Tokens = Optional[Union[Sequence[str], Sequence[Sequence[str]]]]


@dataclass
class ExplorerStep:
    """One row of the steps table, shown exactly as given."""

    hook: str
    shape: Sequence[int] = ()
    axes: Sequence[str] = ()
    dtype: str = ""
    min: Optional[float] = None
    max: Optional[float] = None
    mean: Optional[float] = None
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    true: Optional[int] = None      # boolean arrays (masks): how many True


@dataclass
class ExplorerDiagnosis:
    """One finding in the diagnoses list; ``layer``/``head`` link it to a head."""

    code: str
    message: str
    severity: str = "warning"
    hint: Optional[str] = None
    hook: Optional[str] = None
    layer: Optional[int] = None
    head: Optional[int] = None

    @classmethod
    def from_diagnosis(cls, diagnosis: Diagnosis, layer: Optional[int] = None) -> ExplorerDiagnosis:
        return cls(code=diagnosis.code, message=diagnosis.message, severity=diagnosis.severity,
                   hint=diagnosis.hint, hook=diagnosis.hook, layer=layer, head=diagnosis.head)


@dataclass
class ExplorerLayer:
    """One attention layer: its name and pattern (batch, heads, seq_q, seq_k)."""

    name: str
    pattern: np.ndarray
    query_tokens: Tokens = None     # None: the data's tokens
    key_tokens: Tokens = None

    @property
    def n_heads(self) -> int:
        return int(np.shape(self.pattern)[1])


@dataclass
class ExplorerData:
    """Everything the explorer page shows."""

    title: str = "attntrace explorer"
    query_tokens: Tokens = None     # None: positions are the labels
    key_tokens: Tokens = None       # None: the query tokens (self-attention)
    layers: List[ExplorerLayer] = field(default_factory=list)
    steps: List[ExplorerStep] = field(default_factory=list)
    diagnoses: List[ExplorerDiagnosis] = field(default_factory=list)


# ---------------------------------------------------------------- validation

def _from_mapping(cls, value: Any, what: str):
    """A dataclass from itself or from a dict with its field names (unknown keys are an error)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise input_error("ATT-E502", f"explorer data: {what} is a {type(value).__name__}, "
                          f"expected a {cls.__name__} or a dict",
                          hint=f"fields of {cls.__name__}: {', '.join(f.name for f in fields(cls))}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise input_error("ATT-E502", f"explorer data: {what} has unknown key(s) {', '.join(map(repr, unknown))}",
                          hint=f"fields of {cls.__name__}: {', '.join(sorted(names))}")
    try:
        return cls(**value)
    except TypeError as exc:     # a required field is missing
        raise input_error("ATT-E502", f"explorer data: {what}: {exc}",
                          hint=f"fields of {cls.__name__}: {', '.join(sorted(names))}") from None


def coerce_data(data: Union[ExplorerData, Mapping[str, Any]]) -> ExplorerData:
    """``data`` as an :class:`ExplorerData`; nested dicts become the matching dataclasses."""
    data = _from_mapping(ExplorerData, data, "the data")
    return ExplorerData(
        title=str(data.title),
        query_tokens=data.query_tokens,
        key_tokens=data.key_tokens,
        layers=[_from_mapping(ExplorerLayer, layer, f"layers[{i}]") for i, layer in enumerate(data.layers)],
        steps=[_from_mapping(ExplorerStep, step, f"steps[{i}]") for i, step in enumerate(data.steps)],
        diagnoses=[ExplorerDiagnosis.from_diagnosis(d) if isinstance(d, Diagnosis)
                   else _from_mapping(ExplorerDiagnosis, d, f"diagnoses[{i}]")
                   for i, d in enumerate(data.diagnoses)],
    )


def _pattern_array(layer: ExplorerLayer) -> np.ndarray:
    """The layer's pattern as a 4-D real float array, or ATT-E500 naming the layer."""
    try:
        pattern = np.asarray(layer.pattern)
    except (ValueError, TypeError) as exc:    # ragged nested lists and the like
        raise input_error("ATT-E500", f"explorer layer {layer.name!r}: the pattern is not an array ({exc})",
                          hint="pass a numpy array shaped (batch, heads, seq_q, seq_k)") from None
    if pattern.dtype == bool or np.issubdtype(pattern.dtype, np.integer):
        pattern = pattern.astype(np.float32)
    if not np.issubdtype(pattern.dtype, np.floating):
        raise input_error("ATT-E500", f"explorer layer {layer.name!r}: the pattern has dtype {pattern.dtype}, "
                          "expected real numbers", hint="pass float weights (e.g. the softmax output)")
    if pattern.ndim != 4 or 0 in pattern.shape:
        raise input_error("ATT-E500", f"explorer layer {layer.name!r}: the pattern has shape "
                          f"{tuple(pattern.shape)}, expected (batch, heads, seq_q, seq_k), none empty",
                          hint="a single item's (heads, seq_q, seq_k) pattern becomes 4-D with pattern[None]")
    return pattern


def _token_lists(tokens: Tokens, batch: int, seq: int, where: str) -> List[List[str]]:
    """Labels per batch item: given ones checked against the pattern, else positions."""
    if tokens is None:
        return [[str(i) for i in range(seq)] for _ in range(batch)]
    tokens = list(tokens)
    if all(isinstance(t, str) for t in tokens):     # one list shared by every batch item
        tokens = [tokens] * batch
    if len(tokens) != batch:
        raise input_error("ATT-E501", f"{where}: {len(tokens)} token lists for a batch of {batch}",
                          hint="give one list of labels per batch item, or one list for all")
    lists = []
    for item, labels in enumerate(tokens):
        if isinstance(labels, str) or len(labels) != seq:
            count = "a string" if isinstance(labels, str) else f"{len(labels)} labels"
            raise input_error("ATT-E501", f"{where}, batch item {item}: {count} for {seq} positions",
                              hint="one label per position of that axis of the pattern")
        lists.append([str(label) for label in labels])
    return lists


# ------------------------------------------------------------------ encoding

def value_range(pattern: np.ndarray) -> Tuple[float, float, int, int, int]:
    """(lo, hi, nan, posinf, neginf) of a layer: [0, 1] for patterns, else the finite min/max."""
    lo, hi = float(np.min(pattern)), float(np.max(pattern))
    nan = posinf = neginf = 0
    if not (np.isfinite(lo) and np.isfinite(hi)):      # NaN or inf somewhere: count, then range over the rest
        nan, posinf, neginf = (int(np.count_nonzero(f(pattern))) for f in (np.isnan, np.isposinf, np.isneginf))
        finite = pattern[np.isfinite(pattern)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0, nan, posinf, neginf
    if hi == lo:        # a constant: one level, decoded exactly
        hi = lo + 1.0
    return lo, hi, nan, posinf, neginf


def quantise(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 codes of ``values`` (any shape) on the layer's scale; see the module docstring."""
    values = np.asarray(values)
    dtype = np.float64 if values.dtype == np.float64 else np.float32     # float32 halves the memory traffic
    level = values.astype(dtype)
    level -= dtype(lo)
    level *= dtype((LEVELS - 1) / (hi - lo))
    level += dtype(1.5)                                 # +1: code 0 is exact zero; +0.5: round to nearest
    special = []
    if not np.isfinite(level).all():                    # rare: only layers holding NaN or inf pay this
        special = [(np.isnan(values), CODE_NAN), (np.isposinf(values), CODE_POSINF),
                   (np.isneginf(values), CODE_NEGINF)]
        level[~np.isfinite(level)] = 1.0
    np.clip(level, 1.0, LEVELS + 0.5, out=level)
    codes = level.astype(np.uint8)                      # truncation after +0.5 rounds to the nearest level
    codes[values == 0] = 0
    for mask, code in special:
        codes[mask] = code
    return codes


def dequantise(codes: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float64 values of uint8 codes (the inverse of :func:`quantise` up to step / 2)."""
    step = (hi - lo) / (LEVELS - 1)
    table = lo + (np.arange(256) - 1) * step
    table[0] = 0.0
    table[CODE_NAN], table[CODE_POSINF], table[CODE_NEGINF] = np.nan, np.inf, -np.inf
    return table[codes]


def _encode_chunk(matrix: np.ndarray, lo: float, hi: float) -> str:
    return base64.b64encode(zlib.compress(quantise(matrix, lo, hi).tobytes(), ZLIB_LEVEL)).decode("ascii")


# ---------------------------------------------------------------------- page

def _number_text(value: Any) -> Optional[str]:
    """A number exactly as given: Python's repr of a float, str of an int."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def _step_json(step: ExplorerStep) -> Dict[str, Any]:
    return {
        "hook": str(step.hook), "shape": [int(s) for s in step.shape], "axes": [str(a) for a in step.axes],
        "dtype": str(step.dtype), "min": _number_text(step.min), "max": _number_text(step.max),
        "mean": _number_text(step.mean), "nan": int(step.nan), "posinf": int(step.posinf),
        "neginf": int(step.neginf), "true": None if step.true is None else int(step.true),
    }


def _diagnosis_json(diagnosis: ExplorerDiagnosis, n_layers: int) -> Dict[str, Any]:
    layer = diagnosis.layer if diagnosis.layer is not None and 0 <= diagnosis.layer < n_layers else None
    return {"code": str(diagnosis.code), "severity": str(diagnosis.severity), "message": str(diagnosis.message),
            "hint": diagnosis.hint, "hook": diagnosis.hook, "layer": layer,
            "head": None if diagnosis.head is None else int(diagnosis.head)}


def _layer_payload(index: int, layer: ExplorerLayer, data: ExplorerData) -> Tuple[Dict[str, Any], List[str]]:
    """The layer's metadata and its chunks (one per batch item and head, in that order)."""
    pattern = _pattern_array(layer)
    batch, heads, seq_q, seq_k = (int(s) for s in pattern.shape)
    where = f"explorer layer {layer.name!r}"
    query_tokens = layer.query_tokens if layer.query_tokens is not None else data.query_tokens
    key_tokens = layer.key_tokens if layer.key_tokens is not None else (
        data.key_tokens if data.key_tokens is not None else query_tokens)
    if key_tokens is query_tokens and seq_k != seq_q and query_tokens is not None:
        raise input_error("ATT-E501", f"{where}: {seq_q} queries but {seq_k} keys and no key tokens",
                          hint="give key_tokens (on the data or on this layer) for cross-attention")
    meta = {"name": str(layer.name), "batch": batch, "heads": heads, "seq_q": seq_q, "seq_k": seq_k,
            "query_tokens": _token_lists(query_tokens, batch, seq_q, f"{where}, query tokens"),
            "key_tokens": _token_lists(key_tokens, batch, seq_k, f"{where}, key tokens")}
    lo, hi, nan, posinf, neginf = value_range(pattern)
    meta.update(lo=lo, hi=hi, nan=nan, posinf=posinf, neginf=neginf, chunks=[])
    chunks = []
    for b in range(batch):
        for h in range(heads):
            meta["chunks"].append(f"{index}.{b}.{h}")
            chunks.append(_encode_chunk(pattern[b, h], lo, hi))
    return meta, chunks


def _asset(name: str) -> str:
    return resources.files("attntrace.render").joinpath("explorer_assets", name).read_text(encoding="utf-8")


def _script_safe_json(value: Any) -> str:
    """JSON that cannot close its <script> element (labels may contain '</script>')."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")


def explorer_html(data: Union[ExplorerData, Mapping[str, Any]]) -> str:
    """The explorer as one self-contained HTML document."""
    data = coerce_data(data)
    layers, chunks = [], []
    for index, layer in enumerate(data.layers):
        meta, layer_chunks = _layer_payload(index, layer, data)
        layers.append(meta)
        chunks.extend(zip(meta["chunks"], layer_chunks))
    meta = {"version": FORMAT_VERSION, "title": data.title, "layers": layers,
            "steps": [_step_json(s) for s in data.steps],
            "diagnoses": [_diagnosis_json(d, len(layers)) for d in data.diagnoses],
            "encoding": {"zero": 0, "levels": LEVELS, "nan": CODE_NAN, "posinf": CODE_POSINF,
                         "neginf": CODE_NEGINF}}
    blobs = "\n".join(f'<script type="application/octet-stream" data-chunk="{key}">{text}</script>'
                      for key, text in chunks)
    parts = {"@TITLE@": html.escape(data.title), "/*@CSS@*/": _asset("explorer.css"),
             "/*@JS@*/": _asset("explorer.js"), "@META@": _script_safe_json(meta), "@CHUNKS@": blobs}
    # one pass over the template: inserted text (a title, a label) is never scanned for markers
    return _MARKER.sub(lambda match: parts[match.group(0)], _asset("explorer.html"))


def write_explorer(path: Union[str, os.PathLike], data: Union[ExplorerData, Mapping[str, Any]]) -> int:
    """Write the explorer to ``path`` atomically (a temp file beside it, then os.replace; ATT-E064 if
    that fails); returns the bytes written.  Refusing to overwrite an input is the caller's job."""
    page = explorer_html(data).encode("utf-8")
    try:
        atomic_write(Path(path), lambda stream: stream.write(page))
    except OSError as exc:      # atomic_write lets the temp file's own failure (a missing folder) through
        raise input_error("ATT-E064", f"cannot write {path}: {exc.strerror or exc}",
                          hint="check that the folder exists and is writable") from None
    return len(page)


def explorer_iframe(data: Union[ExplorerData, Mapping[str, Any]], height: int = 1100) -> str:
    """The explorer as an HTML fragment for Jupyter (``_repr_html_``): a sandboxed iframe whose
    ``srcdoc`` is the whole page, so its scripts run even where the notebook strips <script>
    from outputs; still offline (the page's CSP travels with it)."""
    page = explorer_html(data)
    return (f'<iframe class="attntrace-explorer" title="attntrace explorer" sandbox="allow-scripts" '
            f'style="width:100%;height:{int(height)}px;border:0" srcdoc="{html.escape(page, quote=True)}"></iframe>')
