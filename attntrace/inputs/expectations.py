"""Reading `expect:`: the values a hand calculation wrote down, and which part of a hook they cover.

Under ``expect:`` each key is a hook name or an alias (Q, K, V, qk, scaled,
weights, output ...), written as a whole array, a partial mapping (row, col,
cell, head, batch) or a list of those; :mod:`attntrace.analysis.expect`
compares them with a trace.  This module only reads and validates them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from attntrace.errors import Location, input_error
from attntrace.inputs.sources import SOURCE_KINDS, Array, nested_shape

SELECT_KEYS = ("batch", "head", "row", "col", "cell")
VALUE_KEYS = ("values", "value")
TOLERANCE_KEYS = ("tolerance", "atol", "rtol", "decimals")
INFINITIES = {"inf": np.inf, "+inf": np.inf, "∞": np.inf, "-inf": -np.inf, "−inf": -np.inf,
              "-∞": -np.inf, "−∞": -np.inf}


@dataclass
class Expectation:
    hook: str                 # resolved hook name (aliases expanded)
    written_as: str           # what the user wrote (alias or hook)
    expected: Array
    select: Dict[str, Any] = field(default_factory=dict)   # partial: batch/head/row/col (see attntrace.expect)
    tolerance: Optional[Dict[str, float]] = None           # this entry's own atol/rtol/decimals
    path: List[Any] = field(default_factory=list)          # YAML path of the written values


@dataclass(frozen=True)
class Coordinate:
    """One selector of a partial expectation (an index or a token) and where it was written."""

    value: Any
    location: Optional[Location] = None


def read_expectations(reader, hook: str, written: str, value: Any, path: List) -> List[Expectation]:
    """The expectations one `expect:` key holds: a whole array, a partial mapping, or a list of those."""
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return [_partial(reader, hook, written, item, path + [i]) for i, item in enumerate(value)]
    if isinstance(value, dict) and not any(key in SOURCE_KINDS for key in value):
        return [_partial(reader, hook, written, value, path)]
    return [Expectation(hook, written, _values(reader, value, path, written), path=list(path))]


def _partial(reader, hook: str, written: str, block: Dict, path: List) -> Expectation:
    reader.check_keys(block, SELECT_KEYS + VALUE_KEYS + TOLERANCE_KEYS, path, f"expect.{written}")
    given = [key for key in VALUE_KEYS if key in block]
    if len(given) != 1:
        raise input_error("ATT-E066", f"expect.{written} needs `values:` (or `value:` for one cell)",
                          reader.locate(path), hint="e.g. {row: 2, values: [0.1, 0.2, 0.7]} or "
                                                    "{cell: [0, 2], value: 0.33}")
    select: Dict[str, Coordinate] = {}
    for key in ("batch", "head", "row", "col"):
        if key in block:
            select[key] = _coordinate(reader, block[key], path + [key], key)
    if "cell" in block:
        cell = block["cell"]
        if "row" in block or "col" in block or not (isinstance(cell, list) and len(cell) == 2):
            raise input_error("ATT-E066", f"expect.{written}.cell is [row, column] (and replaces row:/col:)",
                              reader.locate(path + ["cell"]), hint="e.g. cell: [0, 2] or cell: [B, C]")
        select["row"] = _coordinate(reader, cell[0], path + ["cell", 0], "row")
        select["col"] = _coordinate(reader, cell[1], path + ["cell", 1], "column")
    tolerance = None
    for key in TOLERANCE_KEYS:
        if key in block:
            tolerance = dict(tolerance or {}, **reader.tolerance(key, block[key], path + [key]))
    values_path = path + [given[0]]
    return Expectation(hook, written, _values(reader, block[given[0]], values_path, written),
                       select=select, tolerance=tolerance, path=values_path)


def _coordinate(reader, value: Any, path: List, what: str) -> Coordinate:
    if isinstance(value, bool) or not (isinstance(value, str) or (isinstance(value, int) and value >= 0)):
        raise input_error("ATT-E066", f"{what} must be an index from 0 or a token, got {value!r}",
                          reader.locate(path))
    text = reader.doc.scalar_text(path) if isinstance(value, str) else None
    return Coordinate(text or value, reader.locate(path))


def _values(reader, value: Any, path: List, name: str) -> Array:
    """Written values: numbers or nested lists (±inf allowed, as `-.inf` or "-inf"), or an array source."""
    if isinstance(value, dict):
        return reader.array(value, path, name)
    value = _infinities(value)
    if isinstance(value, bool) or not isinstance(value, (list, int, float)):
        raise input_error("ATT-E066", f"expect.{name} needs numbers: a matrix, a row, or one value",
                          reader.locate(path), hint="e.g. [[1, 0], [0, 1]] or {row: 0, values: [0.5, 0.5]}")
    if isinstance(value, list):
        shape = nested_shape(value, reader.ctx, list(path), True)
        if 0 in shape:
            raise input_error("ATT-E066", f"expect.{name} is empty", reader.locate(path))
    data = np.array(value, dtype=np.float64)
    if np.isnan(data).any():
        raise input_error("ATT-E066", f"expect.{name} holds NaN, which never equals anything",
                          reader.locate(path))
    return Array(name, data, reader.locate(path))


def _infinities(value: Any) -> Any:
    if isinstance(value, list):
        return [_infinities(v) for v in value]
    if isinstance(value, str) and value.strip() in INFINITIES:
        return INFINITIES[value.strip()]
    return value
