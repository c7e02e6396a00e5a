"""Diagnoses and the exceptions that carry them.

Every problem attntrace reports -- a YAML typo, a shape conflict, a failed
invariant -- is a :class:`Diagnosis`: plain data that the rich renderer turns
into a panel and the JSON renderer into an object.  Exceptions only carry
diagnoses to the CLI, which maps them to exit codes:

    0 success · 1 a check or expectation failed · 2 bad input or usage · 3 shape error
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from attntrace.codes import CODES

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SHAPE_ERROR = 3


@dataclass(frozen=True)
class Location:
    """Where a value came from: file, 1-based line and column, and YAML path."""

    file: Optional[str]
    line: Optional[int]
    column: Optional[int]
    path: str = ""

    def __str__(self) -> str:
        where = self.file or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where} ({self.path})" if self.path else where

    def to_json(self) -> Dict[str, Any]:
        return {"file": self.file, "line": self.line, "column": self.column, "path": self.path}


@dataclass
class Operand:
    """One array taking part in a step, as a diagnosis shows it."""

    name: str
    shape: Sequence[int]
    axes: Sequence[str] = ()
    origin: str = ""                      # e.g. "X(4×6) @ W_q(6×6) → split heads"
    location: Optional[Location] = None
    conflict_axis: Optional[int] = None   # index into shape of the offending axis

    def to_json(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "shape": [int(s) for s in self.shape],
            "axes": list(self.axes),
            "origin": self.origin,
            "location": self.location.to_json() if self.location else None,
            "conflict_axis": self.conflict_axis,
        }


@dataclass
class Diagnosis:
    """A finding: an error (input or shape) or a warning (an invariant check)."""

    code: str                       # ATT-E0xx input, ATT-E1xx shape, ATT-W2xx invariant
    message: str
    severity: str = "error"         # "error" | "warning" | "info" (a note: never a failure)
    step: Optional[str] = None      # e.g. "4/12 'scores = Q·Kᵀ'"
    hook: Optional[str] = None
    head: Optional[int] = None
    rule: Optional[str] = None      # the step's shape rule in symbols
    operands: List[Operand] = field(default_factory=list)
    bindings: List[str] = field(default_factory=list)   # "d_model=6 from embeddings, spec.yaml:8"
    locations: List[Location] = field(default_factory=list)
    fixes: List[str] = field(default_factory=list)      # only fixes verified to work
    details: List[str] = field(default_factory=list)    # extra lines: arithmetic, alignment
    hint: Optional[str] = None

    def __post_init__(self) -> None:
        if self.code not in CODES:      # a code nobody registered is a bug in attntrace, not bad input
            raise ValueError(f"diagnosis code {self.code} is not registered in attntrace.codes")

    def text(self) -> str:
        """One plain line: code, message, and the hint after a semicolon."""
        where = f" [{self.locations[0]}]" if self.locations else ""
        return f"{self.code} {self.message}{where}" + (f"; {self.hint}" if self.hint else "")

    def to_json(self) -> Dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "step": self.step,
            "hook": self.hook,
            "head": self.head,
            "message": self.message,
            "rule": self.rule,
            "operands": [o.to_json() for o in self.operands],
            "bindings": list(self.bindings),
            "locations": [loc.to_json() for loc in self.locations],
            "fixes": list(self.fixes),
            "details": list(self.details),
            "hint": self.hint,
        }


class AttnTraceError(Exception):
    """Base for every error attntrace reports without a traceback."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, diagnoses: Diagnosis | List[Diagnosis]):
        self.diagnoses = diagnoses if isinstance(diagnoses, list) else [diagnoses]
        # str(exc) is what a notebook shows: the code, where, and the hint ("did you mean ...")
        super().__init__(self.diagnoses[0].text())

    @property
    def diagnosis(self) -> Diagnosis:
        return self.diagnoses[0]


class InputError(AttnTraceError):
    """Bad input or usage: malformed YAML, wrong types, missing files (exit 2)."""

    exit_code = EXIT_BAD_INPUT

    def prefixed(self, text: str) -> InputError:
        """The same error, its message prefixed with where it was written (a hook, a file)."""
        d = self.diagnosis
        return input_error(d.code, f"{text}: {d.message}", d.locations[0] if d.locations else None, hint=d.hint)


class ShapeError(AttnTraceError):
    """A shape conflict diagnosed against the plan (exit 3)."""

    exit_code = EXIT_SHAPE_ERROR


def input_error(code: str, message: str, location: Optional[Location] = None,
                hint: Optional[str] = None) -> InputError:
    """Shorthand for the common one-location input error."""
    return InputError(Diagnosis(code=code, message=message,
                                locations=[location] if location else [], hint=hint))
