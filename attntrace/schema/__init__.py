"""The JSON Schema (draft 2020-12) of every document attntrace prints with ``--format json``.

The schema is package data (``output.schema.json`` beside this file): one ``$defs`` entry per
kind of document (trace, error, explain flow, bugs, mask, positions, hooks, expectations,
capture, diff, grad, heads, import-model) and a top-level ``oneOf`` that accepts exactly these.

    >>> import jsonschema
    >>> from attntrace.schema import load_schema
    >>> jsonschema.Draft202012Validator(load_schema()).validate(document)

Reading it needs only the standard library; validating needs the ``jsonschema`` package.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any, Dict

SCHEMA_FILE = "output.schema.json"


def load_schema() -> Dict[str, Any]:
    """The schema as a dict (a fresh copy on every call, so a caller may change it)."""
    text = resources.files(__name__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


__all__ = ["SCHEMA_FILE", "load_schema"]
