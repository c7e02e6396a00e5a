"""A big array inside a JSON document: ``{"encoding": "base64", "dtype", "shape", "data"}``.

`run --export trace.json` writes arrays of more than a million values this way (the raw
little-endian bytes, base64): as text numbers, the weights of a 2,048-token, 12-head trace
alone would be about a gigabyte of JSON.  Reading one back with numpy::

    np.frombuffer(base64.b64decode(v["data"]), dtype=v["dtype"]).reshape(v["shape"])

:func:`unpack` does that with the checks a file from elsewhere needs.
"""
from __future__ import annotations

import base64
import binascii
import math
from typing import Any, Dict

import numpy as np

ENCODING = "base64"
NUMERIC_KINDS = "biuf"          # bool, integers, floats: what a trace holds


def packed_header(array: np.ndarray) -> Dict[str, Any]:
    """Everything but the data, for a writer that streams the bytes after it."""
    return {"encoding": ENCODING, "dtype": little_endian(array.dtype).str, "shape": list(array.shape)}


def little_endian(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def is_packed(value: Any) -> bool:
    return isinstance(value, dict) and value.get("encoding") == ENCODING


def unpack(value: Dict[str, Any]) -> np.ndarray:
    """The array a packed value holds; ValueError when it is not a well-formed packed array."""
    try:
        dtype = np.dtype(value["dtype"])
        shape = tuple(value["shape"])
        data = value["data"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"a packed array needs dtype, shape and data ({exc})") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
        raise ValueError(f"a packed array of dtype {dtype} is not real numbers")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"a packed array's shape must be whole numbers ≥ 0, got {value['shape']!r}")
    if not isinstance(data, str):
        raise ValueError("a packed array's data must be base64 text")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"a packed array's data is not base64 ({exc})") from None
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"a packed array of shape {list(shape)} and dtype {dtype} needs {expected} bytes, "
                         f"its data holds {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
