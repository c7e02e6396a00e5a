"""Safe YAML loading that remembers where every value came from.

The document is composed into nodes once (with libyaml when present) and then
constructed with the *safe* constructor, so no arbitrary Python object can be
built.  The node tree is kept: :meth:`Document.locate` walks it on demand to
turn a YAML path such as ``("attention", "W_q", 1)`` into file, line and
column, so every message can point at the line the user edits.

Before anything is constructed the node graph is measured (:func:`check_budget`):
aliases let a few lines stand for billions of values ("billion laughs") or for a
list that contains itself, and every later walk of the data would expand them.
A document that refers to itself, nests deeper than :data:`MAX_DEPTH` or expands
to more than :data:`MAX_EXPANDED_NODES` beyond what is written is refused
(ATT-E018).  Integers too large for a float64 are refused where they are read
(ATT-E019): Python would need seconds to parse 10⁶ digits, and numpy cannot hold them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from attntrace.errors import Location, input_error

MAX_DEPTH = 64                      # a spec nests ~10 deep (blocks[0].attention.mask.matrix[b][q][k])
MAX_EXPANDED_NODES = 1_000_000      # values aliases may add beyond the ones written out
LARGEST_FLOAT_INT = 2 ** 1024       # integers from here on have no float64 (numpy raises OverflowError)
MAX_INT_DIGITS = 400                # longer integers are refused before Python parses them


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """The safe loader, reading 1e9 and -1e-9 as numbers (YAML 1.2) as well as 1.0e+9:
    PyYAML's YAML 1.1 rules read `-1e9`, the usual additive mask value, as text."""

    def construct_yaml_int(self, node):
        """An integer, unless it is too large for a float64 (or for Python to parse quickly)."""
        digits = node.value.lstrip("+-").replace("_", "").lstrip("0")
        value = None if len(digits) > MAX_INT_DIGITS else self._number(super().construct_yaml_int, node, "an integer")
        if value is None or abs(value) >= LARGEST_FLOAT_INT:
            raise input_error("ATT-E019", f"the integer {_abbreviated(node.value)} is too large to represent "
                                          f"(a float64 holds up to about 1.8e308)", self._location(node),
                              hint="write a smaller number; quote it (\"...\") if it is meant as text")
        return value

    def construct_yaml_float(self, node):
        try:                        # the common spelling (1.5, -2e-3) at C speed: inline matrices hold 10⁵ of them
            return float(node.value)
        except ValueError:          # .inf, 1:30 (sexagesimal), a !!float tag on a non-number
            return self._number(super().construct_yaml_float, node, "a number")

    def _number(self, construct, node, what: str):
        """A scalar tagged !!int or !!float that is no such number (`!!int 1.5`) is a clean error."""
        try:
            return construct(node)
        except (ValueError, TypeError, OverflowError):
            raise input_error("ATT-E005", f"{_abbreviated(node.value)!r} is tagged as {what} but is not one",
                              self._location(node), hint="remove the !!int / !!float tag, or fix the value") from None

    def _location(self, node) -> Location:
        return Location(self._file, node.start_mark.line + 1, node.start_mark.column + 1, "")


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
_Loader._file = None


def _abbreviated(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:10]}…{text[-6:]} ({len(text):,} characters)"


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


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _only_scalars(nodes: list) -> bool:
    """True for a row of plain values (an inline matrix row): checked per row, not per value."""
    return set(map(type, nodes)) <= {yaml.ScalarNode}


def _node_location(node: yaml.Node, file: Optional[str]) -> Location:
    return Location(file, node.start_mark.line + 1, node.start_mark.column + 1, "")


