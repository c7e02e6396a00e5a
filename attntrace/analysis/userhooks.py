"""`--hook-file my_hooks.py`: hooks written in Python by the user.

Importing a file runs its code, so this happens only when asked for by name
on the command line (a spec can never pull one in).  The convention:

    # my_hooks.py
    import numpy as np

    def flatten(pattern, *, hook):          # fn(array, *, hook) -> array | None
        return np.full_like(pattern, 1 / pattern.shape[-1])

    HOOKS = [("attn.hook_pattern", flatten)]      # or {"attn.hook_pattern": flatten}

Names may be aliases or patterns (``attn.hook_*``).  Errors in the file, and
exceptions its hooks raise, are reported with the file and line (exit 2).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import List, Tuple

from attntrace.core.hooks import HookFn
from attntrace.errors import InputError, input_error
from attntrace.hookpoints import match_hooks

EXAMPLE = 'HOOKS = [("attn.hook_pattern", my_fn)]   # my_fn(array, *, hook) -> array | None'


def load_hook_file(path) -> List[Tuple[str, HookFn]]:
    """Import `path` and return its HOOKS as (hook name or pattern, fn) pairs."""
    path = Path(path)
    if not path.is_file():
        raise input_error("ATT-E063", f"--hook-file {path}: file not found")
    if path.suffix != ".py":
        raise input_error("ATT-E063", f"--hook-file {path}: expected a Python file (.py)")
    module = _import(path)
    if not hasattr(module, "HOOKS"):
        raise input_error("ATT-E063", f"{path.name} defines no HOOKS", hint=f"add at module level: {EXAMPLE}")
    raw = module.HOOKS
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    if not isinstance(pairs, (list, tuple)):
        raise input_error("ATT-E063", f"{path.name}: HOOKS must be a list of (hook name, function) pairs "
                                      "or a dict", hint=EXAMPLE)
    hooks = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise input_error("ATT-E063", f"{path.name}: HOOKS[{i}] is not a (hook name, function) pair",
                              hint=EXAMPLE)
        name, fn = pair
        if not callable(fn):
            raise input_error("ATT-E063", f"{path.name}: the hook for '{name}' is not a function", hint=EXAMPLE)
        try:
            match_hooks(name, None)
        except InputError as exc:     # a did-you-mean error: say which file it came from
            raise exc.prefixed(path.name) from None
        hooks.append((name, _reported(fn, name, path)))
    return hooks


def _import(path: Path):
    module_name = f"attntrace_user_hooks_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise input_error("ATT-E063", f"{path.name} line {exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:   # the user's code: report it, never a traceback
        raise input_error("ATT-E063", f"{path.name} failed to import: {type(exc).__name__}: {exc}"
                                      f"{_line_in(path, exc)}") from None
    finally:
        sys.modules.pop(module_name, None)
    return module


def _line_in(path: Path, exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f" (line {frames[-1].lineno})" if frames else ""


def _reported(fn: HookFn, name: str, path: Path) -> HookFn:
    """Turn an exception raised by a user hook into a message naming the hook, file and line."""
    @functools.wraps(fn)
    def call(array, *, hook):
        try:
            return fn(array, hook=hook)
        except Exception as exc:
            from attntrace.errors import AttnTraceError
            if isinstance(exc, AttnTraceError):
                raise
            raise input_error("ATT-E063", f"hook {getattr(fn, '__name__', name)!r} from {path.name} raised "
                                          f"{type(exc).__name__}: {exc}{_line_in(path, exc)} at {hook.name}",
                              hint="the hook is called as fn(array, *, hook) and returns an array or None"
                              ) from None
    return call
