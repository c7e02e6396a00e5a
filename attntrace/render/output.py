"""Consoles, JSON printing and error reports shared by every command."""
from __future__ import annotations

import math
import os
import sys
from typing import Any, List, Optional

import numpy as np


def make_console(width: Optional[int] = None, stderr: bool = False, record: bool = False):
    """A rich console that prints plain text when NO_COLOR is set or output is not a terminal.
    No emoji codes: a token or a file name such as ":cat:" is printed as written (and rich's
    table of emoji codes is not loaded)."""
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    plain = bool(os.environ.get("NO_COLOR")) or not stream.isatty()
    return Console(file=stream, width=width or (None if stream.isatty() else redirected_width()), no_color=plain,
                   color_system=None if plain and not record else "auto", highlight=False, emoji=False,
                   soft_wrap=False, record=record, force_terminal=True if record else None)


def redirected_width() -> int:
    """The width of output that goes to a file or a pipe: COLUMNS when set (as `COLUMNS=200 cmd > f`), else 120."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    return columns if columns >= 40 else 120


def jsonable(value: Any) -> Any:
    """Numbers and arrays as JSON: NaN and infinities become the strings "nan", "inf", "-inf"."""
    if isinstance(value, np.ndarray):
        if value.dtype == bool:
            return value.tolist()
        return jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def print_json(document: Any) -> None:
    import json  # only --format json prints it (~3 ms of every start otherwise)
    sys.stdout.write(json.dumps(jsonable(document), ensure_ascii=False, indent=2) + "\n")


def report_errors(diagnoses: List, fmt: str, exit_code: int) -> None:
    if fmt == "json":
        print_json({"exit_code": exit_code, "diagnoses": [d.to_json() for d in diagnoses]})
        return
    from attntrace.render.diagnosis import render_diagnoses
    console = make_console(stderr=True)
    render_diagnoses(console, diagnoses)