def check_budget(root: Optional[yaml.Node], file: Optional[str] = None) -> None:
    """Refuse (ATT-E018) a node graph that contains itself, nests deeper than MAX_DEPTH, or whose
    aliases expand it by more than MAX_EXPANDED_NODES values -- before anything walks or builds it.

    One iterative pass over the distinct nodes: the expanded size and depth of a node are computed
    from its children's, so a bomb of 10⁹ expanded values costs a few thousand steps."""
    if root is None:
        return
    size: dict = {}             # id(node) -> values it stands for once aliases are expanded
    depth: dict = {}
    shared: dict = {}           # id(node) -> (node, times it is reached): aliases point at these
    scalars = set()             # ids of the scalars in rows of plain values, counted row by row
    visiting = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            children = _children(node)
            visiting.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)      # exact: Python ints do not overflow
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if depth[key] > MAX_DEPTH:
                raise input_error("ATT-E018", f"the YAML nests deeper than {MAX_DEPTH} levels",
                                  _node_location(node, file),
                                  hint="a spec needs about ten levels (blocks, attention, mask, matrix rows)")
            continue
        if key in size:
            node_seen, count = shared.get(key, (node, 1))
            shared[key] = (node_seen, count + 1)
            continue
        if key in visiting:
            raise input_error("ATT-E018", "the YAML refers to itself: an alias (*name) inside the value its "
                                          "anchor (&name) marks makes it infinitely deep", _node_location(node, file),
                              hint="an alias may repeat a value written before it, not the value it is part of")
        children = _children(node)
        if children and _only_scalars(children):
            scalars.update(map(id, children))
            size[key], depth[key] = 1 + len(children), 2
            continue
        visiting.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children)
    extra = size[id(root)] - len(size) - len(scalars)
    if extra > MAX_EXPANDED_NODES:
        biggest = max(shared.values(), key=lambda item: size[id(item[0])] * (item[1] - 1),
                      default=(root, 1))[0]
        raise input_error("ATT-E018", f"aliases expand this YAML by more than {MAX_EXPANDED_NODES:,} values "
                                      f"(it writes out {len(size):,})", _node_location(biggest, file),
                          hint="each *alias repeats its whole anchored value; an alias of aliases multiplies "
                               "(a \"billion laughs\" document). Write the values out, or load arrays from files")


def check_data(data: Any, file: Optional[str] = None) -> None:
    """The same budget for plain data handed to the API (dicts and lists may contain themselves)."""
    stack = [(data, 1, ())]         # (value, depth, ids of the containers on its path)
    count = 0
    while stack:
        value, level, ancestors = stack.pop()
        if not isinstance(value, (dict, list, tuple)):
            continue
        if id(value) in ancestors:
            raise input_error("ATT-E018", "the spec contains itself (a list or mapping inside its own value)",
                              Location(file, None, None, ""),
                              hint="build the spec from fresh lists; a value may be shared, not nested in itself")
        if level > MAX_DEPTH:
            raise input_error("ATT-E018", f"the spec nests deeper than {MAX_DEPTH} levels",
                              Location(file, None, None, ""))
        items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else list(value)
        count += len(items)
        if count > MAX_EXPANDED_NODES * 4:
            raise input_error("ATT-E018", f"the spec holds more than {MAX_EXPANDED_NODES * 4:,} nested values",
                              Location(file, None, None, ""),
                              hint="pass big arrays as numpy arrays, not nested lists")
        inner = ancestors + (id(value),)
        stack.extend((item, level + 1, inner) for item in items if isinstance(item, (dict, list, tuple)))


def _check_duplicate_keys(root: Optional[yaml.Node], file: Optional[str]) -> None:
    """PyYAML silently keeps the last of two equal keys; a spec must not.  Each distinct node is
    checked once (aliases share nodes: walking the expanded graph could take forever)."""
    for node, path in distinct_nodes(root):
        if not isinstance(node, yaml.MappingNode):
            continue
        seen = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                loc = Location(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                               format_path(path + [key]))
                raise input_error(
                    "ATT-E012", f"key '{key}' appears twice (first on line {seen[key]})", loc,
                    hint="remove one of them; YAML would silently keep only the last")
            if key is not None:
                seen[key] = key_node.start_mark.line + 1


def distinct_nodes(root: Optional[yaml.Node]):
    """Every distinct collection node once, with the YAML path it is first reached by."""
    if root is None:
        return
    visited = set()
    stack = [(root, [])]
    while stack:
        node, path = stack.pop()
        if id(node) in visited or isinstance(node, yaml.ScalarNode):
            continue
        visited.add(id(node))
        yield node, path
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in reversed(node.value):
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                stack.append((value_node, path + [key]))
        elif not _only_scalars(node.value):
            stack.extend((item, path + [i]) for i, item in reversed(list(enumerate(node.value))))


def load_text(text: str, file: Optional[str] = None) -> Document:
    """Parse YAML text safely; raise InputError (exit 2) with a location on failure."""
    if not text.strip():
        raise input_error("ATT-E008", "the spec is empty", Location(file, 1, 1, ""),
                          hint="a spec needs at least `version: 1`, `tokens:` and `attention:`; "
                               "run `attntrace run` with no file to see a built-in example")
    loader = _Loader(text)
    loader._file = file
    try:
        root = loader.get_single_node()
        check_budget(root, file)
        _check_duplicate_keys(root, file)
        data = loader.construct_document(root) if root is not None else None
    except (ValueError, TypeError, OverflowError) as exc:     # a tagged value PyYAML cannot build
        raise input_error("ATT-E001", f"a YAML value cannot be built: {type(exc).__name__}: {str(exc)[:120]}",
                          Location(file, None, None, ""),
                          hint="check the value's !!tag, or remove the tag") from None
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
