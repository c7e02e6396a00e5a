"""Safe YAML loading that remembers where every value came from.

The document is composed into nodes once (with libyaml when present) and then
constructed with the *safe* constructor, so no arbitrary Python object can be
built.  The node tree is kept: :meth:`Document.locate` walks it on demand to
turn a YAML path such as ``("attention", "W_q", 1)`` into file, line and
column, so every message can point at the line the user edits.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from attntrace.errors import Location, input_error


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """The safe loader, reading 1e9 and -1e-9 as numbers (YAML 1.2) as well as 1.0e+9:
    PyYAML's YAML 1.1 rules read `-1e9`, the usual additive mask value, as text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))

PathKey = Union[str, int]


def format_path(path: Sequence[PathKey]) -> str:
    """("attention", "W_q", 1, 2) -> "attention.W_q[1][2]"."""
    out = ""
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out += f".{key}" if out else str(key)
    return out or "<document>"


class Document:
    """A loaded YAML document: plain data plus its node tree for locations."""

    def __init__(self, data: Any, root: Optional[yaml.Node], file: Optional[str]):
        self.data = data
        self.root = root
        self.file = file

    def node_at(self, path: Sequence[PathKey], exact: bool = False) -> Optional[yaml.Node]:
        """The node at ``path``; the deepest one found along it unless ``exact``."""
        node = self.root
        for key in path:
            child = _child(node, key)
            if child is None:
                return None if exact else node
            node = child
        return node

    def locate(self, path: Sequence[PathKey]) -> Location:
        node = self.node_at(path)
        line = col = None
        if node is not None:
            line, col = node.start_mark.line + 1, node.start_mark.column + 1
        return Location(self.file, line, col, format_path(path))

    def scalar_text(self, path: Sequence[PathKey]) -> Optional[str]:
        """The source text of a scalar (e.g. a token written as `no`, not False)."""
        node = self.node_at(path, exact=True)
        return node.value if isinstance(node, yaml.ScalarNode) else None


def _child(node: Optional[yaml.Node], key: PathKey) -> Optional[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(key):
                return value_node
    elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
        if 0 <= key < len(node.value):
            return node.value[key]
    return None


def _check_duplicate_keys(node: Optional[yaml.Node], file: Optional[str], path: list) -> None:
    """PyYAML silently keeps the last of two equal keys; a spec must not."""
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                loc = Location(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                               format_path(path + [key]))
                raise input_error(
                    "ATT-E012", f"key '{key}' appears twice (first on line {seen[key]})", loc,
                    hint="remove one of them; YAML would silently keep only the last")
            if key is not None:
                seen[key] = key_node.start_mark.line + 1
            _check_duplicate_keys(value_node, file, path + [key])
    elif isinstance(node, yaml.SequenceNode):
        # sequences of scalars (numbers) cannot hold mappings: skip the walk
        for i, item in enumerate(node.value):
            if not isinstance(item, yaml.ScalarNode):
                _check_duplicate_keys(item, file, path + [i])


def load_text(text: str, file: Optional[str] = None) -> Document:
    """Parse YAML text safely; raise InputError (exit 2) with a location on failure."""
    if not text.strip():
        raise input_error("ATT-E008", "the spec is empty", Location(file, 1, 1, ""),
                          hint="a spec needs at least `version: 1`, `tokens:` and `attention:`; "
                               "run `attntrace run` with no file to see a built-in example")
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        _check_duplicate_keys(root, file, [])
        data = loader.construct_document(root) if root is not None else None
    except yaml.constructor.ConstructorError as exc:
        raise input_error("ATT-E011", f"YAML construct not allowed: {exc.problem}",
                          _mark_location(exc, file),
                          hint="attntrace loads YAML safely: plain lists, numbers and strings only") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        message = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
        raise input_error("ATT-E001", message, _mark_location(exc, file),
                          hint="check brackets, indentation and the ':' after each key") from None
    finally:
        loader.dispose()
    if data is None:
        raise input_error("ATT-E008", "the spec is empty: it holds only comments or `---`",
                          Location(file, 1, 1, ""))
    return Document(data, root, file)


def load_file(path: Union[str, Path]) -> Document:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise input_error("ATT-E007", f"spec file not found: {path}") from None
    except IsADirectoryError:
        raise input_error("ATT-E007", f"spec path is a directory, not a file: {path}") from None
    except OSError as exc:
        raise input_error("ATT-E007", f"cannot read spec file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise input_error("ATT-E001", f"spec is not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})",
                          Location(str(path), None, None, "")) from None
    return load_text(text, str(path))


def _mark_location(exc: yaml.YAMLError, file: Optional[str]) -> Location:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return Location(file, None, None, "")
    return Location(file, mark.line + 1, mark.column + 1, "")
